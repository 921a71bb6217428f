"""Evaluate one specialist: base zero-shot vs specialist vs teacher on the held-out test split,
with the escalation threshold certified on the validation split.

All three columns are scored against the same references: the ground truth where a
truth file gives one for a call (`{"id": <log call id>, "output": {...}}` per line),
otherwise the teacher's logged output (then the teacher scores 1.0 by definition).
The base and the specialist share one model in memory: the adapter is disabled for
the base column.

Scores, usability and the confusion matrix come from the task's kind (`factory.kinds`),
each example judged against the tools its own request offered. Prompts are rendered by
`factory.chat` within the sequence budget training used (earlier turns dropped first); an
example that still cannot be rendered is counted by reason in `skipped`, not scored.

The specialist answers the validation split too, rendered and judged the same way, with
its confidence zeroed for answers that cannot be used (a label outside the label set, no
parsable tool call to an offered tool, JSON that is invalid or breaks the inferred
schema). Validation chooses; test measures (`held_out_calibration`):

- on validation, `certify_threshold` picks the lowest threshold whose kept quality reaches
  `target_quality` x the teacher's validation score on new traffic with probability
  >= 1 - `escalation_delta`, and `fit_calibration_map` fits the map from raw confidence to
  expected score;
- on test, the coverage and kept quality at that threshold and the ECE of the raw and the
  mapped confidences: out-of-sample figures, since test chose nothing.

A validation split too small to certify anything (or with no renderable prompt) leaves the
threshold None: the task escalates every request. The trade-off: one more generation pass
(the specialist on validation), and a threshold resting on the validation share (10% of a
task by default) rather than on the larger test share; the base column stays test only.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from factory import chat, constrain, kinds
from factory.base_model import resolve_base
from factory.constrain import CONSTRAINED_DECODING
from factory.evaluate.calibrate import (apply_map, certify_per_action, certify_threshold, coverage_curve,
                                       evaluate_threshold, examples_to_certify, expected_calibration_error,
                                       fit_calibration_map, group_of, reliability_bins, served)
from factory.evaluate.generate import Generation, generate
from factory.evaluate.report import write_report
from factory.embed import embed_texts
from factory.io import load_split, write_atomic
from factory.recipe import EVAL_FIELDS, Recipe
from factory.models import load_specialist
from factory.schemas import EvaluationResult
from factory.tracking import resume_run

# Part of a stored result's key: results of an earlier evaluation method are recomputed.
# 2: threshold certified on validation, coverage and quality measured on test.
# 3: the betting bound for fractional scores (was Hoeffding-Bentkus).
# 4: thresholds per predicted action for tool calls and agent turns; calls needed to certify.
EVAL_VERSION = 4


def load_truth(path: Path | None) -> dict[str, dict[str, Any]]:
    """Map log call id -> correct output from a JSONL truth file (none when `path` is None)."""
    if path is None:
        return {}
    truth = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            if "id" not in row or "output" not in row:
                raise ValueError(f"{path}:{number}: a truth line needs 'id' and 'output'")
            truth[row["id"]] = {"content": row["output"].get("content"),
                                "tool_calls": row["output"].get("tool_calls") or []}
    return truth


def eval_settings(recipe: Recipe) -> dict[str, Any]:
    """The recipe fields an evaluation depends on; a stored result is reused only when they match."""
    return recipe.model_dump(include=EVAL_FIELDS)


def max_new_tokens(rows: list[dict], tokenizer, cap: int) -> int:
    """Room for the longest training output plus a margin, at most `cap`: base models that
    ramble stop early, and short-answer tasks generate few tokens."""
    longest = max((len(tokenizer(chat.render_output(r["output"]))["input_ids"]) for r in rows), default=cap)
    return min(cap, int(longest * 1.5) + 8)


def prompts_within(tokenizer, rows: list[dict], budget: int,
                   policy: str | None = None) -> tuple[list[str], list[int], dict[str, int]]:
    """(prompts, indexes of the rows they belong to, rows skipped by reason): each row's prompt
    within `budget` tokens (`chat.fit_prompt`), without the `policy` a specialist learned."""
    prompts, kept, skipped = [], [], Counter()
    for i, row in enumerate(rows):
        try:
            prompts.append(chat.fit_prompt(tokenizer, row["messages"], row.get("tools") or [], budget, policy))
            kept.append(i)
        except chat.ChatError as err:
            skipped[err.reason] += 1
    return prompts, kept, dict(skipped)


def load_for_eval(task: str, recipe: Recipe, adapter_dir: str, dataset_version: str, data_dir: Path,
                  seq_budget: int | None = None) -> tuple[Any, Any, int, int]:
    """(model with the adapter, tokenizer, answer token budget, prompt token budget) as evaluation uses them.

    The answer budget fits the task's longest training output (`max_new_tokens`); a prompt may be
    as long as the training run's sequence budget (`seq_budget`, else the recipe's
    `max_seq_length`): as long as the longest training example, so a test prompt is shortened
    (earlier turns dropped) only where a training example would have been. The budget is capped
    by the base's context, so the answer always fits after the prompt. Raises FileNotFoundError
    when the train split is missing.
    """
    model, tokenizer = load_specialist(resolve_base(recipe.base_model), adapter_dir)
    budget = max_new_tokens(load_split(data_dir, task, dataset_version, "train"), tokenizer, recipe.max_new_tokens)
    return model, tokenizer, budget, prompt_budget(model.config, seq_budget or recipe.max_seq_length, budget)


def prompt_budget(config, seq_budget: int, answer_budget: int) -> int:
    """Tokens a prompt may have at inference: the training sequence budget, within the base's
    context less the answer's room."""
    context = getattr(config, "max_position_embeddings", None) or seq_budget + answer_budget
    return max(64, min(seq_budget, context - answer_budget))


