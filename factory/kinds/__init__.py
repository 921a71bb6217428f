"""Task kinds: one class per kind (one file each), one registry. Mining, evaluation, serving and the
CLI ask the registry; adding a kind is a file and a line in `KINDS`.

| kind            | the answer                      | score                               |
|-----------------|---------------------------------|-------------------------------------|
| tool_call       | tool calls, always              | BFCL-style call match               |
| agent_turn      | a tool call or a text reply     | action type, then call match/ROUGE-L|
| json_extraction | a JSON object                   | field-level F1                      |
| classification  | one of a few short labels       | exact label (case-insensitive)      |
| free_text       | any text                        | ROUGE-L                             |

`infer` tries the kinds in the order of `KINDS`; free_text takes whatever is left.
"""

from __future__ import annotations

from typing import Any

from factory.errors import FactoryError
from factory.kinds.agent_turn import AgentTurn
from factory.kinds.base import Kind, Output, Tools
from factory.kinds.classification import Classification
from factory.kinds.free_text import FreeText
from factory.kinds.json_extraction import JsonExtraction
from factory.kinds.tool_call import ToolCall
from factory.records import Record

KINDS: dict[str, Kind] = {k.name: k for k in (ToolCall(), AgentTurn(), JsonExtraction(), Classification(), FreeText())}

__all__ = ["KINDS", "Kind", "Output", "Tools", "get", "infer"]


def get(name: str) -> Kind:
    """The kind called `name`; raises FactoryError naming the known kinds."""
    try:
        return KINDS[name]
    except KeyError:
        raise FactoryError(f"unknown task kind {name!r}; expected one of {', '.join(KINDS)}") from None


def infer(records: list[Record], max_labels: int) -> tuple[str, dict[str, Any]]:
    """(kind, output schema) of a task from its outputs: the first kind in `KINDS` that claims them."""
    for kind in KINDS.values():
        schema = kind.infer(records, max_labels)
        if schema is not None:
            return kind.name, schema
    raise FactoryError("no task kind claims these outputs")
