"""A 1M-record ingest and curate in bounded memory per worker (not in `make bench`'s default
stages: ~15 minutes on 2 cores; run it with `python -m bench.run million`, and with
`FACTORY_ENGINE=ray` on a Ray cluster of two 1-CPU nodes started here on 127.0.0.1).

The sample generator is run with 241 seeds (its PII check is quadratic in one run's size), the
logs are ingested (~1.03M records) and `curate_store` runs on them, both on the engine, while a
thread samples, every half second, the private memory (USS) of each worker (local: this
process's children; ray: the curate actors) and the resident memory of this process (the
driver). With ray the keys start `curate_1m_ray_` / `ingest_1m_ray_`.

ingest_1m_records_per_s        records read per second by the ingest (wall clock, every core)
curate_1m_records              records curated
curate_1m_records_per_s        their rate (wall clock, every core)
curate_1m_worker_peak_mib      the largest worker's peak private memory
curate_1m_worker_start_mib     the same over the first minute of workers (their state: Presidio, a batch)
curate_1m_driver_peak_mib      this process's peak resident memory (local: the raw records'
                               Arrow buffers, the duplicate indexes, a row group of kept records)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS = 241  # x ~4,270 distinct records a seed (1,300 sessions each): 1,028,736 records
MIB = 2 ** 20


def _generate(folder: Path) -> list[Path]:
    def one(seed: int) -> Path:
        out = folder / f"seed-{seed}"
        subprocess.run([sys.executable, str(ROOT / "datasets" / "samples" / "generate.py"), "--sessions", "1300",
                        "--seed", str(seed), "--out", str(out)], check=True, capture_output=True)
        return out / "logs"

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, range(1, SEEDS + 1)))


def _workers(me, ray: bool) -> list:
    import psutil

    children = me.children(recursive=True)
    if not ray:
        return children
    found = []
    for child in children:
        try:
            if "MapWorker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # gone, or a zombie
            continue
    return found


def _sample(peaks: dict[str, float], stop: threading.Event, ray: bool) -> None:
    import psutil

    me, start = psutil.Process(), None
    while not stop.wait(0.5):
        peaks["driver"] = max(peaks.get("driver", 0), me.memory_info().rss)
        for child in _workers(me, ray):
            try:
                uss = child.memory_full_info().uss
            except psutil.Error:
                continue
            peaks["worker"] = max(peaks.get("worker", 0), uss)
            start = start or time.monotonic()  # the first worker seen (Ray's start after its sort)
            if time.monotonic() - start < 60:
                peaks["worker_start"] = max(peaks.get("worker_start", 0), uss)


def run() -> dict[str, float]:
    from factory.engine import engine_name, loopback_cluster

    with tempfile.TemporaryDirectory(prefix="bench-million-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        if engine_name() == "local":
            return _run(tmp, "local")
        (tmp / "ray").mkdir()
        with loopback_cluster(tmp / "ray", object_store_bytes=2_000_000_000):
            return _run(tmp, "ray")


def _run(tmp: Path, engine: str) -> dict[str, float]:
    from factory.curate import curate_store
    from factory.ingest import ingest

    logs = _generate(tmp / "gen")
    start = time.monotonic()
    stats = ingest(logs, tmp / "raw", tmp / "quarantine", engine=engine)
    ingest_rate = stats.read / (time.monotonic() - start)
    peaks: dict[str, float] = {}
    stop, start = threading.Event(), time.monotonic()
    sampler = threading.Thread(target=_sample, args=(peaks, stop, engine == "ray"), daemon=True)
    sampler.start()
    try:
        report = curate_store(tmp / "raw", tmp / "curated.parquet", tmp / "curate.jsonl", tmp / "report.json",
                              engine=engine)
    finally:
        stop.set()
        sampler.join()
    seconds = time.monotonic() - start
    tag = "_ray" if engine == "ray" else ""
    return {f"ingest_1m{tag}_records_per_s": round(ingest_rate), f"curate_1m{tag}_records": float(report["read"]),
            f"curate_1m{tag}_records_per_s": round(report["read"] / seconds, 1),
            f"curate_1m{tag}_worker_peak_mib": round(peaks["worker"] / MIB),
            f"curate_1m{tag}_worker_start_mib": round(peaks["worker_start"] / MIB),
            f"curate_1m{tag}_driver_peak_mib": round(peaks["driver"] / MIB)}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
