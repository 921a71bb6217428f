"""Schema-constrained decoding: a specialist's answer can only take the shape its task asks for.

At every decoding step a grammar masks the tokens that cannot continue a valid answer, before the
argmax, so a `tool_call` specialist names only a tool the request offered and gives it only the
arguments that tool's schema has, with the types and enum values it allows:

- tool_call: one or more `<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>` blocks joined by
  newlines, exactly `chat.render_output`'s text (json.dumps' `", "` and `": "` separators), N a tool
  of the request (the task schema's `tools` when the request has none: `kinds.base.tool_schema`);
- agent_turn: such calls, or a free-text reply that does not start with `<tool_call>`;
- json_extraction: a JSON object valid against the task schema's `json_schema` (any whitespace a
  pretty-printer would use);
- other kinds: no constraint (None).

The answer then ends with the end-of-sequence token (SmolLM2's `<|im_end|>`), which the grammar
allows only where the answer is complete.

One grammar, written here in GBNF, serves every backend: llguidance compiles it in-process
(`evaluate.generate` and `serve.engine`), and a vLLM or llama.cpp server gets its text
(`serve.backends`). llguidance was picked for the in-process path because it builds a grammar
without a per-vocabulary precomputation: per-call tool lists are mostly distinct, so the build is
paid on nearly every request, and a build plus a mask per token costs less in total than
xgrammar's compile plus its (faster) masks (figures in the issue's report).

Logged schemas are sloppy: types such as "str", no "type", nested objects without properties,
enums whose values do not fit their type, "required" names missing from "properties". `strict_schema`
rewrites a schema into the subset the grammar handles and never raises: what it cannot read
becomes "any JSON value" for that parameter (a "required" name without a schema becomes a
property of any value); objects with properties admit no other keys; keywords beyond type,
enum/const, properties, required and items (pattern, format, bounds, anyOf...) are dropped, so
their values are not enforced.

Trade-offs: object keys come in the schema's order (the grammar would otherwise have to admit
every permutation), so a specialist trained on another order is steered to the schema's; integers
have at most 16 digits, fractions 16 and exponents 3, so numbers end; strings are unbounded, so a
budget that runs out mid-string still cuts the answer; and the confidence is taken under the
constraint (over the allowed tokens only), so it is higher than the unconstrained model's for the
same answer, and a threshold certified without the constraint does not carry over.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch
from llguidance.gbnf_to_lark import gbnf_to_lark

from factory.kinds.base import tool_schema

CONSTRAINED_KINDS = ("tool_call", "agent_turn", "json_extraction")
# whether a specialist decodes under its grammar where its recipe or routing metadata does not say
CONSTRAINED_DECODING = True
MAX_DEPTH = 8  # deeper schemas are any JSON value there
_TYPES = ("string", "integer", "number", "boolean", "null", "array", "object")
_SCALARS = (str, int, float, bool, type(None))
_CALL_OPEN = "<tool_call>"


# --- sloppy schemas into the supported subset ---------------------------------------------------


def _fits(value: Any, kind: str) -> bool:
    """Whether a scalar enum value has JSON type `kind`."""
    if kind in ("integer", "number"):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and \
            (kind == "number" or float(value).is_integer())
    return {"string": isinstance(value, str), "boolean": isinstance(value, bool),
            "null": value is None}.get(kind, False)


def _clean(schema: Any, depth: int) -> dict[str, Any]:
    """`schema` in the subset: {} (any value), {"enum": [...]}, {"anyOf": [...]} of types, or one type
    with its properties/required/items."""
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return {}
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if not all(isinstance(k, str) and k in _TYPES for k in kinds) or (isinstance(kind, list) and not kind):
        return {}
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if values is not None:
        if not isinstance(values, list) or not values or not all(isinstance(v, _SCALARS) for v in values) \
                or (kinds and not all(any(_fits(v, k) for k in kinds) for v in values)):
            return {}
        return {"enum": [json.loads(v) for v in dict.fromkeys(json.dumps(v) for v in values)]}
    if not kinds:
        kinds = ["object"] if isinstance(schema.get("properties"), dict) else \
            ["array"] if isinstance(schema.get("items"), dict) else []
    if len(kinds) > 1:
        return {"anyOf": [_clean({**schema, "type": k}, depth) for k in dict.fromkeys(kinds)]}
    if not kinds:
        return {}
    if kinds[0] == "object":
        return _object(schema, depth)
    if kinds[0] == "array":
        items = schema.get("items")
        return {"type": "array", "items": _clean(items, depth + 1)} if isinstance(items, dict) else {"type": "array"}
    return {"type": kinds[0]}


def _object(schema: dict[str, Any], depth: int) -> dict[str, Any]:
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {"type": "object"}
    required = schema.get("required")
    required = [r for r in required if isinstance(r, str)] if isinstance(required, list) else []
    cleaned = {str(k): _clean(v, depth + 1) for k, v in properties.items()}
    cleaned.update({r: {} for r in required if r not in cleaned})
    return {"type": "object", "properties": cleaned, "required": list(dict.fromkeys(required)),
            "additionalProperties": False}


def strict_schema(schema: Any) -> dict[str, Any]:
    """A tool's `parameters` (or a `json_schema`) as the JSON schema the grammar enforces; never raises.

    The result is a valid JSON schema (jsonschema can check answers against it): an object,
    closed (`additionalProperties: false`) where the input lists properties, any object where
    it does not; inside, what cannot be read is any JSON value (see the module docstring).
    """
    cleaned = _clean(schema, 0)
    return cleaned if cleaned.get("type") == "object" else {"type": "object"}


# --- the GBNF grammar -------------------------------------------------------------------------------

# JSON scalars as json.dumps writes them (ensure_ascii=False: other characters as they are)
_PRIMITIVES = {
    "char": r'[^"\\\x00-\x1f] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": r'"\"" char* "\""',
    "integer": r'"-"? ("0" | [1-9] [0-9]{0,15})',
    "number": r'integer ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?',
    "boolean": '"true" | "false"',
    "null": '"null"',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" space (string ":" space value ("," space string ":" space value)*)? "}"',
    "array": '"[" space (value ("," space value)*)? "]"',
}
# json.dumps' separators exactly (`chat.render_output`), or what a pretty-printer adds (JSON answers)
_COMPACT = 'space ::= " "?'
_LOOSE = r'space ::= "" | " " | "\n" [ \t]{0,20}'


def _literal(text: str) -> str:
    """`text` as a GBNF string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") \
        .replace("\t", "\\t") + '"'


