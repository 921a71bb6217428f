"""Bench the whole loop on public agent logs nobody here wrote: API-Bank's tool-using assistant.

`../shared/public-logs/api-bank.jsonl.gz` (see its README: 1,718 calls from 264 multi-turn
dialogues, 102 distinct tool lists, one generic step) goes through the real CLI in a clean
data folder, as a new user would run it: `factory ingest`, `curate`, `mine`, then
`factory finetune` of the largest mined task with the default CPU recipe. Figures:

real_logs_trainable_share   curated records that landed in a task with a dataset (>= 50 examples)
real_logs_specialist_score  the largest task's score on its held-out test split (agent_turn: the
                            action type, then call match or ROUGE-L), against the logged answers
real_logs_base_score        the untrained base model on the same prompts (same run)
real_logs_teacher_score     the logged answers themselves (1.0: they are the references)
real_logs_served_share      the share of the test split the specialist answers at its threshold
real_logs_train_s           seconds of training (the adapter's, not evaluation's)

Omitted, with a note, when the file is absent (a machine without the shared folder).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT.parent / "shared" / "public-logs" / "api-bank.jsonl.gz"


def _factory(env: dict[str, str], *args: str) -> None:
    subprocess.run([str(Path(sys.executable).with_name("factory")), *args], env=env, cwd=ROOT, check=True)


def run() -> dict[str, float]:
    if not LOGS.exists():
        print(f"{LOGS} is absent: real-log figures omitted")
        return {}
    with tempfile.TemporaryDirectory(prefix="bench-real-logs-") as tmp:
        root = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "FACTORY_ARTIFACT_ROOT")}
        env.update(FACTORY_DATA_DIR=str(root / "datasets"), FACTORY_REGISTRY_DIR=str(root / "registry"),
                   FACTORY_REPORTS_DIR=str(root / "reports"))
        for args in (["ingest", str(LOGS)], ["curate"], ["mine"]):
            _factory(env, *args)
        catalog = yaml.safe_load((root / "datasets" / "tasks.yaml").read_text())["tasks"]
        curated = json.loads((root / "datasets" / "curate-report.json").read_text())["kept"]
        ready = {name: e for name, e in catalog.items() if e["status"] == "ready"}
        largest = max(ready, key=lambda name: ready[name]["size"])
        start = time.perf_counter()
        _factory(env, "finetune", largest)
        finetune_s = time.perf_counter() - start
        evaluation = json.loads((root / "reports" / largest / "eval.json").read_text())
        trained = json.loads(next((root / "registry" / "training" / largest).glob("*/train.json")).read_text())
    columns = evaluation["columns"]
    print(f"largest task {largest} ({ready[largest]['kind']}, {ready[largest]['size']} records): "
          f"{trained['train_examples']} training examples, finetune {finetune_s:.0f} s")
    return {
        "real_logs_trainable_share": sum(e["size"] for e in ready.values()) / curated,
        "real_logs_specialist_score": columns["specialist"]["score"],
        "real_logs_base_score": columns["base"]["score"],
        "real_logs_teacher_score": columns["teacher"]["score"],
        "real_logs_served_share": evaluation["calibration"]["coverage"],
        "real_logs_train_s": trained["seconds"],
    }
