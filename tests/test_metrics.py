import json
import random

import numpy as np
import pytest

from factory import kinds
from factory.errors import FactoryError
from factory.metrics import confusion_matrix, macro_f1, rouge_l


def example_score(kind, pred, ref, schema, tools=()):
    return kinds.get(kind).score(pred, ref, schema, list(tools))


def task_metrics(kind, preds, refs, schema, embed=None):
    return kinds.get(kind).metrics(preds, refs, schema, embed=embed)

TOOLS = {
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "days": {"type": "integer"},
                        "temp": {"type": "number"},
                        "unit": {"type": "string", "default": "celsius"},
                        "alerts": {"type": "boolean"},
                        "note": {"type": "string"},
                    },
                    "required": ["city"],
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
            },
        },
    ]
}


def text(content):
    return {"content": content, "tool_calls": []}


def calls(*pairs):
    return {"content": None, "tool_calls": [{"name": n, "arguments": a} for n, a in pairs]}


def weather(**args):
    return calls(("get_weather", {"city": "Paris", **args}))


def tool_score(pred, ref):
    return example_score("tool_call", pred, ref, TOOLS)


# classification


def test_classification_strips_and_ignores_case():
    assert example_score("classification", text("  Billing\n"), text("billing"), {}) == 1.0
    assert example_score("classification", text("refund"), text("billing"), {}) == 0.0
    assert example_score("classification", text(None), text("billing"), {}) == 0.0


def test_macro_f1_by_hand():
    refs = ["a", "a", "b", "c"]
    preds = ["a", "b", "b", "zzz"]
    # a: tp1, 1 pred, 2 refs -> 2/3; b: tp1, 2 preds, 1 ref -> 2/3; c: 0; "zzz" is not a class.
    assert macro_f1(preds, refs, ["a", "b", "c"]) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_macro_f1_skips_declared_labels_seen_nowhere():
    assert macro_f1(["a", "b"], ["a", "b"], ["a", "b", "unused"]) == 1.0


