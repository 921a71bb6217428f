"""The `factory` command line: a thin typer layer over the pipeline stages.

Locations default to the project layout and can be moved with environment variables:
FACTORY_DATA_DIR (datasets/), FACTORY_REGISTRY_DIR (registry/), MLFLOW_TRACKING_URI
(sqlite:///registry/mlflow.db, artifacts under registry/artifacts/).
"""

from __future__ import annotations

import os
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from factory import ingest as ingest_stage
from factory import kinds
from factory import mine as mine_stage
from factory import mkl, schedule
from factory.catalog import load_catalog
from factory.errors import FactoryError
from factory.paths import Paths
from factory.records import from_table


class _Commands(TyperGroup):
    """The command group: a FactoryError (bad input, settings or resources) that any command raises
    ends it with one line naming what to fix and exit code 1, under `factory` and typer's test
    runner alike; any other exception is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FactoryError as err:
            raise _fail(str(err)) from None


app = typer.Typer(help="SLM Factory: agent logs in, specialist small language models out.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=_Commands)
console = Console(width=None if sys.stdout.isatty() else 120)  # logs and pipes get whole tables
# library notices that say nothing to a factory user, once per training run
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted", category=UserWarning)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file when routes download adapters
# the commands whose process runs torch's heavy math (training, generation, embeddings)
TORCH_COMMANDS = frozenset({"mine", "relabel", "train", "eval", "finetune", "register", "demo", "nightly", "serve",
                            "simulate", "export", "select"})


@app.callback()
def _before_command(ctx: typer.Context) -> None:
    # before any module imports torch: some of these commands reach it through spaCy or the
    # evaluator before `factory.train` / `factory.models` could load MKL's AMD fix (factory/mkl.py)
    if ctx.invoked_subcommand in TORCH_COMMANDS:
        mkl.load_on_amd()


def paths() -> Paths:
    return Paths.from_env()


def data_dir() -> Path:
    return paths().data


def registry_dir() -> Path:
    return paths().registry


def _tracking() -> None:
    """Point MLflow at the embedded sqlite store unless MLFLOW_TRACKING_URI says otherwise.

    A sqlite store is first opened under a file lock: MLflow creates and migrates its
    schema on first use, and two processes doing that at once corrupt it.
    """
    import filelock
    import mlflow

    if "MLFLOW_TRACKING_URI" not in os.environ:
        registry_dir().mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(registry_dir() / 'mlflow.db').resolve()}"
        os.environ.setdefault("FACTORY_ARTIFACT_ROOT", str((registry_dir() / "artifacts").resolve()))
    uri = os.environ["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        with filelock.FileLock(uri.removeprefix("sqlite:///") + ".lock"):
            mlflow.MlflowClient().search_experiments(max_results=1)


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    return typer.Exit(code=1)


def _catalog() -> dict:
    catalog = load_catalog(data_dir() / "tasks.yaml")
    if not catalog:
        raise _fail(f"no task catalog at {data_dir() / 'tasks.yaml'}: run `factory mine` first")
    return catalog


def _entry(task: str) -> dict:
    catalog = _catalog()
    if task not in catalog:
        raise _fail(f"unknown task {task!r}; known tasks: {', '.join(sorted(catalog))}")
    return catalog[task]


@app.command()
def ingest(paths: Annotated[Optional[list[Path]], typer.Argument(help="log files or folders (plain or .gz)")] = None,
           fmt: Annotated[Optional[str], typer.Option(
               "--format", help=f"force a format: {', '.join(ingest_stage.FORMATS)}")] = None,
           from_mlflow: Annotated[Optional[str], typer.Option(
               "--from-mlflow", help="also read the traces of an MLflow tracking URI")] = None,
           engine: EngineOpt = None) -> None:
    """Read agent logs into canonical records; bad records go to the quarantine (--engine: where the
    JSONL lines are parsed)."""
    if not paths and not from_mlflow:
        raise _fail("give log files or folders, or --from-mlflow URI")
    records, quarantine = data_dir() / "records" / "raw", data_dir() / "quarantine" / "ingest"
    runs = []
    try:
        if paths:
            runs.append(("files", ingest_stage.ingest(paths, records, quarantine, fmt, engine=engine)))
    except (FileNotFoundError, KeyError, OSError) as err:
        raise _fail(str(err).strip("'\"")) from None
    if from_mlflow:
        from mlflow.exceptions import MlflowException

        try:
            runs.append((from_mlflow, ingest_stage.ingest_mlflow(from_mlflow, records, quarantine)))
        except (MlflowException, OSError) as err:
            raise _fail(f"{from_mlflow}: {err}") from None
    for source, stats in runs:
        console.print(f"ingest {source}: {stats.files} source(s) ({stats.skipped_files} unchanged), read {stats.read}, "
                      f"accepted {stats.accepted}, quarantined {stats.quarantined}, duplicates {stats.duplicates}, "
                      f"skipped {stats.skipped} (not LLM calls)")
        for reason, count in stats.reasons.most_common():
            console.print(f"  quarantined {count:>5}  {reason}")
    if any(stats.read and not stats.accepted and not stats.duplicates for _, stats in runs):
        raise _fail(f"nothing could be ingested: see {quarantine}")


@app.command()
def curate(max_tokens: Annotated[Optional[int], typer.Option(
               help="drop records longer than this many tokens of the base model's tokenizer")] = None,
           base_model: Annotated[Optional[str], typer.Option(
               help="tokenizer for --max-tokens [default: the default recipe's base_model]")] = None,
           keep_failed: Annotated[bool, typer.Option(help="keep failed calls")] = False,
           keep_negative: Annotated[bool, typer.Option(help="keep negatively rated calls")] = False,
           engine: EngineOpt = None) -> None:
    """Scrub PII and secrets, drop failed or negatively rated calls, remove duplicates."""
    from factory import curate as curate_stage

    raw = data_dir() / "records" / "raw"
    if not any(raw.glob("*.parquet")):
        raise _fail("no ingested records: run `factory ingest PATH` first")
    count_tokens = None
    if max_tokens is not None:
        try:
            count_tokens = curate_stage.token_counter(base_model)
        except (ValueError, OSError) as err:
            raise _fail(f"tokenizer for --max-tokens: {err}") from None
    config = curate_stage.CurateConfig(drop_failed=not keep_failed, drop_negative_feedback=not keep_negative,
                                       max_tokens=max_tokens)
    report = curate_stage.curate_store(raw, data_dir() / "records" / "curated.parquet",
                                       data_dir() / "quarantine" / "curate.jsonl", data_dir() / "curate-report.json",
                                       config, count_tokens, engine=engine)
    removed = ", ".join(f"{k} {v}" for k, v in report["removed"].items())
    console.print(f"curate: kept {report['kept']} of {report['read']}; removed: {removed}")


@app.command()
def mine(seed: int = 0, min_examples: int = 50, engine: EngineOpt = None) -> None:
    """Discover the recurring subtasks and publish a versioned dataset for each (--engine ray: the
    embeddings run on the cluster)."""
    import pyarrow.parquet as pq

    path = data_dir() / "records" / "curated.parquet"
    if not path.exists():
        raise _fail("no curated records: run `factory curate` first")
    try:
        records = from_table(pq.read_table(path))
    except (OSError, ValueError) as err:  # pyarrow's errors for a file that is not our Parquet
        raise _fail(f"{path}: {err}") from None
    catalog = mine_stage.mine(records, data_dir(), mine_stage.MineConfig(seed=seed, min_examples=min_examples),
                              engine=engine)
    table = Table("task", "kind", "size", "status", "dataset version", title="Mined tasks")
    for name, entry in catalog.items():
        status = {"not_enough_data": f"not enough data (< {min_examples})",
                  "merged": f"merged into {entry.get('merged_into')}"}.get(entry["status"], entry["status"])
        table.add_row(name, entry["kind"], str(entry["size"]), status, entry.get("dataset_version") or "-")
    console.print(table)
    console.print(f"catalog: {data_dir() / 'tasks.yaml'} (rename tasks or set merged_into there; edits survive)")


def _task_recipe(task: str, recipe_name: str | None, overrides: list[str]):
    """(catalog entry, recipe, its raw mapping) of a task, with MLflow's store set up; FactoryError
    for an unknown task or a recipe that does not validate (RecipeError)."""
    from factory.recipe import load_recipe

    entry = _entry(task)
    recipe, raw = load_recipe(task, recipe_name, overrides)
    _tracking()
    return entry, recipe, raw


def _train(task: str, recipe_name: str | None, overrides: list[str]):
    from factory.train import train as train_task

    entry, recipe, raw = _task_recipe(task, recipe_name, overrides)
    console.rule(f"train {task}")
    try:
        return entry, recipe, train_task(task, entry, recipe, raw, paths().data, paths().registry)
    except ValueError as err:  # train's own checks: no dataset ready, no GPU for the recipe, a base it cannot load
        raise _fail(str(err)) from None


def _trained(task: str, recipe_name: str | None, overrides: list[str]):
    """(entry, recipe, finished training); FactoryError "train first" when the task has none."""
    from factory.pipeline import finished_training

    entry, recipe, _ = _task_recipe(task, recipe_name, overrides)
    return entry, recipe, finished_training(task, entry, recipe, paths())


def _eval(task: str, entry, recipe, trained, truth: Path | None) -> dict:
    from factory.pipeline import evaluate_trained

    console.rule(f"evaluate {task}")
    try:
        return evaluate_trained(task, entry, recipe, trained, paths(), truth)
    except ValueError as err:  # the evaluator's: an empty or unrenderable test split, a malformed truth file
        raise _fail(str(err)) from None


RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", help="recipe name under recipes/base or a YAML path")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe field: key=value")]
TruthOpt = Annotated[Optional[Path], typer.Option(help="JSONL of {id, output}: ground truth for the teacher's calls")]
EngineOpt = Annotated[Optional[str], typer.Option(
    "--engine", help="local (this machine's cores) or ray (the cluster at $RAY_ADDRESS) [default: $FACTORY_ENGINE "
                     "or local]")]


@app.command()
def relabel(task: str, teacher: Annotated[Optional[str], typer.Option(
                help="the teacher's OpenAI-compatible base URL (.../v1); without it only the preference pairs")] = None,
            teacher_model: Annotated[str, typer.Option(help="model name sent to the teacher")] = "teacher",
            teacher_key_env: Annotated[str, typer.Option(help="env var holding the teacher's key")] =
            "FACTORY_UPSTREAM_API_KEY", recipe: RecipeOpt = None, set_: SetOpt = None, seed: int = 0) -> None:
    """Have the teacher answer the task's failed calls and perturbed inputs until it is trainable
    (recipe `relabel:` caps them), publishing a new dataset version; then store the task's
    preference pairs from escalations for `method: dpo` (factory.relabel)."""
    import pyarrow.parquet as pq

    from factory import relabel as relabel_stage
    from factory.recipe import load_recipe

    if teacher is not None:
        spec = load_recipe(task, recipe, set_ or [])[0].relabel
        source = relabel_stage.Teacher(teacher, teacher_model, os.environ.get(teacher_key_env))
        report = relabel_stage.relabel(task, data_dir(), source, spec.max_share, spec.target_examples, spec.workers,
                                       seed)
        console.print(f"relabel {task}: {report['logged']} logged + {report['relabelled']} relabelled + "
                      f"{report['synthetic']} synthetic examples ({report['teacher_calls']} teacher calls, cap "
                      f"{report['cap']}); dataset version {report['dataset_version']}")
    curated = data_dir() / "records" / "curated.parquet"
    if curated.exists():
        pairs = relabel_stage.write_preferences(task, _entry(task), from_table(pq.read_table(curated)), data_dir())
        console.print(f"preference pairs of {task}: {pairs} (escalations whose specialist answer the teacher's differs "
                      "from, training sessions)")


@app.command()
def train(task: str, recipe: RecipeOpt = None, set_: SetOpt = None) -> None:
    """Train (or resume) the LoRA specialist of one task."""
    _, _, trained = _train(task, recipe, set_ or [])
    console.print(f"trained {task}: loss {trained.train_loss:.3f}, {trained.tokens_per_s:.0f} tokens/s, "
                  f"adapter {trained.adapter_dir}")


@app.command("eval")
def eval_(task: str, recipe: RecipeOpt = None, set_: SetOpt = None, truth: TruthOpt = None) -> None:
    """Evaluate a task's trained specialist against the base model and the teacher; writes reports/<task>/."""
    entry, rec, trained = _trained(task, recipe, set_ or [])
    print_results([_eval(task, entry, rec, trained, truth)])


