"""Nightly retraining on the tiny model: incremental, idempotent, locked, resumable."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from factory import pipeline as pipeline_module
from factory.nightly import NightlyConfig, NightlyLocked, Paths, nightly

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "datasets" / "samples" / "logs"


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # in-process CLI calls of earlier tests pin the process-wide URI
    monkeypatch.setenv("FACTORY_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    logs = tmp_path / "logs"
    logs.mkdir()
    paths = Paths(tmp_path / "datasets", tmp_path / "registry", tmp_path / "reports")
    config = NightlyConfig(recipe=str(ROOT / "recipes" / "base" / "cpu-lora.yaml"), overrides=(
        f"base_model={tiny_model_dir}", "max_train_samples=8", "max_eval_samples=4", "max_new_tokens=4",
        "save_steps=1000"), min_growth=0.2)
    return logs, paths, config


def _classify_calls_of(path: Path) -> str:
    """Only the intent-classification calls of a day's log: new data for one task alone."""
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line).get("metadata", {}).get("step") == "classify_intent":
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue
    return "\n".join(keep) + "\n"


def _trainings(paths: Paths) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in (paths.registry / "training").glob("*/*/train.json")}


def test_nightly_retrains_only_what_grew_and_then_nothing(env):
    logs, paths, config = env
    (logs / "day1.jsonl").write_text((SAMPLES / "support-agent-2026-11-03.jsonl").read_text(errors="replace"))
    first = nightly([logs], paths, config)
    assert sorted(first.trained) == ["classify-intent", "draft-reply", "extract-ticket", "order-action"]

    (logs / "day2.jsonl").write_text(_classify_calls_of(SAMPLES / "support-agent-2026-11-04.jsonl"))
    second = nightly([logs], paths, config)
    assert second.trained == ["classify-intent"]
    assert {t.task for t in second.tasks if t.action == "skipped"} == {"draft-reply", "extract-ticket", "order-action"}

    before = _trainings(paths)
    third = nightly([logs], paths, config)
    assert third.trained == [] and third.ingested == 0
    assert _trainings(paths) == before
    client = MlflowClient()
    assert len(client.search_model_versions("name='classify-intent'")) == 2
    assert (paths.registry / "nightly" / "latest.md").read_text().count("| skipped |") == 4


def test_a_second_concurrent_nightly_exits_at_once(env):
    logs, paths, config = env
    paths.registry.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import filelock, sys, time; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); "
        "print('held', flush=True); time.sleep(60)"), str(paths.registry / "nightly.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(NightlyLocked, match="another nightly is running"):
            nightly([logs], paths, config)
        assert time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait()


def test_a_nightly_killed_before_registration_registers_next_time_without_retraining(env, monkeypatch):
    logs, paths, config = env
    (logs / "day1.jsonl").write_text(_classify_calls_of(SAMPLES / "support-agent-2026-11-03.jsonl"))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed between training and registration")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline_module, "register", crash)
        with pytest.raises(KeyboardInterrupt):
            nightly([logs], paths, config)
    trained = _trainings(paths)
    assert len(trained) == 1

    summary = nightly([logs], paths, config)
    assert [t.action for t in summary.tasks] == ["registered (training reused)"]
    assert _trainings(paths) == trained
    assert len(MlflowClient().search_model_versions("name='classify-intent'")) == 1
