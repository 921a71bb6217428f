"""OpenAI chat-completions logs: proxy request/response pairs and the fine-tuning chat shape.

Two line shapes are accepted:

* a logged call: ``{"id", "timestamp", "metadata": {"agent", "step", "session_id", ...},
  "request": {"model", "messages", "tools"?}, "response": {"choices": [...], "usage"?}}``;
* the fine-tuning chat shape: ``{"messages": [...], "tools"?: [...]}`` whose last
  assistant message is the output.

Each parser raises `BadRecord` naming the offending field; the ingest driver
quarantines the line with that reason and carries on.
"""

from __future__ import annotations

import json
from typing import Any

from factory.records import Record, content_id

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


class BadRecord(ValueError):
    """A log line that cannot become a canonical record; the message names the field."""


def detect(obj: Any) -> str | None:
    """Return "openai" or "openai_ft" when `obj` has one of this module's shapes."""
    if not isinstance(obj, dict):
        return None
    if "request" in obj and "response" in obj:
        return "openai"
    if "messages" in obj and "request" not in obj:
        return "openai_ft"
    return None


def _expect(value: Any, kind: type | tuple[type, ...], field: str) -> Any:
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BadRecord(f"{field}: expected {names}, got {type(value).__name__}")
    return value


def _messages(value: Any, field: str) -> list[dict[str, Any]]:
    _expect(value, list, field)
    if not value:
        raise BadRecord(f"{field}: empty")
    for i, message in enumerate(value):
        _expect(message, dict, f"{field}[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise BadRecord(f"{field}[{i}].role: unknown role {role!r}")
        _expect(message.get("content"), (str, list, type(None)), f"{field}[{i}].content")
    return value


def _tool_calls(message: dict[str, Any], field: str) -> list[dict[str, Any]]:
    """Decode OpenAI tool calls (and the legacy `function_call`) to [{"name", "arguments": dict}]."""
    raw = message.get("tool_calls") or []
    if message.get("function_call"):
        raw = [{"function": message["function_call"]}]
    calls = []
    for i, call in enumerate(_expect(raw, list, f"{field}.tool_calls")):
        function = _expect(_expect(call, dict, f"{field}.tool_calls[{i}]").get("function"), dict,
                           f"{field}.tool_calls[{i}].function")
        name = _expect(function.get("name"), str, f"{field}.tool_calls[{i}].function.name")
        arguments = function.get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as err:
                raise BadRecord(f"{field}.tool_calls[{i}].function.arguments: invalid JSON ({err.msg})") from None
        _expect(arguments, dict, f"{field}.tool_calls[{i}].function.arguments")
        calls.append({"name": name, "arguments": arguments})
    return calls


def _finish(record_kwargs: dict[str, Any]) -> Record:
    record_kwargs["id"] = content_id(
        record_kwargs["messages"], record_kwargs.get("tools", []),
        record_kwargs.get("output_text"), record_kwargs.get("output_tool_calls", []),
    )
    return Record(**record_kwargs)


def parse_call(obj: dict[str, Any], location: str) -> Record:
    """A proxy-logged request/response pair. Failed calls become records with outcome "error"."""
    request = _expect(obj.get("request"), dict, "request")
    response = _expect(obj.get("response"), (dict, type(None)), "response") or {}
    metadata = dict(_expect(obj.get("metadata") or {}, dict, "metadata"))
    messages = _messages(request.get("messages"), "request.messages")
    tools = _expect(request.get("tools") or [], list, "request.tools")
    choices = _expect(response.get("choices") or [], list, "response.choices")
    failed = bool(response.get("error")) or not choices or metadata.get("status") == "error"
    output_text, calls = None, []
    if choices:
        message = _expect(_expect(choices[0], dict, "response.choices[0]").get("message"), dict,
                          "response.choices[0].message")
        output_text = _expect(message.get("content"), (str, type(None)), "response.choices[0].message.content")
        calls = _tool_calls(message, "response.choices[0].message")
    usage = _expect(response.get("usage") or {}, dict, "response.usage")
    feedback = metadata.pop("feedback", obj.get("feedback"))
    return _finish(dict(
        source="openai",
        location=location,
        source_id=str(obj.get("id") or ""),
        timestamp=str(obj.get("timestamp") or ""),
        agent=str(metadata.pop("agent", "")),
        step=str(metadata.pop("step", "")),
        session_id=str(metadata.pop("session_id", "")),
        model=str(response.get("model") or request.get("model") or ""),
        messages=messages,
        tools=tools,
        output_text=output_text,
        output_tool_calls=calls,
        usage={k: int(v) for k, v in usage.items() if k in ("prompt_tokens", "completion_tokens")},
        latency_ms=_number(obj.get("latency_ms", metadata.pop("latency_ms", None)), "latency_ms"),
        cost=_number(obj.get("cost", metadata.pop("cost", None)), "cost"),
        outcome="error" if failed else "ok",
        feedback=_number(feedback, "feedback"),
        metadata=metadata,
    ))


def parse_finetune(obj: dict[str, Any], location: str) -> Record:
    """The fine-tuning chat shape: everything before the last assistant message is the request."""
    messages = _messages(obj.get("messages"), "messages")
    if messages[-1].get("role") != "assistant":
        raise BadRecord("messages[-1].role: the last message must be the assistant's output")
    output = messages[-1]
    return _finish(dict(
        source="openai_ft",
        location=location,
        messages=messages[:-1],
        tools=_expect(obj.get("tools") or [], list, "tools"),
        output_text=_expect(output.get("content"), (str, type(None)), f"messages[{len(messages) - 1}].content"),
        output_tool_calls=_tool_calls(output, f"messages[{len(messages) - 1}]"),
    ))


def _number(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRecord(f"{field}: expected a number, got {type(value).__name__}")
    return float(value)


PARSERS = {"openai": parse_call, "openai_ft": parse_finetune}
