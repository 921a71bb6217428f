"""The canonical record: one LLM invocation, whatever log format it came from.

This is the one place the schema is defined. Every stage reads and writes
`Record`; on disk records are Parquet rows with the nested parts (messages,
tools, tool calls, usage, metadata) stored as JSON strings so the Parquet schema
stays flat and stable across log formats.

Fields
------
id            content hash of (messages, tools, output): identical calls share it
source        log format the record came from: "openai", "openai_ft", "otel", "mlflow",
              "langfuse", "langsmith" (factory.ingest.formats)
location      where it was read: "<file>:<line>" (JSONL), "<file>:$<JSON path>" (a whole
              document), either followed by ":<path>" of the unit inside a multi-unit
              object (an OTLP span, an MLflow span), or "mlflow:<uri>#<trace id>:..."
source_id     the log's own id for the call, if it had one
timestamp     ISO-8601 UTC string with microseconds ("2026-11-03T09:00:00.000000Z"), "" when
              the log had none
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
from dataclasses import dataclass, field, fields
from typing import Any

import orjson
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
        row = {name: getattr(self, name) for name in FIELD_NAMES}
        for name in JSON_FIELDS:
            row[name] = _dumps(row[name])
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Record:
        kwargs = dict(row)
        for name in JSON_FIELDS:
            kwargs[name] = _loads(kwargs[name])
        return cls(**kwargs)


def _dumps(value: Any) -> str:
    """Compact JSON with sorted keys; orjson (~10x faster than json), json for what orjson
    refuses (integers over 64 bits, non-string keys)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _loads(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def content_id(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    output_text: str | None,
    output_tool_calls: list[dict[str, Any]],
) -> str:
    """Stable content hash: the same call logged twice gets the same id.

    The hash is over compact sorted-key JSON (`_dumps`). Raises UnicodeEncodeError
    for a string holding a lone surrogate, which no UTF-8 store can hold.
    """
    blob = _dumps([messages, tools, output_text, output_tool_calls])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


_ARROW_TYPES = {
    "latency_ms": pa.float64(),
    "cost": pa.float64(),
    "feedback": pa.float64(),
}
FIELD_NAMES = tuple(f.name for f in fields(Record))
SCHEMA = pa.schema([pa.field(name, _ARROW_TYPES.get(name, pa.string())) for name in FIELD_NAMES])


def to_table(records: list[Record]) -> pa.Table:
    """Records as an Arrow table, built column by column (3x faster than from rows)."""
    columns = {name: [getattr(r, name) for r in records] for name in FIELD_NAMES}
    for name in JSON_FIELDS:
        columns[name] = [_dumps(value) for value in columns[name]]
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def from_table(table: pa.Table) -> list[Record]:
    return [Record.from_row(row) for row in table.to_pylist()]