@app.command("select")
def select_(task: str, candidates: Annotated[Optional[str], typer.Option(
                help="comma-separated base models (default: the recipe's `candidates:`)")] = None,
            steps: Annotated[int, typer.Option(help="training steps per candidate")] = 32,
            target: Annotated[Optional[float], typer.Option(
                help="validation score to reach (default: target_quality x the teacher's)")] = None,
            recipe: RecipeOpt = None, set_: SetOpt = None, truth: TruthOpt = None) -> None:
    """Train each candidate base briefly, keep the cheapest that reaches the target on validation;
    writes recipes/tasks/<task>.yaml's base_model and reports/<task>/select.*."""
    from factory.evaluate.run import load_truth
    from factory.select import select

    entry = _entry(task)
    _tracking()
    names = [n for n in (candidates or "").split(",") if n.strip()] or None
    try:
        result = select(task, entry, paths(), names, recipe, tuple(set_ or []), steps, target, load_truth(truth))
    except ValueError as err:  # train's own checks (a base it cannot load, no GPU for the recipe)
        raise _fail(str(err)) from None
    table = Table("candidate", "parameters", "validation score", "gen tokens/s", "train s",
                  title=f"{task}: {steps} steps per candidate, target {result['target']:.3f}")
    for row in result["candidates"]:
        table.add_row(row["name"] + (" (chosen)" if row["name"] == result["chosen"] else ""),
                      f"{row['parameters'] / 1e6:.1f}M", f"{row['score']:.3f}",
                      f"{row['generation_tokens_per_s']:.1f}", f"{row['train_seconds']:.0f}")
    console.print(table)
    reached = "reaches the target" if result["reached"] else "none reaches the target: best score kept"
    console.print(f"{task}: base_model {result['chosen']} ({reached}); written to recipes/tasks/{task}.yaml")


