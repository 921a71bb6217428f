"""Preference learning from the flywheel: pairs from the request log, DPO continuing the SFT adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
import torch
from mlflow import MlflowClient

from factory import ingest as ingest_stage
from factory.recipe import load_recipe
from factory.relabel import load_preferences, preference_pairs, write_preferences
from factory.records import from_table
from factory.serve.requestlog import RequestLog, log_entry
from factory.train import train
from tests.test_serve import TEACHER, adapters, specialists, upstream  # noqa: F401 (fixtures)
from tests.test_serve import _config as serve_config, _messages as serve_messages, _post as serve_post

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "Route the customer's request: answer with the tool to call."
TOOLS = [{"type": "function", "function": {"name": "get_order_status", "parameters": {
    "type": "object", "properties": {"order_id": {"type": "string"}}}}}]


def _messages(order: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Where is my order {order}? Thanks."}]


def _call(order: str) -> dict:
    return {"content": None, "tool_calls": [{"name": "get_order_status", "arguments": {"order_id": order}}]}


def _completion(output: dict) -> dict:
    calls = [{"id": f"call_{i}", "type": "function",
              "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
             for i, c in enumerate(output["tool_calls"])]
    return {"id": "x", "object": "chat.completion", "model": "teacher",
            "choices": [{"index": 0, "finish_reason": "tool_calls",
                         "message": {"role": "assistant", "content": output["content"], "tool_calls": calls}}]}


def _serve_log(log_dir: Path, n: int) -> None:
    """What `factory serve` logs: escalations whose specialist answered a wrong order id (logged as
    `specialist_answer`), one escalation where it agreed, one where it could not answer, one served call."""
    log = RequestLog(log_dir)
    for i in range(n):
        order = f"A{10000 + i * 7}"
        request = {"model": "gpt-x", "messages": _messages(order), "tools": TOOLS}
        common = dict(agent="desk", step="route", session_id=f"s{i}", task="order-status", confidence=0.2,
                      reason="low_confidence", match="signature", latency_ms=5.0)
        log.write(log_entry(f"req-{i}", request, _completion(_call(order)), route="upstream",
                            specialist_answer=_call("A99999"), **common))
    agree = {"model": "gpt-x", "messages": _messages("A55555"), "tools": TOOLS}
    log.write(log_entry("req-agree", agree, _completion(_call("A55555")), route="upstream",
                        specialist_answer=_call("A55555"), agent="desk", step="route", session_id="sa",
                        task="order-status", confidence=0.4, reason="low_confidence", match="signature",
                        latency_ms=5.0))
    log.write(log_entry("req-none", agree, _completion(_call("A55555")), route="upstream", agent="desk", step="route",
                        session_id="sb", task="order-status", confidence=None, reason="no_task", match="none",
                        latency_ms=5.0))
    log.write(log_entry("req-served", agree, _completion(_call("A55555")), route="specialist",
                        agent="desk", step="route", session_id="sc", task="order-status", confidence=0.99,
                        reason="confident", match="signature", latency_ms=5.0))
    log.close()


def test_the_server_logs_the_answer_it_escalated_and_that_makes_a_pair(tmp_path, specialists, upstream):
    """Through `factory serve`: the "summary" specialist answers below its threshold, the teacher answers."""
    import httpx
    import pyarrow.parquet as pq

    from factory.serve.app import create_app, running
    from factory.serve.router import Router

    app = create_app(Router(specialists.routes), specialists, serve_config(tmp_path, upstream[0]))
    with running(app) as url, httpx.Client() as client:
        escalated = serve_post(client, url, serve_messages("summary"), headers={"X-Session-Id": "s-2"})
        served = serve_post(client, url, serve_messages("reply"), headers={"X-Session-Id": "s-1"})
    assert escalated.json()["factory"]["route"] == "upstream" and served.json()["factory"]["route"] == "specialist"
    ingest_stage.ingest([tmp_path / "logs"], tmp_path / "raw", tmp_path / "quarantine")
    records = from_table(pq.read_table(tmp_path / "raw"))
    served_record = next(r for r in records if r.metadata["route"] == "specialist")
    assert "specialist_answer" not in served_record.metadata  # its answer is the record's output already
    [pair] = preference_pairs(records, "summary")
    assert pair["chosen"]["content"] == TEACHER and pair["session_id"] == "s-2"
    assert pair["rejected"]["content"] and pair["rejected"]["content"] != TEACHER


def test_escalations_the_specialist_got_wrong_become_pairs_and_held_out_sessions_do_not(tmp_path):
    _serve_log(tmp_path / "logs", 6)
    import pyarrow.parquet as pq

    ingest_stage.ingest([tmp_path / "logs"], tmp_path / "raw", tmp_path / "quarantine")
    records = from_table(pq.read_table(tmp_path / "raw"))
    pairs = preference_pairs(records, "order-status", exclude_sessions={"s0"})
    assert sorted(p["session_id"] for p in pairs) == ["s1", "s2", "s3", "s4", "s5"]
    pair = next(p for p in pairs if p["session_id"] == "s3")
    assert pair["chosen"]["tool_calls"][0]["arguments"] == {"order_id": "A10021"}
    assert pair["rejected"]["tool_calls"][0]["arguments"] == {"order_id": "A99999"}
    assert pair["messages"][-1]["content"] == "Where is my order A10021? Thanks."
    assert preference_pairs(records, "another-task") == []

    data = tmp_path / "data"
    for split, sessions in (("train", ["s1", "s2"]), ("validation", []), ("test", ["s4"])):
        (data / "order-status" / "v1").mkdir(parents=True, exist_ok=True)
        (data / "order-status" / "v1" / f"{split}.jsonl").write_text(
            "".join(json.dumps({"id": s, "session_id": s}) + "\n" for s in sessions))
    entry = {"status": "ready", "dataset_version": "v1", "kind": "tool_call"}
    assert write_preferences("order-status", entry, records, data) == 5  # s4 is held out
    assert "s4" not in {p["session_id"] for p in load_preferences(data, "order-status", "v1")}


def _dpo_task(tmp: Path, n: int = 16) -> tuple[Path, dict]:
    folder = tmp / "data" / "order-status" / "v1"
    folder.mkdir(parents=True)
    rows = [{"id": f"r{i}", "session_id": f"s{i}", "messages": _messages(f"A{10000 + i * 7}"), "tools": TOOLS,
             "output": _call(f"A{10000 + i * 7}")} for i in range(n)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "validation.jsonl").write_text("")
    (folder / "test.jsonl").write_text("")
    pairs = [{"id": r["id"], "session_id": r["session_id"], "messages": r["messages"], "tools": TOOLS,
              "chosen": r["output"], "rejected": _call("A99999")} for r in rows]
    (folder / "preference.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return tmp / "data", {"status": "ready", "dataset_version": "v1", "kind": "tool_call"}


def test_dpo_continues_the_sft_adapter_and_its_loss_moves(tmp_path, tiny_model_dir, tracking):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data_dir, entry = _dpo_task(tmp_path)
    common = [f"base_model={tiny_model_dir}", "learning_rate=0.01", "batch_size=4", "max_train_samples=null",
              "warmup_ratio=0", "max_steps=8", "logging_steps=2", "save_steps=1000", "lr_scheduler=constant"]
    recipe, raw = load_recipe(None, "cpu-lora", [*common, "method=dpo", "dpo.beta=0.5", "dpo.learning_rate=0.01",
                                                 "dpo.sft_weight=0"], ROOT / "recipes")
    sft_recipe, _ = load_recipe(None, "cpu-lora", common, ROOT / "recipes")
    result = train("order-status", entry, recipe, raw, data_dir, tmp_path / "registry")
    sft = train("order-status", entry, sft_recipe, raw, data_dir, tmp_path / "registry")  # reused, not retrained
    assert result.run_id != sft.run_id and result.data["sft_run_id"] == sft.run_id
    assert result.recipe_digest != sft.recipe_digest
    losses = result.data["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05, losses  # DPO loss starts at log 2 = 0.693

    # the DPO adapter starts from the SFT one and moved away from it; no reference adapter is left in it
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, result.adapter_dir)
    assert list(tuned.peft_config) == ["default"]
    sft_state = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                          sft.adapter_dir).state_dict()
    moved = [k for k, v in tuned.state_dict().items() if "lora_" in k and not torch.equal(v, sft_state[k])]
    assert moved
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["method"] == "dpo" and run.data.params["preference_pairs"] == "16"
    assert "adapter" in {a.path for a in MlflowClient().list_artifacts(result.run_id)}
    assert train("order-status", entry, recipe, raw, data_dir, tmp_path / "registry") == result


def test_dpo_without_pairs_is_a_clear_error(tmp_path, tiny_model_dir, tracking):
    data_dir, entry = _dpo_task(tmp_path, n=4)
    (data_dir / "order-status" / "v1" / "preference.jsonl").unlink()
    recipe, raw = load_recipe(None, "cpu-lora", [f"base_model={tiny_model_dir}", "max_steps=1", "method=dpo"],
                              ROOT / "recipes")
    with pytest.raises(ValueError, match="no preference pairs"):
        train("order-status", entry, recipe, raw, data_dir, tmp_path / "registry")


def test_nightly_runs_dpo_for_a_task_with_enough_pairs_and_registers_it_through_the_gates(tmp_path, monkeypatch,
                                                                                          tiny_model_dir, tracking):
    from factory.nightly import NightlyConfig, Paths, nightly

    monkeypatch.chdir(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    day = (ROOT / "datasets" / "samples" / "logs" / "support-agent-2026-11-03.jsonl").read_text(errors="replace")
    calls = []
    for line in day.splitlines():
        try:
            call = json.loads(line)
        except ValueError:  # the sample logs plant malformed lines
            continue
        if isinstance(call, dict) and call.get("metadata", {}).get("step") == "classify_intent":
            calls.append(call)
    (logs / "day1.jsonl").write_text("".join(json.dumps(c) + "\n" for c in calls[:60]))
    log = RequestLog(logs / "serve")  # the router escalated these after its specialist said "other"
    for n, call in enumerate(c for c in calls[60:] if c["response"].get("choices")):
        if n == 24:
            break
        log.write(log_entry(call["id"], call["request"], call["response"], agent="acme-support",
                            step="classify_intent", session_id=call["metadata"]["session_id"], route="upstream",
                            task="classify-intent", confidence=0.3, reason="low_confidence", match="signature",
                            latency_ms=3.0, specialist_answer={"content": "other", "tool_calls": []}))
    log.close()
    paths = Paths(tmp_path / "datasets", tmp_path / "registry", tmp_path / "reports")
    config = NightlyConfig(recipe=str(ROOT / "recipes" / "base" / "cpu-lora.yaml"), overrides=(
        f"base_model={tiny_model_dir}", "max_train_samples=8", "max_eval_samples=4", "max_new_tokens=4",
        "save_steps=1000", "min_train_steps=4", "dpo.min_pairs=4"))
    summary = nightly([logs], paths, config)
    outcomes = {t.action: t for t in summary.tasks if t.task == "classify-intent"}
    assert set(outcomes) == {"trained", "trained (dpo)"}, summary.tasks
    dpo = outcomes["trained (dpo)"]
    pairs = load_preferences(paths.data, "classify-intent",
                             yaml.safe_load((paths.data / "tasks.yaml").read_text())["tasks"]["classify-intent"][
                                 "dataset_version"])
    assert len(pairs) >= 4 and dpo.reason == f"{len(pairs)} preference pairs"
    assert all(p["rejected"]["content"] == "other" != p["chosen"]["content"] for p in pairs)
    client = MlflowClient()
    versions = {v.version: v for v in client.search_model_versions("name='classify-intent'")}
    assert set(versions) == {outcomes["trained"].version, dpo.version}
    champion = client.get_registered_model("classify-intent").aliases.get("champion")
    assert (champion == dpo.version) == dpo.promoted  # only the gates make the DPO version the champion
    assert "| trained (dpo) |" in (paths.registry / "nightly" / "latest.md").read_text()
