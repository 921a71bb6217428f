"""The `factory` command line: a thin typer layer over the pipeline stages.

Locations default to the project layout and can be moved with environment variables:
FACTORY_DATA_DIR (datasets/), FACTORY_REGISTRY_DIR (registry/), MLFLOW_TRACKING_URI
(sqlite:///registry/mlflow.db, artifacts under registry/artifacts/).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from factory import ingest as ingest_stage
from factory import mine as mine_stage
from factory.records import from_table, to_table

app = typer.Typer(help="SLM Factory: agent logs in, specialist small language models out.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()


def data_dir() -> Path:
    return Path(os.environ.get("FACTORY_DATA_DIR", "datasets"))


def registry_dir() -> Path:
    return Path(os.environ.get("FACTORY_REGISTRY_DIR", "registry"))


def _tracking() -> None:
    """Point MLflow at the embedded sqlite store unless MLFLOW_TRACKING_URI says otherwise."""
    import mlflow

    if "MLFLOW_TRACKING_URI" not in os.environ:
        registry_dir().mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(registry_dir() / 'mlflow.db').resolve()}"
        os.environ.setdefault("FACTORY_ARTIFACT_ROOT", str((registry_dir() / "artifacts").resolve()))
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=1)


def _catalog() -> dict:
    catalog = mine_stage.load_catalog(data_dir() / "tasks.yaml")
    if not catalog:
        raise _fail(f"no task catalog at {data_dir() / 'tasks.yaml'}: run `factory mine` first")
    return catalog


def _entry(task: str) -> dict:
    catalog = _catalog()
    if task not in catalog:
        raise _fail(f"unknown task {task!r}; known tasks: {', '.join(sorted(catalog))}")
    return catalog[task]


@app.command()
def ingest(paths: Annotated[list[Path], typer.Argument(help="log files or folders")],
           fmt: Annotated[Optional[str], typer.Option("--format", help="force a format")] = None) -> None:
    """Read agent logs into canonical records; bad lines go to the quarantine."""
    try:
        stats = ingest_stage.ingest(paths, data_dir() / "records" / "raw", data_dir() / "quarantine" / "ingest", fmt)
    except (FileNotFoundError, KeyError, OSError) as err:
        raise _fail(str(err)) from None
    console.print(f"ingest: {stats.files} files ({stats.skipped_files} already ingested), read {stats.read}, "
                  f"accepted {stats.accepted}, quarantined {stats.quarantined}, duplicates {stats.duplicates}")
    for reason, count in sorted(stats.reasons.items(), key=lambda kv: -kv[1]):
        console.print(f"  quarantined {count:>5}  {reason}")
    if stats.read and not stats.accepted and not stats.duplicates:
        raise _fail("nothing could be ingested")


@app.command()
def curate(max_tokens: Annotated[Optional[int], typer.Option(help="drop records longer than this")] = None,
           keep_failed: bool = False) -> None:
    """Scrub PII and secrets, drop failed calls, remove duplicates."""
    import pyarrow.parquet as pq

    from factory import curate as curate_stage

    records = ingest_stage.read_records(data_dir() / "records" / "raw")
    if not records:
        raise _fail("no ingested records: run `factory ingest PATH` first")
    config = curate_stage.CurateConfig(drop_failed=not keep_failed, max_tokens=max_tokens)
    result = curate_stage.curate(sorted(records, key=lambda r: (r.timestamp, r.id)), config)
    out = data_dir() / "records" / "curated.parquet"
    tmp = out.with_suffix(".tmp")
    pq.write_table(to_table(result.kept), tmp)
    os.replace(tmp, out)
    quarantine = data_dir() / "quarantine" / "curate.jsonl"
    quarantine.parent.mkdir(parents=True, exist_ok=True)
    mine_stage.write_atomic(quarantine, "".join(
        json.dumps({"reason": reason, **record.to_row()}, ensure_ascii=False) + "\n" for record, reason in result.removed))
    mine_stage.write_atomic(data_dir() / "curate-report.json", json.dumps(result.report, indent=2))
    removed = ", ".join(f"{k} {v}" for k, v in result.report.get("removed", {}).items())
    console.print(f"curate: kept {len(result.kept)} of {len(records)}; removed: {removed or 'none'}")


@app.command()
def mine(seed: int = 0, min_examples: int = 50) -> None:
    """Discover the recurring subtasks and publish a versioned dataset for each."""
    import pyarrow.parquet as pq

    path = data_dir() / "records" / "curated.parquet"
    if not path.exists():
        raise _fail("no curated records: run `factory curate` first")
    catalog = mine_stage.mine(from_table(pq.read_table(path)), data_dir(),
                              mine_stage.MineConfig(seed=seed, min_examples=min_examples))
    table = Table("task", "kind", "size", "status", "dataset version", title="Mined tasks")
    for name, entry in catalog.items():
        table.add_row(name, entry["kind"], str(entry["size"]), entry["status"], entry.get("dataset_version") or "-")
    console.print(table)


def _recipe(task: str, recipe: str | None, overrides: list[str]):
    from factory.recipe import RecipeError, load_recipe

    try:
        return load_recipe(task, recipe, overrides)
    except RecipeError as err:
        raise _fail(str(err)) from None


def _train(task: str, recipe_name: str | None, overrides: list[str]):
    from factory.train import train as train_task

    entry = _entry(task)
    recipe, raw = _recipe(task, recipe_name, overrides)
    _tracking()
    console.rule(f"train {task}")
    try:
        return entry, recipe, train_task(task, entry, recipe, raw, data_dir(), registry_dir())
    except ValueError as err:
        raise _fail(str(err)) from None


def _eval(task: str, entry, recipe, trained, truth: Path | None) -> dict:
    from factory.evaluate.run import evaluate, load_truth

    console.rule(f"evaluate {task}")
    return evaluate(task, entry, recipe, trained.adapter_dir, trained.dataset_version, data_dir(),
                    Path("reports") / task, load_truth(truth), run_id=trained.run_id)


def _register(entry, trained, evaluation, recipe) -> None:
    from factory.registry import register

    version, promoted = register(entry, trained, evaluation, recipe)
    aliases = ", ".join(version.aliases) or "none"
    console.print(f"registered {trained.task} v{version.version} (aliases: {aliases}){' - promoted' if promoted else ''}")


RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", help="recipe name under recipes/base or a YAML path")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe field: key=value")]
TruthOpt = Annotated[Optional[Path], typer.Option(help="JSONL of {id, output}: ground truth for the teacher's calls")]


@app.command()
def train(task: str, recipe: RecipeOpt = None, set_: SetOpt = None) -> None:
    """Train (or resume) the LoRA specialist of one task."""
    _, _, trained = _train(task, recipe, set_ or [])
    console.print(f"trained {task}: loss {trained.train_loss:.3f}, {trained.tokens_per_s:.0f} tokens/s, "
                  f"adapter {trained.adapter_dir}")


@app.command("eval")
def eval_(task: str, recipe: RecipeOpt = None, set_: SetOpt = None, truth: TruthOpt = None) -> None:
    """Evaluate a task's specialist against the base model and the teacher; writes reports/<task>/."""
    entry, rec, trained = _train(task, recipe, set_ or [])
    print_results([_eval(task, entry, rec, trained, truth)])


