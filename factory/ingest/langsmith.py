"""LangSmith run exports (LLM runs only).

Accepted: a JSON array of runs (``[run.dict() for run in client.list_runs(...)]``),
the REST query page ``{"runs": [...], "cursors": ...}``, or one run per JSONL
line. Runs whose ``run_type`` is "llm" are LLM invocations; chains, tools,
retrievers and the rest are skipped.

Fields: ``inputs`` (``{"messages"}`` in OpenAI or LangChain form, including
LangChain's serialized ``[[{"lc": 1, ...}]]`` batches, or ``{"prompts"}``; see
`common.request_of`), ``outputs`` (an OpenAI completion, ``{"messages"}``,
``{"message"}`` or LangChain ``{"generations"}``; see `common.output_of`), the model
from ``extra.metadata.ls_model_name`` / ``extra.invocation_params`` / the inputs /
``outputs.llm_output.model_name``, tools from the inputs or
``extra.invocation_params.tools``, usage from ``prompt_tokens`` /
``completion_tokens`` else ``outputs.usage_metadata`` / ``llm_output.token_usage``,
``total_cost``, ``start_time`` / ``end_time`` (latency), ``error`` or status "error"
-> outcome "error", the step from ``extra.metadata.langgraph_node`` else the run
name, the session from ``extra.metadata`` thread_id / session_id / conversation_id
else ``trace_id``, the agent from ``extra.metadata.agent``, and feedback from
``feedback_stats`` averages (see `common.feedback`).
"""

from __future__ import annotations

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

_SESSION_KEYS = ("thread_id", "session_id", "conversation_id")


def detect(obj: dict[str, Any]) -> str | None:
    return "langsmith" if "run_type" in obj and ("inputs" in obj or "outputs" in obj) else None



def _usage(run: dict[str, Any], outputs: Any) -> dict[str, int]:
    if run.get("prompt_tokens") is not None or run.get("completion_tokens") is not None:
        return usage({k: run.get(k) for k in ("prompt_tokens", "completion_tokens")}, "prompt_tokens")
    if not isinstance(outputs, dict):
        return {}
    if outputs.get("usage_metadata"):
        return usage(outputs["usage_metadata"], "outputs.usage_metadata")
    llm_output = outputs.get("llm_output") if isinstance(outputs.get("llm_output"), dict) else {}
    if llm_output.get("token_usage"):
        return usage(llm_output["token_usage"], "outputs.llm_output.token_usage")
    return usage(outputs.get("usage"), "outputs.usage")


def parse(run: dict[str, Any], location: str) -> Record | None:
    """One run as a record, or None when it is not an LLM run. Raises BadRecord."""
    if run.get("run_type") != "llm":
        return None
    extra = expect(run.get("extra") or {}, dict, "extra")
    metadata = expect(extra.get("metadata") or {}, dict, "extra.metadata")
    params = expect(extra.get("invocation_params") or {}, dict, "extra.invocation_params")
    history, tools, model = request_of(run.get("inputs"), "inputs")
    outputs = run.get("outputs")
    output_text, calls = output_of(outputs, "outputs") if outputs else (None, [])
    llm_output = outputs.get("llm_output") if isinstance(outputs, dict) else None
    llm_output = llm_output if isinstance(llm_output, dict) else {}
    start = timestamp(run.get("start_time"), "start_time")
    end = timestamp(run.get("end_time"), "end_time")
    stats = expect(run.get("feedback_stats") or {}, dict, "feedback_stats")
    scores = [s.get("avg") for s in stats.values() if isinstance(s, dict) and isinstance(s.get("avg"), (int, float))]
    trace_id = text(run.get("trace_id"), "trace_id")
    session = next((metadata[k] for k in _SESSION_KEYS if metadata.get(k)), None)
    return make_record(
        source="langsmith",
        location=location,
        source_id=text(run.get("id"), "id"),
        timestamp=start,
        **agent_step(metadata, "extra.metadata", run.get("name")),
        session_id=text(session or trace_id, "extra.metadata.thread_id"),
        model=text(metadata.get("ls_model_name") or params.get("model") or params.get("model_name") or model
                   or llm_output.get("model_name"), "extra.metadata.ls_model_name"),
        messages=history,
        tools=tools or expect(params.get("tools") or [], list, "extra.invocation_params.tools"),
        output_text=output_text,
        output_tool_calls=calls,
        usage=_usage(run, outputs),
        latency_ms=latency_between(start, end),
        cost=number(run.get("total_cost"), "total_cost"),
        outcome="error" if run.get("error") or run.get("status") == "error" else "ok",
        feedback=feedback(scores, "feedback_stats"),
        metadata={"trace_id": trace_id, "parent_run_id": text(run.get("parent_run_id"), "parent_run_id"),
                  **({"error": text(run.get("error"), "error")[:2000]} if run.get("error") else {})},
    )