def base_prompts(tokenizer, config, judged: Judged, answer_budget: int, policy: str | None) -> list[str]:
    """The prompts the base answers for the specialist's `judged` rows: the same ones, or where the specialist
    learned a `policy`, the rows with it (the base cannot answer without it), within the base's context."""
    if policy is None:
        return judged.prompts
    limit = prompt_budget(config, getattr(config, "max_position_embeddings", None) or 1 << 20, answer_budget)
    prompts = []
    for row, own in zip(judged.rows, judged.prompts):
        try:
            prompts.append(chat.fit_prompt(tokenizer, row["messages"], row.get("tools") or [], limit))
        except chat.ChatError:  # the policy and the latest turn exceed the base's context: as the specialist
            prompts.append(own)
    return prompts


@dataclass(frozen=True)
class Judged:
    """One split as the specialist answered it: the rows that could be rendered, in order.

    confidences  the generation's confidence, zero where the answer cannot be used
    scores       the specialist's example scores against `refs`
    teacher      the logged (teacher) outputs' scores against the same `refs`
    """

    rows: list[dict[str, Any]]
    prompts: list[str]
    skipped: dict[str, int]
    refs: list[dict[str, Any]]
    tools: list[list[dict[str, Any]]]
    generations: list[Generation]
    outputs: list[dict[str, Any]]
    scores: list[float]
    confidences: list[float]
    teacher: list[float]


def judge_split(model, tokenizer, kind: kinds.Kind, schema: dict[str, Any], rows: list[dict[str, Any]],
                truth: dict[str, dict[str, Any]], token_budget: int, prompt_budget: int, batch_size: int,
                desc: str, constrained: bool = CONSTRAINED_DECODING, policy: str | None = None) -> Judged:
    """Render `rows` within `prompt_budget` tokens (without the `policy` the specialist learned), let
    `model` answer greedily, judge each answer.

    The model answers as it is (the adapter enabled); with `constrained`, each answer follows the
    grammar of the kind, the task schema and the row's own tools (`constrain.for_task`), and its
    confidence is taken under that grammar, as the server decodes. Rows that cannot be rendered are
    counted in `skipped` and left out; with none left, every list is empty. Raises
    ValueError when a reference cannot be scored by the kind.
    """
    prompts, kept, skipped = prompts_within(tokenizer, rows, prompt_budget, policy)
    rows = [rows[i] for i in kept]
    tools = [r.get("tools") or [] for r in rows]
    constraints = [constrain.for_task(kind.name, schema, t) for t in tools] if constrained else None
    generations = generate(model, tokenizer, prompts, token_budget, batch_size, desc=desc,
                           constraints=constraints) if prompts else []
    refs = [truth.get(r["source_id"], r["output"]) for r in rows]
    outputs = [chat.parse_output(g.text) for g in generations]
    usable = [kind.usable(p, schema, t) for p, t in zip(outputs, tools)]
    return Judged(
        rows=rows, prompts=prompts, skipped=skipped, refs=refs, tools=tools, generations=generations, outputs=outputs,
        scores=[kind.score(p, r, schema, t) for p, r, t in zip(outputs, refs, tools)],
        confidences=[g.confidence if ok else 0.0 for g, ok in zip(generations, usable)],
        teacher=[kind.score(r["output"], ref, schema, t) for r, ref, t in zip(rows, refs, tools)],
    )


