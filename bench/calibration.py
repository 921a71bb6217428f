"""Escalation out of sample: does the certified threshold keep its promise on examples it never saw?

Each sample task's specialist answers its validation and test splits once, rendered and
judged as evaluation does (`evaluate.run.judge_split`). The scored examples of both splits
are then partitioned again at random, SEEDS times, into a validation part and a test part
of the original sizes. Each draw certifies the threshold and fits the map on its
validation part and measures them on its test part (`evaluate.run.held_out_calibration`);
beside it, the baseline is the in-sample search (`calibrate.calibrate` on the validation
part), the method before certification, judged on the same test part.

Figures (merged into bench/results/latest.json):

calibration_guarantee_holds_share            share of draws (task x seed) whose served answers
                                             on the test part reach the target; only draws
                                             that serve at least one test answer count
calibration_guarantee_holds_share_in_sample  the same for the in-sample baseline
calibration_draws_served                     how many draws that share is over (of
                                             calibration_draws in all)
served_share_out_of_sample                   test answers served over all test examples, each
                                             task weighing its test part's size; mean over seeds
served_share_in_sample                       the same for the baseline
ece_raw, ece_calibrated                      the test part's ECE of the raw and the mapped
                                             confidence, weighted by test size; mean over seeds

Target: one per task, `target_quality` x the teacher's mean score over all its scored
examples, for both certifying and judging: the guarantee is a property of the method, so
the teacher's own sampling noise between the parts is kept out (evaluation sets each
split's target from that split's teacher score). The certificate bounds the true kept
quality with probability >= 1 - delta; a test part of a few dozen answers is itself noisy,
so some measured misses are test noise and some true misses measure as holds. The draws
split examples, not sessions as mining does, so the parts are closer to exchangeable than
the mined splits are.

Adapters: the finished trainings of the default recipe (cpu-lora) in the project's data
and registry folders (FACTORY_DATA_DIR, FACTORY_REGISTRY_DIR: datasets/ and registry/,
where `make demo` leaves them). What is missing is made first through the CLI: without a
task catalog, `factory ingest`, `curate` and `mine` of the sample logs; for each ready task
without a finished training, `factory train TASK` (about 2 minutes a task on 2 cores). The
bench then runs each specialist over its validation and test splits (about a minute a
task on 2 cores); the draws take seconds. It is not part of `make test`.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from factory import kinds
from factory.catalog import load_catalog
from factory.errors import FactoryError
from factory.evaluate.calibrate import calibrate, evaluate_threshold
from factory.evaluate.run import held_out_calibration, judge_split, load_for_eval, load_truth
from factory.io import load_split
from factory.paths import Paths
from factory.pipeline import finished_training
from factory.recipe import Recipe, load_recipe
from factory.train import TrainResult

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "datasets" / "samples"
SEEDS = 50


@dataclass(frozen=True)
class Scored:
    """One task's scored validation and test examples, pooled (validation first)."""

    task: str
    confidences: np.ndarray
    scores: np.ndarray
    n_validation: int
    target: float
    binary: bool


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "factory.cli", *args], check=True)


def _trained(paths: Paths) -> list[tuple[str, dict, Recipe, TrainResult]]:
    """(task, catalog entry, recipe, finished training) of every ready task, made through the CLI when missing."""
    if not load_catalog(paths.data / "tasks.yaml"):
        for command in (["ingest", str(SAMPLES / "logs")], ["curate"], ["mine"]):
            _cli(*command)
    found = []
    for task, entry in load_catalog(paths.data / "tasks.yaml").items():
        if entry["status"] != "ready":
            continue
        recipe, _ = load_recipe(task)  # the default recipe, as `factory train` takes it
        try:
            trained = finished_training(task, entry, recipe, paths)
        except FactoryError:
            _cli("train", task)
            trained = finished_training(task, entry, recipe, paths)
        found.append((task, entry, recipe, trained))
    return found


