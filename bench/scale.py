"""Scale-out: curate on one core, on every core and on Ray; the per-task trainings on Ray.

Figures (wall clock, since the work spreads over processes; on a shared machine they move
with the load, so each is measured beside its baseline in the same run):

* ``ingest_records_per_s_local_1core``, ``_local_all``, ``_ray``: records read per second by
  `ingest` on ~60,000 calls (15 marked copies of the generated logs, one JSONL file): parsed in
  this process, by a pool of every core, and by Ray tasks on the cluster below (the same
  records, checked); the driver's reading, duplicate check and Parquet writing count in all.
* ``curate_records_per_s_local_1core``: records per second through `curate_store` with the
  local engine and one worker (Presidio in this process) on ~4,000 generated records.
* ``curate_records_per_s_local_all``: the same with the local engine on every core
  (`local_workers()`, a forked process pool).
* ``curate_records_per_s_ray``: the same on a Ray cluster of two worker nodes of 1 CPU each,
  started here on 127.0.0.1 (`ray start`); counts Ray Data's planning, the read, the sort in
  the object store and the actor start-up (each loads Presidio), not the cluster's start.
* ``nightly_parallel_speedup``: wall time of the nightly's retrain phase (train -> evaluate ->
  register) for the 4 tasks of one sample day on a tiny random Llama, one after the other
  here (local engine) over the same on that cluster (one Ray task each, 2 at a time).
* ``scale_cores``: the cores this process may use, for reading the figures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SESSIONS = 1300  # ~4,000 records
INGEST_COPIES = 15  # ~60,000 records to ingest
DAY = ROOT / "datasets" / "samples" / "logs" / "support-agent-2026-11-03.jsonl"
TINY = ("max_train_samples=8", "max_eval_samples=4", "max_new_tokens=4", "save_steps=1000")


def _ingest_rate(logs: Path, out: Path, **engine) -> float:
    from factory.ingest import ingest

    start = time.perf_counter()
    stats = ingest([logs], out / "raw", out / "quarantine", **engine)
    return stats.read / (time.perf_counter() - start)


def _copies(logs: Path, out: Path, count: int) -> Path:
    """`count` marked copies of the log lines in one file (bench/ingest.py's `_copies`)."""
    from bench.ingest import _copies as marked

    lines = [raw for path in sorted(logs.glob("*.jsonl")) for raw in path.read_bytes().splitlines(keepends=True)]
    out.mkdir()
    (out / "calls.jsonl").write_bytes(marked(lines, count))
    return out


def _curate_rate(raw: Path, out: Path, **engine) -> float:
    from factory.curate import curate_store

    start = time.perf_counter()
    report = curate_store(raw, out / "curated.parquet", out / "curate.jsonl", out / "report.json", **engine)
    return report["read"] / (time.perf_counter() - start)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _tiny_model(folder: Path) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with SmolLM2's tokenizer, as in tests/conftest.py."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from factory.base_model import ensure_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(ensure_checkpoint())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _retrain_all(data: Path, root: Path, model: Path, engine: str) -> float:
    """Seconds to train, evaluate and register every ready task of `data` (a copy) under `root`."""
    import mlflow

    from factory.catalog import load_catalog
    from factory.engine import run_each
    from factory.paths import Paths
    from factory.pipeline import finetune, open_store, task_resources

    shutil.copytree(data, root / "datasets")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["FACTORY_ARTIFACT_ROOT"] = str(root / "artifacts")
    os.environ["FACTORY_DATA_DIR"] = str(root / "datasets")  # registration reads the splits from there
    os.environ["FACTORY_REGISTRY_DIR"] = str(root / "registry")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    paths = Paths(root / "datasets", root / "registry", root / "reports")
    recipe, overrides = str(ROOT / "recipes" / "base" / "cpu-lora.yaml"), (f"base_model={model}", *TINY)
    catalog = {t: e for t, e in load_catalog(paths.data / "tasks.yaml").items() if e["status"] == "ready"}
    jobs = [partial(finetune, task, entry, paths, recipe, overrides) for task, entry in catalog.items()]
    resources = [task_resources(task, recipe, overrides) for task in catalog]
    open_store()
    start = time.perf_counter()
    results = run_each(jobs, resources, engine)
    seconds = time.perf_counter() - start
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed or len(results) != 4:
        raise RuntimeError(f"{len(results)} tasks, failures: {failed}")
    return seconds


def run() -> dict[str, float]:
    """The figures; the environment (MLflow store, data folders) is restored after, as the
    other stages of `bench.run` run in this process too."""
    import mlflow

    saved, uri = dict(os.environ), mlflow.get_tracking_uri()
    try:
        return _run()
    finally:
        os.environ.clear()
        os.environ.update(saved)
        mlflow.set_tracking_uri(uri)


def _run() -> dict[str, float]:
    from factory.engine import local_workers, loopback_cluster
    from factory.ingest import ingest
    from factory.nightly import prepare
    from factory.paths import Paths

    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "datasets" / "samples" / "generate.py"), "--sessions",
                        str(SESSIONS), "--out", str(tmp / "gen")], check=True, capture_output=True)
        ingest([tmp / "gen" / "logs"], tmp / "raw", tmp / "quarantine")
        logs = _copies(tmp / "gen" / "logs", tmp / "copies", INGEST_COPIES)
        figures = {
            "ingest_records_per_s_local_1core": _ingest_rate(logs, tmp / "ingest-one", engine="local", workers=1),
            "ingest_records_per_s_local_all": _ingest_rate(logs, tmp / "ingest-all", engine="local"),
            "curate_records_per_s_local_1core": _curate_rate(tmp / "raw", tmp / "one", engine="local", workers=1),
            "curate_records_per_s_local_all": _curate_rate(tmp / "raw", tmp / "all", engine="local"),
        }
        (tmp / "logs").mkdir()
        shutil.copy(DAY, tmp / "logs")
        prepare([tmp / "logs"], Paths(tmp / "data", tmp / "prep-registry", tmp / "prep-reports"), "local")
        model = _tiny_model(tmp / "tiny")
        sequential = _retrain_all(tmp / "data", tmp / "local", model, "local")
        (tmp / "ray").mkdir()
        with loopback_cluster(tmp / "ray", object_store_bytes=200_000_000):
            figures["ingest_records_per_s_ray"] = _ingest_rate(logs, tmp / "ingest-ray", engine="ray")
            figures["curate_records_per_s_ray"] = _curate_rate(tmp / "raw", tmp / "on-ray", engine="ray")
            parallel = _retrain_all(tmp / "data", tmp / "tasks-on-ray", model, "ray")
        same = all((tmp / "one" / f).read_bytes() == (tmp / d / f).read_bytes()
                   for d in ("all", "on-ray") for f in ("curated.parquet", "curate.jsonl", "report.json"))
        same_ingest = all(_files(tmp / "ingest-one" / d) == _files(tmp / d2 / d)
                          for d in ("raw", "quarantine") for d2 in ("ingest-all", "ingest-ray"))
        if not same or not same_ingest:
            raise RuntimeError("the engines wrote different curate or ingest outputs")
    figures["nightly_parallel_speedup"] = sequential / parallel
    figures["nightly_retrain_s_local"] = sequential
    figures["nightly_retrain_s_ray"] = parallel
    figures["scale_cores"] = local_workers()
    return {k: round(v, 2) for k, v in figures.items()}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
