"""MLflow traces: a JSON export of `mlflow.search_traces`, or read straight from a tracking URI.

Accepted exports (a whole document, or one trace per JSONL line):

* ``Trace.to_json()`` / ``Trace.to_dict()``: ``{"info": {...}, "data": {"spans": [...]}}``
  (MLflow 3 span dicts with ``start_time_unix_nano``; MLflow 2's ``context`` /
  ``start_time`` spans are read too), alone or in a list (``return_type="list"``);
* the rows of the DataFrame ``search_traces`` returns, as ``df.to_json(orient="records")``
  writes them: ``{"trace_id", "trace": "<trace JSON>", "spans": [...],
  "trace_metadata", "tags", "assessments", ...}``.

Every span is a unit; spans whose ``mlflow.spanType`` is LLM or CHAT_MODEL are the
LLM invocations (others are skipped). Span attributes hold JSON strings, as MLflow
writes them. Inputs are read as a chat request (``{"messages", "tools"?, "model"?}``,
the LangChain ``[[message, ...]]`` form, or a prompt string); outputs with
`common.output_of` (an OpenAI completion, a message, LangChain generations).
Model: ``mlflow.llm.model`` else the inputs' model. Usage: ``mlflow.chat.tokenUsage``
else the outputs' usage. Cost: ``mlflow.llm.cost.total_cost``. Step: the parent
span's name (the function that made the call; autolog names the LLM span after the
client class), else the span's own. Agent: a ``agent`` tag / metadata entry, else
the trace's root span name. Session: ``mlflow.trace.session`` metadata, else the
trace id. Feedback: boolean or numeric assessment values on the trace or the span
(see `common.feedback`).

`read_tracking` pages through a tracking server's traces with `MlflowClient`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from factory.ingest.common import (
    BadRecord,
    expect,
    feedback,
    make_record,
    messages,
    ns_timestamp,
    number,
    output_of,
    request_of,
    text,
    usage,
)
from factory.records import Record

LLM_SPAN_TYPES = frozenset({"LLM", "CHAT_MODEL"})
PAGE_SIZE = 200


def detect(obj: dict[str, Any]) -> str | None:
    if isinstance(obj.get("info"), dict) and isinstance(obj.get("data"), dict):
        return "mlflow"
    if "trace_id" in obj and ("spans" in obj or "trace" in obj):
        return "mlflow"
    return None


def _trace(obj: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """(info, spans) of a trace dict or a DataFrame row."""
    if "info" in obj:
        info = expect(obj["info"], dict, "info")
        return info, expect(expect(obj.get("data") or {}, dict, "data").get("spans") or [], list, "data.spans")
    if isinstance(obj.get("trace"), (str, dict)):  # a DataFrame row: the full trace as JSON
        inner = obj["trace"]
        if isinstance(inner, str):
            try:
                inner = json.loads(inner)
            except (json.JSONDecodeError, RecursionError):
                raise BadRecord("trace: invalid JSON string") from None
        if not isinstance(inner, dict) or "info" not in inner:
            raise BadRecord("trace: expected a trace object with info and data")
        return _trace(inner)
    info = {k: obj.get(k) for k in ("trace_id", "trace_metadata", "tags", "assessments", "state")}
    return info, expect(obj.get("spans") or [], list, "spans")


def _span_ids(span: dict[str, Any]) -> tuple[str, str]:
    """(span id, parent span id) for MLflow 3 and MLflow 2 span dicts."""
    context = span.get("context") if isinstance(span.get("context"), dict) else {}
    span_id = span.get("span_id") or context.get("span_id") or ""
    parent = span.get("parent_span_id") or span.get("parent_id") or ""
    return str(span_id), str(parent)


def units(obj: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every span of a trace, with what the record needs from the rest of the trace."""
    info, spans = _trace(obj)
    names = {}
    root = ""
    for span in spans:
        if isinstance(span, dict):
            span_id, parent = _span_ids(span)
            names[span_id] = span.get("name")
            if not parent:
                root = span.get("name") or root
    for k, span in enumerate(spans):
        parent = _span_ids(span)[1] if isinstance(span, dict) else ""
        yield f"data.spans[{k}]", {"info": info, "span": span, "parent_name": names.get(parent), "root_name": root}


