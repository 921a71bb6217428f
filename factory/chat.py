"""Chat rendering and parsing: the one place a conversation becomes model text and back.

Training, evaluation, serving and the registry's pyfunc all go through here, so a
specialist sees at inference exactly the text it was trained on. Nothing here imports the
trainer; the only model-side object is the tokenizer (its chat template and special tokens).

What a logged conversation may hold, and how each piece is rendered:

* content as a string, null, or OpenAI content parts (`[{"type": "text", "text": ...}]`):
  text parts are joined with newlines; other parts (images, audio) are dropped here
  (the router escalates such requests before they reach a specialist); a non-string
  tool result (a JSON object) becomes its compact JSON.
* assistant turns with `tool_calls` (arguments as a JSON string or an object) and no or
  null content, and `tool` (or legacy `function`) messages with `tool_call_id` and `name`.
  Call ids are rewritten to 9-character ids (`call00001`...) that every template accepts
  (Mistral's insists on exactly 9), keeping each tool message tied to its call.
* templates that render tools and tool calls themselves (Qwen2.5, Llama 3.1, Mistral v0.3)
  get them natively. A template that ignores `tools` (SmolLM2's) gets a compact tool list
  appended to the system message (`tools_text`): with a fixed tool list a model could
  memorise the tools, with a per-call list it must read them. A template that ignores
  `tool_calls` gets earlier calls as `<tool_call>` text, the format the model answers in.
  What a template supports is found by rendering a probe, not by reading its source.
* a template that still refuses the conversation (strict role alternation, no system
  role, one call per turn) gets a flattened copy: tool results as user turns, consecutive
  turns of one role merged, the system prompt folded into the first user turn. If that
  fails too, `ChatError` says why; callers count such records by reason and skip them.

Long conversations are budgeted, not dropped (`fit_messages`): the system prompt, the tools,
the latest user turn and everything after it are kept, and whole earlier turns are dropped,
oldest first, until the prompt fits.

A task whose every call carries the same system prompt and tools (a long policy) can have them
learned into the weights instead of read (`task_policy`, `without_policy`): its specialist is
trained and asked without them, and answers only conversations whose policy fingerprint matches.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from factory.errors import FactoryError

TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
_PROBE_TOOL = "zq_probe_tool"
_TOOLS_HEADER = ("You can call these tools. To call one, answer with "
                 '<tool_call>{"name": <tool name>, "arguments": <JSON object>}</tool_call>:')
POLICY_CHANGED = "policy_changed"  # the ChatError reason of a request whose policy its specialist did not learn
_DESCRIPTION_CHARS = 200
_PARAM_CHARS = 80


class ChatError(FactoryError):
    """A conversation the base model's chat template cannot render; `reason` is short, for counting."""

    def __init__(self, reason: str):
        super().__init__(f"chat template cannot render the conversation: {reason}")
        self.reason = reason


# --- messages -------------------------------------------------------------------------------------


