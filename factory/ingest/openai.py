"""OpenAI chat-completions logs: proxy request/response pairs and the fine-tuning chat shape.

Two shapes are accepted, one object per line:

* a logged call (``openai``): ``{"id", "timestamp", "metadata": {"agent", "step",
  "session_id", "feedback"?, ...}, "request": {"model", "messages", "tools"?},
  "response": {"choices": [...], "usage"?, "error"?}, "latency_ms"?, "cost"?}``.
  Tool calls (``tool_calls``), ``tool`` role messages and the older
  ``function_call`` / ``functions`` / ``function`` role form are read; a legacy
  completions choice (``{"text": ...}``) is read as text. A call whose response
  has an ``error``, no choices, or ``metadata.status == "error"`` is kept with
  outcome "error" (curate decides whether to drop it).
* the fine-tuning chat shape (``openai_ft``): ``{"messages": [...], "tools"?,
  "functions"?}`` whose last message is the assistant's output.

`parse_call` / `parse_finetune` raise `BadRecord` naming the offending field.
"""

from __future__ import annotations

from typing import Any

from factory.ingest.common import (
    BadRecord,
    expect,
    make_record,
    messages,
    number,
    output_of,
    text,
    timestamp,
    usage,
)
from factory.records import Record


def detect(obj: dict[str, Any]) -> str | None:
    """"openai" or "openai_ft" when `obj` has one of this module's shapes, else None."""
    if "request" in obj and "response" in obj:
        return "openai"
    if "messages" in obj and "request" not in obj:
        return "openai_ft"
    return None


def _tools(container: dict[str, Any], field: str) -> list[dict[str, Any]]:
    """`tools`, or the legacy `functions` list as function tools."""
    tools = container.get("tools") or []
    if type(tools) is list and (tools or "functions" not in container):
        return tools
    expect(tools, list, f"{field}.tools" if field else "tools")
    if not tools and container.get("functions"):
        functions = expect(container["functions"], list, f"{field}.functions" if field else "functions")
        tools = [{"type": "function", "function": f} for f in functions]
    return tools


def parse_call(obj: dict[str, Any], location: str) -> Record:
    """A proxy-logged request/response pair (the hot path of big proxy logs: type checks
    are inlined, the helpers only run to name the field of a bad value)."""
    request = obj.get("request")
    if type(request) is not dict:
        expect(request, dict, "request")
    response = obj.get("response")
    if type(response) is not dict:
        response = expect(response, (dict, type(None)), "response") or {}
    metadata = obj.get("metadata")
    metadata = dict(metadata) if type(metadata) is dict else dict(expect(metadata or {}, dict, "metadata"))
    choices = response.get("choices")
    if choices and type(choices) is not list:
        expect(choices, list, "response.choices")
    output_text, calls = output_of(response, "response") if choices else (None, [])
    failed = not choices or bool(response.get("error")) or metadata.get("status") == "error"
    pop = metadata.pop
    feedback = pop("feedback", obj.get("feedback"))
    latency = obj.get("latency_ms", pop("latency_ms", None))
    cost = obj.get("cost", pop("cost", None))
    return make_record(
        messages(request.get("messages"), "request.messages"),
        _tools(request, "request"),
        output_text,
        calls,
        source="openai",
        location=location,
        source_id=text(obj.get("id"), "id"),
        timestamp=timestamp(obj.get("timestamp"), "timestamp"),
        agent=text(pop("agent", ""), "metadata.agent"),
        step=text(pop("step", ""), "metadata.step"),
        session_id=text(pop("session_id", ""), "metadata.session_id"),
        model=text(response.get("model") or request.get("model"), "request.model"),
        usage=usage(response.get("usage"), "response.usage"),
        latency_ms=None if latency is None else number(latency, "latency_ms"),
        cost=None if cost is None else number(cost, "cost"),
        outcome="error" if failed else "ok",
        feedback=None if feedback is None else _feedback(feedback),
        metadata=metadata,
    )


def _feedback(value: Any) -> float | None:
    score = number(value, "feedback")
    if score is not None and not -1.0 <= score <= 1.0:
        raise BadRecord(f"feedback: {score} is outside [-1, 1]")
    return score


def parse_finetune(obj: dict[str, Any], location: str) -> Record:
    """The fine-tuning chat shape: everything before the last assistant message is the request."""
    history = messages(obj.get("messages"), "messages")
    last = len(history) - 1
    if history[last].get("role") != "assistant":
        raise BadRecord(f"messages[{last}].role: the last message must be the assistant's output")
    if last == 0:
        raise BadRecord("messages: no request before the assistant's output")
    output_text, calls = output_of(history[last], f"messages[{last}]")
    return make_record(
        source="openai_ft",
        location=location,
        messages=history[:last],
        tools=_tools(obj, ""),
        output_text=output_text,
        output_tool_calls=calls,
    )
