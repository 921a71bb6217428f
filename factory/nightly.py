"""Nightly: ingest what is new, re-mine, retrain the tasks that need it, promote through the gates.

    lock -> ingest -> curate -> mine -> per task: decide -> train -> evaluate -> register
         -> routes -> summary (Markdown + an MLflow run)

Every step is idempotent, which is what makes the whole run resumable: ingest skips
files it has read, dataset versions are content hashes, training resumes from its
checkpoints or returns the finished adapter, evaluation reuses the stored result of
the same run, and registration makes one version per training run. A run killed
after training and before registration therefore completes the registration next
time without retraining.

A task retrained tonight that has at least `dpo.min_pairs` preference pairs (escalations whose
specialist answer differs from the teacher's, `factory.relabel.write_preferences`) then gets a
DPO run on its new SFT adapter (`method: dpo`), registered like any version: it becomes the
champion only when the registry's gates pass, else the SFT specialist stays.

A task is retrained when it has no champion, when its data grew by at least
`min_growth` since the champion's dataset, or when the champion's score on the new
test split dropped by at least `drift_margin` (drift). The drift check costs one
evaluation of the champion, so it only runs when the dataset changed but grew too
little to retrain anyway. `max_tasks` and `time_budget_s` bound a night; tasks left
over are reported as skipped with the reason.

With the ray engine (`NightlyConfig.engine`, else $FACTORY_ENGINE) ingest's parsing, the curate
scrub and mine's embeddings run on the cluster and the tasks to retrain run at once, one Ray task each asking
for its recipe's resources (`pipeline.task_resources`); a task that fails, or whose worker
dies, is reported as failed and the others go on; the time budget then bounds when a task
may start. The summary is the same as the local engine's, tasks in catalog order.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock
import mlflow
import pyarrow.parquet as pq
from mlflow import MlflowClient

from factory import ingest as ingest_stage
from factory.curate import CurateConfig, curate_store
from factory.engine import engine_name, run_each
from factory.errors import FactoryError
from factory.evaluate.run import evaluate, load_truth
from factory.paths import Paths
from factory.pipeline import finetune, open_store, task_resources
from factory.io import load_split, write_atomic
from factory.mine import MineConfig, mine
from factory.records import from_table
from factory.recipe import RecipeError, load_recipe
from factory.registry import Gates, write_routes
from factory.relabel import write_preferences


@dataclass(frozen=True)
class NightlyConfig:
    min_growth: float = 0.2
    drift_margin: float = 0.05
    max_tasks: int = 10
    time_budget_s: float = 6 * 3600
    recipe: str | None = None
    overrides: tuple[str, ...] = ()
    truth: Path | None = None
    gates: Gates = Gates()
    engine: str | None = None  # factory.engine: None is $FACTORY_ENGINE, else local


@dataclass
class TaskOutcome:
    task: str
    action: str  # "trained", "skipped", "failed"
    reason: str
    version: str | None = None
    promoted: bool = False
    score: float | None = None


@dataclass
class Summary:
    started: str
    seconds: float = 0.0
    ingested: int = 0
    curated: int = 0
    tasks: list[TaskOutcome] = field(default_factory=list)

    @property
    def trained(self) -> list[str]:
        return [t.task for t in self.tasks if t.action == "trained"]


class NightlyLocked(RuntimeError):
    """Another nightly holds the lock."""


def prepare(logs: list[Path], paths: Paths, engine: str | None = None) -> tuple[int, int, dict[str, dict[str, Any]]]:
    """Ingest, curate and mine (the parsing, the scrub and the embeddings mapped by `engine`);
    returns (records accepted now, curated total, catalog)."""
    stats = ingest_stage.ingest(logs, paths.data / "records" / "raw", paths.data / "quarantine" / "ingest",
                                engine=engine)
    curated = paths.data / "records" / "curated.parquet"
    report = curate_store(paths.data / "records" / "raw", curated, paths.data / "quarantine" / "curate.jsonl",
                          paths.data / "curate-report.json", CurateConfig(), engine=engine)
    return stats.accepted, report["kept"], mine(from_table(pq.read_table(curated)), paths.data, MineConfig(), engine)


def _alias(client: MlflowClient, task: str, alias: str):
    try:
        return client.get_model_version_by_alias(task, alias)
    except mlflow.exceptions.MlflowException:
        return None


def _dataset_size(paths: Paths, task: str, version: str) -> int:
    if not (paths.data / task / version).exists():
        return 0
    return sum(len(load_split(paths.data, task, version, s)) for s in ("train", "validation", "test"))


def decide(task: str, entry: dict[str, Any], paths: Paths, config: NightlyConfig) -> tuple[bool, str]:
    """Whether `task` needs a new specialist tonight, and why.

    The newest registered version (the challenger, else the champion) says what data
    was last trained on; drift is measured on the champion, the version that serves.
    """
    if entry.get("status") != "ready":
        return False, f"not trained: {entry.get('status')}"
    client = MlflowClient()
    champion = _alias(client, task, "champion")
    latest = _alias(client, task, "challenger") or champion
    if latest is None:
        return True, "no specialist yet"
    if latest.tags.get("dataset_version") == entry["dataset_version"]:
        return False, f"up to date: v{latest.version} was trained on this data"
    old_size = _dataset_size(paths, task, latest.tags.get("dataset_version", ""))
    total = sum(len(load_split(paths.data, task, entry["dataset_version"], s)) for s in ("train", "validation", "test"))
    growth = (total - old_size) / max(old_size, 1)
    if growth >= config.min_growth:
        return True, f"data grew {growth:.0%} (>= {config.min_growth:.0%})"
    if champion is None:
        return False, f"data grew {growth:.0%} (< {config.min_growth:.0%}); no champion to check for drift"
    drift = _champion_drift(task, entry, champion, paths, config)
    if drift >= config.drift_margin:
        return True, f"champion dropped {drift:.3f} on fresh held-out data (drift)"
    return False, f"data grew {growth:.0%} and the champion holds (drift {drift:.3f})"


def _champion_drift(task, entry, champion, paths: Paths, config: NightlyConfig) -> float:
    """Score drop of the champion's adapter on the new test split, against its registered score."""
    recipe, _ = load_recipe(task, config.recipe, list(config.overrides))
    adapter = mlflow.artifacts.download_artifacts(run_id=champion.run_id, artifact_path="adapter")
    fresh = evaluate(task, entry, recipe, adapter, entry["dataset_version"], paths.data,
                     paths.reports / task / "drift", load_truth(config.truth), policy=champion.tags.get("policy"))
    return float(champion.tags["score"]) - fresh["columns"]["specialist"]["score"]