def text_of(content: Any) -> str:
    """Message content as text: strings as they are, text parts joined with newlines, None as ""."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content
                         if isinstance(p, dict) and p.get("type", "text") == "text" and "text" in p)
    return json.dumps(content, ensure_ascii=False, sort_keys=True)


def _arguments(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value if value is not None else {}


def _call(call: dict[str, Any]) -> dict[str, Any]:
    """A logged call (OpenAI `{"function": {...}}` or the records' `{"name", "arguments"}`) as name + arguments."""
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    return {"name": str(fn.get("name", "")), "arguments": _arguments(fn.get("arguments", fn.get("parameters")))}


def normalize(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` in the one shape every template path below renders (see the module docstring)."""
    ids: dict[str, str] = {}
    pending: list[str] = []
    out = []
    for message in messages:
        role = message.get("role")
        role = "tool" if role == "function" else role
        if role == "developer":
            role = "system"
        item: dict[str, Any] = {"role": role, "content": text_of(message.get("content"))}
        calls = message.get("tool_calls") or ([message["function_call"]] if message.get("function_call") else [])
        if role == "assistant" and calls:
            item["tool_calls"] = []
            for call in calls:
                new = f"call{len(ids) + 1:05d}"
                ids[str(call.get("id") or new)] = new
                pending.append(new)
                item["tool_calls"].append({"id": new, "type": "function", "function": _call(call)})
        elif role == "tool":
            known = ids.get(str(message.get("tool_call_id")))
            call_id = known or (pending[0] if pending else f"call{len(ids) + 1:05d}")
            if call_id in pending:
                pending.remove(call_id)
            item["tool_call_id"] = call_id
            if message.get("name"):
                item["name"] = str(message["name"])
        out.append(item)
    return out


# --- a task's fixed policy ------------------------------------------------------------------------


def policy_fingerprint(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    """16 hex digits naming a conversation's policy: its system (or developer) messages and its tools."""
    system = "\n\n".join(text_of(m.get("content")) for m in messages if m.get("role") in ("system", "developer"))
    listing = json.dumps(tools or [], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(f"{system}\0{listing}".encode()).hexdigest()[:16]


def task_policy(rows: list[dict[str, Any]], share: float = 0.9) -> str | None:
    """The fingerprint of the policy (system prompt and tools) that at least `share` of `rows` carry, else None.

    A policy is a fixed prefix only when it is fixed: a task whose system prompt holds the date or
    the customer's name, or whose calls offer their own tools, has none.
    """
    if len(rows) < 2:
        return None
    counts = Counter(policy_fingerprint(r["messages"], r.get("tools") or []) for r in rows)
    fingerprint, n = counts.most_common(1)[0]
    return fingerprint if n >= share * len(rows) else None


def without_policy(messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                   policy: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(messages, tools) as a specialist that learned `policy` reads them: no system prompt, no tool list.

    `policy` None returns them unchanged. Raises ChatError (reason "policy_changed") when the
    conversation's own policy is another: its specialist never saw that one.
    """
    if policy is None:
        return messages, tools
    if policy_fingerprint(messages, tools) != policy:
        raise ChatError(POLICY_CHANGED)
    return [m for m in messages if m.get("role") not in ("system", "developer")], []


# --- tools and outputs as text --------------------------------------------------------------------


def _clip(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _param(name: str, spec: dict[str, Any], required: bool) -> str:
    kind = spec.get("type", "any")
    kind = "|".join(map(str, kind)) if isinstance(kind, list) else str(kind)
    if isinstance(spec.get("enum"), list):
        kind = "|".join(json.dumps(v, ensure_ascii=False) for v in spec["enum"][:12])
    text = f"{name}{'' if required else '?'}: {kind}"
    if "default" in spec:
        text += f" = {json.dumps(spec['default'], ensure_ascii=False)}"
    if spec.get("description"):
        text += f" ({_clip(spec['description'], _PARAM_CHARS)})"
    return text


def tools_text(tools: list[dict[str, Any]]) -> str:
    """A compact tool list for templates that ignore `tools`: `- name(arg: type, opt?: type): description`.

    Trade-off: a few dozen tokens a tool instead of the full JSON schema (nested object
    properties are shown as `object`), which keeps per-call tool lists affordable on CPU.
    """
    lines = [_TOOLS_HEADER]
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        params = fn.get("parameters") or {}
        props = params.get("properties") or {}
        required = set(params.get("required") or [])
        args = ", ".join(_param(k, v if isinstance(v, dict) else {}, k in required) for k, v in props.items())
        line = f"- {fn.get('name', '')}({args})"
        if fn.get("description"):
            line += f": {_clip(fn['description'], _DESCRIPTION_CHARS)}"
        lines.append(line)
    return "\n".join(lines)


def render_output(output: dict[str, Any]) -> str:
    """An output as the assistant's text: content, or tool calls in the Hermes/Qwen `<tool_call>` format."""
    calls = output.get("tool_calls") or []
    if calls:
        return "\n".join(
            "<tool_call>\n" + json.dumps(_call(c), ensure_ascii=False) + "\n</tool_call>" for c in calls)
    return text_of(output.get("content"))


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _as_call(value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict) and isinstance(value.get("name"), str) \
            and set(value) <= {"name", "arguments", "parameters", "id", "type"}:
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = _json(arguments)
        return {"name": value["name"], "arguments": arguments} if isinstance(arguments, dict) else None
    return None


def parse_output(text: str) -> dict[str, Any]:
    """Invert the renderings: tool calls become tool calls, anything else is content.

    Reads Hermes/Qwen `<tool_call>{...}</tool_call>` blocks, and a whole answer that is
    a call object (`{"name", "parameters"}`: Llama 3.1) or a list of them (Mistral's
    `[TOOL_CALLS] [...]`, with or without the marker).
    """
    calls = [c for c in (_as_call(_json(b)) for b in TOOL_CALL.findall(text)) if c]
    if not calls:
        body = text.strip().removeprefix("[TOOL_CALLS]").removeprefix("<|python_tag|>").strip()
        value = _json(body) if body[:1] in ("[", "{") else None
        parsed = [_as_call(v) for v in (value if isinstance(value, list) else [value])]
        if parsed and all(parsed):
            calls = parsed
    if calls:
        return {"content": None, "tool_calls": calls}
    return {"content": text.strip(), "tool_calls": []}


# --- what a template supports, found by rendering ------------------------------------------------


@dataclass(frozen=True)
class Features:
    tools: bool  # renders the `tools` argument
    tool_calls: bool  # renders assistant `tool_calls`
    injects_system: bool  # adds a default system prompt when the conversation has none


def _try(tokenizer, messages: list[dict], **kwargs) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except (TemplateError, TypeError, KeyError, IndexError, ValueError):
        return None


@functools.lru_cache(maxsize=16)
def _features(template: str, tokenizer) -> Features:
    user = [{"role": "user", "content": "x"}]
    probe = [{"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}]
    with_tools = _try(tokenizer, user, tools=probe) or ""
    called = [*user, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call00001", "type": "function", "function": {"name": _PROBE_TOOL, "arguments": {}}}]}]
    bare = _try(tokenizer, user) or ""
    empty = _try(tokenizer, [{"role": "system", "content": ""}, *user])
    return Features(tools=_PROBE_TOOL in with_tools, tool_calls=_PROBE_TOOL in (_try(tokenizer, called) or ""),
                    injects_system=empty is not None and len(bare) > len(empty))


def features(tokenizer) -> Features:
    """What the tokenizer's chat template renders (cached per template)."""
    return _features(tokenizer.chat_template or "", tokenizer)


# --- rendering ------------------------------------------------------------------------------------


def _prepared(tokenizer, messages: list[dict], tools: list[dict]) -> tuple[list[dict], dict[str, Any]]:
    """Normalised messages adapted to what the template renders, and the `tools` keyword for it."""
    feats = features(tokenizer)
    msgs = normalize(messages)
    if not feats.tool_calls:
        msgs = [{"role": m["role"], "content": render_output({"tool_calls": [c["function"] for c in m["tool_calls"]]})}
                if m.get("tool_calls") else m for m in msgs]
    if tools and not feats.tools:
        listing = tools_text(tools)
        if msgs and msgs[0]["role"] == "system":
            content = msgs[0]["content"]
            msgs = [{"role": "system", "content": f"{content}\n\n{listing}" if content else listing}, *msgs[1:]]
        else:
            msgs = [{"role": "system", "content": listing}, *msgs]
    if feats.injects_system and (not msgs or msgs[0]["role"] != "system"):
        msgs = [{"role": "system", "content": ""}, *msgs]
    return msgs, ({"tools": tools} if tools and feats.tools else {})


def _flattened(msgs: list[dict]) -> list[dict]:
    """A conversation of alternating user/assistant text turns, the system prompt folded into the first."""
    system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system" and m["content"])
    turns: list[dict] = []
    for m in msgs:
        if m["role"] == "system":
            continue
        if m.get("tool_calls"):
            role, content = "assistant", render_output({"tool_calls": [c["function"] for c in m["tool_calls"]]})
        elif m["role"] == "tool":
            role, content = "user", f"<tool_response>\n{m['content']}\n</tool_response>"
        else:
            role, content = ("assistant" if m["role"] == "assistant" else "user"), m["content"]
        if turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": f"{turns[-1]['content']}\n\n{content}"}
        else:
            turns.append({"role": role, "content": content})
    if system:
        if turns and turns[0]["role"] == "user":
            turns[0] = {"role": "user", "content": f"{system}\n\n{turns[0]['content']}"}
        else:
            turns.insert(0, {"role": "user", "content": system})
    return turns


def _render(tokenizer, msgs: list[dict], kwargs: dict[str, Any], generation: bool) -> str:
    text = _try(tokenizer, msgs, add_generation_prompt=generation, **kwargs)
    if text is None:
        text = _try(tokenizer, _flattened(msgs), add_generation_prompt=generation)
    if text is None:
        try:
            tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation, **kwargs)
        except Exception as err:  # noqa: BLE001 - reported by reason, the record is skipped
            raise ChatError(f"{type(err).__name__}: {str(err)[:120]}") from None
        raise ChatError("the template rendered nothing")
    return text


def render_prompt(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    """The prompt text with the generation prompt appended. Raises ChatError.

    A conversation without a system message gets an empty one when the template would
    inject its own default (SmolLM2: "You are a helpful AI assistant named SmolLM..."):
    those tokens cost time in every training step and carry nothing task-specific.
    """
    msgs, kwargs = _prepared(tokenizer, messages, tools or [])
    return _render(tokenizer, msgs, kwargs, generation=True)


def render_completion(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                      output: dict[str, Any]) -> str:
    """The assistant turn that follows `render_prompt`, ending with the eos token. Raises ChatError.

    Templates that render `tool_calls` format the calls themselves; other templates get
    `render_output`'s text as the content. Falls back to `render_output(output) + eos`
    when the template does not render the prompt as a prefix of the whole conversation.
    """
    msgs, kwargs = _prepared(tokenizer, messages, tools or [])
    calls = output.get("tool_calls") or []
    if calls and features(tokenizer).tool_calls:
        first = sum(len(m.get("tool_calls", [])) for m in msgs) + 1
        turn = {"role": "assistant", "content": text_of(output.get("content")), "tool_calls": [
            {"id": f"call{first + i:05d}", "type": "function", "function": _call(c)} for i, c in enumerate(calls)]}
    else:
        turn = {"role": "assistant", "content": render_output(output)}
    prompt = _render(tokenizer, msgs, kwargs, generation=True)
    eos = tokenizer.eos_token
    full = _try(tokenizer, [*msgs, turn], **kwargs)
    if full is None or not full.startswith(prompt):
        return render_output(output) + eos
    completion = full[len(prompt):]
    end = completion.rfind(eos)
    return completion[: end + len(eos)] if end >= 0 else completion + eos


def fit_messages(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                 budget: int) -> tuple[list[dict[str, Any]], int]:
    """`messages` shortened until the rendered prompt has at most `budget` tokens; (messages, messages dropped).

    Keeps the system prompt, the tools, the latest user message and what follows it, and
    drops whole earlier turns (a user message with the replies, calls and tool results
    that follow it), oldest first: the instruction and the question the answer depends on
    carry the task, the middle of a long dialogue carries it least. When the latest turn
    alone is still too long (a long chain of calls), its oldest call-and-result steps go
    next, the user message staying. Raises ChatError (reason "too long") when even the
    shortest form exceeds the budget, and when the template cannot render it.
    """
    def fits(msgs: list[dict]) -> bool:
        prompt = render_prompt(tokenizer, msgs, tools)
        return len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= budget

    msgs = normalize(messages)
    if fits(msgs):
        return msgs, 0
    system = [m for m in msgs if m["role"] == "system"]
    rest = [m for m in msgs if m["role"] != "system"]
    last = max((i for i, m in enumerate(rest) if m["role"] == "user"), default=0)
    # each candidate is shorter than the one before: the first that fits is found by bisection
    candidates = [system + rest[i:] for i in range(1, last + 1)
                  if rest[i]["role"] == "user" and rest[i - 1]["role"] != "user"]
    candidates += [system + rest[last:last + 1] + rest[j:] for j in range(last + 2, len(rest))
                   if rest[j]["role"] == "assistant"]
    first = bisect.bisect_left(candidates, True, key=fits)
    if first == len(candidates):
        raise ChatError("too long")
    return candidates[first], len(msgs) - len(candidates[first])


def fit_prompt(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]], budget: int,
               policy: str | None = None) -> str:
    """`render_prompt` of `messages`, shortened to `budget` tokens by `fit_messages` when longer; for a
    specialist that learned `policy`, without it (`without_policy`).

    A prompt within the budget (nearly every request) is rendered and tokenized once. Raises ChatError.
    """
    messages, tools = without_policy(messages, tools, policy)
    prompt = render_prompt(tokenizer, messages, tools)
    if len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= budget:
        return prompt
    return render_prompt(tokenizer, fit_messages(tokenizer, messages, tools, budget)[0], tools)