def _finetune(task: str, entry: dict, recipe: str | None, overrides: list[str], truth: Path | None) -> dict:
    """Train (or reuse), evaluate (or reuse) and register one task; returns the evaluation."""
    from factory.pipeline import finetune as finetune_task

    _tracking()
    console.rule(f"finetune {task}")
    try:
        done = finetune_task(task, entry, paths(), recipe, tuple(overrides), truth)
    except ValueError as err:  # the trainer's, evaluator's and registry's checks of data and settings
        raise _fail(str(err)) from None
    _print_finetuned(task, done)
    return done.evaluation


def _print_finetuned(task: str, done) -> None:
    aliases = ", ".join(done.version.aliases) or "none"
    console.print(f"{task}: trained in {done.trained.seconds:.0f} s ({done.trained.tokens_per_s:.0f} tokens/s); "
                  f"registered v{done.version.version} (aliases: {aliases}){' - promoted' if done.promoted else ''}")


@app.command()
def finetune(tasks: Annotated[list[str], typer.Argument(help="task names")], recipe: RecipeOpt = None,
             set_: SetOpt = None, truth: TruthOpt = None, engine: EngineOpt = None,
             learning_curve: Annotated[bool, typer.Option(
                 "--learning-curve", help="also train on 1/4 and 1/2 of the data and report the test score at "
                 "each size (reports/<task>/learning-curve/): more logs, or a bigger base?")] = False) -> None:
    """Train, evaluate and register tasks, then refresh routes.json.

    With --engine ray the tasks run at once on the cluster, one Ray task each asking for its
    recipe's GPUs and CPUs; a task that fails is reported and the others go on (exit 1 after)."""
    from factory.engine import engine_name, run_each
    from factory.pipeline import curve_verdict, finetune as finetune_task, learning_curve as curve, open_store, \
        task_resources

    if learning_curve:
        for task in tasks:
            points = curve(task, _entry(task), paths(), recipe, tuple(set_ or []), truth)
            table = Table("examples", "base", "specialist", "teacher", "served", "train s",
                          title=f"{task}: learning curve (held-out test split)")
            for p in points:
                table.add_row(str(p["examples"]), *(f"{p[c]:.3f}" for c in ("base", "specialist", "teacher")),
                              f"{p['served']:.0%}", f"{p['train_seconds']:.0f}")
            console.print(table)
            console.print(f"{task}: {curve_verdict(points)}; plot: {paths().reports / task / 'learning-curve'}")

    if len(tasks) == 1 and engine_name(engine) == "local":
        evaluation = _finetune(tasks[0], _entry(tasks[0]), recipe, set_ or [], truth)
        routes()
        print_results([evaluation])
        return
    _tracking()
    overrides = tuple(set_ or [])
    jobs = [partial(finetune_task, task, _entry(task), paths(), recipe, overrides, truth) for task in tasks]
    resources = [task_resources(task, recipe, overrides) for task in tasks]
    open_store()
    evaluations, failed = [], []
    for task, done in zip(tasks, run_each(jobs, resources, engine)):
        if isinstance(done, BaseException):
            failed.append(task)
            console.print(f"{task}: failed: {done}")
        else:
            _print_finetuned(task, done)
            evaluations.append(done.evaluation)
    routes()
    print_results(evaluations)
    if failed:
        raise _fail(f"{len(failed)} of {len(tasks)} tasks failed: {', '.join(failed)}")