def test_classification_task_metrics():
    refs = [text(x) for x in ["a", "a", "b", "c"]]
    preds = [text(x) for x in ["A", "b", "b", "zzz"]]
    m = task_metrics("classification", preds, refs, {"labels": ["a", "b", "c"]})
    assert m["score"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx(4 / 9)


def test_confusion_matrix_with_invalid_column():
    labels = ["Spam", "Ham"]
    refs = [text(x) for x in ["spam", "spam", "ham", "ham"]]
    preds = [text(x) for x in ["SPAM", "ham", "ham", "maybe"]]
    out_labels, matrix = confusion_matrix(preds, refs, labels)
    assert out_labels == ["Spam", "Ham"]
    assert matrix == [[1, 1, 0], [0, 1, 1]]


def test_confusion_matrix_rejects_unknown_reference():
    with pytest.raises(ValueError):
        confusion_matrix([text("a")], [text("b")], ["a"])


# tool calls


def test_tool_call_exact_match():
    ref = calls(("get_weather", {"city": "Paris", "days": 3}))
    assert tool_score(ref, ref) == 1.0


def test_tool_call_int_vs_float():
    ref = calls(("get_weather", {"city": "Paris", "days": 3, "temp": 12}))
    pred = calls(("get_weather", {"city": "Paris", "days": 3.0, "temp": 12.0}))
    assert tool_score(pred, ref) == 1.0
    assert tool_score(weather(days=3.5), weather(days=3)) == 0.0


def test_tool_call_numeric_string_coerced_only_for_number_types():
    ref = calls(("get_weather", {"city": "Paris", "temp": 12.5, "days": 2}))
    pred = calls(("get_weather", {"city": "Paris", "temp": "12.5", "days": " 2 "}))
    assert tool_score(pred, ref) == 1.0
    assert tool_score(weather(temp="warm"), weather(temp=12.5)) == 0.0
    # "note" is a string: 7 and "7" differ.
    assert tool_score(weather(note=7), weather(note="7")) == 0.0


def test_tool_call_booleans():
    ref = calls(("get_weather", {"city": "Paris", "alerts": True}))
    assert tool_score(calls(("get_weather", {"city": "Paris", "alerts": "True"})), ref) == 1.0
    assert tool_score(calls(("get_weather", {"city": "Paris", "alerts": False})), ref) == 0.0
    # booleans never equal numbers
    temp_ref = calls(("get_weather", {"city": "Paris", "temp": 1}))
    assert tool_score(calls(("get_weather", {"city": "Paris", "temp": True})), temp_ref) == 0.0


def test_tool_call_missing_optional_with_default():
    ref = calls(("get_weather", {"city": "Paris", "unit": "celsius"}))
    assert tool_score(calls(("get_weather", {"city": "Paris"})), ref) == 1.0
    assert tool_score(weather(unit="fahrenheit"), weather()) == 0.0


def test_tool_call_missing_optional_without_default_is_mismatch():
    ref = calls(("get_weather", {"city": "Paris", "days": 3}))
    assert tool_score(calls(("get_weather", {"city": "Paris"})), ref) == 0.0
    assert tool_score(ref, calls(("get_weather", {"city": "Paris"}))) == 0.0


def test_tool_call_parallel_calls_order_free():
    a = ("get_weather", {"city": "Paris"})
    b = ("get_weather", {"city": "Rome"})
    c = ("get_time", {"tz": "CET"})
    assert tool_score(calls(c, b, a), calls(a, b, c)) == 1.0
    assert tool_score(calls(a, b), calls(a, b, c)) == 0.0
    assert tool_score(calls(a, a, c), calls(a, b, c)) == 0.0


def test_tool_call_extra_argument_is_mismatch():
    ref = calls(("get_weather", {"city": "Paris"}))
    assert tool_score(calls(("get_weather", {"city": "Paris", "verbose": True})), ref) == 0.0


def test_tool_call_wrong_name_is_mismatch():
    assert tool_score(calls(("get_time", {"city": "Paris"})), calls(("get_weather", {"city": "Paris"}))) == 0.0


def test_tool_call_undecodable_arguments_never_match():
    ref = calls(("get_weather", {"city": "Paris"}))
    pred = {"content": None, "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Par'}]}
    assert tool_score(pred, ref) == 0.0
    assert tool_score(pred, pred) == 0.0


def test_tool_call_strings_keep_case_but_not_outer_spaces():
    ref = calls(("get_weather", {"city": "Paris"}))
    assert tool_score(calls(("get_weather", {"city": " Paris "})), ref) == 1.0
    assert tool_score(calls(("get_weather", {"city": "paris"})), ref) == 0.0


def test_tool_call_no_calls_on_both_sides_matches():
    assert tool_score(text("I cannot help."), text("Sorry.")) == 1.0
    assert tool_score(calls(("get_time", {})), text("Sorry.")) == 0.0


def test_tool_call_nested_objects_and_arrays():
    schema = {
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "book",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "seats": {"type": "array", "items": {"type": "integer"}},
                            "opts": {
                                "type": "object",
                                "properties": {"window": {"type": "boolean", "default": False}},
                            },
                        },
                    },
                },
            }
        ]
    }
    ref = calls(("book", {"seats": [1, 2], "opts": {"window": False}}))
    assert example_score("tool_call", calls(("book", {"seats": ["1", 2.0], "opts": {}})), ref, schema) == 1.0
    assert example_score("tool_call", calls(("book", {"seats": [2, 1], "opts": {}})), ref, schema) == 0.0


def test_tool_call_task_metrics_name_accuracy():
    refs = [calls(("get_weather", {"city": "Paris"})), calls(("get_time", {"tz": "CET"}))]
    preds = [calls(("get_weather", {"city": "Rome"})), calls(("get_time", {"tz": "CET"}))]
    assert task_metrics("tool_call", preds, refs, TOOLS) == {"score": 0.5, "name_accuracy": 1.0}


