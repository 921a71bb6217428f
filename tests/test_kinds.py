"""Task kinds: each judges an answer against the tools its own request offered; agent turns score the action first."""

from __future__ import annotations

import pytest

from factory import kinds
from factory.errors import FactoryError


def _tool(name: str, **props: str) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {k: {"type": v} for k, v in props.items()}}}}


WEATHER, CONVERT = _tool("get_weather", city="string", days="integer"), _tool("convert", amount="number")
SCHEMA = {"tools": [WEATHER]}  # the tools the task was seen calling


def call(name: str, **arguments) -> dict:
    return {"content": None, "tool_calls": [{"name": name, "arguments": arguments}]}


def reply(text: str) -> dict:
    return {"content": text, "tool_calls": []}


def test_a_call_is_usable_when_its_request_offered_the_tool():
    tool_call = kinds.get("tool_call")
    assert tool_call.usable(call("convert", amount=3), SCHEMA, [CONVERT])  # offered by this request
    assert not tool_call.usable(call("convert", amount=3), SCHEMA, [WEATHER])  # not offered here
    assert tool_call.usable(call("get_weather", city="Oslo"), SCHEMA, [])  # no tools sent: the task's
    assert not tool_call.usable(reply("Oslo is sunny"), SCHEMA, [WEATHER])


def test_call_arguments_are_coerced_by_the_requests_own_schema():
    # "days" is an integer in this request's tool: "3" matches 3; without the schema it does not
    pred, ref = call("get_weather", city="Oslo", days="3"), call("get_weather", city="Oslo", days=3)
    assert kinds.get("tool_call").score(pred, ref, {"tools": []}, [WEATHER]) == 1.0
    assert kinds.get("tool_call").score(pred, ref, {"tools": []}, []) == 0.0


def test_an_agent_turn_scores_the_action_first_then_the_call_or_the_reply():
    turn = kinds.get("agent_turn")
    assert turn.score(reply("It is sunny in Oslo."), call("get_weather", city="Oslo"), SCHEMA, [WEATHER]) == 0.0
    assert turn.score(call("get_weather", city="Oslo"), reply("It is sunny in Oslo."), SCHEMA, [WEATHER]) == 0.0
    assert turn.score(call("get_weather", city="Oslo"), call("get_weather", city="Oslo"), SCHEMA, [WEATHER]) == 1.0
    assert turn.score(reply("It is sunny in Oslo today."), reply("It is sunny in Oslo."), SCHEMA, []) == \
        pytest.approx(2 * 5 / (6 + 5))
    assert turn.usable(reply("Sure."), SCHEMA, []) and not turn.usable(reply("  "), SCHEMA, [])
    assert not turn.usable(call("book_flight"), SCHEMA, [WEATHER])


def test_agent_turn_metrics_and_action_confusion():
    turn = kinds.get("agent_turn")
    refs = [call("get_weather", city="Oslo"), call("get_weather", city="Rome"), reply("Done."), reply("Bye now.")]
    preds = [call("get_weather", city="Oslo"), reply("Rome is warm."), reply("Done."), call("get_weather", city="X")]
    metrics = turn.metrics(preds, refs, SCHEMA, [[WEATHER]] * 4)
    assert metrics["score"] == pytest.approx(0.5) and metrics["action_accuracy"] == pytest.approx(0.5)
    assert metrics["call_match"] == pytest.approx(0.5) and metrics["reply_rouge_l"] == pytest.approx(0.5)
    assert turn.confusion(preds, refs, SCHEMA) == {"labels": ["call", "reply"], "matrix": [[1, 1, 0], [1, 1, 0]]}


def test_every_kind_is_in_the_registry_and_unknown_kinds_are_a_clear_error():
    assert list(kinds.KINDS) == ["tool_call", "agent_turn", "json_extraction", "classification", "free_text"]
    assert all(kind.score_name for kind in kinds.KINDS.values())
    with pytest.raises(FactoryError, match="unknown task kind 'ranking'"):
        kinds.get("ranking")