@app.command()
def register(task: str, recipe: RecipeOpt = None, set_: SetOpt = None, truth: TruthOpt = None) -> None:
    """Register a task's trained specialist, evaluating it first if needed (one version per training run)."""
    from factory.registry import register as register_version

    entry, rec, trained = _trained(task, recipe, set_ or [])
    evaluation = _eval(task, entry, rec, trained, truth)
    version, promoted = register_version(entry, trained, evaluation, rec)
    aliases = ", ".join(version.aliases) or "none"
    console.print(f"registered {task} v{version.version} (aliases: {aliases}){' - promoted' if promoted else ''}")


@app.command()
def promote(task: str, force: bool = False,
            reason: Annotated[Optional[str], typer.Option(help="why (required with --force; recorded as a tag)")] = None,
            tolerance: Annotated[Optional[float], typer.Option(
                help="how far below the champion the challenger may score (default 0.01)")] = None,
            min_teacher_share: Annotated[Optional[float], typer.Option(
                help="the least share of the teacher's score (default 0.8)")] = None,
            truth: TruthOpt = None) -> None:
    """Move the `champion` alias to the challenger if it passes the gates."""
    from factory.evaluate.run import load_truth
    from factory.registry import Gates
    from factory.registry import promote as promote_task

    _tracking()
    try:
        gates = Gates(**{k: v for k, v in (("tolerance", tolerance), ("min_teacher_share", min_teacher_share))
                         if v is not None})
        promoted, problems = promote_task(task, gates, force=force, reason=reason, data_dir=data_dir(),
                                          truth=load_truth(truth))
    except ValueError as err:
        raise _fail(str(err)) from None
    for problem in problems:
        console.print(f"gate: {problem}")
    if not promoted:
        raise _fail(f"{task}: challenger not promoted")
    console.print(f"{task}: challenger promoted to champion{' (forced)' if force and problems else ''}")


