"""Langfuse observation exports (generations only).

Accepted: the public API's page ``{"data": [observation, ...], "meta": {...}}``
(``GET /api/public/observations``), a JSON array of observations, or one
observation per JSONL line; camelCase (API JSON) and snake_case (Python SDK
``.dict()``) keys are both read. Observations of type GENERATION are LLM
invocations; spans, events, tools, agents and the rest are skipped.

Fields: ``input`` (messages, ``{"messages", "tools"?}`` or a prompt, see
`common.request_of`), ``output`` (see `common.output_of`), ``model``, ``startTime`` /
``endTime`` (latency; else ``latency`` in seconds), ``usageDetails`` else ``usage``,
``costDetails.total`` else ``calculatedTotalCost`` / ``totalPrice``, ``level`` ERROR
-> outcome "error", ``name`` (step; ``metadata.langgraph_node`` wins when present),
``sessionId`` else ``traceId`` (session), ``metadata.agent`` (agent), and numeric or
boolean ``scores`` when the export embeds them (feedback, see `common.feedback`).
"""

from __future__ import annotations

import re
from typing import Any

from factory.ingest.common import (
    agent_step,
    expect,
    feedback,
    latency_between,
    make_record,
    number,
    output_of,
    request_of,
    text,
    timestamp,
    usage,
)
from factory.records import Record


def _get(obj: dict[str, Any], camel: str) -> Any:
    if camel in obj:
        return obj[camel]
    return obj.get(re.sub(r"(?<!^)([A-Z])", r"_\1", camel).lower())


def detect(obj: dict[str, Any]) -> str | None:
    if isinstance(obj.get("type"), str) and _get(obj, "traceId") is not None and _get(obj, "startTime") is not None:
        return "langfuse"
    return None



def parse(obj: dict[str, Any], location: str) -> Record | None:
    """One observation as a record, or None when it is not a generation. Raises BadRecord."""
    if obj.get("type") != "GENERATION":
        return None
    metadata = _get(obj, "metadata") or {}
    metadata = metadata if isinstance(metadata, dict) else {"value": metadata}
    history, tools, model = request_of(obj.get("input"), "input")
    if not tools and isinstance(_get(obj, "modelParameters"), dict):
        tools = expect(_get(obj, "modelParameters").get("tools") or [], list, "modelParameters.tools")
    output_text, calls = output_of(obj.get("output"), "output")
    start = timestamp(_get(obj, "startTime"), "startTime")
    end = timestamp(_get(obj, "endTime"), "endTime")
    latency = latency_between(start, end)
    if latency is None and obj.get("latency") is not None:
        latency = number(obj["latency"], "latency") * 1000.0
    costs = _get(obj, "costDetails") or {}
    cost = expect(costs, dict, "costDetails").get("total")
    if cost is None:
        cost = next((c for c in (_get(obj, "calculatedTotalCost"), _get(obj, "totalPrice")) if c is not None), None)
    scores = [s.get("value") for s in expect(obj.get("scores") or [], list, "scores")
              if isinstance(s, dict) and isinstance(s.get("value"), (bool, int, float))
              and s.get("dataType", s.get("data_type")) != "CATEGORICAL"]
    trace_id = text(_get(obj, "traceId"), "traceId")
    return make_record(
        source="langfuse",
        location=location,
        source_id=text(obj.get("id"), "id"),
        timestamp=start,
        **agent_step(metadata, "metadata", obj.get("name")),
        session_id=text(_get(obj, "sessionId") or trace_id, "sessionId"),
        model=text(obj.get("model") or model, "model"),
        messages=history,
        tools=tools,
        output_text=output_text,
        output_tool_calls=calls,
        usage=usage(_get(obj, "usageDetails") or obj.get("usage"), "usageDetails"),
        latency_ms=latency,
        cost=number(cost, "costDetails.total"),
        outcome="error" if obj.get("level") == "ERROR" else "ok",
        feedback=feedback(scores, "scores"),
        metadata={"trace_id": trace_id, "parent_observation_id": text(_get(obj, "parentObservationId"),
                                                                      "parentObservationId"),
                  **({"status_message": _get(obj, "statusMessage")} if _get(obj, "statusMessage") else {})},
    )
