"""Scoring primitives the task kinds (`factory.kinds`) are built from; each returns a value in [0, 1].

An output (prediction or reference) is an assistant message:
`{"content": str | None, "tool_calls": [{"name": str, "arguments": dict}]}`.

label_match       stripped content equals the reference, case-insensitively.
tool_calls_match  AST match in the style of the Berkeley Function Calling Leaderboard.
json_field_f1     field-level F1 between flattened (key path, value) leaves.
rouge_l           ROUGE-L F1 over word tokens.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

INVALID = "<invalid>"
_TOKEN = re.compile(r"\w+")

Output = dict[str, Any]


def macro_f1(preds: Sequence[str], refs: Sequence[str], labels: Sequence[str] = ()) -> float:
    """Unweighted mean of per-class F1 over normalised (stripped, casefolded) labels.

    Classes are the declared `labels` plus any reference label, keeping only
    those that occur in refs or preds (a class seen nowhere would be 0/0).
    A prediction outside the classes is not a class of its own: it costs the
    true class recall but does not add a zero-F1 class per distinct garbage
    string (unlike scikit-learn's default, which would).
    """
    classes = {_norm(x) for x in labels} | {_norm(x) for x in refs}
    preds, refs = [_norm(x) for x in preds], [_norm(x) for x in refs]
    n_pred, n_ref = Counter(preds), Counter(refs)
    hits = Counter(r for p, r in zip(preds, refs) if p == r)
    present = [c for c in classes if n_pred[c] or n_ref[c]]
    return mean([2 * hits[c] / (n_pred[c] + n_ref[c]) for c in present])


def confusion_matrix(
    preds: Sequence[Output], refs: Sequence[Output], labels: Sequence[str]
) -> tuple[list[str], list[list[int]]]:
    """Counts of (reference label, predicted label), matched case-insensitively.

    Returns (labels, matrix): row i is reference `labels[i]`; the columns are
    `labels` followed by one "<invalid>" column for predictions outside the
    label set, so the matrix is len(labels) x (len(labels) + 1).
    Raises ValueError when a reference is not one of `labels`.
    """
    index = {_norm(label): i for i, label in enumerate(labels)}
    matrix = [[0] * (len(labels) + 1) for _ in labels]
    for pred, ref in zip(preds, refs):
        row = index.get(label_of(ref))
        if row is None:
            raise ValueError(f"reference label {_text(ref)!r} is not one of {list(labels)}")
        matrix[row][index.get(label_of(pred), len(labels))] += 1
    return list(labels), matrix


def tool_calls_match(pred: Output, ref: Output, schema: dict[str, Any]) -> bool:
    """True when the predicted calls equal the reference calls as a multiset.

    Calls are compared order-free (parallel calls) after canonicalising each
    one against its tool's JSON schema (schema["tools"], OpenAI function tools):
    - numbers: 12 == 12.0; under "number"/"integer" a numeric string ("12.5")
      is coerced to its number; booleans never equal numbers;
    - "boolean": "true"/"false" strings (any case) are coerced to booleans;
    - strings: surrounding whitespace is ignored, case is not (ids, paths);
    - arrays are compared in order, objects recursively with their properties;
    - an argument absent on one side equals the property's "default" when the
      schema declares one; with no declared default, an argument present on
      only one side is a mismatch. This is stricter than BFCL, whose curated
      answers mark an optional parameter as omittable; a single teacher call
      cannot say whether omitting it means the same call. Arguments unknown to
      the schema are therefore a mismatch unless both sides pass them equal.
    Arguments that are not a dict (failed to decode) never match. A tool
    missing from the schema is compared without coercion beyond numbers.
    A reference with no tool calls matches a prediction with no tool calls:
    the decision not to call a tool is what is graded, not the text.
    """
    tools = {}
    for tool in schema.get("tools", []):
        fn = tool.get("function", tool)
        tools[fn["name"]] = fn.get("parameters") or {}
    pred_calls, ref_calls = _canonical_calls(pred, tools), _canonical_calls(ref, tools)
    return pred_calls is not None and pred_calls == ref_calls


def parse_json_object(output: Output) -> dict[str, Any] | None:
    """The content parsed as a JSON object, or None (invalid JSON, non-object).

    Strict: a Markdown code fence around the JSON makes it invalid, because a
    specialist trained on the teacher's raw JSON should emit raw JSON.
    """
    try:
        value = json.loads(_text(output))
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def json_field_f1(pred: Output, ref: Output) -> float:
    """F1 between the sets of (key path, value) leaves of two JSON objects.

    Paths are tuples of keys and list indices, so lists are compared by
    position; string values are stripped and casefolded, numbers compare
    numerically (1 == 1.0), and booleans, null, strings and numbers never
    equal each other. Empty objects and lists are leaves. A prediction that
    is not a JSON object scores 0. Raises ValueError when the reference is
    not a JSON object.
    """
    ref_obj = parse_json_object(ref)
    if ref_obj is None:
        raise ValueError(f"reference is not a JSON object: {_text(ref)[:200]!r}")
    pred_obj = parse_json_object(pred)
    if pred_obj is None:
        return 0.0
    p, r = set(_leaves(pred_obj)), set(_leaves(ref_obj))
    return 2 * len(p & r) / (len(p) + len(r))


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 (beta = 1) over lowercased `\\w+` tokens.

    A compact bit-parallel LCS (Hyyrö 2004) on Python integers replaces the
    `rouge-score` dependency: O(len(pred) * len(ref) / 64) word operations, so
    long answers stay fast. Tokens are Unicode word runs without stemming,
    whereas rouge-score keeps only [a-z0-9] (it drops non-Latin text) and is
    usually run with a Porter stemmer, so scores differ slightly from it.
    Two texts with no tokens score 1.0 (identical); one empty side scores 0.0.
    """
    p, r = _TOKEN.findall(pred.casefold()), _TOKEN.findall(ref.casefold())
    if not p or not r:
        return float(p == r)
    return 2 * _lcs_length(p, r) / (len(p) + len(r))


def _lcs_length(a: list[str], b: list[str]) -> int:
    masks: dict[str, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def _canonical_calls(output: Output, tools: dict[str, dict[str, Any]]) -> list[str] | None:
    calls = []
    for call in output.get("tool_calls") or []:
        args = call.get("arguments")
        if not isinstance(args, dict):
            return None
        name = call.get("name")
        calls.append(json.dumps([name, _canon(args, tools.get(name, {}))], sort_keys=True))
    return sorted(calls)


def _canon(value: Any, schema: dict[str, Any]) -> Any:
    declared = schema.get("type")
    types = {declared} if isinstance(declared, str) else set(declared or ())
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        out = {key: _canon(item, props.get(key, {})) for key, item in value.items()}
        for key, prop in props.items():
            if key not in out and "default" in prop:
                out[key] = _canon(prop["default"], prop)
        return out
    if isinstance(value, list):
        items = schema.get("items")
        return [_canon(item, items if isinstance(items, dict) else {}) for item in value]
    if isinstance(value, str):
        text = value.strip()
        if "string" not in types:
            if types & {"number", "integer"} and (number := _parse_number(text)) is not None:
                return number
            if "boolean" in types and text.lower() in ("true", "false"):
                return text.lower() == "true"
        return text
    if isinstance(value, float):
        return _number(value)
    return value


def _parse_number(text: str) -> int | float | None:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return _number(number) if math.isfinite(number) else None


def _number(value: int | float) -> int | float:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _leaves(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, tuple]]:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list) and value:
        for i, item in enumerate(value):
            yield from _leaves(item, (*path, i))
    elif isinstance(value, str):
        yield path, ("str", value.strip().casefold())
    elif isinstance(value, bool) or value is None:
        yield path, ("const", value)
    elif isinstance(value, (int, float)):
        yield path, ("num", _number(value))
    else:
        yield path, ("empty", type(value).__name__)


def embedding_similarity(embed: Callable[[list[str]], np.ndarray], preds: list[str], refs: list[str]) -> float:
    vectors = np.asarray(embed(preds + refs), dtype=float)
    a, b = vectors[: len(preds)], vectors[len(preds) :]
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = np.divide((a * b).sum(axis=1), norms, out=np.zeros(len(preds)), where=norms > 0)
    return float(cosine.mean())


def call_names(output: Output) -> Counter:
    """The multiset of called function names."""
    return Counter(call.get("name") for call in output.get("tool_calls") or [])


def label_match(pred: Output, ref: Output) -> float:
    return float(label_of(pred) == label_of(ref))


def _text(output: Output) -> str:
    return output.get("content") or ""


def label_of(output: Output) -> str:
    """The content as a class label: stripped and casefolded."""
    return _norm(_text(output))


def _norm(label: str) -> str:
    return label.strip().casefold()


def mean(values: Sequence[float]) -> float:
    """The mean, 0.0 for no values."""
    return float(sum(values) / len(values)) if values else 0.0
