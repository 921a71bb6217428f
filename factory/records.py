"""The canonical record: one LLM invocation, whatever log format it came from.

This is the one place the schema is defined. Every stage reads and writes
`Record`; on disk records are Parquet rows with the nested parts (messages,
tools, tool calls, usage, metadata) stored as JSON strings so the Parquet schema
stays flat and stable across log formats.

Fields
------
id            content hash of (messages, tools, output): identical calls share it
source        log format the record came from ("openai", "openai_ft", ...)
location      "<file>:<line>" it was read from
source_id     the log's own id for the call, if it had one
timestamp     ISO-8601 string, "" when the log had none
agent         agent / application name
step          step, span or run name inside the agent
session_id    session / conversation / trace id ("" when unknown)
model         the model that answered (the teacher)
messages      the request's chat messages (OpenAI shape)
tools         the request's tool schemas (OpenAI shape)
output_text   the assistant's text output (None when it only called tools)
output_tool_calls  [{"name": str, "arguments": dict}] (arguments decoded)
usage         {"prompt_tokens": int, "completion_tokens": int}
latency_ms    float | None
cost          float | None (USD)
outcome       "ok" or "error"
feedback      user/evaluator score in [-1, 1] or None
metadata      any other fields the log carried (JSON-safe)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pyarrow as pa

JSON_FIELDS = ("messages", "tools", "output_tool_calls", "usage", "metadata")


@dataclass
class Record:
    id: str
    source: str
    location: str
    messages: list[dict[str, Any]]
    source_id: str = ""
    timestamp: str = ""
    agent: str = ""
    step: str = ""
    session_id: str = ""
    model: str = ""
    tools: list[dict[str, Any]] = field(default_factory=list)
    output_text: str | None = None
    output_tool_calls: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    latency_ms: float | None = None
    cost: float | None = None
    outcome: str = "ok"
    feedback: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> dict[str, Any]:
        """The output as an assistant message: {"content": str|None, "tool_calls": [...]}."""
        return {"content": self.output_text, "tool_calls": self.output_tool_calls}

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        for name in JSON_FIELDS:
            row[name] = json.dumps(row[name], ensure_ascii=False, sort_keys=True)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Record:
        kwargs = dict(row)
        for name in JSON_FIELDS:
            kwargs[name] = json.loads(kwargs[name])
        return cls(**kwargs)


def content_id(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    output_text: str | None,
    output_tool_calls: list[dict[str, Any]],
) -> str:
    """Stable content hash: the same call logged twice gets the same id."""
    blob = json.dumps([messages, tools, output_text, output_tool_calls], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


_ARROW_TYPES = {
    "latency_ms": pa.float64(),
    "cost": pa.float64(),
    "feedback": pa.float64(),
}
SCHEMA = pa.schema([pa.field(f.name, _ARROW_TYPES.get(f.name, pa.string())) for f in fields(Record)])


def to_table(records: list[Record]) -> pa.Table:
    return pa.Table.from_pylist([r.to_row() for r in records], schema=SCHEMA)


def from_table(table: pa.Table) -> list[Record]:
    return [Record.from_row(row) for row in table.to_pylist()]
