"""Routing without generation: routes.json parsing, signature matching, the embedding fallback,
the decision table and the request log segments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import numpy as np

from factory.embed import embed_texts
from factory.serve.centroids import build_centroids, task_centroid
from factory.serve.requestlog import RequestLog
from factory.serve.router import Match, Router, decide, load_routes, parse_routes, request_template, tool_names

CLASSIFY = "Classify the customer's message into exactly one intent: billing, shipping, returns. Answer with the label."
EXTRACT = "Extract the ticket fields (order id, product, problem) from the message as a JSON object."
ORDER = "You are Acme's order assistant. Call the right tool for the customer's request."
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {}}} for n in ("get_order_status", "issue_refund")]


def _msgs(system: str, user: str = "Where is order A12345? It was due 3 days ago.") -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _entry(task: str, system: str, tools=(), agent="acme", step="", threshold=0.5, size=10) -> dict:
    template, names = request_template(_msgs(system)), tool_names(list(tools))
    return {"task": task, "kind": "classification", "threshold": threshold, "size": size,
            "signature": {"agent": agent, "step": step or task, "template": template, "tools": list(names)},
            "output_schema": {"labels": ["billing", "shipping", "returns"]}, "base_model": "base",
            "adapter_uri": "runs:/r/adapter", "max_new_tokens": 8, "dataset_version": "v1"}


def _routes(*entries: dict):
    return parse_routes({"tasks": {e["task"]: e for e in entries}}, Path("routes.json"))


def test_signature_ignores_values_and_tool_lists_but_not_the_template():
    dated = ORDER + " Today is 2026-11-03, customer 'Ann'."
    router = Router(_routes(_entry("classify", CLASSIFY), _entry("order", dated, TOOLS)))
    other_order = _msgs(ORDER + " Today is 2026-12-24, customer 'Bob'.", "Refund order B99 please")
    assert router.match(_msgs(CLASSIFY), []).route.task == "classify"
    assert router.match(other_order, list(reversed(TOOLS))).route.task == "order"
    # tools are input, not identity: a per-request tool list still reaches the step's task
    retrieved = [{"type": "function", "function": {"name": "track_parcel", "parameters": {}}}, TOOLS[0]]
    assert router.match(_msgs(dated), retrieved).route.task == "order"
    assert router.match(_msgs(dated), []).route.task == "order"
    assert router.match(_msgs("Summarise the ticket."), []) == Match(None, "none")


def test_tool_overlap_chooses_among_routes_sharing_a_template():
    weather = [{"type": "function", "function": {"name": n, "parameters": {}}} for n in ("get_weather", "get_forecast")]
    router = Router(_routes(_entry("orders", ORDER, TOOLS, size=100), _entry("weather", ORDER, weather, size=5)))
    assert router.match(_msgs(ORDER), weather[:1]).route.task == "weather"
    assert router.match(_msgs(ORDER), TOOLS + weather[:1]).route.task == "orders"
    assert router.match(_msgs(ORDER), []).route.task == "orders"


def test_agent_and_step_choose_among_routes_sharing_a_signature():
    router = Router(_routes(_entry("big", CLASSIFY, step="triage", size=100),
                            _entry("small", CLASSIFY, agent="shop", step="route", size=5)))
    assert router.match(_msgs(CLASSIFY), []).route.task == "big"
    assert router.match(_msgs(CLASSIFY), [], agent="shop", step="route").route.task == "small"
    assert router.match(_msgs(CLASSIFY), [], agent="shop", step="other").route.task == "big"


def test_decisions():
    route = _routes(_entry("c", CLASSIFY, threshold=0.7))["c"]
    never = _routes(_entry("c", CLASSIFY, threshold=None))["c"]
    assert decide(Match(None, "none")).reason == "no_match"
    assert decide(Match(never, "signature"), 0.99, True).reason == "no_threshold"
    assert decide(Match(route, "signature"), 0.99, False).reason == "unusable"
    assert decide(Match(route, "signature"), 0.69, True).reason == "below_threshold"
    assert decide(Match(route, "signature"), 0.7, True).served_by == "specialist"


def test_an_agent_turn_is_served_per_action():
    """A task certified for lookups but not for replies serves its confident calls and escalates every reply,
    however confident; a call of a tool without a group of its own takes the pooled `call` threshold."""
    entry = _entry("t", ORDER, TOOLS, threshold=None) | {
        "kind": "agent_turn", "output_schema": {"tools": TOOLS},
        "action_thresholds": {"call:get_order_status": 0.8, "call": 0.95, "reply": None},
        "action_groups": {"call:get_order_status": "call:get_order_status", "call:issue_refund": "call",
                          "reply": "reply"}}
    match = Match(_routes(entry)["t"], "signature")
    lookup = {"content": None, "tool_calls": [{"name": "get_order_status", "arguments": {"order_id": "A1"}}]}
    refund = {"content": None, "tool_calls": [{"name": "issue_refund", "arguments": {}}]}
    reply = {"content": "Your order ships tomorrow.", "tool_calls": []}
    assert decide(match, 0.85, True, lookup).served_by == "specialist"
    assert decide(match, 0.85, True, refund).reason == "below_threshold"
    assert decide(match, 0.96, True, refund).served_by == "specialist"
    assert decide(match, 0.999, True, reply).reason == "no_threshold"
    nothing = _routes(entry | {"action_thresholds": {"call": None, "reply": None}})["t"]
    assert not nothing.serves and decide(Match(nothing, "signature"), 0.99, True, lookup).reason == "no_threshold"


@pytest.mark.parametrize("mutate, field", [
    (lambda e: e.pop("adapter_uri"), "tasks.c.adapter_uri"),
    (lambda e: e.update(max_new_tokens="8"), "tasks.c.max_new_tokens"),
    (lambda e: e.update(threshold="high"), "tasks.c.threshold"),
    (lambda e: e["signature"].pop("tools"), "tasks.c.signature"),
    (lambda e: e.update(kind="ranking"), "tasks.c.kind: Value error, unknown task kind 'ranking'"),
])
def test_bad_routes_name_the_file_and_field(tmp_path, mutate, field):
    entry = _entry("c", CLASSIFY)
    mutate(entry)
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"tasks": {"c": entry}}))
    with pytest.raises(ValueError, match=f"{path}: {field}"):
        load_routes(path)


def test_missing_or_broken_routes_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="factory routes"):
        load_routes(tmp_path / "routes.json")
    (tmp_path / "routes.json").write_text("{")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_routes(tmp_path / "routes.json")


def test_embedding_fallback_only_when_no_signature_matches(tmp_path):
    routes = _routes(_entry("classify", CLASSIFY), _entry("extract", EXTRACT), _entry("order", ORDER, TOOLS))
    users = ["My card was charged twice.", "Where is my parcel?", "I want to send this back.", "Refund A1 please"]
    for task, system in (("classify", CLASSIFY), ("extract", EXTRACT), ("order", ORDER)):
        (tmp_path / task / "v1").mkdir(parents=True)
        rows = [{"messages": _msgs(system, user), "output": {"content": "x", "tool_calls": []}} for user in users]
        (tmp_path / task / "v1" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []

    def counted(texts):
        calls.append(texts)
        return embed_texts(texts)

    centroids, missing = build_centroids(routes, tmp_path, counted, min_similarity=0.8)
    assert missing == []
    router = Router(routes, centroids)
    calls.clear()
    assert router.match(_msgs(CLASSIFY), []).method == "signature" and calls == []

    paraphrase = _msgs("Classify the customer message into one intent among billing, shipping or returns. "
                       "Reply with only the label.", "My parcel never arrived.")
    found = router.match(paraphrase, [])
    assert (found.route.task, found.method) == ("classify", "embedding") and found.similarity >= 0.8
    assert router.match(_msgs("Write a haiku about the sea.", "waves"), []) == Match(None, "none")
    # a paraphrased order prompt without the order tools must not reach the tool-calling task
    assert router.match(_msgs(ORDER + " Be brief."), []).route is None
    assert router.match(_msgs(ORDER + " Be brief."), TOOLS).route.task == "order"

    stored = np.eye(384, dtype=np.float32)[0]  # a centroid stored by mining wins over recomputing one
    np.save(tmp_path / "order" / "v1" / "centroid.npy", stored)
    assert np.array_equal(task_centroid(routes["order"], tmp_path, counted), stored)
    assert task_centroid(routes["order"], tmp_path / "elsewhere", counted) is None


def test_request_log_rotates_and_recovers_a_crashed_segment(tmp_path):
    log = RequestLog(tmp_path, max_records=2)
    for i in range(3):
        log.write({"id": f"call-{i}"})
    assert len(list(tmp_path.glob("*.jsonl"))) == 1 and len(list(tmp_path.glob("*.open"))) == 1
    crashed = next(tmp_path.glob("*.open"))
    with open(crashed, "a") as f:
        f.write('{"id": "half')  # a process killed mid-write
    RequestLog(tmp_path)  # the next server finalises the leftover segment
    lines = sorted(line for p in tmp_path.glob("*.jsonl") for line in p.read_text().splitlines())
    assert [json.loads(line)["id"] for line in lines] == ["call-0", "call-1", "call-2"]
    assert not list(tmp_path.glob("*.open"))
