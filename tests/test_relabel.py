"""Teacher relabelling against a real loopback OpenAI-compatible endpoint: a task mined under
min_examples becomes trainable; marks, the cap, held-out splits, failures that lose nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from typer.testing import CliRunner

from factory import ingest as ingest_stage
from factory.catalog import load_catalog
from factory.cli import app as cli_app
from factory.curate import curate_store
from factory.io import SPLITS, load_split
from factory.mine import MineConfig, mine
from factory.records import from_table
from factory.relabel import RelabelError, Teacher, relabel
from factory.serve.app import running
from tests.conftest import enter_workspace

SYSTEM = "You are the order desk. Call the tool that answers the customer."
TOOLS = [{"type": "function", "function": {"name": "get_order_status", "description": "Look up an order",
                                           "parameters": {"type": "object",
                                                          "properties": {"order_id": {"type": "string"}}}}}]
ORDER = re.compile(r"A\d{5}")


def _call(order: str) -> dict:
    return {"id": "call_0", "type": "function",
            "function": {"name": "get_order_status", "arguments": json.dumps({"order_id": order})}}


def _logs(path: Path, logged: int, failed: int) -> None:
    """Proxy-shape logs: `logged` good calls, `failed` calls the upstream failed (curate drops them)."""
    lines = []
    for i in range(logged + failed):
        order = f"A{10000 + i * 37}"
        ok = i < logged
        lines.append({"id": f"call-{i}", "timestamp": f"2026-11-03T09:{i // 60:02d}:{i % 60:02d}Z",
                      "metadata": {"agent": "desk", "step": "status", "session_id": f"s{i}",
                                   **({} if ok else {"status": "error"})},
                      "request": {"model": "gpt-x", "tools": TOOLS,
                                  "messages": [{"role": "system", "content": SYSTEM},
                                               {"role": "user", "content": f"Where is my order {order}? Thanks."}]},
                      "response": {"choices": [{"index": 0, "message": {"role": "assistant", "content": None,
                                                                        "tool_calls": [_call(order)]}}]}
                      if ok else {"error": {"message": "rate limited"}}})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _teacher(seen: list[dict], fail_after: int | None = None) -> FastAPI:
    """A teacher that looks the order up (the order id of the last user message), or answers 500
    after `fail_after` requests."""
    teacher = FastAPI()

    @teacher.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body)
        if fail_after is not None and len(seen) > fail_after:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=500)
        order = ORDER.findall(body["messages"][-1]["content"])[-1]
        return {"id": "t", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "tool_calls",
                             "message": {"role": "assistant", "content": None, "tool_calls": [_call(order)]}}]}

    return teacher


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """A data folder after ingest, curate and mine of 30 good and 4 failed calls: one task, not enough data."""
    enter_workspace(tmp_path, monkeypatch)
    (tmp_path / "recipes").symlink_to(Path(__file__).resolve().parents[1] / "recipes")
    data = tmp_path / "datasets"
    _logs(tmp_path / "desk.jsonl", logged=30, failed=4)
    ingest_stage.ingest([tmp_path / "desk.jsonl"], data / "records" / "raw", data / "quarantine" / "ingest")
    curate_store(data / "records" / "raw", data / "records" / "curated.parquet", data / "quarantine" / "curate.jsonl",
                 data / "curate-report.json")
    catalog = mine(from_table(pq.read_table(data / "records" / "curated.parquet")), data, MineConfig(min_examples=50))
    assert [e["status"] for e in catalog.values()] == ["not_enough_data"]
    return data


def _task(data: Path) -> str:
    return next(iter(load_catalog(data / "tasks.yaml")))


def test_a_task_under_min_examples_becomes_trainable_with_marked_capped_train_only_examples(workspace):
    data, task = workspace, _task(workspace)
    before = (data / "tasks.yaml").read_text()

    # a teacher that fails part way: a clear error naming it, the catalog untouched, its answers kept
    seen: list[dict] = []
    with running(_teacher(seen, fail_after=10)) as url:
        with pytest.raises(RelabelError, match=rf"teacher {re.escape(url)}/v1/chat/completions answered HTTP 500"):
            relabel(task, data, Teacher(f"{url}/v1", model="big-teacher"), max_share=0.6, target_examples=50,
                    workers=2)
    assert (data / "tasks.yaml").read_text() == before
    store = data / "records" / "relabel" / f"{task}.jsonl"
    assert len(store.read_text().splitlines()) == 10 and oct(store.stat().st_mode)[-3:] == "600"

    seen.clear()
    with running(_teacher(seen)) as url:
        report = relabel(task, data, Teacher(f"{url}/v1", model="big-teacher"), max_share=0.6, target_examples=50)
    assert report["relabelled"] == 4 and report["logged"] == 30 and report["synthetic"] == 16
    assert report["teacher_calls"] == len(seen) == 20 - 10  # the first run's answers were not asked again
    assert all(body["model"] == "big-teacher" and body["tools"] == TOOLS for body in seen)

    entry = load_catalog(data / "tasks.yaml")[task]
    assert entry["status"] == "ready" and entry["size"] == 50 and entry["dataset_version"] == report["dataset_version"]
    assert (data / entry["embedding"]["centroid"]).exists()
    splits = {s: load_split(data, task, entry["dataset_version"], s) for s in SPLITS}
    assert sum(map(len, splits.values())) == 50
    generated = [r for r in splits["train"] if "origin" in r]
    assert len(generated) == 20 and {r["teacher"] for r in generated} == {"big-teacher"}
    assert len(generated) <= 0.6 * len(splits["train"])  # the cap
    assert not any("origin" in r for s in ("validation", "test") for r in splits[s])  # never held out
    held_out = {r["messages"][-1]["content"] for s in ("validation", "test") for r in splits[s]}
    for row in generated:  # the teacher's answer, for an input no held-out example has
        question = row["messages"][-1]["content"]
        assert question not in held_out
        assert row["output"]["tool_calls"] == [{"name": "get_order_status",
                                                "arguments": {"order_id": ORDER.findall(question)[-1]}}]
    failed_orders = {f"A{10000 + i * 37}" for i in range(30, 34)}
    assert {ORDER.findall(r["messages"][-1]["content"])[0] for r in generated if r["origin"] == "relabelled"} \
        == failed_orders
    card = (data / task / entry["dataset_version"] / "card.md").read_text()
    assert "relabelled (failed or negatively rated calls answered again): 4" in card
    assert "synthetic (perturbed inputs of training examples, answered by the teacher): 16" in card

    # rerun: the stored answers make the same version without a teacher call
    seen.clear()
    with running(_teacher(seen)) as url:
        again = relabel(task, data, Teacher(f"{url}/v1", model="big-teacher"), max_share=0.6, target_examples=50)
    assert again["dataset_version"] == report["dataset_version"] and seen == []

    # a re-mine forgets the relabelled version; relabel makes it again from the kept answers, splits unchanged
    mine(from_table(pq.read_table(data / "records" / "curated.parquet")), data, MineConfig(min_examples=50))
    assert load_catalog(data / "tasks.yaml")[task]["status"] == "not_enough_data"
    with running(_teacher(seen)) as url:
        again = relabel(task, data, Teacher(f"{url}/v1", model="big-teacher"), max_share=0.6, target_examples=50)
    assert again["dataset_version"] == report["dataset_version"] and seen == []


def test_a_cap_too_small_to_reach_the_target_is_an_error_that_changes_nothing(workspace):
    data, task = workspace, _task(workspace)
    before = (data / "tasks.yaml").read_text()
    with running(_teacher([])) as url:
        with pytest.raises(RelabelError, match="raise relabel.max_share"):
            relabel(task, data, Teacher(f"{url}/v1"), max_share=0.2, target_examples=50)
    assert (data / "tasks.yaml").read_text() == before


def test_answers_the_task_cannot_use_are_left_out_and_counted(workspace):
    data, task = workspace, _task(workspace)
    chatty = FastAPI()

    @chatty.post("/v1/chat/completions")
    async def chat(request: Request):
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Let me check that order."}}]}

    with running(chatty) as url:
        with pytest.raises(RelabelError, match="20 teacher answers unusable as a tool_call answer left out"):
            relabel(task, data, Teacher(f"{url}/v1"), max_share=0.6, target_examples=50)
    assert load_catalog(data / "tasks.yaml")[task]["status"] == "not_enough_data"


def test_cli_relabel_reads_the_recipe_cap_and_names_an_unreachable_teacher(workspace, monkeypatch):
    data, task = workspace, _task(workspace)
    runner = CliRunner()
    result = runner.invoke(cli_app, ["relabel", task, "--teacher", "http://127.0.0.1:9/v1"])
    assert result.exit_code == 1 and "teacher http://127.0.0.1:9/v1/chat/completions failed" in result.output
    with running(_teacher([])) as url:
        result = runner.invoke(cli_app, ["relabel", task, "--teacher", f"{url}/v1", "--set", "relabel.max_share=0.1"])
        assert result.exit_code == 1 and "max_share=0.1" in result.output
        result = runner.invoke(cli_app, ["relabel", task, "--teacher", f"{url}/v1"])
    assert result.exit_code == 0, result.output
    assert "30 logged + 4 relabelled + 16 synthetic" in result.output
    assert f"preference pairs of {task}: 0" in result.output  # no escalation in these logs
    assert yaml.safe_load((data / "tasks.yaml").read_text())["tasks"][task]["status"] == "ready"


def test_a_quarantine_with_pii_in_output_rows_still_reads(workspace):
    """curate quarantines PII the output alone holds with a `detail` naming the field: relabel reads past it."""
    from factory.relabel import failed_records

    data, task = workspace, _task(workspace)
    path = data / "quarantine" / "curate.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    failed = len(failed_records(data, load_catalog(data / "tasks.yaml")[task]))
    extra = {**rows[0], "reason": "pii_in_output_only", "detail": "output_tool_calls[0].arguments.to: EMAIL"}
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, extra]))
    assert len(failed_records(data, load_catalog(data / "tasks.yaml")[task])) == failed
