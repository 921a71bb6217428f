"""Helpers every log-format parser shares: validation, OpenAI-shape messages, outputs, records.

Each format module turns one logged LLM invocation into a `Record` through
`make_record`; anything that cannot become one raises `BadRecord`, whose message
names the offending field (the ingest driver quarantines the unit with it).

Messages are normalised to the OpenAI chat shape (``{"role", "content",
"tool_calls"?, "tool_call_id"?}``) from the three shapes the supported tools log:
OpenAI messages as they are, LangChain messages (serialized ``{"lc": 1, "kwargs":
...}`` or plain ``{"type": "human", ...}``) and OpenTelemetry GenAI messages
(``{"role", "parts": [...]}``). Only the request's history is rewritten; text
content parts stay lists, as OpenAI allows.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from typing import Any

from factory.records import Record, content_id

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# LangChain message type / class name -> OpenAI role
_LC_ROLES = {
    "human": "user", "HumanMessage": "user", "HumanMessageChunk": "user",
    "ai": "assistant", "AIMessage": "assistant", "AIMessageChunk": "assistant",
    "system": "system", "SystemMessage": "system", "SystemMessageChunk": "system",
    "tool": "tool", "ToolMessage": "tool", "ToolMessageChunk": "tool",
    "function": "function", "FunctionMessage": "function",
}
_EPOCH = dt.datetime(1970, 1, 1)
_CONTENT = (str, list, type(None))
MAX_DEPTH = 64  # deeper wrappers or documents are not chat logs; rejecting them bounds recursion


class BadRecord(ValueError):
    """A logged unit that cannot become a canonical record; the message names the field."""


def expect(value: Any, kind: type | tuple[type, ...], field: str) -> Any:
    """`value` if it is an instance of `kind`, else BadRecord naming `field` and both types."""
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BadRecord(f"{field}: expected {names}, got {type(value).__name__}")
    return value


def number(value: Any, field: str) -> float | None:
    """A JSON number (or a numeric string, as OTLP encodes 64-bit ints) as float; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise BadRecord(f"{field}: expected a number, got {value[:40]!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRecord(f"{field}: expected a number, got {type(value).__name__}")
    return float(value)


def integer(value: Any, field: str) -> int | None:
    """A JSON integer (or a decimal string, as OTLP encodes 64-bit ints) exactly; a whole float too."""
    if type(value) is int:
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        try:
            return int(value)
        except ValueError:  # non-ASCII digits, or over Python's 4300-digit limit
            raise BadRecord(f"{field}: expected an integer, got {value[:40]!r}") from None
    result = number(value, field)
    if result is None:
        return None
    if result != result or result in (float("inf"), float("-inf")) or result != int(result):
        raise BadRecord(f"{field}: expected an integer, got {str(value)[:40]!r}")
    return int(result)


def text(value: Any, field: str) -> str:
    """A string field; None and absent become ""; numbers are accepted as ids often are."""
    if type(value) is str:
        return value
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise BadRecord(f"{field}: expected a string, got {type(value).__name__}")


def decode_json(value: Any, field: str) -> Any:
    """Decode a JSON string (formats that store structures in string attributes); others pass."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError) as err:
        raise BadRecord(f"{field}: invalid JSON string ({getattr(err, 'msg', 'too deeply nested')})") from None


# --- time ---------------------------------------------------------------------


def iso_from_ns(ns: int) -> str:
    """Unix nanoseconds as an ISO-8601 UTC string with microseconds and a Z.
    Raises OverflowError outside years 1-9999."""
    seconds, rest = divmod(ns, 1_000_000_000)
    moment = _EPOCH + dt.timedelta(seconds=seconds, microseconds=rest // 1000)
    return moment.isoformat(timespec="microseconds") + "Z"


def ns_timestamp(value: Any, field: str) -> tuple[int | None, str]:
    """(nanoseconds, ISO-8601 string) of a Unix-nanosecond field (OTLP encodes it as a string);
    (None, "") when absent. Raises BadRecord."""
    ns = integer(value, field)
    if not ns:
        return None, ""
    try:
        return ns, iso_from_ns(ns)
    except OverflowError:
        raise BadRecord(f"{field}: {ns} ns is outside years 1-9999") from None


def timestamp(value: Any, field: str) -> str:
    """Normalise a timestamp to ISO-8601 UTC with microseconds ("2026-11-03T09:00:00.000000Z",
    one width, so the strings sort in time order); "" when absent.

    Accepts ISO-8601 strings (a missing zone is taken as UTC) and Unix epoch
    numbers, whose unit is read from their size (s, ms, us or ns). Raises
    BadRecord for anything else, or a date outside years 1-9999.
    """
    if value is None or value == "":
        return ""
    try:
        if isinstance(value, str) and not value.lstrip("-").isdigit():
            size = len(value)
            if value[-1:] == "Z" and value[10:11] == "T" and (size == 20 or size in (24, 27) and value[19] == "."):
                dt.datetime.fromisoformat(value[:-1])  # fast path for UTC stamps: validate, pad to microseconds
                return value[:-1] + ".000000"[size - 27:] + "Z" if size < 27 else value
            moment = dt.datetime.fromisoformat(value)
            if moment.tzinfo is not None:
                moment = moment.astimezone(dt.timezone.utc).replace(tzinfo=None)
            return moment.isoformat(timespec="microseconds") + "Z"
        else:
            epoch = integer(value, field)
            scale = next(s for limit, s in ((1e11, 1e9), (1e14, 1e6), (1e17, 1e3), (float("inf"), 1))
                         if abs(epoch) < limit)
            return iso_from_ns(int(epoch * scale))
    except (ValueError, OverflowError, OSError):
        raise BadRecord(f"{field}: not an ISO-8601 timestamp or epoch number: {str(value)[:40]!r}") from None


def latency_between(start: str, end: str) -> float | None:
    """Milliseconds from one normalised timestamp to another; None when either is missing."""
    if not start or not end:
        return None
    delta = dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)
    return delta.total_seconds() * 1000.0


# --- messages -----------------------------------------------------------------


def _arguments_json(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _openai_call(call_id: Any, name: Any, arguments: Any, field: str) -> dict[str, Any]:
    call = {"type": "function", "function": {"name": expect(name, str, f"{field}.name"),
                                             "arguments": _arguments_json(arguments if arguments is not None else {})}}
    if call_id is not None:
        call["id"] = text(call_id, f"{field}.id")
    return call


def _parts_message(message: dict[str, Any], field: str) -> dict[str, Any]:
    """An OpenTelemetry GenAI message ({"role", "parts"}) in the OpenAI shape."""
    role = message.get("role")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    response: dict[str, Any] | None = None
    for i, part in enumerate(expect(message.get("parts"), list, f"{field}.parts")):
        where = f"{field}.parts[{i}]"
        kind = expect(part, dict, where).get("type")
        if kind == "text" or kind == "reasoning":
            if kind == "text":
                texts.append(text(part.get("content"), f"{where}.content"))
        elif kind == "tool_call":
            calls.append(_openai_call(part.get("id"), part.get("name"), part.get("arguments"), where))
        elif kind == "tool_call_response":
            result = part.get("result", part.get("response"))
            response = {"role": "tool", "content": result if isinstance(result, str) else json.dumps(result),
                        "tool_call_id": text(part.get("id"), f"{where}.id").strip()}
        else:
            texts.append(json.dumps(part, ensure_ascii=False, sort_keys=True))
    if response is not None:
        return response
    out: dict[str, Any] = {"role": role, "content": "\n".join(texts) if texts else None}
    if calls:
        out["tool_calls"] = calls
    return out


def _langchain_message(message: dict[str, Any], field: str) -> dict[str, Any]:
    """A LangChain message (serialized constructor or plain dict) in the OpenAI shape."""
    if "kwargs" in message and "lc" in message:
        body = expect(message["kwargs"], dict, f"{field}.kwargs")
        class_name = (message.get("id") or [""])[-1] if isinstance(message.get("id"), list) else ""
        kind = body.get("type") or class_name
        field = f"{field}.kwargs"
    else:
        body, kind = message, message.get("type")
    kind = kind if isinstance(kind, str) else repr(kind)[:40]
    role = body.get("role") if kind in ("chat", "ChatMessage") else _LC_ROLES.get(kind)
    if role is None:
        raise BadRecord(f"{field}.type: unknown message type {kind!r}")
    out: dict[str, Any] = {"role": role, "content": body.get("content")}
    calls = body.get("tool_calls") or []
    if calls:
        out["tool_calls"] = [
            _openai_call(c.get("id"), c.get("name"), c.get("args", c.get("arguments")), f"{field}.tool_calls[{i}]")
            if isinstance(c, dict) and "function" not in c else c
            for i, c in enumerate(expect(calls, list, f"{field}.tool_calls"))
        ]
    if body.get("tool_call_id") is not None:
        out["tool_call_id"] = text(body["tool_call_id"], f"{field}.tool_call_id")
    if isinstance(body.get("name"), str) and body["name"]:
        out["name"] = body["name"]
    return out


def _known_role(role: Any) -> bool:
    return type(role) is str and role in ROLES


def message(value: Any, field: str) -> dict[str, Any]:
    """One chat message, validated and in the OpenAI shape. Raises BadRecord."""
    msg = expect(value, dict, field)
    if "role" not in msg:
        if "parts" in msg:
            raise BadRecord(f"{field}.role: missing")
        if "type" in msg or "lc" in msg:
            msg = _langchain_message(msg, field)
    elif "parts" in msg:
        msg = _parts_message(msg, field)
    role = msg.get("role")
    if not _known_role(role):
        raise BadRecord(f"{field}.role: unknown role {str(role)[:40]!r}")
    expect(msg.get("content"), (str, list, type(None)), f"{field}.content")
    return msg


def messages(value: Any, field: str) -> list[dict[str, Any]]:
    """A non-empty list of chat messages in the OpenAI shape. Raises BadRecord."""
    expect(value, list, field)
    if not value:
        raise BadRecord(f"{field}: empty")
    for m in value:  # fast path: already OpenAI-shaped, as most logs are
        if (type(m) is not dict or not _known_role(m.get("role")) or "parts" in m
                or type(m.get("content")) not in _CONTENT):
            return [message(m, f"{field}[{i}]") for i, m in enumerate(value)]
    return value


def content_text(content: Any, field: str) -> str | None:
    """Message content as plain text: a string as is, text parts joined, None as None."""
    if content is None or isinstance(content, str):
        return content
    parts = []
    for i, part in enumerate(expect(content, list, field)):
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") in ("text", "output_text"):
            parts.append(text(part.get("text", part.get("content")), f"{field}[{i}].text"))
    return "".join(parts)


def tool_calls(message_: dict[str, Any], field: str) -> list[dict[str, Any]]:
    """An assistant message's tool calls (and the legacy `function_call`) as
    [{"name", "arguments": dict}], arguments decoded from their JSON string."""
    raw = message_.get("tool_calls") or []
    if message_.get("function_call"):
        raw = [{"function": message_["function_call"]}]
    calls = []
    for i, call in enumerate(expect(raw, list, f"{field}.tool_calls")):
        where = f"{field}.tool_calls[{i}]"
        function = expect(expect(call, dict, where).get("function"), dict, f"{where}.function")
        name = expect(function.get("name"), str, f"{where}.function.name")
        arguments = function.get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except (json.JSONDecodeError, RecursionError):
                raise BadRecord(f"{where}.function.arguments: invalid JSON") from None
        expect(arguments, dict, f"{where}.function.arguments")
        calls.append({"name": name, "arguments": arguments})
    return calls


def output_of(value: Any, field: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(output text, decoded tool calls) from the shapes tools log a model's answer in:

    a string; an OpenAI chat completion ({"choices": [...]}); one assistant message
    (OpenAI, LangChain or OpenTelemetry parts); {"message": ...}; {"messages": [...]}
    or a list of messages (the last one; of OpenTelemetry choices, the first);
    LangChain's {"generations": [[...]]}. Wrappers are unwrapped in a loop, at most
    MAX_DEPTH deep. Raises BadRecord for anything else.
    """
    for _ in range(MAX_DEPTH):
        if value is None or isinstance(value, str):
            return value, []
        if isinstance(value, list):
            if not value:
                return None, []
            index = 0 if isinstance(value[0], dict) and "finish_reason" in value[0] else len(value) - 1
            value, field = value[index], f"{field}[{index}]"
            continue
        expect(value, dict, field)
        if "choices" in value:
            choices = expect(value["choices"], list, f"{field}.choices")
            if not choices:
                return None, []
            choice = expect(choices[0], dict, f"{field}.choices[0]")
            answer = choice.get("message")
            if (type(answer) is dict and answer.get("role") == "assistant" and type(answer.get("content")) is str
                    and not answer.get("tool_calls") and not answer.get("function_call")):
                return answer["content"], []  # fast path: a plain text answer
            if "message" not in choice and "text" in choice:
                return expect(choice["text"], (str, type(None)), f"{field}.choices[0].text"), []
            value, field = expect(answer, dict, f"{field}.choices[0].message"), f"{field}.choices[0].message"
            continue
        if "generations" in value:
            generations = expect(value["generations"], list, f"{field}.generations")
            first = generations[0] if generations else []
            first = first[0] if isinstance(first, list) and first else first
            if not first:
                return None, []
            expect(first, dict, f"{field}.generations[0][0]")
            if first.get("message") is None:
                return expect(first.get("text"), (str, type(None)), f"{field}.generations[0][0].text"), []
            value, field = first["message"], f"{field}.generations[0][0].message"
            continue
        key = next((k for k in ("message", "messages", "output") if k in value), None)
        if key is not None and not ("role" in value or "lc" in value or "parts" in value):
            value, field = value[key], f"{field}.{key}"
            continue
        if "role" not in value and "lc" not in value and "type" not in value:
            value = {"role": "assistant", **value}  # proxies often log the answer without its role
        msg = message(value, field)
        return content_text(msg.get("content"), f"{field}.content"), tool_calls(msg, field)
    raise BadRecord(f"{field}: nested deeper than {MAX_DEPTH} levels")


def request_of(inputs: Any, field: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(messages, tools, model) from the inputs an LLM call was traced with.

    Reads ``{"messages", "tools"?, "model"?}`` (OpenAI or LangChain messages; LangChain's
    batch form ``[[message, ...]]`` takes the first list), a prompt under ``prompt`` /
    ``prompts`` / ``input`` / ``inputs``, a bare message list, or a prompt string.
    Raises BadRecord.
    """
    tools: list[Any] = []
    model = ""
    if isinstance(inputs, dict):
        tools = inputs.get("tools") or []
        model = inputs.get("model") or inputs.get("model_name") or ""
        if "messages" in inputs:
            inputs, field = inputs["messages"], f"{field}.messages"
        else:
            prompt = next((inputs[k] for k in ("prompt", "prompts", "input", "inputs") if k in inputs), None)
            if prompt is None:
                raise BadRecord(f"{field}: no messages or prompt in the inputs")
            inputs = prompt
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], (list, str)):
        inputs = inputs[0]  # LangChain: one message list (or prompt) per batch item
    if isinstance(inputs, str):
        inputs = [{"role": "user", "content": inputs}]
    return messages(inputs, field), expect(tools, list, f"{field}.tools"), text(model, f"{field}.model")


# --- usage, cost, feedback ----------------------------------------------------

_PROMPT_KEYS = ("prompt_tokens", "input_tokens", "input", "promptTokens", "inputTokens")
_COMPLETION_KEYS = ("completion_tokens", "output_tokens", "output", "completionTokens", "outputTokens")


def usage(value: Any, field: str) -> dict[str, int]:
    """Token usage in any of the common spellings as {"prompt_tokens", "completion_tokens"}."""
    if not value:
        return {}
    found = expect(value, Mapping, field)
    out = {}
    for target, keys in (("prompt_tokens", _PROMPT_KEYS), ("completion_tokens", _COMPLETION_KEYS)):
        for key in keys:
            count = found.get(key)
            if count is not None:
                out[target] = count if type(count) is int else integer(count, f"{field}.{key}")
                break
    return out


def feedback(scores: Iterable[Any], field: str) -> float | None:
    """Mean of user/evaluator scores mapped onto [-1, 1], None when there are none.

    Booleans map to +1 / -1 (thumbs up / down); numbers in [0, 1] (the usual
    LangSmith / Langfuse / MLflow scale) map linearly (0 -> -1, 1 -> 1); numbers
    already in [-1, 0) are kept. Anything else raises BadRecord.
    """
    values = []
    for i, score in enumerate(scores):
        if isinstance(score, bool):
            values.append(1.0 if score else -1.0)
            continue
        value = number(score, f"{field}[{i}]")
        if value is None:
            continue
        if 0.0 <= value <= 1.0:
            values.append(2.0 * value - 1.0)
        elif -1.0 <= value < 0.0:
            values.append(value)
        else:
            raise BadRecord(f"{field}[{i}]: score {value} is outside [-1, 1]")
    return sum(values) / len(values) if values else None


def agent_step(metadata: Mapping[str, Any], metadata_field: str, name: Any) -> dict[str, str]:
    """The agent and step of an LLM call a tracing tool (Langfuse, LangSmith) logged inside an
    agent's trace, as `make_record` fields: the agent from `metadata.agent`; the step from
    LangGraph's node name (`metadata.langgraph_node`, the same for every call of that node),
    else the observation's or run's `name`. Raises BadRecord for a value that is neither a
    string nor a number."""
    return {"agent": text(metadata.get("agent"), f"{metadata_field}.agent"),
            "step": text(metadata.get("langgraph_node") or name, "name")}


def make_record(messages: list[dict[str, Any]], tools: list[dict[str, Any]], output_text: str | None,
                output_tool_calls: list[dict[str, Any]], **fields: Any) -> Record:
    """A Record whose id is the content hash of its messages, tools and output.

    Raises BadRecord when the content cannot be hashed: a lone surrogate in a
    string (json.loads and ijson decode "\\ud800" to one) or nesting too deep.
    The other fields are checked when the batch is written (see ingest).
    """
    try:
        record_id = content_id(messages, tools, output_text, output_tool_calls)
    except (TypeError, UnicodeEncodeError) as err:
        raise BadRecord(f"record: cannot be stored ({err})") from None
    except RecursionError:
        raise BadRecord("record: nested too deeply to be stored") from None
    return Record(id=record_id, messages=messages, tools=tools, output_text=output_text,
                  output_tool_calls=output_tool_calls, **fields)