@app.command()
def rollback(task: str, reason: Annotated[Optional[str], typer.Option(help="why (recorded as a tag)")] = None) -> None:
    """Move the `champion` alias back to the previous champion."""
    from factory.registry import rollback as rollback_task

    _tracking()
    try:
        old, new = rollback_task(task, reason)
    except ValueError as err:
        raise _fail(str(err)) from None
    console.print(f"{task}: champion rolled back from v{old} to v{new}")


@app.command()
def routes(export: Annotated[Optional[list[str]], typer.Option(
        help="also write serving configs to registry/exports/: vllm (--lora-modules command line), lorax, "
             "llamacpp (base and adapter GGUFs, llama-server --lora-scaled command line)")] = None,
           strict: Annotated[bool, typer.Option(help="exit 1 when a task lost its champion")] = False) -> None:
    """Write registry/routes.json from the champions (downloading their adapters to registry/adapters/).

    Names every task left out because it lost its champion (alias deleted, or pointing at a
    deleted version) and why; its requests escalate until the alias is set again.
    """
    from factory.registry import EXPORTS, write_routes

    unknown = sorted(set(export or []) - set(EXPORTS))
    if unknown:
        raise _fail(f"unknown export {', '.join(unknown)}; known: {', '.join(sorted(EXPORTS))}")
    _tracking()
    table, lost = write_routes(registry_dir() / "routes.json")
    console.print(f"routes: {len(table)} champion(s) -> {registry_dir() / 'routes.json'}")
    for task, why in sorted(lost.items()):
        console.print(f"[yellow]not routed:[/yellow] {task}: {why}", soft_wrap=True)
    for name in dict.fromkeys(export or []):
        for path in EXPORTS[name](table, registry_dir() / "exports"):
            console.print(f"  {name}: {path}")
    if strict and lost:
        raise _fail(f"{len(lost)} task(s) without a champion: {', '.join(sorted(lost))}")


