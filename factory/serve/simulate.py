"""Replay held-out calls through routes.json: what serving would have done, and what it saves.

Each call is routed exactly as the server routes it (`Router.match`, the specialist's
answer and confidence, `decide`), one request at a time so the measured specialist
latency is the one a client would see. Per task and overall it reports:

served            share of calls the specialists answer
quality           system quality relative to the teacher: sum of the scores of what the
                  client gets (the specialist's answer, or the teacher's when escalated)
                  over the sum of the teacher's scores, on matched calls (on unmatched
                  calls both are the teacher). References are the ground truth where a
                  truth file gives one, else the teacher's output (then the teacher scores 1);
                  a call whose reference cannot be scored (a JSON task's teacher answered
                  in prose) is left out of quality and counted in `n` but not in `scored`.
cost_saving       1 - simulated cost / all-teacher cost. Teacher cost: the call's logged
                  cost, else its logged token usage at the configured prices, else tokens
                  estimated as characters / 4. A specialist answer costs its tokens at
                  `Prices.specialist`; an escalated call pays the specialist's attempt too.
latency_saving    1 - simulated mean latency / all-teacher mean latency. Teacher latency:
                  the logged one, else `Prices.teacher_latency_ms`; escalated calls add the
                  specialist's time.
served_quality    mean score of the answers the specialists served (scored calls; None
                  when none was served), beside
calibrated        the mean calibrated probability of those answers (the route's
                  `calibration_map` applied to their confidence): what the map predicted
                  served_quality to be. None when no served answer has a map.

Sources: the test splits of the routed tasks' dataset versions (held out from training
and from choosing the threshold, which is certified on the validation split, so the
figures are out of sample; usage and latency joined from the curated records by id), or
log files in any format ingest reads (successful calls only).
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from factory import kinds
from factory.chat import ChatError, render_output
from factory.ingest import ingest, read_records
from factory.io import load_split, write_atomic
from factory.records import Record
from factory.serve.router import SPECIALIST, UPSTREAM, Decision, Router, decide, failure_reason
from factory.serve.specialists import Specialists

UNMATCHED = "(unmatched)"


@dataclass(frozen=True)
class Prices:
    teacher_input: float = 2.50  # USD per million prompt tokens
    teacher_output: float = 10.00  # USD per million completion tokens
    specialist: float = 0.02  # USD per million tokens, prompt and completion (own hardware)
    teacher_latency_ms: float = 800.0  # for calls logged without a latency


@dataclass(frozen=True)
class Example:
    location: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    output: dict[str, Any]
    source_id: str = ""
    agent: str = ""
    step: str = ""
    usage: dict[str, int] = field(default_factory=dict)
    latency_ms: float | None = None
    cost: float | None = None


def _from_record(record: Record) -> Example:
    return Example(location=record.location, messages=record.messages, tools=record.tools, output=record.output,
                   source_id=record.source_id, agent=record.agent, step=record.step, usage=record.usage,
                   latency_ms=record.latency_ms, cost=record.cost)


def examples_from_splits(router: Router, data_dir: Path, records: dict[str, Record] | None = None,
                         limit: int | None = None, split: str = "test") -> list[Example]:
    """The held-out split of every routed task's dataset version (at most `limit` per task);
    `records` (curated records by id) supplies the logged usage, latency and cost.

    Raises FileNotFoundError when a route's dataset version is not under `data_dir`.
    """
    examples = []
    for task, route in sorted(router.routes.items()):
        path = data_dir / task / route.dataset_version / f"{split}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path}: the {split} split of task {task!r} (dataset {route.dataset_version}) "
                                    f"is missing; pass log files instead")
        for number, row in enumerate(load_split(data_dir, task, route.dataset_version, split)[:limit], start=1):
            record = (records or {}).get(row["id"])
            if record is not None:
                examples.append(_from_record(record))
            else:
                examples.append(Example(location=f"{path}:{number}", messages=row["messages"],
                                        tools=row.get("tools") or [], output=row["output"],
                                        source_id=row.get("source_id", "")))
    return examples


def examples_from_logs(paths: list[Path]) -> list[Example]:
    """Successful calls of log files, read by `factory.ingest` into a scratch folder (any format it
    reads; bad lines are skipped, identical calls folded into one). Raises FileNotFoundError for a
    missing path."""
    with tempfile.TemporaryDirectory() as tmp:
        ingest(paths, Path(tmp) / "records", Path(tmp) / "quarantine")
        return [_from_record(r) for r in read_records(Path(tmp) / "records") if r.outcome == "ok"]


def _teacher_cost(example: Example, prices: Prices) -> float:
    if example.cost is not None:
        return example.cost
    prompt = example.usage.get("prompt_tokens")
    completion = example.usage.get("completion_tokens")
    if prompt is None:
        prompt = len(json.dumps(example.messages) + json.dumps(example.tools)) // 4
    if completion is None:
        completion = len(render_output(example.output)) // 4 + 1
    return (prompt * prices.teacher_input + completion * prices.teacher_output) / 1e6




def replay(examples: list[Example], router: Router, specialists: Specialists, prices: Prices = Prices(),
           truth: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One outcome per example: task, who served it, scores, cost and latency, both ways."""
    outcomes = []
    for example in examples:
        match = router.match(example.messages, example.tools, example.agent, example.step)
        route, answer, failed = match.route, None, None
        if route is not None and route.serves:
            try:
                answer = specialists.answer(route.task, example.messages, example.tools)
            except ChatError as err:  # as the server does: the teacher answers
                failed = failure_reason(err)
        decision = Decision(UPSTREAM, failed) if failed else decide(
            match, answer and answer.confidence, bool(answer and answer.usable), answer.output if answer else None)
        teacher_cost, teacher_ms = _teacher_cost(example, prices), example.latency_ms or prices.teacher_latency_ms
        spec_cost = 0.0 if answer is None else (answer.prompt_tokens + answer.completion_tokens) * prices.specialist / 1e6
        spec_ms = 0.0 if answer is None else answer.seconds * 1000
        outcome = {"task": route.task if route else UNMATCHED, "served_by": decision.served_by,
                   "reason": decision.reason, "confidence": answer.confidence if answer else None,
                   "calibrated": answer.calibrated if answer else None,
                   "baseline_cost": teacher_cost, "baseline_ms": teacher_ms, "teacher_score": 1.0, "score": 1.0}
        if route is not None:
            reference = (truth or {}).get(example.source_id, example.output)
            try:
                outcome["teacher_score"] = kinds.get(route.kind).score(example.output, reference, route.output_schema,
                                                                        example.tools)
                outcome["score"] = outcome["teacher_score"]
                if decision.served_by == SPECIALIST:
                    outcome["score"] = kinds.get(route.kind).score(answer.output, reference, route.output_schema,
                                                                    example.tools)
            except ValueError:  # the reference cannot be scored (e.g. a JSON task's teacher wrote prose)
                outcome["teacher_score"] = outcome["score"] = None
        served = decision.served_by == SPECIALIST
        outcome["cost"] = spec_cost + (0.0 if served else teacher_cost)
        outcome["ms"] = spec_ms + (0.0 if served else teacher_ms)
        outcomes.append(outcome)
    return outcomes


