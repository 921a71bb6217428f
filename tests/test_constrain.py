"""Constrained decoding: the grammars admit exactly the answers a task may give, sloppy logged schemas
never break them, and a random model constrained answers only in shape."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
import torch

from bench.constrained import tool_requests, valid_calls
from factory import chat, constrain
from factory.evaluate.generate import generate
from factory.models import load_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]},
                                     "days": {"type": "integer"}},
    "required": ["city"]}}}
SCORES = {"type": "function", "function": {"name": "get_scores", "parameters": {
    "type": "object", "properties": {"team": {"type": "string"}}, "required": ["team"]}}}
TICKET = {"json_schema": {"type": "object", "properties": {"order": {"type": "string"},
                                                           "amount": {"type": ["number", "null"]},
                                                           "urgent": {"type": "boolean"}},
                          "required": ["order", "urgent"]}}
CLOSED_TICKET = {"json_schema": {**TICKET["json_schema"], "properties": {
    **TICKET["json_schema"]["properties"], "order": {"type": "string", "enum": ["A-17", "B-2"]}}}}
SLOPPY = [
    {"type": "object", "properties": {"q": {"type": "str"}}, "required": ["q"]},  # a Python type name
    {"properties": {"q": {"description": "no type"}, "n": {"type": "int"}}},  # no type anywhere
    {"type": "object", "properties": {"filter": {"type": "object", "properties": {
        "from": {"type": "string", "format": "date", "pattern": "(unclosed"}, "tags": {"type": "array"}}}}},
    {"type": "object", "properties": {"level": {"enum": [1, "high", None, 2.5]}}},  # mixed scalar enum: kept
    {"type": "object", "properties": {"level": {"type": "string", "enum": [1, 2]}}},  # enum against its type
    {"type": "object", "properties": {"level": {"enum": [{"a": 1}, []]}}},  # enum of objects
    {"type": "object", "properties": {}, "required": ["ghost", 3]},  # required names not in properties
    {"type": "object", "properties": ["not", "a", "dict"], "required": "q"},
    {"type": ["object", "null"], "properties": {"x": {"type": ["string", "integer", "bogus"]}}},
    {"type": "object", "properties": {"x": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                                      "y": {"$ref": "#/definitions/y"}, "z": True}},
    {"type": "object", "properties": {"deep": {"type": "object", "properties": {"a": {"type": "object",
     "properties": {"b": {"type": "array", "items": {"type": "object", "properties": {"c": {"type": "number"}},
                                                     "required": ["c"]}}}}}}}},
    "not a schema", None, {"type": "object", "properties": {"x\"\n\\y": {"type": "string", "enum": ["a\"\n"]}}},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def accepts(constraint: constrain.Constraint, tokenizer, text: str) -> bool:
    """Whether the grammar takes `text` as a complete answer: every token of it, then the end of sequence."""
    matcher = constraint.matcher(tokenizer, len(tokenizer))
    return all(matcher.consume_token(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]) \
        and matcher.consume_token(tokenizer.eos_token_id)


def call(name: str, **arguments) -> str:
    return chat.render_output({"tool_calls": [{"name": name, "arguments": arguments}]})


def test_tool_calls_are_the_rendered_format_with_offered_tools_and_schema_arguments(tokenizer):
    grammar = constrain.for_task("tool_call", {"tools": [SCORES]}, [WEATHER, SCORES])
    good = [call("get_weather", city="Oslo"), call("get_weather", city="Oslo", unit="c", days=3),
            call("get_scores", team="Ajax") + "\n" + call("get_weather", city="Zürich \"Nord\"\n")]
    bad = [call("get_weather", city="Oslo", league="Soccer"),  # an argument the schema does not have
           call("get_weather", unit="c"),  # the required city missing
           call("get_weather", city="Oslo", unit="kelvin"),  # outside the enum
           call("get_weather", city="Oslo", days="3"),  # a string for an integer
           call("get_weather", days=3, city="Oslo"),  # keys out of the schema's order
           call("book_flight", to="Oslo"),  # a tool the request did not offer
           call("get_weather", city="Oslo").replace(", ", ","),  # not json.dumps' separators
           "The weather in Oslo is fine.", ""]
    assert all(accepts(grammar, tokenizer, text) for text in good)
    assert not any(accepts(grammar, tokenizer, text) for text in bad)
    # the request's tools replace the task's; without any, the task's tools are offered
    assert not accepts(grammar, tokenizer, call("get_scores", team="Ajax").replace("get_scores", "get_weathe"))
    fallback = constrain.for_task("tool_call", {"tools": [SCORES]}, [])
    assert accepts(fallback, tokenizer, call("get_scores", team="Ajax"))
    assert not accepts(fallback, tokenizer, call("get_weather", city="Oslo"))


def test_agent_turns_call_or_reply_and_json_answers_follow_the_schema(tokenizer):
    turn = constrain.for_task("agent_turn", {}, [WEATHER])
    assert accepts(turn, tokenizer, call("get_weather", city="Oslo"))
    assert accepts(turn, tokenizer, "Which city do you mean? I can look up <tool_call> for you.")
    assert accepts(turn, tokenizer, "<b>Sure</b>, <tool_ca")
    assert not any(accepts(turn, tokenizer, t) for t in ("<tool_call> garbage", "<tool_call>\n{\"name\": \"x\"}",
                                                         " leading space", ""))
    ticket = constrain.for_task("json_extraction", TICKET, [])
    assert accepts(ticket, tokenizer, '{"order": "A-17", "amount": 12.5, "urgent": true}')
    assert accepts(ticket, tokenizer, json.dumps({"order": "A-17", "amount": None, "urgent": False}, indent=2))
    assert accepts(ticket, tokenizer, '{"order": "A-17", "urgent": false}')
    assert not any(accepts(ticket, tokenizer, t) for t in (
        '{"order": "A-17"}', '{"order": "A-17", "urgent": "yes"}', '{"order": "A-17", "urgent": true, "x": 1}',
        '{"order": "A-17", "urgent": true} and more', "[]"))
    assert constrain.for_task("free_text", TICKET, [WEATHER]) is None
    assert constrain.for_task("classification", {"labels": ["a"]}, []) is None
    assert constrain.for_task("tool_call", {}, []) is None  # no tool to call: left unconstrained


@pytest.mark.parametrize("schema", SLOPPY, ids=range(len(SLOPPY)))
def test_sloppy_logged_schemas_degrade_to_any_value_and_never_break_the_grammar(tokenizer, schema):
    strict = constrain.strict_schema(schema)
    jsonschema.Draft202012Validator.check_schema(strict)
    assert strict["type"] == "object"
    tool = {"type": "function", "function": {"name": "lookup", "parameters": schema}}
    grammar = constrain.for_task("tool_call", {}, [tool])
    assert grammar.matcher(tokenizer, len(tokenizer)) is not None
    assert constrain.for_task("json_extraction", {"json_schema": schema}, []).matcher(tokenizer, len(tokenizer))


def test_what_a_sloppy_schema_keeps_and_what_it_drops(tokenizer):
    strict = [constrain.strict_schema(s) for s in SLOPPY]
    assert strict[0] == {"type": "object", "properties": {"q": {}}, "required": ["q"], "additionalProperties": False}
    assert strict[1]["properties"] == {"q": {}, "n": {}}
    inner = strict[2]["properties"]["filter"]
    assert inner["properties"] == {"from": {"type": "string"}, "tags": {"type": "array"}}
    assert strict[3]["properties"]["level"] == {"enum": [1, "high", None, 2.5]}
    assert strict[4]["properties"]["level"] == {} and strict[5]["properties"]["level"] == {}
    assert strict[6]["properties"] == {"ghost": {}} and strict[6]["required"] == ["ghost"]
    assert strict[7] == {"type": "object"}
    assert strict[9]["properties"] == {"x": {}, "y": {}, "z": {}}
    tool = {"type": "function", "function": {"name": "lookup", "parameters": SLOPPY[0]}}
    grammar = constrain.for_task("tool_call", {}, [tool])
    # any JSON value for the degraded parameter, still no other key and still required
    assert all(accepts(grammar, tokenizer, call("lookup", q=v)) for v in ("x", 3, None, [1, {"a": "b"}], {"k": []}))
    assert not accepts(grammar, tokenizer, call("lookup", q="x", extra=1))
    assert not accepts(grammar, tokenizer, call("lookup"))
    deep = {"type": "function", "function": {"name": "lookup", "parameters": SLOPPY[10]}}
    grammar = constrain.for_task("tool_call", {}, [deep])
    assert accepts(grammar, tokenizer, call("lookup", deep={"a": {"b": [{"c": 1.5}]}}))
    assert not accepts(grammar, tokenizer, call("lookup", deep={"a": {"b": [{"d": 1}]}}))


def test_grammars_are_cached_by_their_tools_and_schema():
    first = constrain.for_task("tool_call", {}, [WEATHER, SCORES])
    assert constrain.for_task("tool_call", {}, json.loads(json.dumps([WEATHER, SCORES]))) is first
    assert constrain.for_task("agent_turn", {}, [WEATHER, SCORES]) is not first
    assert constrain.for_task("tool_call", {}, [SCORES, WEATHER]) is not first


@pytest.fixture(scope="module")
def random_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_a_random_model_constrained_answers_only_in_shape(random_model, tokenizer):
    """Rows of different tool lists, an agent turn, a JSON extraction and an unconstrained row in one batch.
    (The JSON row's schema has no free string: a random model can stay in a string until the budget
    runs out, which no grammar prevents; its numbers, enums and booleans have an end.)"""
    requests = tool_requests(6)
    assert len({json.dumps(r["tools"]) for r in requests}) > 1
    prompts = [chat.render_prompt(tokenizer, r["messages"], r["tools"]) for r in requests]
    constraints = [constrain.for_task("tool_call", {}, r["tools"]) for r in requests]
    prompts += [prompts[0], chat.render_prompt(tokenizer, [{"role": "user", "content": "Order A-17, urgent."}], []),
                prompts[1]]
    constraints += [constrain.for_task("agent_turn", {}, requests[0]["tools"]),
                    constrain.for_task("json_extraction", CLOSED_TICKET, []), None]
    free = generate(random_model, tokenizer, prompts, 60, batch_size=9)
    bound = generate(random_model, tokenizer, prompts, 60, batch_size=9, constraints=constraints)
    assert not any(valid_calls(g.text, r["tools"]) for g, r in zip(free, requests))
    for answer, request in zip(bound, requests):
        assert answer.text.startswith("<tool_call>\n{\"name\": ") and valid_calls(answer.text, request["tools"])
    turn, ticket, unconstrained = bound[6:]
    assert valid_calls(turn.text, requests[0]["tools"]) or not turn.text.startswith("<tool_call>")
    jsonschema.validate(json.loads(ticket.text), constrain.strict_schema(CLOSED_TICKET["json_schema"]))
    assert unconstrained.text == free[8].text  # a row without a grammar is decoded as before


def test_confidence_is_taken_under_the_constraint(random_model, tokenizer):
    """Greedy decoding replayed by hand: the argmax over the allowed tokens, and its log-probability from
    the softmax over the allowed tokens only (renormalised), not over the whole vocabulary."""
    request = tool_requests(1)[0]
    prompt = chat.render_prompt(tokenizer, request["messages"], request["tools"])
    grammar = constrain.for_task("tool_call", {}, request["tools"])
    answer = generate(random_model, tokenizer, [prompt], 24, constraints=[grammar])[0]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    matcher, tokens, logprobs, free = grammar.matcher(tokenizer, len(tokenizer)), [], [], []
    with torch.no_grad():
        while len(tokens) < 24 and tokenizer.eos_token_id not in tokens:
            logits = random_model(torch.tensor([ids + tokens])).logits[0, -1:].float()
            masked = constrain.mask_logits(logits.clone(), [matcher])
            token = int(masked.argmax())
            logprobs.append(masked.log_softmax(-1)[0, token].item())
            free.append(logits.log_softmax(-1)[0, token].item())
            constrain.advance(matcher, token)
            tokens.append(token)
    assert answer.text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert answer.confidence == pytest.approx(math.exp(sum(logprobs) / len(logprobs)), rel=1e-3)
    assert answer.confidence > math.exp(sum(free) / len(free))