def _attr(attrs: dict[str, Any], key: str) -> Any:
    """An attribute value; MLflow stores them JSON-encoded, a value that is not JSON is kept as is."""
    value = attrs.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def parse(unit: dict[str, Any], location: str) -> Record | None:
    """One span as a record, or None when it is not an LLM span. Raises BadRecord."""
    span = expect(unit["span"], dict, "span")
    attrs = expect(span.get("attributes") or {}, dict, "span.attributes")
    span_type = _attr(attrs, "mlflow.spanType") or span.get("span_type")
    if not (isinstance(span_type, str) and span_type in LLM_SPAN_TYPES):
        return None
    info = unit["info"]
    metadata = info.get("trace_metadata") or info.get("request_metadata") or {}
    tags = info.get("tags") or {}
    expect(metadata, dict, "info.trace_metadata")
    expect(tags, dict, "info.tags")
    trace_id = text(info.get("trace_id") or info.get("request_id"), "info.trace_id")
    span_id, parent = _span_ids(span)

    chat = _attr(attrs, "mlflow.chat.messages")
    inputs = _attr(attrs, "mlflow.spanInputs") if "mlflow.spanInputs" in attrs else span.get("inputs")
    outputs = _attr(attrs, "mlflow.spanOutputs") if "mlflow.spanOutputs" in attrs else span.get("outputs")
    if isinstance(chat, list) and chat and isinstance(chat[-1], dict) and chat[-1].get("role") == "assistant":
        history, tools, model = messages(chat[:-1], "mlflow.chat.messages"), [], ""
        outputs = chat[-1]
    else:
        history, tools, model = request_of(inputs, "mlflow.spanInputs")
    tools = tools or expect(_attr(attrs, "mlflow.chat.tools") or [], list, "mlflow.chat.tools")
    output_text, calls = output_of(outputs, "mlflow.spanOutputs")

    start, started = ns_timestamp(span.get("start_time_unix_nano", span.get("start_time")),
                                  "span.start_time_unix_nano")
    end, _ = ns_timestamp(span.get("end_time_unix_nano", span.get("end_time")), "span.end_time_unix_nano")
    status = span.get("status") if isinstance(span.get("status"), dict) else {"code": span.get("status_code")}
    token_usage = _attr(attrs, "mlflow.chat.tokenUsage")
    if not token_usage and isinstance(outputs, dict):
        token_usage = outputs.get("usage")
    cost = _attr(attrs, "mlflow.llm.cost")
    scores = [
        a["feedback"]["value"] for a in expect(info.get("assessments") or [], list, "info.assessments")
        if isinstance(a, dict) and isinstance(a.get("feedback"), dict)
        and isinstance(a["feedback"].get("value"), (bool, int, float)) and a.get("span_id") in (None, "", span_id)
    ]
    return make_record(
        source="mlflow",
        location=location,
        source_id=span_id,
        timestamp=started,
        agent=text(tags.get("agent") or metadata.get("agent") or unit["root_name"], "info.tags.agent"),
        step=text((unit["parent_name"] if parent else None) or span.get("name"), "span.name"),
        session_id=text(metadata.get("mlflow.trace.session") or tags.get("mlflow.trace.session") or trace_id,
                        "info.trace_metadata.mlflow.trace.session"),
        model=text(_attr(attrs, "mlflow.llm.model") or model or _attr(attrs, "model"), "mlflow.llm.model"),
        messages=history,
        tools=tools,
        output_text=output_text,
        output_tool_calls=calls,
        usage=usage(token_usage, "mlflow.chat.tokenUsage"),
        latency_ms=(end - start) / 1e6 if start and end else None,
        cost=number(cost.get("total_cost"), "mlflow.llm.cost.total_cost") if isinstance(cost, dict) else None,
        outcome="error" if status.get("code") in ("STATUS_CODE_ERROR", "ERROR", 2) else "ok",
        feedback=feedback(scores, "info.assessments"),
        metadata={"trace_id": trace_id, "span_name": text(span.get("name"), "span.name")},
    )


def read_tracking(uri: str, since_ms: int | None = None) -> Iterator[tuple[str, dict[str, Any], int]]:
    """(trace id, trace dict, request time in ms) for every trace of every experiment at `uri`,
    oldest first, from `since_ms` on (inclusive, so a trace logged in the same millisecond as the
    last one read is not missed; the ingest driver drops the repeats as duplicates).

    Raises mlflow.exceptions.MlflowException when the tracking server cannot be read.
    """
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    for experiment in experiments:
        token = None
        while True:
            page = client.search_traces(
                locations=[experiment],
                filter_string=f"timestamp_ms >= {int(since_ms)}" if since_ms is not None else None,
                order_by=["timestamp_ms ASC"],
                max_results=PAGE_SIZE,
                page_token=token,
            )
            for trace in page:
                yield trace.info.trace_id, trace.to_dict(), int(trace.info.request_time)
            token = page.token
            if not token:
                break