def _finetune(task: str, entry: dict, recipe: str | None, overrides: list[str], truth: Path | None) -> dict:
    """Train (or reuse), evaluate (or reuse) and register one task; returns the evaluation."""
    from factory.nightly import NightlyConfig, Paths, finetune as finetune_task
    from factory.recipe import RecipeError

    _tracking()
    console.rule(f"finetune {task}")
    config = NightlyConfig(recipe=recipe, overrides=tuple(overrides), truth=truth)
    try:
        trained, evaluation, version, promoted = finetune_task(
            task, entry, Paths(data_dir(), registry_dir(), Path("reports")), config)
    except (RecipeError, ValueError) as err:
        raise _fail(str(err)) from None
    aliases = ", ".join(version.aliases) or "none"
    console.print(f"{task}: trained in {trained.seconds:.0f} s ({trained.tokens_per_s:.0f} tokens/s); "
                  f"registered v{version.version} (aliases: {aliases}){' - promoted' if promoted else ''}")
    return evaluation


@app.command()
def finetune(task: str, recipe: RecipeOpt = None, set_: SetOpt = None, truth: TruthOpt = None) -> None:
    """Train, evaluate and register one task, then refresh routes.json."""
    evaluation = _finetune(task, _entry(task), recipe, set_ or [], truth)
    routes()
    print_results([evaluation])


@app.command()
def register(task: str, recipe: RecipeOpt = None, set_: SetOpt = None, truth: TruthOpt = None) -> None:
    """Register a task's evaluated specialist (one version per training run)."""
    entry, rec, trained = _train(task, recipe, set_ or [])
    evaluation = _eval(task, entry, rec, trained, truth)
    _register(entry, trained, evaluation, rec)


