"""Evaluate one specialist: base zero-shot vs specialist vs teacher on the held-out test split.

All three columns are scored against the same references: the ground truth where a
truth file gives one for a call (`{"id": <log call id>, "output": {...}}` per line),
otherwise the teacher's logged output (then the teacher scores 1.0 by definition).
The base and the specialist share one model in memory: the adapter is disabled for
the base column.

Scores, usability and the confusion matrix come from the task's kind (`factory.kinds`),
each example judged against the tools its own request offered. Prompts are rendered by
`factory.chat` within the sequence budget training used (earlier turns dropped first); a
test example that still cannot be rendered is counted by reason in `skipped`, not scored.

The specialist's confidence is zeroed for answers that cannot be used (a label
outside the label set, no parsable tool call to an offered tool, JSON that is invalid or
breaks the inferred schema), then the escalation threshold is calibrated so the answers it
keeps reach `target_quality` x the teacher's score with the largest coverage.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import mlflow

from factory import chat, kinds
from factory.base_model import resolve_base
from factory.evaluate.calibrate import calibrate
from factory.evaluate.generate import Generation, generate
from factory.evaluate.report import write_report
from factory.embed import embed_texts
from factory.io import load_split, write_atomic
from factory.recipe import EVAL_FIELDS, Recipe
from factory.models import load_specialist
from factory.tracking import resume_run


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


def prompts_within(tokenizer, rows: list[dict], budget: int) -> tuple[list[str], list[int], dict[str, int]]:
    """(prompts, indexes of the rows they belong to, rows skipped by reason): each row's prompt
    within `budget` tokens (`chat.fit_prompt`)."""
    prompts, kept, skipped = [], [], Counter()
    for i, row in enumerate(rows):
        try:
            prompts.append(chat.fit_prompt(tokenizer, row["messages"], row.get("tools") or [], budget))
            kept.append(i)
        except chat.ChatError as err:
            skipped[err.reason] += 1
    return prompts, kept, dict(skipped)


def evaluate(task: str, entry: dict[str, Any], recipe: Recipe, adapter_dir: str, dataset_version: str,
             data_dir: Path, report_dir: Path, truth: dict[str, dict[str, Any]],
             run_id: str | None = None, seq_budget: int | None = None) -> dict[str, Any]:
    """Score the three columns, calibrate the threshold, write the report; returns the result dict.

    `seq_budget` is the training run's sequence budget (the recipe's `max_seq_length` when
    not given); prompts keep room for the answer within it. A stored result for the same
    adapter, dataset version, evaluation settings and truth is returned as is. With
    `run_id`, metrics and report files are logged to that MLflow run. Raises ValueError
    when the test split is empty or no test prompt can be rendered.
    """
    key = {"adapter": str(adapter_dir), "dataset_version": dataset_version, "settings": eval_settings(recipe),
           "truth": hashlib.sha256(json.dumps(truth, sort_keys=True).encode()).hexdigest()[:16]}
    stored = report_dir / "eval.json"
    if stored.exists():
        previous = json.loads(stored.read_text())
        if previous.get("key") == key:
            return previous
    kind, schema = kinds.get(entry["kind"]), entry["output_schema"]
    rows = load_split(data_dir, task, dataset_version, "test")[: recipe.max_eval_samples]
    if not rows:
        raise ValueError(f"task {task!r}: the test split of {dataset_version} is empty")
    model, tokenizer = load_specialist(resolve_base(recipe.base_model), adapter_dir)
    budget = max_new_tokens(load_split(data_dir, task, dataset_version, "train"), tokenizer, recipe.max_new_tokens)
    prompts, kept, skipped = prompts_within(tokenizer, rows, max(64, (seq_budget or recipe.max_seq_length) - budget))
    if not prompts:
        raise ValueError(f"task {task!r}: no test prompt of {dataset_version} can be rendered ({skipped})")
    rows = [rows[i] for i in kept]
    specialist = generate(model, tokenizer, prompts, budget, recipe.eval_batch_size, desc=f"{task}: specialist")
    with model.disable_adapter():
        base = generate(model, tokenizer, prompts, budget, recipe.eval_batch_size, desc=f"{task}: base")

    refs = [truth.get(r["source_id"], r["output"]) for r in rows]
    tools = [r.get("tools") or [] for r in rows]
    teacher = [r["output"] for r in rows]
    outputs = {"base": [chat.parse_output(g.text) for g in base],
               "specialist": [chat.parse_output(g.text) for g in specialist], "teacher": teacher}
    columns = {name: kind.metrics(preds, refs, schema, tools, embed=embed_texts) for name, preds in outputs.items()}
    scores = [kind.score(p, r, schema, t) for p, r, t in zip(outputs["specialist"], refs, tools)]
    confidences = [g.confidence if kind.usable(p, schema, t) else 0.0
                   for g, p, t in zip(specialist, outputs["specialist"], tools)]
    target = recipe.target_quality * columns["teacher"]["score"]
    cal = calibrate(confidences, scores, target)
    result = {
        "key": key, "task": task, "kind": kind.name, "dataset_version": dataset_version, "run_id": run_id,
        "n_test": len(rows), "skipped": skipped, "columns": columns,
        "calibration": {"threshold": cal.threshold, "coverage": cal.coverage, "quality": cal.quality,
                        "target": target, "curve": [list(p) for p in cal.curve]},
        "confusion": kind.confusion(outputs["specialist"], refs, schema),
        "worst": _worst(rows, refs, outputs["specialist"], specialist, scores),
    }
    paths = write_report(report_dir, result)
    write_atomic(stored, json.dumps(result, indent=2, ensure_ascii=False))
    if run_id:
        with resume_run(run_id):
            mlflow.log_metrics({f"{col}_{k}": v for col, m in columns.items() for k, v in m.items()})
            mlflow.log_metrics({"threshold": _finite(cal.threshold), "coverage": cal.coverage})
            for path in paths.values():
                mlflow.log_artifact(str(path), "eval")
    return result


def _finite(value: float | None) -> float:
    return 1.0 if value is None or value == float("inf") else float(value)


def _worst(rows, refs, preds, gens: list[Generation], scores: list[float], n: int = 8) -> list[dict[str, Any]]:
    order = sorted(range(len(rows)), key=lambda i: (scores[i], -gens[i].confidence))[:n]
    return [{"id": rows[i]["id"], "prompt": chat.text_of(rows[i]["messages"][-1].get("content"))[:500],
             "reference": chat.render_output(refs[i]), "prediction": chat.render_output(preds[i]),
             "score": scores[i], "confidence": gens[i].confidence} for i in order]
