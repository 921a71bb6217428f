"""Routing: which task a chat request belongs to, and whether its specialist may answer it.

Matching, cheapest first:

1. signature: the request's prompt-template fingerprint (`factory.mine.template_fingerprint`,
   the key the tasks were mined by) looked up in a dict: tens of microseconds. The tools a
   request offers are a feature, not part of the key (agents that retrieve their tools per
   request offer a different list every time). When several routes share a template (two
   agents reusing one prompt, a generic step split into tasks) the request's agent and step
   choose among them, then the overlap of the request's tool names with each task's, then
   the largest task.
2. embedding (optional): the nearest task centroid (`centroids.Centroids`) among the tasks
   whose tools fit the request's, accepted at cosine similarity >= its `min_similarity`. It runs
   only when step 1 finds nothing, so a matched request never pays for an embedding. The
   trade-off: a prompt edited enough to change its fingerprint is still served, by a
   specialist trained on the old prompt; the confidence threshold is the guard.
3. none: the request is escalated.

Decision (`decide`): the specialist answers when its answer is usable (the task kind's `usable`:
a known label, a parsable call to a known tool, schema-valid JSON, non-empty text) and its
confidence reaches the task's calibrated threshold: for tool calls and agent turns the threshold
certified for the answer's action group (the tool it calls, or a reply), else the task's one. A
null threshold (calibration found no operating point) means the task, or that action, escalates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from factory import kinds
from factory.chat import POLICY_CHANGED, ChatError
from factory.evaluate.calibrate import action_threshold
from factory.mine import template_fingerprint
from factory.records import Record
from factory.schemas import RouteEntry, field_errors

SPECIALIST, UPSTREAM = "specialist", "upstream"


@dataclass(frozen=True)
class Route:
    """One task's champion, as routes.json describes it."""

    task: str
    kind: str
    threshold: float | None
    template: str
    tools: tuple[str, ...]
    output_schema: dict[str, Any]
    base_model: str
    adapter_uri: str
    max_new_tokens: int
    dataset_version: str
    version: str = ""
    agent: str = ""
    step: str = ""
    coverage: float = 0.0
    size: int = 0
    action_thresholds: dict[str, float | None] | None = field(default=None, compare=False)
    action_groups: dict[str, str] | None = field(default=None, compare=False)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def serves(self) -> bool:
        """Whether any answer could be served: a threshold for the task or for one of its actions."""
        if self.action_thresholds is not None:
            return any(t is not None for t in self.action_thresholds.values())
        return self.threshold is not None

    def threshold_for(self, output: dict[str, Any] | None) -> float | None:
        """The threshold an answer must reach: its action group's, when the task has them."""
        action = kinds.get(self.kind).action(output) if output is not None else ""
        return action_threshold(self.threshold, self.action_thresholds, self.action_groups, action)


@dataclass(frozen=True)
class Match:
    route: Route | None
    method: str  # "signature", "embedding" or "none"
    similarity: float | None = None


@dataclass(frozen=True)
class Decision:
    served_by: str  # SPECIALIST or UPSTREAM
    # "confident", "below_threshold", "no_threshold", "unusable", "no_match"; the server adds
    # "unsupported" (n > 1), "policy_changed" (not the policy the specialist learned) and
    # "specialist_error" (generation raised, e.g. a chat template error)
    reason: str


def failure_reason(err: Exception) -> str:
    """The escalation reason of a specialist that raised `err` instead of answering: `policy_changed` for a
    request whose system prompt or tools are not the policy it learned, else `specialist_error`."""
    return POLICY_CHANGED if isinstance(err, ChatError) and err.reason == POLICY_CHANGED else "specialist_error"


class Fallback(Protocol):
    def nearest(self, messages: list[dict[str, Any]], tools: tuple[str, ...]) -> tuple[str, float] | None: ...


_MAPPED = {"task", "kind", "threshold", "signature", "output_schema", "base_model", "adapter_uri", "max_new_tokens",
           "dataset_version", "version", "coverage", "size", "action_thresholds", "action_groups"}  # the entry's keys that have a Route field