class _Rules:
    """GBNF rules under construction; identical bodies share one rule."""

    def __init__(self, compact: bool):
        self.compact = compact
        self.rules: dict[str, str] = {}
        self._names: dict[str, str] = {}

    def add(self, stem: str, body: str) -> str:
        if body not in self._names:
            name = f"{stem}{len(self.rules)}"
            self.rules[name], self._names[body] = body, name
        return self._names[body]

    def sep(self, text: str) -> str:
        """A JSON separator: json.dumps' (`", "`, `": "`) when compact, else the character and any spacing."""
        return _literal(text + " ") if self.compact else f"{_literal(text)} space"

    def value(self, schema: dict[str, Any]) -> str:
        """A rule (or primitive) for the values of a `strict_schema` subschema."""
        if "enum" in schema:
            return self.add("enum", " | ".join(_literal(json.dumps(v, ensure_ascii=False)) for v in schema["enum"]))
        if "anyOf" in schema:
            return self.add("any", " | ".join(self.value(s) for s in schema["anyOf"]))
        kind = schema.get("type")
        if kind == "object" and "properties" in schema:
            return self.add("obj", self._members(schema))
        if kind == "array" and schema.get("items"):
            item = self.value(schema["items"])
            return self.add("arr", f'"[" space ({item} ({self.sep(",")} {item})*)? "]"')
        return kind or "value"

    def _members(self, schema: dict[str, Any]) -> str:
        """`{...}` with the properties in order, each required one present, the optional ones maybe."""
        props, required = list(schema["properties"].items()), set(schema["required"])
        close = '"}"' if self.compact else 'space "}"'
        rest: dict[bool, str] = {True: close, False: close}  # the members after i, given whether none came yet
        for key, sub in reversed(props):
            member = f"{_literal(json.dumps(key, ensure_ascii=False))} {self.sep(':')} {self.value(sub)}"
            after = rest[False]
            first = self.add("m", f"{member} {after}")
            later = self.add("m", f"{self.sep(',')} {member} {after}")
            if key in required:
                rest = {True: first, False: later}
            else:
                rest = {True: self.add("m", f"{first} | {rest[True]}"),
                        False: self.add("m", f"{later} | {rest[False]}")}
        return f'"{{" {"" if self.compact else "space "}{rest[True]}'

    def text(self, root: str) -> str:
        lines = [f"root ::= {root}", _COMPACT if self.compact else _LOOSE]
        lines += [f"{name} ::= {body}" for name, body in _PRIMITIVES.items()]
        lines += [f"{name} ::= {body}" for name, body in self.rules.items()]
        return "\n".join(lines) + "\n"


def _tool(tool: Any) -> tuple[str, Any] | None:
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    return (fn["name"], fn.get("parameters")) if isinstance(fn, dict) and isinstance(fn.get("name"), str) else None


def _calls(rules: _Rules, tools: list[Any]) -> str | None:
    """The rule for one or more tagged calls to `tools`; None when no tool has a name."""
    named = dict(t for t in map(_tool, tools) if t)
    if not named:
        return None
    arguments = _literal(', "arguments": ')
    bodies = [rules.add("tool", f"{_literal(json.dumps(name, ensure_ascii=False))} {arguments} "
                                f"{rules.value(strict_schema(params))}") for name, params in named.items()]
    head, tail = _literal(f'{_CALL_OPEN}\n{{"name": '), _literal("}\n</tool_call>")
    call = rules.add("call", f'{head} ({" | ".join(bodies)}) {tail}')
    return rules.add("calls", f'{call} ("\\n" {call})*')


