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
from conftest import enter_workspace

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "datasets" / "samples"


def _enter(root: Path, mp: pytest.MonkeyPatch) -> Path:
    logs = root / "logs"
    logs.mkdir()
    shutil.copy(SAMPLES / "logs" / "support-agent-2026-11-03.jsonl", logs)
    return enter_workspace(root, mp)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    return _enter(tmp_path, monkeypatch)


def _demo_args(tiny_model_dir: Path) -> list[str]:
    return ["demo", "--logs", "logs", "--truth", str(SAMPLES / "truth.jsonl"),
            "--recipe", str(ROOT / "recipes" / "base" / "cpu-lora.yaml"),
            "--set", f"base_model={tiny_model_dir}", "--set", "max_train_samples=16",
            "--set", "max_eval_samples=6", "--set", "max_new_tokens=8", "--set", "save_steps=1000"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_model_dir):
    """One demo run for the module (it trains four tasks): yields (workspace, CLI result)."""
    with pytest.MonkeyPatch.context() as mp:
        root = _enter(tmp_path_factory.mktemp("demo"), mp)
        yield root, CliRunner().invoke(app, _demo_args(tiny_model_dir))


def test_demo_runs_the_whole_loop_and_reruns_idempotently(demo, tiny_model_dir):
    runner = CliRunner()
    workspace, result = demo
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
        assert (workspace / "reports" / task / "reliability.png").exists()
        # at most 6 validation examples certify nothing: the task escalates everything, end to end
        cal = report["calibration"]
        assert cal["split"] == "test" and 0 < cal["validation"]["n"] <= 6 < cal["validation"]["min_kept"]
        assert cal["threshold"] is None and cal["coverage"] == 0.0 and cal["n"] == report["n_test"]
        assert routing["threshold"] is None and routing["coverage"] == 0.0 and routing["coverage_split"] == "test"
        assert version.tags["threshold"] == "None" and version.tags["coverage"] == "0.0"
        assert routing["calibration_map"] == cal["map"] and routing["calibration"]["ece"] == cal["ece"]
        metrics = MlflowClient().get_run(version.run_id).data.metrics
        assert metrics["coverage_test"] == 0.0 and metrics["ece_raw"] == cal["ece"]["raw"]
        assert "threshold" not in metrics and "quality_test" not in metrics  # none certified, nothing kept
    assert "Specialists on the held-out test split" in result.output
    assert "│ all " in result.output  # the closing table's overall row

    again = runner.invoke(app, _demo_args(tiny_model_dir))
    assert again.exit_code == 0, again.output
    for task in ready:
        assert len(client.search_model_versions(f"name='{task}'")) == 1


def test_a_learning_curve_trains_on_a_quarter_a_half_and_all_of_the_data(demo, tiny_model_dir):
    """`finetune --learning-curve`: three nested trainings, each scored on the held-out test split, a plot,
    a verdict; all of the data is the task's own training (one registered version still)."""
    workspace, _ = demo
    args = _demo_args(tiny_model_dir)[5:]  # the recipe and its overrides
    result = CliRunner().invoke(app, ["finetune", "classify-intent", "--learning-curve", *args])
    assert result.exit_code == 0, result.output
    folder = workspace / "reports" / "classify-intent" / "learning-curve"
    points = json.loads((folder / "learning-curve.json").read_text())
    assert [p["fraction"] for p in points] == [0.25, 0.5, 1.0] and [p["examples"] for p in points] == [4, 8, 16]
    assert all(0 <= p["specialist"] <= 1 for p in points) and (folder / "learning-curve.png").stat().st_size > 0
    assert "learning curve" in result.output and ("still rising" in result.output or "flat" in result.output)
    assert len(MlflowClient().search_model_versions("name='classify-intent'")) == 1


def test_unknown_task_lists_the_known_ones(workspace, tiny_model_dir):
    runner = CliRunner()
    for command in (["ingest", "logs"], ["curate"], ["mine"]):
        assert runner.invoke(app, command).exit_code == 0
    result = runner.invoke(app, ["finetune", "no-such-task"])
    assert result.exit_code != 0
    assert "unknown task 'no-such-task'" in result.output
    assert "classify-intent" in result.output