def nightly(logs: list[Path], paths: Paths, config: NightlyConfig = NightlyConfig()) -> Summary:
    """One night's run. Raises NightlyLocked at once when another nightly is running."""
    paths.registry.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(paths.registry / "nightly.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise NightlyLocked(f"another nightly is running (lock held on {lock.lock_file})") from None
    try:
        return _run(logs, paths, config)
    finally:
        lock.release()


def _run(logs: list[Path], paths: Paths, config: NightlyConfig) -> Summary:
    start = time.monotonic()
    deadline = time.time() + config.time_budget_s
    summary = Summary(started=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    summary.ingested, summary.curated, catalog = prepare(logs, paths, config.engine)
    budget_left = config.max_tasks
    reused = _finished_runs(paths)
    outcomes: dict[str, list[TaskOutcome]] = {}
    planned: list[str] = []
    for task, entry in catalog.items():
        needed, reason = decide(task, entry, paths, config)
        if not needed:
            outcomes[task] = [TaskOutcome(task, "skipped", reason)]
        elif budget_left <= 0:
            outcomes[task] = [TaskOutcome(task, "skipped", f"over tonight's budget ({reason})")]
        else:
            budget_left -= 1
            planned.append(task)
            outcomes[task] = [TaskOutcome(task, "planned", reason)]
    jobs = [partial(_retrain, task, catalog[task], outcomes[task][0].reason, paths, config, deadline, reused)
            for task in planned]
    resources = [_resources(task, config) for task in planned] if engine_name(config.engine) == "ray" else []
    open_store()
    for task, done in zip(planned, run_each(jobs, resources, config.engine)):
        if isinstance(done, BaseException):  # a worker that died, a bug: the other tasks went on
            done = [TaskOutcome(task, "failed", f"{outcomes[task][0].reason}; {type(done).__name__}: {done}")]
        outcomes[task] = done
    summary.tasks = [outcome for task in catalog for outcome in outcomes[task]]
    write_routes(paths.registry / "routes.json")
    summary.seconds = time.monotonic() - start
    _report(summary, paths)
    return summary


def _resources(task: str, config: NightlyConfig) -> dict[str, float]:
    try:
        return task_resources(task, config.recipe, config.overrides)
    except RecipeError:
        return {"num_cpus": 1}  # the task itself reports the bad recipe as its failure


def _retrain(task: str, entry: dict[str, Any], reason: str, paths: Paths, config: NightlyConfig, deadline: float,
             reused: set[str]) -> list[TaskOutcome]:
    """One task's train -> evaluate -> register, then its DPO step, here or on a Ray worker. A task
    that would start after the night's time budget (`deadline`, wall clock) is skipped."""
    if time.time() > deadline:
        return [TaskOutcome(task, "skipped", f"over tonight's budget ({reason})")]
    try:
        done = finetune(task, entry, paths, config.recipe, config.overrides, config.truth, config.gates)
    except (ValueError, RuntimeError, FactoryError) as err:
        return [TaskOutcome(task, "failed", f"{reason}; {err}")]
    action = "trained" if done.trained.run_id not in reused else "registered (training reused)"
    return [TaskOutcome(task, action, reason, done.version.version, done.promoted,
                        done.evaluation["columns"]["specialist"]["score"]), *_dpo(task, entry, paths, config)]


def _dpo(task: str, entry: dict[str, Any], paths: Paths, config: NightlyConfig) -> list[TaskOutcome]:
    """The DPO step (see the module docstring): no outcome when the task has too few pairs."""
    curated = from_table(pq.read_table(paths.data / "records" / "curated.parquet"))
    pairs = write_preferences(task, entry, curated, paths.data)
    if pairs < load_recipe(task, config.recipe, list(config.overrides))[0].dpo.min_pairs:
        return []
    why = f"{pairs} preference pairs"
    try:
        done = finetune(task, entry, paths, config.recipe, (*config.overrides, "method=dpo"), config.truth,
                        config.gates)
    except (ValueError, RuntimeError, FactoryError) as err:
        return [TaskOutcome(task, "failed", f"dpo on {why}; {err}")]
    return [TaskOutcome(task, "trained (dpo)", why, done.version.version, done.promoted,
                        done.evaluation["columns"]["specialist"]["score"])]


def _finished_runs(paths: Paths) -> set[str]:
    """Run ids of trainings already finished on disk (a resumed night reuses them)."""
    return {json.loads(p.read_text())["run_id"] for p in (paths.registry / "training").glob("*/*/train.json")}


def render_summary(summary: Summary) -> str:
    lines = [f"# Nightly run {summary.started}", "",
             f"{summary.ingested} new records ingested, {summary.curated} curated, "
             f"{len(summary.trained)} task(s) retrained in {summary.seconds:.0f} s.", "",
             "| task | action | version | promoted | score | why |", "|---|---|---|---|---|---|"]
    for t in summary.tasks:
        score = "-" if t.score is None else f"{t.score:.3f}"
        lines.append(f"| {t.task} | {t.action} | {t.version or '-'} | {'yes' if t.promoted else 'no'} | {score} | {t.reason} |")
    return "\n".join(lines) + "\n"


def _report(summary: Summary, paths: Paths) -> None:
    text = render_summary(summary)
    folder = paths.registry / "nightly"
    write_atomic(folder / f"{summary.started.replace(':', '-')}.md", text)
    write_atomic(folder / "latest.md", text)
    mlflow.set_experiment("nightly")
    with mlflow.start_run(run_name=f"nightly-{summary.started}"):
        mlflow.log_metrics({"ingested": summary.ingested, "curated": summary.curated,
                            "tasks_trained": len(summary.trained),
                            "tasks_promoted": sum(t.promoted for t in summary.tasks)})
        mlflow.log_text(text, "summary.md")
        mlflow.log_dict({"tasks": [asdict(t) for t in summary.tasks]}, "summary.json")