@app.command()
def export(task: str,
           fmt: Annotated[str, typer.Option("--format", help="merged, gguf, gguf-adapter or ollama")],
           version: Annotated[Optional[str], typer.Option(help="the version number [default: the champion]")] = None,
           alias: Annotated[Optional[str], typer.Option(help="the version an alias names, e.g. champion")] = None,
           quant: Annotated[Optional[str], typer.Option(
               help="comma-separated: f32, f16, q8_0, q4_0 for gguf/ollama [f16,q8_0 / q8_0]; f32, f16 for "
                    "gguf-adapter [f32]")] = None,
           out: Annotated[Optional[Path], typer.Option(
               help="folder [default: registry/exports/<task>/v<version>/<format>]")] = None,
           prompts: Annotated[int, typer.Option(help="test prompts the fidelity check asks")] = 64,
           min_agreement: Annotated[Optional[float], typer.Option(
               help="least share of answers identical to the specialist's [0.95 for merged, f32, f16, q8_0; "
                    "q4_0 not gated]")] = None) -> None:
    """Export a registered specialist to run elsewhere, check it against the PyTorch specialist on test
    prompts and record it on the version; exits 1 when an export falls below its agreement threshold."""
    from factory.export import check_quants, export as export_version, export_dir, version_of

    quants = check_quants(fmt, quant.split(",") if quant else None)
    _tracking()
    number = version_of(task, version, alias)
    folder = out or export_dir(registry_dir(), task, number, fmt)
    try:
        done = export_version(task, number, fmt, quants, folder, data_dir(), n_prompts=prompts,
                              min_agreement=min_agreement)
    except (ValueError, FileNotFoundError) as err:  # no routing metadata, no test split for the fidelity check
        raise _fail(f"{task} v{number}: {err}") from None
    for item in done:
        check = item.fidelity
        status = "[red]failed[/red]" if item.failed else "ok"
        console.print(f"{task} v{number} {item.key}: {status} - agreement {check['agreement']:.3f} on {check['n']} "
                      f"test prompts (min {'-' if check['min_agreement'] is None else check['min_agreement']}), task score {check['task_score']:.3f} "
                      f"(specialist {check['specialist_score']:.3f}), written in {item.seconds:.1f} s", soft_wrap=True)
        for path in item.files:
            console.print(f"  {path}", soft_wrap=True)
    failed = [item.key for item in done if item.failed]
    if failed:
        raise _fail(f"{task} v{number}: export {', '.join(failed)} below the agreement threshold "
                    "(recorded as failed on the version)")


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
            time_budget_h: float = 6.0, engine: EngineOpt = None) -> None:
    """Ingest new logs, re-mine, retrain what grew or drifted, promote through the gates, refresh routes."""
    from factory.nightly import NightlyConfig, NightlyLocked, nightly as run_nightly, render_summary

    _tracking()
    config = NightlyConfig(min_growth=min_growth, drift_margin=drift_margin, max_tasks=max_tasks,
                           time_budget_s=time_budget_h * 3600, recipe=recipe, overrides=tuple(set_ or []),
                           truth=truth, engine=engine)
    try:
        summary = run_nightly(logs, paths(), config)
    except (NightlyLocked, ValueError) as err:  # a lock held, a malformed catalog, no room on disk
        raise _fail(str(err)) from None
    console.print(render_summary(summary))


schedule_app = typer.Typer(help="Schedule the nightly run (crontab, or a systemd user timer).",
                           no_args_is_help=True)
app.add_typer(schedule_app, name="schedule")


@schedule_app.command("install")
def schedule_install(logs: Annotated[list[Path], typer.Argument(help="log folders the nightly reads")],
                     at: str = "02:00", systemd: bool = False) -> None:
    """Run `factory nightly LOGS...` every day at --at (HH:MM, local time)."""
    project, logs = Path.cwd(), [p.resolve() for p in logs]
    done = schedule.install_systemd(project, logs, at) if systemd else schedule.install_cron(project, logs, at)
    console.print(f"scheduled: {done}")


@schedule_app.command("show")
def schedule_show() -> None:
    """Print this project's crontab entry."""
    console.print(schedule.show_cron(Path.cwd()) or "no nightly scheduled for this project", soft_wrap=True)


@schedule_app.command("remove")
def schedule_remove() -> None:
    """Remove this project's crontab entry."""
    console.print("removed" if schedule.remove_cron(Path.cwd()) else "no nightly scheduled for this project")


RoutesOpt = Annotated[Optional[Path], typer.Option("--routes", help="routing table (default registry/routes.json)")]
EmbeddingOpt = Annotated[bool, typer.Option(help="nearest task centroid when no signature matches")]