def held_out_calibration(val_confidences: Sequence[float], val_scores: Sequence[float],
                         test_confidences: Sequence[float], test_scores: Sequence[float], *, val_target: float | None,
                         test_target: float, delta: float, binary: bool) -> dict[str, Any]:
    """Certify the threshold and fit the map on validation, measure them on test: the result's `calibration`.

    Top-level figures are the test split's (`split: "test"`): `coverage`, `quality` (mean
    score of the kept test answers, None when none is kept), `kept`, `n`, `target` (the
    test target, `test_target`), `ece` {raw, calibrated} and `reliability` {raw, calibrated}
    (bins of the test confidences before and after the map), `test_curve` [[threshold,
    coverage, quality], ...]. From validation: `threshold` (None: nothing certified, every
    request escalates), `map` (`fit_calibration_map`, None without validation), `delta`,
    `validation` {n, coverage, quality, lower_bound, target, min_kept} and `curve`
    [[threshold, coverage, quality, lower bound], ...]. JSON-safe.

    The targets are separate so each split's teacher score sets its own (pass one value
    for both to judge the guarantee itself); `val_target` is None only when validation is
    empty, which certifies nothing and fits no map. Raises ValueError when the test set is
    empty, a confidence or score lies outside [0, 1], or `binary` is set and a validation
    score is not 0/1; RuntimeError when the Platt fit does not converge.
    """
    mapping, threshold, curve = None, None, []
    validation = {"n": len(val_confidences), "coverage": 0.0, "quality": None, "lower_bound": None,
                  "target": val_target, "min_kept": None}
    if len(val_confidences):
        cert = certify_threshold(val_confidences, val_scores, val_target, delta, binary_scores=binary)
        mapping = fit_calibration_map(val_confidences, val_scores)
        threshold, curve = cert.threshold, [list(p) for p in cert.curve]
        validation.update(coverage=cert.coverage, quality=cert.quality, lower_bound=cert.lower_bound,
                          min_kept=cert.min_kept)
    point = evaluate_threshold(threshold, test_confidences, test_scores)
    mapped = None if mapping is None else apply_map(mapping, np.asarray(test_confidences, dtype=float))
    bins = None if mapped is None else [list(b) for b in reliability_bins(mapped, test_scores)]
    return {
        "split": "test", "threshold": threshold, "coverage": point.coverage, "quality": point.quality,
        "kept": point.kept, "n": point.n, "target": test_target, "delta": delta, "binary_scores": binary,
        "validation": validation, "map": mapping,
        "ece": {"raw": expected_calibration_error(test_confidences, test_scores),
                "calibrated": None if mapped is None else expected_calibration_error(mapped, test_scores)},
        "reliability": {"raw": [list(b) for b in reliability_bins(test_confidences, test_scores)],
                        "calibrated": bins},
        "curve": curve, "test_curve": [list(p) for p in coverage_curve(test_confidences, test_scores)],
    }


def action_calibration(kind: kinds.Kind, validation: Judged, test: Judged, target: float | None,
                       delta: float) -> dict[str, Any] | None:
    """Per-action escalation (`calibrate.certify_per_action`) for kinds whose answers take different
    actions (a call of each tool, a reply): None for the others, or without validation answers.

    `groups` maps each validation action to its group, `thresholds` each group to its certified
    threshold; per group, `validation` {n, coverage, quality, lower_bound, min_kept} and `test`
    {n, kept, coverage, quality} (at its threshold, on the test answers predicted to take its
    actions); `coverage`, `quality`, `kept`, `n` what the rule serves of the whole test split.
    """
    if type(kind).action is kinds.Kind.action or not validation.confidences or target is None:
        return None
    val_actions = [kind.action(o) for o in validation.outputs]
    cert = certify_per_action(validation.confidences, validation.scores, val_actions, target, delta,
                              kind.binary_action)
    test_actions = [kind.action(o) for o in test.outputs]
    keep = served(test.confidences, test_actions, cert.thresholds, cert.groups)
    scores = np.asarray(test.scores)
    groups: dict[str, Any] = {}
    for group, c in cert.each.items():
        mine = np.asarray([group_of(a, cert.groups) == group for a in test_actions], dtype=bool)
        kept = mine & keep
        groups[group] = {
            "threshold": c.threshold,
            "validation": {"n": c.n, "coverage": c.coverage, "quality": c.quality, "lower_bound": c.lower_bound,
                           "min_kept": c.min_kept},
            "test": {"n": int(mine.sum()), "kept": int(kept.sum()),
                     "coverage": float(kept.sum() / mine.sum()) if mine.any() else 0.0,
                     "quality": float(scores[kept].mean()) if kept.any() else None}}
    return {"delta_each": cert.delta_each, "groups": cert.groups, "thresholds": cert.thresholds,
            "by_group": groups, "n": len(test_actions), "kept": int(keep.sum()),
            "coverage": float(keep.mean()) if keep.size else 0.0,
            "quality": float(scores[keep].mean()) if keep.any() else None}


