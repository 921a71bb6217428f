"""What every task kind answers: is a task of this kind, is an answer usable, how good is it."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from factory.metrics import mean
from factory.records import Record

Output = dict[str, Any]  # {"content": str | None, "tool_calls": [{"name": str, "arguments": dict}]}
Tools = list[dict[str, Any]]
Embed = Callable[[list[str]], np.ndarray]
ANSWER, REPLY, CALL = "answer", "reply", "call"  # actions; a call to tool T is f"call:{T}"


class Kind(ABC):
    """One task kind. Subclasses set `name` and override what differs; instances hold no state.

    `tools` arguments are the tools the request offered (OpenAI function tools): a task whose
    calls offer different tool lists is judged against each call's own list, and against
    the schema's tools (those the task was seen calling) when a request has none.
    """

    name: ClassVar[str]
    score_name: ClassVar[str]  # what "score" means, for tables
    embeds: ClassVar[bool] = False  # whether `extras` wants an embedding function (free text)
    binary: ClassVar[bool] = False  # every score is 0 or 1 (the exact binomial bound applies)

    def action(self, output: Output) -> str:
        """What the answer does, for escalation per action (`evaluate.calibrate.certify_per_action`):
        one action for kinds whose answers all do the same thing."""
        return ANSWER

    def binary_action(self, action: str) -> bool:
        """Whether the scores of answers taking `action` are all 0 or 1."""
        return self.binary

    @abstractmethod
    def infer(self, records: list[Record], max_labels: int) -> dict[str, Any] | None:
        """The output schema when the task's outputs are of this kind, else None."""

    def usable(self, output: Output, schema: dict[str, Any], tools: Tools) -> bool:
        """Whether an answer can be acted on at all; unusable answers get confidence 0."""
        return bool((output.get("content") or "").strip())

    @abstractmethod
    def score(self, pred: Output, ref: Output, schema: dict[str, Any], tools: Tools) -> float:
        """Quality of one prediction against its reference, in [0, 1]."""

    def extras(self, preds: Sequence[Output], refs: Sequence[Output], schema: dict[str, Any],
               tools: Sequence[Tools], embed: Embed | None) -> dict[str, Any]:
        """Kind-specific aggregates beside the mean score."""
        return {}

    def confusion(self, preds: Sequence[Output], refs: Sequence[Output],
                  schema: dict[str, Any]) -> dict[str, Any] | None:
        """{"labels", "matrix"} (rows: reference label, columns: predicted label then "<invalid>"),
        for kinds whose answers fall into a few classes; None for the others."""
        return None

    def metrics(self, preds: Sequence[Output], refs: Sequence[Output], schema: dict[str, Any],
                tools: Sequence[Tools] | None = None, embed: Embed | None = None) -> dict[str, Any]:
        """Aggregates over a test set: "score" (the mean `score`) first, then `extras`.

        Raises ValueError on empty or unequal-length inputs.
        """
        if len(preds) != len(refs):
            raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
        if not preds:
            raise ValueError("no examples to score")
        tools = list(tools) if tools is not None else [[] for _ in preds]
        out: dict[str, Any] = {"score": mean([self.score(p, r, schema, t) for p, r, t in zip(preds, refs, tools)])}
        out.update(self.extras(preds, refs, schema, tools, embed if self.embeds else None))
        return out


def call_action(output: Output) -> str:
    """`call:<name of the first tool called>`, or `reply` for an answer that calls nothing."""
    calls = output.get("tool_calls") or []
    return f"{CALL}:{calls[0]['name']}" if calls else REPLY


def called_tools(records: list[Record], limit: int = 64) -> Tools:
    """The definitions of the tools the records called (first definition of each name, at most `limit`)."""
    names = {c["name"] for r in records for c in r.output_tool_calls}
    found: dict[str, dict[str, Any]] = {}
    for record in records:
        for tool in record.tools:
            name = tool.get("function", tool).get("name")
            if name in names and name not in found and len(found) < limit:
                found[name] = tool
    return list(found.values())


def tool_schema(schema: dict[str, Any], tools: Tools) -> dict[str, Any]:
    """The tools a call is judged against: the request's own, else the task's."""
    return {"tools": tools} if tools else schema


def json_object(text: str | None) -> dict | None:
    """`text` parsed as a JSON object, or None."""
    if not (text or "").lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text or "")
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