def test_serving_applies_the_stored_calibration_map(demo):
    """The map registered with each specialist reaches routes.json and every served answer."""
    import dataclasses

    from factory.evaluate.calibrate import apply_map
    from factory.io import load_split
    from factory.serve.router import load_routes
    from factory.serve.specialists import Specialists

    workspace, result = demo
    assert result.exit_code == 0, result.output
    task = "classify-intent"  # the tiny model fails the gates: force its promotion so that it is routed
    for command in (["promote", task, "--force", "--reason", "test"], ["routes"]):
        assert CliRunner().invoke(app, command).exit_code == 0
    routes = load_routes(workspace / "registry" / "routes.json")
    route = routes[task]
    specialists = Specialists({task: route}, adapter_cache=workspace / "adapter-cache")
    row = load_split(workspace / "datasets", task, route.dataset_version, "test")[0]
    answer = specialists.answer(task, row["messages"], row.get("tools") or [])
    stored = route.extra["calibration_map"]
    assert stored["method"] == "platt"
    expected = float(apply_map(stored, answer.confidence if answer.usable else 0.0))
    assert answer.calibrated == pytest.approx(expected)

    specialists.routes[task] = dataclasses.replace(route, extra={**route.extra, "calibration_map": {
        "method": "platt", "a": 0.0, "b": 0.0}})  # sigmoid(0): 0.5 whatever the confidence
    assert specialists.answer(task, row["messages"], row.get("tools") or []).calibrated == 0.5
    specialists.routes[task] = dataclasses.replace(route, extra={})
    assert specialists.answer(task, row["messages"], row.get("tools") or []).calibrated is None
    with pytest.raises(ValueError, match="classify-intent.*malformed calibration_map"):
        Specialists({task: dataclasses.replace(route, extra={"calibration_map": {"method": "platt"}})})


def test_too_little_validation_reaches_the_router_as_never():
    """Evaluation -> routing metadata -> routes.json -> decision, for a task with 5 validation examples."""
    from factory.evaluate.run import held_out_calibration
    from factory.recipe import Recipe
    from factory.registry import routing_metadata
    from factory.serve.router import Match, decide, parse_routes
    from factory.train import TrainResult

    cal = held_out_calibration([0.99, 0.98, 0.97, 0.96, 0.95], [1.0] * 5, [0.99, 0.5, 0.2], [1.0, 1.0, 0.0],
                               val_target=0.9, test_target=0.9, delta=0.1, binary=True)
    evaluation = {"calibration": cal, "n_test": 3}
    trained = TrainResult(task="t", kind="classification", run_id="r", adapter_dir="a", base_model="b",
                          dataset_version="v1", recipe_digest="d", train_examples=1, train_loss=0.0, train_tokens=1,
                          tokens_per_s=1.0, seconds=1.0)
    entry = {"signature": {"template": "fp", "tools": []}, "output_schema": {"labels": ["x"]}}
    routing = routing_metadata(entry, trained, evaluation, Recipe(base_model="b"), "upstream", "sha256:0", {})
    assert routing["threshold"] is None and routing["coverage"] == 0.0 and routing["coverage_split"] == "test"
    assert routing["calibration"]["validation"]["n"] == 5 and routing["calibration_map"] == cal["map"]
    document = json.loads(json.dumps({"tasks": {"t": {**routing, "adapter_uri": "a"}}}, allow_nan=False))
    route = parse_routes(document, Path("routes.json"))["t"]
    assert route.threshold is None and route.extra["calibration_map"] == cal["map"]
    assert decide(Match(route, "signature"), 0.99, True).reason == "no_threshold"


def test_simulate_sets_served_quality_beside_its_calibrated_prediction():
    from factory.serve.router import SPECIALIST, UPSTREAM
    from factory.serve.simulate import summarise

    def outcome(served_by: str, score: float, calibrated: float | None) -> dict:
        return {"task": "t", "served_by": served_by, "score": score, "teacher_score": 1.0, "calibrated": calibrated,
                "cost": 0.0, "baseline_cost": 1.0, "ms": 1.0, "baseline_ms": 1.0}

    rows = summarise([outcome(SPECIALIST, 1.0, 0.9), outcome(SPECIALIST, 0.0, 0.7), outcome(UPSTREAM, 1.0, 0.2)])
    task = rows[0]
    assert task["served"] == pytest.approx(2 / 3) and task["served_quality"] == 0.5
    assert task["calibrated"] == pytest.approx(0.8)  # escalated answers' probabilities do not count
    nothing = summarise([outcome(UPSTREAM, 1.0, None)])[0]
    assert nothing["served_quality"] is None and nothing["calibrated"] is None