def _reply(rules: _Rules) -> str:
    """Non-empty text that starts with neither whitespace nor `<tool_call>` (spelt out character by
    character: GBNF has no negation)."""
    rules.rules["anychar"] = r"[^\x00]"
    tail = f"| [^{_CALL_OPEN[-1]}] anychar*"
    for char in reversed(_CALL_OPEN[1:-1]):
        tail = f"| [^{char}] anychar* | {_literal(char)} ({tail.removeprefix('| ')})?"
    return rules.add("reply", f'[^<\\x00-\\x20] anychar* | "<" ({tail.removeprefix("| ")})?')


@dataclass(frozen=True)
class Constraint:
    """A task's answer grammar: `gbnf` is its text (as llama.cpp and vLLM take it)."""

    gbnf: str

    @functools.cached_property
    def lark(self) -> str:
        """The grammar in llguidance's Lark syntax (converted once)."""
        return gbnf_to_lark(self.gbnf)

    def matcher(self, tokenizer, vocab_size: int) -> llguidance.LLMatcher:
        """A fresh matcher of this grammar at the answer's start, over `tokenizer`'s tokens and a model's
        `vocab_size` logits (ids the tokenizer lacks are never allowed)."""
        return _compiled(_llg_tokenizer(tokenizer, vocab_size), self.lark).deep_copy()


def for_task(kind: str, schema: dict[str, Any] | None, tools: list[dict[str, Any]] | None) -> Constraint | None:
    """The constraint of an answer of a task of `kind` with output `schema` to a request offering `tools`;
    None for kinds without one (see the module docstring), and for a call kind without any named tool
    (neither the request nor the task has one). Never raises on a malformed schema."""
    if kind not in CONSTRAINED_KINDS:
        return None
    schema = schema if isinstance(schema, dict) else {}
    key = json.dumps(schema.get("json_schema") if kind == "json_extraction" else tool_schema(schema, tools or [])
                     .get("tools"), default=str)
    return _constraint(kind, key)


def for_routing(routing: dict[str, Any], tools: list[list[dict[str, Any]]]) -> list[Constraint | None] | None:
    """One constraint per request (each offering its `tools`) for a registered specialist's routing metadata,
    as its evaluation decoded: None when the metadata turns constrained decoding off."""
    if not routing.get("constrained_decoding", CONSTRAINED_DECODING):
        return None
    return [for_task(routing["kind"], routing.get("output_schema"), t) for t in tools]


@functools.lru_cache(maxsize=512)
def _constraint(kind: str, key: str) -> Constraint | None:
    value = json.loads(key)
    if kind == "json_extraction":
        rules = _Rules(compact=False)
        return Constraint(rules.text(rules.value(strict_schema(value if value is not None else {"type": "object"}))))
    rules = _Rules(compact=True)
    calls = _calls(rules, value if isinstance(value, list) else [])
    if calls is None:
        return None
    return Constraint(rules.text(calls if kind == "tool_call" else f"{calls} | {_reply(rules)}"))


# --- matching -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _llg_tokenizer(tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of a Hugging Face fast tokenizer (about a second to build, so cached)."""
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)


@functools.lru_cache(maxsize=256)
def _compiled(tokenizer: llguidance.LLTokenizer, lark: str) -> llguidance.LLMatcher:
    """A matcher at the start of `lark`, kept to be copied. Raises RuntimeError when llguidance refuses
    the grammar (a bug here: `strict_schema` only lets through what the grammar writer handles)."""
    matcher = llguidance.LLMatcher(tokenizer, lark, log_level=0)
    if matcher.is_error():
        raise RuntimeError(f"llguidance cannot build the answer grammar: {matcher.get_error()}")
    return matcher


def advance(matcher: llguidance.LLMatcher | None, token: int) -> None:
    """Feed the token a row chose to its matcher (none, or one stopped after its answer: nothing)."""
    if matcher is not None and not matcher.is_stopped():
        matcher.consume_token(token)


def mask_logits(scores: torch.Tensor, matchers: list[llguidance.LLMatcher | None]) -> torch.Tensor:
    """`scores` [rows, vocabulary] with the tokens each row's matcher forbids set to -inf, in place: once
    the answer is complete only the end-of-sequence token is left. Rows without a matcher, or whose
    matcher has failed (it cannot, fed only the tokens its masks allowed), are left as they are.
    (An additive 0/-inf bias: `masked_fill` with a boolean mask is several times slower on a CPU.)"""
    rows = [i for i, m in enumerate(matchers) if m is not None and not m.is_error()]
    if not rows:
        return scores
    words = (scores.shape[-1] + 31) // 32
    bitmask = np.zeros((len(rows), words), dtype=np.int32)
    for j, i in enumerate(rows):
        matchers[i].unsafe_compute_mask_ptr(bitmask[j].ctypes.data, words * 4)
    bias = np.take(_BIAS, bitmask.view(np.uint8), axis=0).reshape(len(rows), -1)[:, :scores.shape[-1]]
    for j, i in enumerate(rows):
        scores[i] += torch.from_numpy(bias[j]).to(scores.device, scores.dtype)
    return scores


# per byte of a bitmask: the bias of its 8 tokens (bit set: allowed, 0; else -inf)
_BIAS = np.where(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little"),
                 0.0, -np.inf).astype(np.float32)