def calls_to_certify(curve: Sequence[Sequence[float]], n_validation: int, validation_share: float,
                     task_calls: int, target: float | None, delta: float, binary: bool) -> dict[str, Any] | None:
    """How many more logged calls the task needs to certify a threshold at its current error rate.

    For each validation operating point (threshold, coverage, quality) the validation answers
    it would take at that quality (`calibrate.examples_to_certify`) divided by its coverage;
    the cheapest point wins. Validation is `validation_share` of a task's calls, so the task
    needs that many validation answers / share calls in all. None when no target; `needed`
    None when no operating point's quality reaches the target (more data alone cannot help).
    """
    if target is None or not n_validation:
        return None
    best = None
    for _, coverage, quality, *_ in curve:
        need = examples_to_certify(quality, target, delta, binary)
        if need is not None and coverage > 0:
            total = math.ceil(need / coverage)
            best = total if best is None else min(best, total)
    if best is None:
        return {"validation_answers": None, "more_calls": None}
    calls = math.ceil(best / validation_share) if validation_share > 0 else None
    return {"validation_answers": best, "more_calls": None if calls is None else max(0, calls - task_calls)}


def evaluate(task: str, entry: dict[str, Any], recipe: Recipe, adapter_dir: str, dataset_version: str,
             data_dir: Path, report_dir: Path, truth: dict[str, dict[str, Any]],
             run_id: str | None = None, seq_budget: int | None = None, policy: str | None = None) -> dict[str, Any]:
    """Score the three columns on test, certify the threshold on validation, write the report; returns the result.

    `seq_budget` is the training run's sequence budget (the recipe's `max_seq_length` when
    not given); prompts keep room for the answer within it. `policy` is the one the specialist
    learned (`train.choose_policy`): its prompts leave it out, the base's keep it (within the
    base's context), and rows with another policy are skipped as the router escalates them. Each split is cut to the
    recipe's `max_eval_samples`. A stored result for the same evaluation version, adapter,
    dataset version, evaluation settings and truth is returned as is. With `run_id`,
    metrics and report files are logged to that MLflow run. Raises ValueError when the test
    split is empty or no test prompt can be rendered.
    """
    key = {"version": EVAL_VERSION, "adapter": str(adapter_dir), "dataset_version": dataset_version,
           "settings": eval_settings(recipe),
           "truth": hashlib.sha256(json.dumps(truth, sort_keys=True).encode()).hexdigest()[:16]}
    stored = report_dir / "eval.json"
    if stored.exists():
        previous = json.loads(stored.read_text())
        if previous.get("key") == key:
            EvaluationResult.model_validate(previous)
            return previous
    kind, schema = kinds.get(entry["kind"]), entry["output_schema"]
    rows = load_split(data_dir, task, dataset_version, "test")[: recipe.max_eval_samples]
    if not rows:
        raise ValueError(f"task {task!r}: the test split of {dataset_version} is empty")
    model, tokenizer, budget, prompt_budget = load_for_eval(task, recipe, adapter_dir, dataset_version, data_dir,
                                                            seq_budget)
    test = judge_split(model, tokenizer, kind, schema, rows, truth, budget, prompt_budget, recipe.eval_batch_size,
                       f"{task}: specialist", recipe.constrained_decoding, policy)
    if not test.prompts:
        raise ValueError(f"task {task!r}: no test prompt of {dataset_version} can be rendered ({test.skipped})")
    validation = judge_split(model, tokenizer, kind, schema,
                             load_split(data_dir, task, dataset_version, "validation")[: recipe.max_eval_samples],
                             truth, budget, prompt_budget, recipe.eval_batch_size, f"{task}: specialist (validation)",
                             recipe.constrained_decoding, policy)
    with model.disable_adapter():
        base = generate(model, tokenizer, base_prompts(tokenizer, model.config, test, budget, policy), budget,
                        recipe.eval_batch_size, desc=f"{task}: base")

    outputs = {"base": [chat.parse_output(g.text) for g in base], "specialist": test.outputs,
               "teacher": [r["output"] for r in test.rows]}
    columns = {name: kind.metrics(preds, test.refs, schema, test.tools, embed=embed_texts)
               for name, preds in outputs.items()}
    cal = held_out_calibration(
        validation.confidences, validation.scores, test.confidences, test.scores,
        val_target=recipe.target_quality * float(np.mean(validation.teacher)) if validation.teacher else None,
        test_target=recipe.target_quality * columns["teacher"]["score"], delta=recipe.escalation_delta,
        binary=kind.binary)
    cal["actions"] = action_calibration(kind, validation, test, cal["validation"]["target"], recipe.escalation_delta)
    if cal["actions"]:  # what is served is the per-action rule's; the one threshold's stays beside it
        cal["single_threshold"] = {k: cal[k] for k in ("coverage", "quality", "kept")}
        cal.update({k: cal["actions"][k] for k in ("coverage", "quality", "kept")})
    sizes = {split: len(load_split(data_dir, task, dataset_version, split)) for split in ("train", "validation", "test")}
    certified = cal["threshold"] is not None or any(t is not None for t in (cal["actions"] or {}).get("thresholds", {}).values())
    cal["to_certify"] = None if certified else calls_to_certify(
        cal["curve"], len(validation.rows), sizes["validation"] / max(1, sum(sizes.values())), sum(sizes.values()),
        cal["validation"]["target"], recipe.escalation_delta, kind.binary)
    if cal["to_certify"] and (cal["to_certify"]["validation_answers"] or 0) > (recipe.max_eval_samples or 1 << 62):
        cal["to_certify"]["max_eval_samples"] = cal["to_certify"]["validation_answers"]  # the recipe's cap is lower
    result = {
        "key": key, "task": task, "kind": kind.name, "dataset_version": dataset_version, "run_id": run_id,
        "n_test": len(test.rows), "n_validation": len(validation.rows), "skipped": test.skipped,
        "skipped_validation": validation.skipped, "columns": columns, "calibration": cal,
        "confusion": kind.confusion(test.outputs, test.refs, schema),
        "worst": _worst(test.rows, test.refs, test.outputs, test.generations, test.scores),
    }
    EvaluationResult.model_validate(result)  # as the registry and the CLI will read it
    paths = write_report(report_dir, result)
    write_atomic(stored, json.dumps(result, indent=2, ensure_ascii=False))
    if run_id:
        with resume_run(run_id):
            mlflow.log_metrics({f"{col}_{k}": v for col, m in columns.items() for k, v in m.items()})
            mlflow.log_metrics(calibration_metrics(cal))
            for path in paths.values():
                mlflow.log_artifact(str(path), "eval")
    return result


def calibration_metrics(cal: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of a `calibration`: test coverage and quality, ECE before and after the map,
    the threshold, validation coverage. Figures that do not exist (no threshold, nothing kept, no map)
    are left out rather than logged as a stand-in number."""
    metrics = {"threshold": cal["threshold"], "coverage_test": cal["coverage"], "quality_test": cal["quality"],
               "target_test": cal["target"], "coverage_validation": cal["validation"]["coverage"],
               "ece_raw": cal["ece"]["raw"], "ece_calibrated": cal["ece"]["calibrated"]}
    return {name: float(value) for name, value in metrics.items() if value is not None}


def _worst(rows, refs, preds, gens: list[Generation], scores: list[float], n: int = 8) -> list[dict[str, Any]]:
    order = sorted(range(len(rows)), key=lambda i: (scores[i], -gens[i].confidence))[:n]
    return [{"id": rows[i]["id"], "prompt": chat.text_of(rows[i]["messages"][-1].get("content"))[:500],
             "reference": chat.render_output(refs[i]), "prediction": chat.render_output(preds[i]),
             "score": scores[i], "confidence": gens[i].confidence} for i in order]
