"""Bench the mine stage: discover tasks in 100k logged calls and publish their datasets, on 2 cores.

The records come from the sample-log generator (`datasets/samples/generate.py`, ~36k
sessions in 10 seeded runs) read by `factory.ingest`, failed calls dropped as curate would (curate's PII
scrubbing is left out: it is curate's cost, not mine's). Two runs, each from a cold start
(model loaded, no cached embeddings): the logs as generated (`mine_100k_s`, target <= 300 s)
and the hard variant where every call is logged under one generic step with the task's
instruction in the user message instead of a system prompt (`mine_100k_generic_s`). Each
reports the adjusted Rand index of the mined tasks against the generator's planted tasks
and how many texts were embedded (the hot spot: skeletons and centroid samples only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from sklearn.metrics import adjusted_rand_score

from factory import ingest
from factory import embed
from factory import mine as mine_stage
from factory.io import SPLITS, load_split
from factory.records import Record

ROOT = Path(__file__).resolve().parents[1]
N_RECORDS = 100_000
SESSIONS = 36_000  # ~2.95 calls per session: a little over 100k calls that did not fail
CHUNKS = 10


def _records(tmp: Path) -> tuple[list[Record], dict[str, str]]:
    """~100k calls that did not fail, and the planted task per call id.

    Generated in 10 seeded chunks: the generator's dirt planting is quadratic in the calls
    of one run, and sessions are independent anyway.
    """
    for seed in range(CHUNKS):
        subprocess.run([sys.executable, str(ROOT / "datasets" / "samples" / "generate.py"), "--seed", str(seed),
                        "--sessions", str(SESSIONS // CHUNKS), "--out", str(tmp / f"gen-{seed}")],
                       check=True, capture_output=True)
    ingest.ingest([tmp / f"gen-{seed}" / "logs" for seed in range(CHUNKS)], tmp / "raw", tmp / "quarantine")
    records = sorted((r for r in ingest.read_records(tmp / "raw") if r.outcome == "ok"),
                     key=lambda r: (r.timestamp, r.id))
    truth = {row["id"]: row["task"] for seed in range(CHUNKS)
             for row in map(json.loads, (tmp / f"gen-{seed}" / "truth.jsonl").read_text().splitlines())}
    return records[:N_RECORDS], truth


def _generic(record: Record) -> Record:
    user = "\n\n".join(m["content"] for m in record.messages)
    return replace(record, step="agent", messages=[{"role": "user", "content": user}])


def _mine(records: list[Record], truth: dict[str, str], out: Path) -> tuple[float, float, int]:
    """(seconds, adjusted Rand index, texts embedded) of one cold mining run."""
    embed._embedder.cache_clear()
    embed._cache.clear()
    start = time.perf_counter()
    catalog = mine_stage.mine(records, out)
    seconds = time.perf_counter() - start
    embedded = len(embed._cache)
    task_of = {row["id"]: task for task, entry in catalog.items() if entry["status"] == "ready"
               for split in SPLITS
               for row in load_split(out, task, entry["dataset_version"], split)}
    planted = [truth.get(r.source_id, "classify_intent") for r in records]
    score = adjusted_rand_score(planted, [task_of.get(r.id, "") for r in records])
    return seconds, score, embedded


def run() -> dict[str, float]:
    threads = torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if affinity and len(affinity) > 2:
        os.sched_setaffinity(0, sorted(affinity)[:2])
    torch.set_num_threads(2)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            records, truth = _records(Path(tmp))
            seconds, score, embedded = _mine(records, truth, Path(tmp) / "plain")
            generic_s, generic_score, generic_embedded = _mine([_generic(r) for r in records], truth,
                                                               Path(tmp) / "generic")
    finally:
        torch.set_num_threads(threads)
        if affinity and len(affinity) > 2:
            os.sched_setaffinity(0, affinity)
    return {
        "mine_100k_records": float(len(records)),
        "mine_100k_s": round(seconds, 1),
        "mine_100k_ari": round(score, 4),
        "mine_100k_embedded_texts": float(embedded),
        "mine_100k_generic_s": round(generic_s, 1),
        "mine_100k_generic_ari": round(generic_score, 4),
        "mine_100k_generic_embedded_texts": float(generic_embedded),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
