"""Reliability: SIGKILL during ingest and training, two trainings at once on one store,
PII/secret canaries through the whole loop, and a too-small dataset.

Everything runs the real `factory` CLI in subprocesses inside a throw-away workspace
(tests/reliability/workspace.py) on a slice of the sample logs and the tiny random
model. Kill points are drawn from fixed seeds, so a failure reproduces. The module
prints its counts (faults injected, reruns matched, canaries planted / found) at the end.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from factory.ingest import ingest, read_records
from reliability import canaries
from reliability.workspace import (SAMPLES, integrity, kill_at, leftovers, random_delays, run, start,
                                   tiny_overrides)

COUNTS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def print_counts(request):
    yield
    writer = request.config.pluginmanager.get_plugin("terminalreporter")
    line = ("reliability: faults injected {faults}, kills landed {landed}, reruns matched {matched}, "
            "canaries planted {planted}, canaries found {found}").format(**{k: COUNTS[k] for k in (
                "faults", "landed", "matched", "planted", "found")})
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if writer and capture:
        with capture.global_and_fixture_disabled():
            writer.write_line(f"\n{line}")


def _client(ws: Path) -> MlflowClient:
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A workspace after ingest, curate and mine of 240 proxy-log lines and the
    fine-tuning export, both carrying PII/secret canaries."""
    ws = tmp_path_factory.mktemp("prepared")
    logs = ws / "logs"
    logs.mkdir()
    proxy = (SAMPLES / "support-agent-2026-11-03.jsonl").read_text(errors="replace").splitlines()[:240]
    proxy, planted = canaries.plant_proxy(proxy)
    export, planted_ft = canaries.plant_finetune((SAMPLES / "finetune-export.jsonl").read_text().splitlines()[:40])
    (logs / "proxy.jsonl").write_text("\n".join(proxy) + "\n")
    (logs / "export.jsonl").write_text("\n".join(export) + "\n")
    COUNTS["planted"] = planted + planted_ft
    for args in (["ingest", "logs"], ["curate"], ["mine", "--min-examples", "20"]):
        done = run(ws, *args)
        assert done.returncode == 0, done.stdout + done.stderr
    return ws


def _copy(prepared: Path, dest: Path) -> Path:
    shutil.copytree(prepared, dest, ignore=shutil.ignore_patterns("cli-*.log"))
    return dest


def _ready_tasks(ws: Path) -> dict[str, dict]:
    catalog = yaml.safe_load((ws / "datasets" / "tasks.yaml").read_text())["tasks"]
    return {name: e for name, e in catalog.items() if e["status"] == "ready"}


# --- kill -9 during ingest -----------------------------------------------------------------


def _ingest_view(data: Path) -> tuple[list[str], int]:
    """What a reader sees: the sorted record ids, and the number of quarantined units."""
    ids = sorted(r.id for r in read_records(data / "records" / "raw"))
    quarantined = sum(len(p.read_bytes().splitlines()) for p in (data / "quarantine" / "ingest").glob("*.jsonl"))
    return ids, quarantined


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_during_ingest_then_rerun_matches_a_clean_run(tmp_path, seed):
    logs = tmp_path / "logs"
    logs.mkdir()
    for path in sorted(SAMPLES.glob("*.jsonl")):
        shutil.copy(path, logs)
    ref = tmp_path / "reference"
    ingest([logs], ref / "records" / "raw", ref / "quarantine" / "ingest", watermarks=ref / "records" / "watermarks.json")
    expected = _ingest_view(ref)

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "logs").symlink_to(logs)
    for delay in random_delays(seed, 2, 0.0, 0.6):  # two kills in a row, then a full run
        COUNTS["faults"] += 1
        COUNTS["landed"] += kill_at(start(ws, "ingest", "logs"), delay, lambda: (ws / "datasets").exists())
    done = run(ws, "ingest", "logs")
    assert done.returncode == 0, done.stdout + done.stderr
    ids, quarantined = _ingest_view(ws / "datasets")
    assert len(ids) == len(set(ids)), "duplicate records after the rerun"
    assert (ids, quarantined) == expected
    assert not [p for p in (ws / "datasets" / "records" / "raw").glob("*.parquet") if p.name.startswith(".")]
    again = run(ws, "ingest", "logs")
    assert again.returncode == 0 and _ingest_view(ws / "datasets") == expected
    COUNTS["matched"] += 1