# json extraction


def js(obj):
    return text(json.dumps(obj))


def test_json_f1_partial_credit():
    ref = js({"name": "Ada Lovelace", "age": 36, "address": {"city": "London", "zip": "W1"}})
    pred = js({"name": " ada lovelace ", "age": 36.0, "address": {"city": "Paris"}, "extra": 1})
    # leaves: pred 4, ref 4, shared: name, age -> F1 = 2*2 / 8
    assert example_score("json_extraction", pred, ref, {}) == pytest.approx(0.5)
    assert example_score("json_extraction", ref, ref, {}) == 1.0


def test_json_lists_by_position_and_types_distinct():
    ref = js({"tags": ["a", "b"], "flag": True, "n": None})
    pred = js({"tags": ["b", "a"], "flag": 1, "n": None})
    assert example_score("json_extraction", pred, ref, {}) == pytest.approx(2 / 8)


def test_json_invalid_prediction_scores_zero():
    ref = js({"a": 1})
    assert example_score("json_extraction", text('{"a": 1'), ref, {}) == 0.0
    assert example_score("json_extraction", text("[1, 2]"), ref, {}) == 0.0
    assert example_score("json_extraction", text(None), ref, {}) == 0.0
    assert example_score("json_extraction", text('```json\n{"a": 1}\n```'), ref, {}) == 0.0


def test_json_invalid_reference_raises():
    with pytest.raises(ValueError):
        example_score("json_extraction", js({"a": 1}), text("not json"), {})


def test_json_task_metrics_validity():
    schema = {"json_schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}
    refs = [js({"a": 1})] * 3
    preds = [js({"a": 1}), js({"a": "x"}), text("oops")]
    m = task_metrics("json_extraction", preds, refs, schema)
    assert m["score"] == pytest.approx(1 / 3)
    assert m["valid_json"] == pytest.approx(2 / 3)
    assert m["schema_valid"] == pytest.approx(1 / 3)
    assert "schema_valid" not in task_metrics("json_extraction", preds, refs, {})


# free text


def _lcs_dp(a, b):
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat = 4
    assert rouge_l("The cat sat on the mat.", "the cat lay on a mat") == pytest.approx(2 * 4 / 12)
    assert rouge_l("", "") == 1.0
    assert rouge_l("hello", "") == 0.0
    assert rouge_l("Größe über", "größe ÜBER") == 1.0


def test_rouge_l_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(1, 30))]
        b = [rng.choice("abcd") for _ in range(rng.randint(1, 30))]
        expected = 2 * _lcs_dp(a, b) / (len(a) + len(b))
        assert rouge_l(" ".join(a), " ".join(b)) == pytest.approx(expected)


def test_free_text_metrics_with_and_without_embedder():
    preds, refs = [text("a b"), text("x")], [text("a b"), text("y")]
    m = task_metrics("free_text", preds, refs, {})
    assert m == {"score": 0.5, "rouge_l": 0.5}

    seen = []

    def embed(texts):
        seen.append(list(texts))
        table = {"a b": [1.0, 0.0], "x": [1.0, 1.0], "y": [1.0, -1.0]}
        return np.array([table[t] for t in texts])

    m = task_metrics("free_text", preds, refs, {}, embed=embed)
    assert m["embedding_similarity"] == pytest.approx(0.5)  # cos 1 and cos 0
    assert seen == [["a b", "x", "a b", "y"]]


# errors


def test_bad_inputs_raise():
    with pytest.raises(FactoryError, match="unknown task kind 'summarise'"):
        example_score("summarise", text("a"), text("a"), {})
    with pytest.raises(ValueError):
        task_metrics("classification", [], [], {})
    with pytest.raises(ValueError):
        task_metrics("classification", [text("a")], [], {})