def _router(routes_file: Path | None, embedding: bool, min_similarity: float, specialists=None):
    """Routes, router and specialists (adapters are fetched from the MLflow store when not local);
    `specialists(routes)` builds them when given (`serve --backend`), else `Specialists`."""
    from factory.embed import embed_texts
    from factory.serve.centroids import build_router
    from factory.serve.engine import single_threaded
    from factory.serve.router import load_routes
    from factory.serve.specialists import Specialists

    try:
        table = load_routes(routes_file or registry_dir() / "routes.json")
    except (OSError, ValueError) as err:
        raise _fail(str(err)) from None
    _tracking()
    router, missing = build_router(table, data_dir(), embedding, min_similarity, single_threaded(embed_texts))
    for task in missing:
        console.print(f"{task}: no dataset under {data_dir()}, so no embedding centroid (signature matches only)")
    return router, (specialists or Specialists)(table)


@app.command()
def serve(host: str = "127.0.0.1", port: int = 8000,
          upstream: Annotated[Optional[str], typer.Option(help="OpenAI-compatible base URL to escalate to")] = None,
          upstream_key_env: Annotated[str, typer.Option(help="env var holding the upstream key")] = "FACTORY_UPSTREAM_API_KEY",
          api_keys_env: Annotated[str, typer.Option(help="env var with comma-separated client keys")] = "FACTORY_API_KEYS",
          api_keys_file: Annotated[Optional[Path], typer.Option(help="file of client keys, one a line")] = None,
          upstream_model: Annotated[Optional[str], typer.Option(
              help="the upstream model that requests pinned to factory/<task> escalate to")] = None,
          routes_file: RoutesOpt = None, log_dir: Annotated[Optional[Path], typer.Option(
              help="request logs for `factory ingest`, private to this user (default <data dir>/logs/serve)")] = None,
          upstream_timeout: float = 60.0, max_request_bytes: int = 512 * 1024, embedding: EmbeddingOpt = True,
          min_similarity: float = 0.8,
          backend: Annotated[str, typer.Option(
              help="where specialists generate: local (in-process), vllm or llamacpp (a server at --backend-url "
                   "started from `factory routes --export vllm|llamacpp`)")] = "local",
          backend_url: Annotated[Optional[str], typer.Option(
              help="base URL of the vLLM or llama-server, e.g. http://127.0.0.1:8000")] = None,
          backend_timeout: Annotated[float, typer.Option(
              help="seconds a specialist answer may take (queueing included) before the request escalates")] = 30.0,
          max_batch: Annotated[int, typer.Option(
              min=1, help="local backend: requests decoded together in one batch (all tasks of a base)")] = 32,
          max_queue: Annotated[int, typer.Option(
              min=0, help="local backend: requests that may wait for a batch slot; more escalate (reason "
                          "overloaded, 503 without an upstream)")] = 256) -> None:
    """Serve the champions behind an OpenAI-compatible endpoint, escalating to --upstream."""
    import uvicorn

    from factory.serve.app import ServeConfig, check_bind, create_app, load_api_keys
    from factory.serve.backends import make_specialists

    try:
        keys = load_api_keys(api_keys_env, api_keys_file)
        check_bind(host, keys)
        router, specialists = _router(routes_file, embedding, min_similarity,
                                      lambda table: make_specialists(backend, backend_url, table, backend_timeout,
                                                                       max_batch, max_queue))
    except (OSError, ValueError) as err:
        raise _fail(str(err)) from None
    config = ServeConfig(log_dir=log_dir or data_dir() / "logs" / "serve", upstream=upstream,
                         upstream_key=os.environ.get(upstream_key_env) or None, upstream_timeout=upstream_timeout,
                         upstream_model=upstream_model, api_keys=keys, max_request_bytes=max_request_bytes)
    if upstream and not config.upstream_key:
        console.print(f"no key in ${upstream_key_env}: escalations go upstream without Authorization")
    console.print(f"serving {len(router.routes)} specialist(s) ({backend} backend) on http://{host}:{port}/v1, "
                  f"logging to {config.log_dir}")
    uvicorn.run(create_app(router, specialists, config), host=host, port=port)


