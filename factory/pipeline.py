"""One task's sequence, written once: train (or reuse) -> evaluate (or reuse) -> register.

`factory finetune`, `make finetune`, `factory demo` and the nightly all run `finetune`. Each
step is idempotent (training returns a finished run, evaluation a stored result for the same
adapter and settings, registration one version per training run), so a killed sequence
resumes where it stopped. `factory eval` and `factory register` run one step on a finished
training (`finished_training`) and say "train first" rather than train behind the user's back.

Several tasks may run at once (`factory finetune A B --engine ray`, the nightly on Ray: one
Ray task each, asking for `task_resources`); registrations of one registered model are
serialised by a file lock in the registry folder (`registry/locks/<task>.lock`), so two runs
of the same task never interleave their alias and promotion steps. Different models
register in parallel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from factory.errors import FactoryError
from factory.evaluate.report import write_learning_curve
from factory.evaluate.run import evaluate, load_truth
from factory.paths import Paths
from factory.recipe import Recipe, load_recipe
from factory.registry import Gates, register
from factory.train import TrainResult, run_dir, train


@dataclass(frozen=True)
class Finetuned:
    trained: TrainResult
    evaluation: dict[str, Any]
    version: Any  # mlflow ModelVersion
    promoted: bool


def finished_training(task: str, entry: dict[str, Any], recipe: Recipe, paths: Paths) -> TrainResult:
    """The finished training of `task` for its current dataset version and this recipe.

    Raises FactoryError ("train first") when there is none.
    """
    version = entry.get("dataset_version")
    result = run_dir(paths.registry, task, version, recipe) / "train.json" if version else None
    if result is None or not result.exists():
        raise FactoryError(f"task {task!r} has no finished training for dataset {version} and this recipe: "
                           f"run `factory train {task}` first")
    return TrainResult(**json.loads(result.read_text()))


def evaluate_trained(task: str, entry: dict[str, Any], recipe: Recipe, trained: TrainResult, paths: Paths,
                     truth: Path | None = None) -> dict[str, Any]:
    """Evaluate a finished training (or return its stored evaluation); logged to its MLflow run."""
    return evaluate(task, entry, recipe, trained.adapter_dir, trained.dataset_version, paths.data,
                    paths.reports / task, load_truth(truth), run_id=trained.run_id, seq_budget=trained.seq_budget,
                    policy=trained.policy)


def misses_target(evaluation: dict[str, Any], recipe: Recipe) -> bool:
    """Whether the specialist's test score is below `target_quality` x the teacher's."""
    columns = evaluation["columns"]
    return columns["specialist"]["score"] < recipe.target_quality * columns["teacher"]["score"]


def finetune(task: str, entry: dict[str, Any], paths: Paths, recipe: str | None = None,
             overrides: tuple[str, ...] = (), truth: Path | None = None, gates: Gates = Gates()) -> Finetuned:
    """Train, evaluate and register one task; with the recipe's `select_base`, a specialist that misses
    its target is replaced by one of the base `factory select` chooses. Raises RecipeError,
    FactoryError or ValueError (bad data or settings) before spending time where it can."""
    spec, raw = load_recipe(task, recipe, list(overrides))
    trained = train(task, entry, spec, raw, paths.data, paths.registry)
    evaluation = evaluate_trained(task, entry, spec, trained, paths, truth)
    if spec.select_base and len(spec.candidates) > 1 and misses_target(evaluation, spec):
        from factory.select import select

        chosen = select(task, entry, paths, None, recipe, overrides, truth=load_truth(truth))["chosen"]
        if chosen != spec.base_model:
            spec, raw = load_recipe(task, recipe, [*overrides, f"base_model={chosen}"])
            trained = train(task, entry, spec, raw, paths.data, paths.registry)
            evaluation = evaluate_trained(task, entry, spec, trained, paths, truth)
    locks = paths.registry / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(locks / f"{task}.lock")):
        version, promoted = register(entry, trained, evaluation, spec, gates)
    return Finetuned(trained, evaluation, version, promoted)


CURVE_FRACTIONS = (0.25, 0.5, 1.0)
# a gain in test score from half to all of the data above this reads as "still rising"
RISING = 0.02


def learning_curve(task: str, entry: dict[str, Any], paths: Paths, recipe: str | None = None,
                   overrides: tuple[str, ...] = (), truth: Path | None = None,
                   fractions: tuple[float, ...] = CURVE_FRACTIONS) -> list[dict[str, Any]]:
    """The specialist's held-out scores when trained on `fractions` of what the recipe trains on,
    so a user can tell "collect more logs" (still rising at all of it) from "use a bigger base"
    (flat below the target). Each point is a training (nested subsets: the first examples of the
    recipe's seeded order) and an evaluation, stored apart from the task's own (`reports/<task>/
    learning-curve/`) but for all of the data, which is the task's own training and evaluation;
    nothing is registered. Costs the trainings of the fractions below 1 on top.
    Raises as `train` and `evaluate` do.
    """
    spec, raw = load_recipe(task, recipe, list(overrides))
    full = train(task, entry, spec, raw, paths.data, paths.registry)
    out = paths.reports / task / "learning-curve"
    points = []
    for fraction in sorted(fractions):
        if fraction >= 1.0:
            sized, sized_raw, trained = spec, raw, full
        else:
            examples = max(1, round(full.train_examples * fraction))
            sized, sized_raw = load_recipe(task, recipe, [*overrides, f"max_train_samples={examples}"])
            trained = train(task, entry, sized, sized_raw, paths.data, paths.registry)
        whole = trained is full  # evaluated where (and as) `finetune` evaluates it, which then reuses it
        result = evaluate(task, entry, sized, trained.adapter_dir, trained.dataset_version, paths.data,
                          paths.reports / task if whole else out / str(trained.train_examples), load_truth(truth),
                          run_id=trained.run_id if whole else None, seq_budget=trained.seq_budget,
                          policy=trained.policy)
        columns = result["columns"]
        points.append({"fraction": fraction, "examples": trained.train_examples,
                       **{name: columns[name]["score"] for name in ("base", "specialist", "teacher")},
                       "served": result["calibration"]["coverage"], "train_seconds": trained.seconds})
    write_learning_curve(out, points)
    return points


def curve_verdict(points: list[dict[str, Any]]) -> str:
    """One line reading a learning curve: whether more logs or a bigger base is the next step."""
    last, before = points[-1], points[-2] if len(points) > 1 else points[-1]
    gain = last["specialist"] - before["specialist"]
    if gain > RISING:
        return (f"still rising (+{gain:.3f} from {before['examples']} to {last['examples']} examples): "
                "more logged calls should help")
    return f"flat ({gain:+.3f} from {before['examples']} to {last['examples']} examples): try a bigger base or recipe"


def open_store() -> None:
    """Create the MLflow store's tables (a new sqlite store is migrated on first use) here,
    before tasks running at once would race to migrate it and fail."""
    from mlflow import MlflowClient

    MlflowClient().search_registered_models(max_results=1)


def task_resources(task: str, recipe: str | None = None, overrides: tuple[str, ...] = ()) -> dict[str, float]:
    """What one task's train -> evaluate -> register asks a Ray cluster for: its recipe's GPUs
    (`num_processes` for ddp / DeepSpeed, run by accelerate inside the task; 1 for QLoRA or a
    bf16/fp16 recipe; none for a CPU recipe) and CPUs (`torch_threads`, else 1).
    Raises RecipeError as `load_recipe` does."""
    spec, _ = load_recipe(task, recipe, list(overrides))
    if spec.distributed != "none":
        gpus = spec.num_processes or 1
    else:
        gpus = 1 if spec.method == "qlora" or spec.precision != "fp32" else 0
    return {"num_cpus": spec.torch_threads or 1, "num_gpus": gpus}