# --- kill -9 during training ---------------------------------------------------------------


def _training_dirs(ws: Path, task: str) -> list[Path]:
    return list((ws / "registry" / "training" / task).glob("*"))


def _checkpointed(ws: Path, task: str):
    return lambda: any(d.glob("checkpoint-*") for d in _training_dirs(ws, task))


def _adapter_published(ws: Path, task: str):
    return lambda: any((d / "adapter").is_dir() for d in _training_dirs(ws, task))


@pytest.mark.parametrize("point", ["after-a-checkpoint", "adapter-published"])
def test_kill_during_finetune_then_rerun_registers_one_version(prepared, tmp_path, tiny_model_dir, point):
    ws = _copy(prepared, tmp_path / "ws")
    task = "classify-intent"
    args = ["finetune", task, *tiny_overrides(tiny_model_dir, save_steps=1)]
    ready = _checkpointed(ws, task) if point == "after-a-checkpoint" else _adapter_published(ws, task)
    delay = random_delays(3, 1, 0.0, 1.0)[0] if point == "after-a-checkpoint" else 0.0
    COUNTS["faults"] += 1
    COUNTS["landed"] += kill_at(start(ws, *args), delay, ready)

    done = run(ws, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    again = run(ws, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    versions = _client(ws).search_model_versions(f"name='{task}'")
    assert len(versions) == 1, [v.version for v in versions]
    (run_dir,) = _training_dirs(ws, task)
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((run_dir / "train.json").read_text())["task"] == task
    assert integrity(ws / "mlflow.db") == "ok"
    assert leftovers(ws / "registry") == [] and leftovers(ws / "reports") == []
    COUNTS["matched"] += 1


# --- two trainings at once; canaries ------------------------------------------------------


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory, tiny_model_dir):
    """A copy of `prepared` where two tasks were finetuned at the same time on one store."""
    ws = _copy(prepared, tmp_path_factory.mktemp("trained") / "ws")
    tasks = ["classify-intent", "draft-reply"]
    assert set(tasks) <= set(_ready_tasks(ws))
    procs = {t: start(ws, "finetune", t, *tiny_overrides(tiny_model_dir)) for t in tasks}
    codes = {t: p.wait(timeout=600) for t, p in procs.items()}
    return ws, codes


def test_two_finetunes_at_once_both_finish_and_the_store_is_sound(trained):
    ws, codes = trained
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in ws.glob("cli-*.log"))
    assert codes == {"classify-intent": 0, "draft-reply": 0}, logs
    client = _client(ws)
    for task in codes:
        assert len(client.search_model_versions(f"name='{task}'")) == 1
        assert (ws / "reports" / task / "eval.json").exists()
    assert integrity(ws / "mlflow.db") == "ok"


def test_no_canary_survives_the_loop(trained):
    ws, codes = trained
    assert 0 in codes.values(), "no finetune finished: nothing to scan"
    data = ws / "datasets"
    raw = canaries.scan([data / "records" / "raw"])
    assert set(raw) == set(canaries.CANARIES), "the canaries never reached the raw store: the test proves nothing"
    outputs = [p for p in data.iterdir() if p.name not in {"records", "quarantine"}]
    outputs += [data / "records" / "curated.parquet", data / "quarantine" / "curate.jsonl",
                ws / "reports", ws / "registry", ws / "artifacts", ws / "mlflow.db"]
    found = canaries.scan(outputs)
    COUNTS["found"] = sum(len(v) for v in found.values())
    print(f"canaries planted: {COUNTS['planted']}, found: {COUNTS['found']}")
    assert found == {}


# --- resources ------------------------------------------------------------------------------


def test_an_empty_training_split_fails_clearly_before_training(prepared, tmp_path, tiny_model_dir):
    ws = _copy(prepared, tmp_path / "ws")
    entry = _ready_tasks(ws)["classify-intent"]
    (ws / "datasets" / "classify-intent" / entry["dataset_version"] / "train.jsonl").write_text("")
    done = run(ws, "train", "classify-intent", *tiny_overrides(tiny_model_dir))
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert "classify-intent" in done.stdout and "train" in done.stdout
    assert not list((ws / "registry" / "training").glob("*/*/checkpoint-*"))