@app.command()
def simulate(logs: Annotated[Optional[list[Path]], typer.Argument(help="log files to replay (default: test splits)")] = None,
             routes_file: RoutesOpt = None, truth: TruthOpt = None,
             limit: Annotated[Optional[int], typer.Option(help="at most this many test calls per task")] = None,
             price_in: Annotated[float, typer.Option(help="teacher USD per 1M prompt tokens")] = 2.5,
             price_out: Annotated[float, typer.Option(help="teacher USD per 1M completion tokens")] = 10.0,
             specialist_price: Annotated[float, typer.Option(help="specialist USD per 1M tokens")] = 0.02,
             teacher_latency_ms: Annotated[float, typer.Option(help="for calls logged without latency")] = 800.0,
             out: Path = Path("reports/simulate"), embedding: EmbeddingOpt = True, min_similarity: float = 0.8) -> None:
    """Replay held-out calls through routes.json: share served, quality vs the teacher, savings."""
    from factory.evaluate.run import load_truth
    from factory.serve import simulate as sim

    router, specialists = _router(routes_file, embedding, min_similarity)
    try:
        examples = (sim.examples_from_logs(logs) if logs else
                    sim.examples_from_splits(router, data_dir(), sim.curated_records(data_dir()), limit))
        prices = sim.Prices(price_in, price_out, specialist_price, teacher_latency_ms)
        result = sim.simulate(examples, router, specialists, out, prices, load_truth(truth))
    except (OSError, ValueError) as err:
        raise _fail(str(err)) from None
    table = Table("task", "calls", "served", "quality vs teacher", "cost $", "cost saving", "mean ms",
                  "latency saving", title="Simulated serving")
    for r in result["rows"]:
        table.add_row(r["task"], str(r["n"]), f"{r['served']:.0%}", "-" if r["quality"] is None else f"{r['quality']:.3f}",
                      f"{r['cost']:.4f}", f"{r['cost_saving']:.0%}", f"{r['mean_ms']:.0f}", f"{r['latency_saving']:.0%}")
    console.print(table)
    console.print(f"wrote {out / 'simulate.json'} and {out / 'simulate.png'}")


def served_relative(result: dict) -> float | None:
    """The quality of the test answers a task's specialist serves, relative to its teacher's test score
    (1.0: as good as the teacher); None when it serves none or the teacher scores 0."""
    cal, teacher = result["calibration"], result["columns"]["teacher"]["score"]
    return cal["quality"] / teacher if cal["quality"] is not None and teacher else None


def served_overall(results: list[dict]) -> tuple[float, float | None]:
    """(served share, served quality relative to the teacher) over all tasks, out of sample.

    Each task weighs as many invocations as its test split has examples: the served share
    is all kept test answers over all test examples, the relative quality each task's
    `served_relative` weighted by its kept answers (None when nothing is served). Raises
    ZeroDivisionError for no results.
    """
    share = sum(r["calibration"]["kept"] for r in results) / sum(r["calibration"]["n"] for r in results)
    weighted = [(r["calibration"]["kept"], q) for r in results if (q := served_relative(r)) is not None]
    served = sum(k for k, _ in weighted)
    return share, sum(k * q for k, q in weighted) / served if served else None


def _threshold_cell(cal: dict) -> str:
    if cal.get("actions"):
        certified = [g for g, t in cal["actions"]["thresholds"].items() if t is not None]
        return f"per action ({len(certified)} of {len(cal['actions']['thresholds'])} groups)"
    return "-" if cal["threshold"] is None else f"{cal['threshold']:.3f}"


def _to_certify_cell(cal: dict) -> str:
    need = cal.get("to_certify")
    if not need:
        return ""
    if need["more_calls"] is None:
        return "better model"
    cap = f", max_eval_samples={need['max_eval_samples']}" if need.get("max_eval_samples") else ""
    return f"+{need['more_calls']} calls{cap}"


def print_results(results: list[dict]) -> None:
    table = Table("task", "kind", "score", "base", "specialist", "teacher", "threshold", "served",
                  "served quality vs teacher", "to certify",
                  title="Specialists on the held-out test split (escalation threshold certified on validation)",
                  caption="served: share of the test split the specialist answers at the threshold (the rest "
                  "escalates to the LLM); served quality vs teacher: mean score of those answers over the "
                  "teacher's test score; to certify: the logged calls a task without a threshold still needs at "
                  "its current error rate. 'all' weighs each task by its test calls.")
    for r in results:
        cols, cal = r["columns"], r["calibration"]
        relative = served_relative(r)
        table.add_row(r["task"], r["kind"], kinds.get(r["kind"]).score_name,
                      *(f"{cols[c]['score']:.3f}" for c in ("base", "specialist", "teacher")),
                      _threshold_cell(cal), f"{cal['coverage']:.0%}",
                      "-" if relative is None else f"{relative:.3f}", _to_certify_cell(cal))
    if results:
        share, relative = served_overall(results)
        table.add_row("all", "", "", "", "", "", "", f"{share:.0%}", "-" if relative is None else f"{relative:.3f}", "")
    console.print(table)


def main() -> None:
    """The `factory` command (`_Commands` turns a FactoryError into one line and exit code 1)."""
    app()


if __name__ == "__main__":
    main()