def parse_routes(data: Any, path: Path) -> dict[str, Route]:
    """Routes from the routes.json document `data` (each task a `schemas.RouteEntry`); raises
    ValueError naming the file and the dotted field."""
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, dict):
        raise ValueError(f"{path}: expected a top-level 'tasks' mapping")
    routes = {}
    for task, raw in tasks.items():
        try:
            entry = RouteEntry.model_validate(raw)
        except ValidationError as err:
            raise ValueError(field_errors(err, path, f"tasks.{task}")) from None
        sig = entry.signature
        routes[task] = Route(
            task=entry.task, kind=entry.kind, threshold=entry.threshold, template=sig.template,
            tools=tuple(sorted(sig.tools)), output_schema=entry.output_schema, base_model=entry.base_model,
            adapter_uri=entry.adapter_uri, max_new_tokens=entry.max_new_tokens,
            dataset_version=entry.dataset_version, version=entry.version, agent=sig.agent, step=sig.step,
            coverage=entry.coverage, size=entry.size, action_thresholds=entry.action_thresholds,
            action_groups=entry.action_groups, extra={k: v for k, v in raw.items() if k not in _MAPPED})
    return routes


def load_routes(path: Path) -> dict[str, Route]:
    """Read routes.json (as `registry.write_routes` writes it).

    Raises FileNotFoundError when it is missing and ValueError naming the file and the
    field when it is malformed.
    """
    if not path.exists():
        raise FileNotFoundError(f"no routing table at {path}: run `factory routes` first")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    return parse_routes(data, path)


def request_template(messages: list[dict[str, Any]]) -> str:
    """The template fingerprint of a request, exactly as mining computes it."""
    return template_fingerprint(Record(id="", source="serve", location="", messages=messages))


def tool_names(tools: list[dict[str, Any]]) -> tuple[str, ...]:
    """The sorted names of the tools a request offers."""
    return tuple(sorted(str(t.get("function", t).get("name", "")) for t in tools if isinstance(t, dict)))


def tool_overlap(a: tuple[str, ...], b: tuple[str, ...]) -> float:
    """Jaccard similarity of two tool-name sets; 1.0 when both are empty."""
    if not a and not b:
        return 1.0
    return len(set(a) & set(b)) / len(set(a) | set(b))


class Router:
    """Signature lookup with an optional embedding fallback; see the module docstring."""

    def __init__(self, routes: dict[str, Route], fallback: Fallback | None = None):
        self.routes = routes
        self.fallback = fallback
        self._index: dict[str, list[Route]] = {}
        for route in sorted(routes.values(), key=lambda r: -r.size):
            self._index.setdefault(route.template, []).append(route)

    def match(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], agent: str = "",
              step: str = "") -> Match:
        names = tool_names(tools)
        candidates = self._index.get(request_template(messages))
        if candidates:
            chosen = max(candidates, key=lambda r: (bool(agent) and (r.agent, r.step) == (agent, step),
                                                    tool_overlap(names, r.tools), r.size))
            return Match(chosen, "signature")
        if self.fallback is not None:
            nearest = self.fallback.nearest(messages, names)
            if nearest is not None:
                return Match(self.routes[nearest[0]], "embedding", nearest[1])
        return Match(None, "none")


def decide(match: Match, confidence: float | None = None, usable: bool = False,
           output: dict[str, Any] | None = None) -> Decision:
    """Who answers: the specialist only for a matched task with a usable answer confident enough
    for its action (`Route.threshold_for` the parsed `output`)."""
    route = match.route
    if route is None:
        return Decision(UPSTREAM, "no_match")
    if not route.serves:
        return Decision(UPSTREAM, "no_threshold")
    if not usable:
        return Decision(UPSTREAM, "unusable")
    threshold = route.threshold_for(output)
    if threshold is None:
        return Decision(UPSTREAM, "no_threshold")
    if confidence is None or confidence < threshold:
        return Decision(UPSTREAM, "below_threshold")
    return Decision(SPECIALIST, "confident")
