"""The whole loop through the CLI, on a slice of the sample logs and a tiny random model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from factory.cli import app

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "datasets" / "samples"


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    logs.mkdir()
    shutil.copy(SAMPLES / "logs" / "support-agent-2026-11-03.jsonl", logs)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FACTORY_DATA_DIR", str(tmp_path / "datasets"))
    monkeypatch.setenv("FACTORY_REGISTRY_DIR", str(tmp_path / "registry"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("FACTORY_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    return tmp_path


def _demo_args(tiny_model_dir: Path) -> list[str]:
    return ["demo", "--logs", "logs", "--truth", str(SAMPLES / "truth.jsonl"),
            "--recipe", str(ROOT / "recipes" / "base" / "cpu-lora.yaml"),
            "--set", f"base_model={tiny_model_dir}", "--set", "max_train_samples=16",
            "--set", "max_eval_samples=6", "--set", "max_new_tokens=8", "--set", "save_steps=1000"]


def test_demo_runs_the_whole_loop_and_reruns_idempotently(workspace, tiny_model_dir):
    runner = CliRunner()
    result = runner.invoke(app, _demo_args(tiny_model_dir))
    assert result.exit_code == 0, result.output

    catalog = yaml.safe_load((workspace / "datasets" / "tasks.yaml").read_text())["tasks"]
    assert {e["kind"] for e in catalog.values()} == {"classification", "tool_call", "json_extraction", "free_text"}
    ready = [name for name, e in catalog.items() if e["status"] == "ready"]
    assert len(ready) == 4

    client = MlflowClient()
    for task in ready:
        versions = client.search_model_versions(f"name='{task}'")
        assert len(versions) == 1
        version = client.get_model_version_by_alias(task, "challenger")
        routing = json.loads(version.tags["routing"])
        assert routing["task"] == task and routing["signature"] == catalog[task]["signature"]
        report = json.loads((workspace / "reports" / task / "eval.json").read_text())
        assert set(report["columns"]) == {"base", "specialist", "teacher"}
        assert (workspace / "reports" / task / "report.html").exists()
    assert (workspace / "registry" / "routes.json").exists()
    assert "Specialists on the held-out test split" in result.output

    again = runner.invoke(app, _demo_args(tiny_model_dir))
    assert again.exit_code == 0, again.output
    for task in ready:
        assert len(client.search_model_versions(f"name='{task}'")) == 1


def test_unknown_task_lists_the_known_ones(workspace, tiny_model_dir):
    runner = CliRunner()
    for command in (["ingest", "logs"], ["curate"], ["mine"]):
        assert runner.invoke(app, command).exit_code == 0
    result = runner.invoke(app, ["finetune", "no-such-task"])
    assert result.exit_code != 0
    assert "unknown task 'no-such-task'" in result.output
    assert "classify-intent" in result.output