def score_task(task: str, entry: dict, recipe: Recipe, trained: TrainResult, paths: Paths, truth: dict) -> Scored:
    """The specialist over its validation and test splits, once (each cut to `max_eval_samples`)."""
    kind = kinds.get(entry["kind"])
    model, tokenizer, budget, prompt_budget = load_for_eval(task, recipe, trained.adapter_dir,
                                                            trained.dataset_version, paths.data, trained.seq_budget)
    judged = [judge_split(model, tokenizer, kind, entry["output_schema"],
                          load_split(paths.data, task, trained.dataset_version, split)[: recipe.max_eval_samples],
                          truth, budget, prompt_budget, recipe.eval_batch_size, f"{task}: {split}")
              for split in ("validation", "test")]
    teacher = judged[0].teacher + judged[1].teacher
    return Scored(task=task, confidences=np.array(judged[0].confidences + judged[1].confidences, dtype=float),
                  scores=np.array(judged[0].scores + judged[1].scores, dtype=float),
                  n_validation=len(judged[0].rows), target=recipe.target_quality * float(np.mean(teacher)),
                  binary=kind.binary)


def resample(tasks: list[Scored], seeds: int, delta: float) -> dict[str, float]:
    """The module's figures from `seeds` random validation/test partitions of each task's scored examples.

    A holds share is NaN when no draw serves a test answer (nothing to judge). A task without
    validation examples has no map: its calibrated ECE counts as the raw one. Raises
    ValueError when no task has a test part (every example would be validation).
    """
    tasks = [t for t in tasks if t.scores.size > t.n_validation]
    if not tasks:
        raise ValueError("no task has test examples to measure on")
    holds, holds_in_sample, served_share, served_in_sample, ece_raw, ece_calibrated = ([] for _ in range(6))
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        kept = kept_in_sample = n_test = 0
        raw = calibrated = 0.0
        for t in tasks:
            order = rng.permutation(t.scores.size)
            val, test = order[: t.n_validation], order[t.n_validation:]
            cal = held_out_calibration(t.confidences[val], t.scores[val], t.confidences[test], t.scores[test],
                                       val_target=t.target if val.size else None, test_target=t.target,
                                       delta=delta, binary=t.binary)
            baseline = calibrate(t.confidences[val], t.scores[val], t.target).threshold if val.size else None
            point = evaluate_threshold(baseline, t.confidences[test], t.scores[test])
            if cal["kept"]:
                holds.append(cal["quality"] >= t.target - 1e-9)
            if point.kept:
                holds_in_sample.append(point.quality >= t.target - 1e-9)
            kept, kept_in_sample, n_test = kept + cal["kept"], kept_in_sample + point.kept, n_test + test.size
            raw += cal["ece"]["raw"] * test.size
            mapped = cal["ece"]["calibrated"]
            calibrated += (cal["ece"]["raw"] if mapped is None else mapped) * test.size
        served_share.append(kept / n_test)
        served_in_sample.append(kept_in_sample / n_test)
        ece_raw.append(raw / n_test)
        ece_calibrated.append(calibrated / n_test)
    return {
        "calibration_guarantee_holds_share": _share(holds),
        "calibration_guarantee_holds_share_in_sample": _share(holds_in_sample),
        "calibration_draws_served": float(len(holds)), "calibration_draws": float(seeds * len(tasks)),
        "served_share_out_of_sample": float(np.mean(served_share)),
        "served_share_in_sample": float(np.mean(served_in_sample)),
        "ece_raw": float(np.mean(ece_raw)), "ece_calibrated": float(np.mean(ece_calibrated)),
    }


def _share(flags: list[bool]) -> float:
    return float(np.mean(flags)) if flags else float("nan")


def run() -> dict[str, float]:
    paths = Paths.from_env()
    truth = load_truth(SAMPLES / "truth.jsonl")
    found = _trained(paths)
    scored = [score_task(task, entry, recipe, trained, paths, truth) for task, entry, recipe, trained in found]
    deltas = {recipe.escalation_delta for _, _, recipe, _ in found}
    if len(deltas) != 1:
        raise ValueError(f"the tasks' recipes set different escalation_delta values: {sorted(deltas)}")
    figures = resample(scored, SEEDS, deltas.pop())
    figures["calibration_tasks"] = float(len(scored))
    figures["calibration_examples"] = float(sum(t.scores.size for t in scored))
    return figures
