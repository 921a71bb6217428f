"""OpenTelemetry GenAI spans exported as OTLP JSON (``{"resourceSpans": [...]}``).

A document (or one JSONL line, as the collector's file exporter writes them) holds
resource spans -> scope spans -> spans; every span is one unit. A span is an LLM
invocation when ``gen_ai.operation.name`` (or Traceloop's ``llm.request.type``)
is chat / text_completion / generate_content / completion, or, without an
operation, when it carries prompt messages; other spans (agents, tools,
embeddings, HTTP) are skipped.

Messages are read from, in order of preference:

* the current conventions' attributes ``gen_ai.system_instructions``,
  ``gen_ai.input.messages``, ``gen_ai.output.messages`` (structured or JSON
  strings), on the span or on a span event such as
  ``gen_ai.client.inference.operation.details``;
* the older indexed attributes ``gen_ai.prompt.N.{role,content,tool_call_id,
  tool_calls.M.*}`` and ``gen_ai.completion.N.*`` (OpenLLMetry);
* span events: ``gen_ai.content.prompt`` / ``gen_ai.content.completion`` (attributes
  ``gen_ai.prompt`` / ``gen_ai.completion`` holding JSON), or per-message events
  ``gen_ai.{system,user,assistant,tool}.message`` and ``gen_ai.choice`` whose body
  is in ``gen_ai.event.content`` (JSON) or in plain ``content`` / ``tool_calls``
  attributes.

Model: ``gen_ai.response.model`` else ``gen_ai.request.model``. Usage:
``gen_ai.usage.{input,output}_tokens`` (or the older ``prompt``/``completion``
spelling). Agent: ``gen_ai.agent.name`` else the resource's ``service.name``.
Step: the span name. Session: ``gen_ai.conversation.id`` / ``session.id`` else the
trace id. Outcome "error" when the span status is ERROR or ``error.type`` is set.
Both the lowerCamelCase keys of the OTLP JSON encoding and snake_case are read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from factory.ingest.common import (
    MAX_DEPTH,
    BadRecord,
    decode_json,
    expect,
    integer,
    make_record,
    messages,
    ns_timestamp,
    output_of,
    text,
    usage,
)
from factory.records import Record

LLM_OPERATIONS = frozenset({"chat", "text_completion", "generate_content", "completion"})
_EVENT_ROLES = {"gen_ai.system.message": "system", "gen_ai.user.message": "user",
                "gen_ai.assistant.message": "assistant", "gen_ai.tool.message": "tool"}
_INDEXED = re.compile(r"^gen_ai\.(prompt|completion)\.(\d+)\.(.+)$")
_FUNCTION = re.compile(r"^llm\.request\.functions\.(\d+)\.(name|description|parameters)$")
_ERROR_CODES = (2, "2", "STATUS_CODE_ERROR", "ERROR")


def detect(obj: dict[str, Any]) -> str | None:
    return "otel" if "resourceSpans" in obj or "resource_spans" in obj else None


def _get(obj: dict[str, Any], camel: str) -> Any:
    """A field in OTLP JSON's lowerCamelCase, or its snake_case spelling."""
    if camel in obj:
        return obj[camel]
    return obj.get(re.sub(r"(?<!^)([A-Z])", r"_\1", camel).lower())


def any_value(value: Any, field: str, depth: int = 0) -> Any:
    """An OTLP AnyValue ({"stringValue": ...}, {"intValue": "12"}, arrays, kvlists) as plain data."""
    expect(value, dict, field)
    if depth > MAX_DEPTH:
        raise BadRecord(f"{field}: nested deeper than {MAX_DEPTH} levels")
    for key in ("stringValue", "boolValue", "doubleValue", "bytesValue"):
        found = _get(value, key)
        if found is not None:
            return found
    found = _get(value, "intValue")
    if found is not None:
        return integer(found, f"{field}.intValue")
    found = _get(value, "arrayValue")
    if found is not None:
        items = expect(_get(expect(found, dict, f"{field}.arrayValue"), "values") or [], list, f"{field}.arrayValue")
        return [any_value(v, f"{field}.arrayValue.values[{i}]", depth + 1) for i, v in enumerate(items)]
    found = _get(value, "kvlistValue")
    if found is not None:
        values = _get(expect(found, dict, f"{field}.kvlistValue"), "values")
        return attributes(values, f"{field}.kvlistValue", depth + 1)
    return None


def attributes(items: Any, field: str, depth: int = 0) -> dict[str, Any]:
    """An OTLP attribute list ([{"key", "value": AnyValue}]) as a dict."""
    out = {}
    for i, item in enumerate(expect(items or [], list, field)):
        key = expect(expect(item, dict, f"{field}[{i}]").get("key"), str, f"{field}[{i}].key")
        out[key] = any_value(item.get("value") or {}, f"{field}[{i}].value", depth)
    return out