def summarise(outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-task rows (sorted by task) and a final "all" row; see the module docstring."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for outcome in outcomes:
        groups[outcome["task"]].append(outcome)
    rows = []
    for task, members in [*sorted(groups.items()), ("all", outcomes)]:
        matched = [o for o in members if o["task"] != UNMATCHED and o["score"] is not None]
        served = [o for o in matched if o["served_by"] == SPECIALIST]
        predicted = [o["calibrated"] for o in served if o["calibrated"] is not None]
        teacher = sum(o["teacher_score"] for o in matched)
        base_cost, base_ms = sum(o["baseline_cost"] for o in members), sum(o["baseline_ms"] for o in members)
        rows.append({
            "task": task, "n": len(members), "scored": len(matched),
            "served": sum(o["served_by"] == SPECIALIST for o in members) / len(members),
            "quality": sum(o["score"] for o in matched) / teacher if teacher else None,
            "served_quality": sum(o["score"] for o in served) / len(served) if served else None,
            "calibrated": sum(predicted) / len(predicted) if predicted else None,
            "cost": sum(o["cost"] for o in members), "baseline_cost": base_cost,
            "cost_saving": 1 - sum(o["cost"] for o in members) / base_cost if base_cost else 0.0,
            "mean_ms": sum(o["ms"] for o in members) / len(members), "baseline_mean_ms": base_ms / len(members),
            "latency_saving": 1 - sum(o["ms"] for o in members) / base_ms if base_ms else 0.0,
        })
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Two panels: share served per task, and quality / cost saving / latency saving per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r["task"] for r in rows]
    y = np.arange(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.6 * len(rows)), sharey=True)
    served = np.array([r["served"] for r in rows])
    left.barh(y, served, color="tab:green", label="specialist")
    left.barh(y, 1 - served, left=served, color="tab:gray", label="upstream LLM")
    left.set(xlim=(0, 1), xlabel="share of calls", title="Who serves", yticks=y, yticklabels=names)
    left.invert_yaxis()
    left.legend(loc="lower right", fontsize=8)
    for offset, (key, label) in zip((-0.27, 0, 0.27), (("quality", "quality vs teacher"),
                                                       ("cost_saving", "cost saving"),
                                                       ("latency_saving", "latency saving"))):
        right.barh(y + offset, [r[key] or 0.0 for r in rows], height=0.25, label=label)
    right.axvline(1.0, color="black", linewidth=0.5)
    right.set(xlabel="ratio", title="Quality and savings")
    right.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def simulate(examples: list[Example], router: Router, specialists: Specialists, out_dir: Path,
             prices: Prices = Prices(), truth: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Replay, summarise, and write `simulate.json` and `simulate.png` to `out_dir`; returns the summary.

    Raises ValueError when there is nothing to replay.
    """
    if not examples:
        raise ValueError("no calls to replay")
    rows = summarise(replay(examples, router, specialists, prices, truth))
    result = {"rows": rows, "prices": asdict(prices), "tasks": sorted(router.routes)}
    write_atomic(out_dir / "simulate.json", json.dumps(result, indent=2))
    plot(rows, out_dir / "simulate.png")
    return result


def curated_records(data_dir: Path) -> dict[str, Record]:
    """Curated records by id (for the logged usage, latency and cost of split rows); empty if none."""
    import pyarrow.parquet as pq

    from factory.records import from_table

    path = data_dir / "records" / "curated.parquet"
    return {r.id: r for r in from_table(pq.read_table(path))} if path.exists() else {}