@app.command()
def promote(task: str, force: bool = False, reason: Optional[str] = None) -> None:
    """Move the `champion` alias to the challenger if it passes the gates."""
    from factory.registry import promote as promote_task

    _tracking()
    try:
        promoted, problems = promote_task(task, force=force, reason=reason)
    except ValueError as err:
        raise _fail(str(err)) from None
    for problem in problems:
        console.print(f"gate: {problem}")
    if not promoted:
        raise _fail(f"{task}: challenger not promoted")
    console.print(f"{task}: challenger promoted to champion")


@app.command()
def routes() -> None:
    """Write registry/routes.json from the champions."""
    from factory.registry import write_routes

    _tracking()
    table = write_routes(registry_dir() / "routes.json")
    console.print(f"routes: {len(table)} champion(s) -> {registry_dir() / 'routes.json'}")


@app.command()
def demo(logs: Path = Path("datasets/samples/logs"), truth: TruthOpt = Path("datasets/samples/truth.jsonl"),
         recipe: RecipeOpt = None, set_: SetOpt = None) -> None:
    """The whole loop on the sample logs: ingest, curate, mine, train, evaluate, register, route."""
    ingest([logs])
    curate()
    mine()
    results = []
    for task, entry in _catalog().items():
        if entry["status"] != "ready":
            console.print(f"skip {task}: {entry['status']}")
            continue
        results.append(_finetune(task, entry, recipe, set_ or [], truth))
    routes()
    print_results(results)


@app.command()
def nightly(logs: Annotated[list[Path], typer.Argument(help="log files or folders to pick new logs from")],
            recipe: RecipeOpt = None, set_: SetOpt = None, truth: TruthOpt = None,
            min_growth: float = 0.2, drift_margin: float = 0.05, max_tasks: int = 10,
            time_budget_h: float = 6.0) -> None:
    """Ingest new logs, re-mine, retrain what grew or drifted, promote through the gates, refresh routes."""
    from factory.nightly import NightlyConfig, NightlyLocked, Paths, nightly as run_nightly, render_summary

    _tracking()
    config = NightlyConfig(min_growth=min_growth, drift_margin=drift_margin, max_tasks=max_tasks,
                           time_budget_s=time_budget_h * 3600, recipe=recipe, overrides=tuple(set_ or []),
                           truth=truth)
    try:
        summary = run_nightly(logs, Paths(data_dir(), registry_dir(), Path("reports")), config)
    except NightlyLocked as err:
        raise _fail(str(err)) from None
    console.print(render_summary(summary))


schedule_app = typer.Typer(help="Schedule the nightly run (crontab, or a systemd user timer).",
                           no_args_is_help=True)
app.add_typer(schedule_app, name="schedule")


@schedule_app.command("install")
def schedule_install(logs: Annotated[list[Path], typer.Argument(help="log folders the nightly reads")],
                     at: str = "02:00", systemd: bool = False) -> None:
    """Run `factory nightly LOGS...` every day at --at (HH:MM, local time)."""
    from factory import schedule

    project, logs = Path.cwd(), [p.resolve() for p in logs]
    try:
        done = schedule.install_systemd(project, logs, at) if systemd else schedule.install_cron(project, logs, at)
    except (ValueError, RuntimeError) as err:
        raise _fail(str(err)) from None
    console.print(f"scheduled: {done}")


@schedule_app.command("show")
def schedule_show() -> None:
    """Print this project's crontab entry."""
    from factory import schedule

    try:
        entry = schedule.show_cron(Path.cwd())
    except RuntimeError as err:
        raise _fail(str(err)) from None
    console.print(entry or "no nightly scheduled for this project")


@schedule_app.command("remove")
def schedule_remove() -> None:
    """Remove this project's crontab entry."""
    from factory import schedule

    try:
        removed = schedule.remove_cron(Path.cwd())
    except RuntimeError as err:
        raise _fail(str(err)) from None
    console.print("removed" if removed else "no nightly scheduled for this project")


def print_results(results: list[dict]) -> None:
    table = Table("task", "kind", "metric", "base", "specialist", "teacher", "threshold", "served",
                  title="Specialists on the held-out test split")
    for r in results:
        cols, cal = r["columns"], r["calibration"]
        threshold = cal["threshold"]
        table.add_row(r["task"], r["kind"], "score", *(f"{cols[c]['score']:.3f}" for c in ("base", "specialist", "teacher")),
                      "-" if threshold in (None, float("inf")) else f"{threshold:.3f}", f"{cal['coverage']:.0%}")
    console.print(table)


if __name__ == "__main__":
    app()