def units(obj: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every span of a document, with its resource attributes and scope name."""
    for i, resource_spans in enumerate(expect(_get(obj, "resourceSpans"), list, "resourceSpans")):
        where = f"resourceSpans[{i}]"
        expect(resource_spans, dict, where)
        resource = expect(_get(resource_spans, "resource") or {}, dict, f"{where}.resource")
        resource = attributes(_get(resource, "attributes"), f"{where}.resource.attributes")
        for j, scope_spans in enumerate(expect(_get(resource_spans, "scopeSpans") or [], list, f"{where}.scopeSpans")):
            scope_where = f"{where}.scopeSpans[{j}]"
            scope = expect(_get(expect(scope_spans, dict, scope_where), "scope") or {}, dict, f"{scope_where}.scope")
            for k, span in enumerate(expect(_get(scope_spans, "spans") or [], list, f"{scope_where}.spans")):
                yield f"{scope_where}.spans[{k}]", {"resource": resource, "scope": scope.get("name", ""), "span": span}


# --- messages from the three generations of the conventions ------------------


def _indexed(attrs: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """gen_ai.{prompt|completion}.N.* attributes as OpenAI messages, in index order."""
    found: dict[int, dict[str, Any]] = {}
    for key, value in attrs.items():
        match = _INDEXED.match(key)
        if not match or match.group(1) != kind:
            continue
        entry = found.setdefault(int(match.group(2)), {})
        rest = match.group(3)
        call = re.match(r"^tool_calls\.(\d+)\.(id|name|arguments)$", rest)
        if call:
            entry.setdefault("_calls", {}).setdefault(int(call.group(1)), {})[call.group(2)] = value
        elif rest in ("role", "content", "tool_call_id", "name"):
            entry[rest] = value
        elif rest == "function_call.name" or rest == "function_call.arguments":
            entry.setdefault("_calls", {}).setdefault(0, {})[rest.split(".")[1]] = value
    out = []
    for index in sorted(found):
        entry = found[index]
        calls = entry.pop("_calls", {})
        entry.setdefault("role", "assistant" if kind == "completion" else "user")
        entry.setdefault("content", None)
        if isinstance(entry["content"], str) and entry["content"].startswith(("[{", "{\"")):
            decoded = decode_json(entry["content"], f"gen_ai.{kind}.{index}.content")
            entry["content"] = decoded if isinstance(decoded, list) else entry["content"]
        if calls:
            entry["tool_calls"] = [
                {"id": c.get("id"), "type": "function",
                 "function": {"name": c.get("name"), "arguments": c.get("arguments") or "{}"}}
                for _, c in sorted(calls.items())
            ]
        out.append(entry)
    return out


def _event_message(event: dict[str, Any], attrs: dict[str, Any], field: str) -> dict[str, Any]:
    """A per-message event (gen_ai.user.message, ..., gen_ai.choice) as one message."""
    body = decode_json(attrs.get("gen_ai.event.content"), f"{field}.gen_ai.event.content") or {}
    body = {**attrs, **expect(body, dict, f"{field}.gen_ai.event.content")}
    if event["name"] == "gen_ai.choice":
        body = expect(decode_json(body.get("message"), f"{field}.message") or body, dict, f"{field}.message")
        role = "assistant"
    else:
        role = _EVENT_ROLES[event["name"]]
    out: dict[str, Any] = {"role": body.get("role", role), "content": body.get("content")}
    calls = decode_json(body.get("tool_calls"), f"{field}.tool_calls")
    if calls:
        out["tool_calls"] = calls
    if role == "tool" and body.get("id") is not None:
        out["tool_call_id"] = body["id"]
    return out


def _from_events(events: list[tuple[dict[str, Any], dict[str, Any], str]]) -> tuple[Any, Any]:
    """(prompt messages, completion) from span events; either may be None."""
    prompt: list[Any] | None = None
    completion: Any = None
    per_message: list[dict[str, Any]] = []
    for event, attrs, field in events:
        name = event["name"]
        if name == "gen_ai.content.prompt" and "gen_ai.prompt" in attrs:
            prompt = decode_json(attrs["gen_ai.prompt"], f"{field}.gen_ai.prompt")
        elif name == "gen_ai.content.completion" and "gen_ai.completion" in attrs:
            completion = decode_json(attrs["gen_ai.completion"], f"{field}.gen_ai.completion")
        elif name in _EVENT_ROLES:
            per_message.append(_event_message(event, attrs, field))
        elif name == "gen_ai.choice" and completion is None:
            completion = _event_message(event, attrs, field)
    if prompt is None and per_message:
        prompt = per_message
    return prompt, completion


def _tools(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    definitions = decode_json(attrs.get("gen_ai.tool.definitions"), "gen_ai.tool.definitions")
    if definitions:
        tools = []
        for i, tool in enumerate(expect(definitions, list, "gen_ai.tool.definitions")):
            expect(tool, dict, f"gen_ai.tool.definitions[{i}]")
            if "function" in tool:
                tools.append(tool)
            else:
                spec = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
                tools.append({"type": tool.get("type", "function"), "function": spec})
        return tools
    functions: dict[int, dict[str, Any]] = {}
    for key, value in attrs.items():
        match = _FUNCTION.match(key)
        if match:
            part = match.group(2)
            functions.setdefault(int(match.group(1)), {})[part] = (
                decode_json(value, key) if part == "parameters" else value)
    return [{"type": "function", "function": functions[i]} for i in sorted(functions)]


def _system(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    instructions = decode_json(attrs.get("gen_ai.system_instructions"), "gen_ai.system_instructions")
    if not instructions:
        return []
    if isinstance(instructions, str):
        return [{"role": "system", "content": instructions}]
    return [{"role": "system", "parts": expect(instructions, list, "gen_ai.system_instructions")}]


# --- one span -----------------------------------------------------------------


def parse(unit: dict[str, Any], location: str) -> Record | None:
    """One span as a record, or None when it is not an LLM invocation. Raises BadRecord."""
    span = expect(unit["span"], dict, "span")
    attrs = attributes(_get(span, "attributes"), "span.attributes")
    events = []
    for i, event in enumerate(expect(_get(span, "events") or [], list, "span.events")):
        expect(event, dict, f"span.events[{i}]")
        event_attrs = attributes(_get(event, "attributes"), f"span.events[{i}].attributes")
        events.append(({"name": text(event.get("name"), f"span.events[{i}].name")}, event_attrs, f"span.events[{i}]"))
        for key in ("gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions"):
            if key in event_attrs:
                attrs.setdefault(key, event_attrs[key])
    operation = attrs.get("gen_ai.operation.name") or attrs.get("llm.request.type")
    if operation is not None and not (isinstance(operation, str) and operation in LLM_OPERATIONS):
        return None

    prompt = decode_json(attrs.get("gen_ai.input.messages"), "gen_ai.input.messages")
    completion = decode_json(attrs.get("gen_ai.output.messages"), "gen_ai.output.messages")
    if prompt is None:
        prompt = _indexed(attrs, "prompt") or None
        completion = _indexed(attrs, "completion") or None
    if prompt is None:
        prompt, completion = _from_events(events)
    if prompt is None:
        if operation is None:
            return None
        raise BadRecord("span: an LLM span without prompt messages (no gen_ai.input.messages, "
                        "gen_ai.prompt.N.* or prompt events)")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    history = messages(_system(attrs) + expect(prompt, list, "gen_ai.input.messages"), "gen_ai.input.messages")
    output_text, calls = output_of(completion, "gen_ai.output.messages")

    start, started = ns_timestamp(_get(span, "startTimeUnixNano"), "span.startTimeUnixNano")
    end, _ = ns_timestamp(_get(span, "endTimeUnixNano"), "span.endTimeUnixNano")
    status = _get(span, "status") or {}
    failed = expect(status, dict, "span.status").get("code") in _ERROR_CODES or bool(attrs.get("error.type"))
    trace_id = text(_get(span, "traceId"), "span.traceId")
    resource = unit["resource"]
    return make_record(
        source="otel",
        location=location,
        source_id=text(_get(span, "spanId"), "span.spanId"),
        timestamp=started,
        agent=text(attrs.get("gen_ai.agent.name") or resource.get("service.name"), "service.name"),
        step=text(span.get("name"), "span.name"),
        session_id=text(attrs.get("gen_ai.conversation.id") or attrs.get("session.id") or trace_id,
                        "gen_ai.conversation.id"),
        model=text(attrs.get("gen_ai.response.model") or attrs.get("gen_ai.request.model"), "gen_ai.request.model"),
        messages=history,
        tools=_tools(attrs),
        output_text=output_text,
        output_tool_calls=calls,
        usage=usage({k.rsplit(".", 1)[-1]: v for k, v in attrs.items() if k.startswith("gen_ai.usage.")},
                    "gen_ai.usage"),
        latency_ms=(end - start) / 1e6 if start and end else None,
        outcome="error" if failed else "ok",
        metadata={k: v for k, v in (
            ("trace_id", trace_id),
            ("parent_span_id", _get(span, "parentSpanId") or ""),
            ("operation", operation),
            ("provider", attrs.get("gen_ai.provider.name") or attrs.get("gen_ai.system")),
            ("scope", unit.get("scope")),
            ("error_type", attrs.get("error.type")),
        ) if v},
    )
