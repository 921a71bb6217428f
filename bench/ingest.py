"""Ingest and curate throughput, and ingest memory at two sizes.

Logs: `datasets/samples/generate.py --sessions 3400` writes ~10.7k proxy-logged calls
(the real mix: tool calls, failures, malformed lines, duplicates); copies of them
with a per-copy marker in every user message make 10k and 100k unique records.

Figures (each ingest runs in a fresh subprocess, so imports and the RSS
high-water mark belong to that run alone):

* ``ingest_records_per_s``: records read per CPU-second of the 100k ingest
  on one core (``FACTORY_WORKERS=1``: the parsing in the ingesting process; parquet's own
  threads count against it), after a warm-up ingest in the same process so one-time imports
  are not counted. ``ingest_wall_records_per_s``: the same per wall second
  (noisy on a shared machine). ``ingest_calibration_loop_ms``: CPU milliseconds of
  ``sum(range(2_000_000))`` in the same process, to compare machines and load
  (about 20 ms on a quiet modern core); the records/s figure scales with it.
* ``ingest_peak_mb_10k`` / ``ingest_peak_mb_100k``: peak RSS (VmHWM) of the whole
  process, interpreter and imports included; flat means the 100k figure stays
  close to the 10k one. ``ingest_import_mb``: the peak after the imports, for scale.
* ``curate_records_per_s``: records per CPU-second through `curate_store`
  (Presidio scrubbing, filters, MinHash dedup) on 1,000 ingested records, after
  the analyzer is built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SESSIONS = 3400
CURATE_RECORDS = 1000

_INGEST = r"""
import json, re, shutil, sys, time
from pathlib import Path
from factory.ingest import ingest
work = Path(sys.argv[1])
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the forking parent
rss = lambda: int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
imported = rss()
loop = time.process_time()
sum(range(2_000_000))
loop = time.process_time() - loop
ingest([Path(sys.argv[3])], work / "warm" / "raw", work / "warm" / "q")
shutil.rmtree(work / "warm")
wall, cpu = time.perf_counter(), time.process_time()
stats = ingest([Path(sys.argv[2])], work / "records" / "raw", work / "records" / "q")
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
print(json.dumps({"read": stats.read, "accepted": stats.accepted, "cpu_s": cpu, "wall_s": wall,
                  "peak_mb": rss(), "import_mb": imported, "loop_ms": loop * 1000}))
"""

_CURATE = """
import json, sys, time
from pathlib import Path
from factory.curate import CurateConfig, curate, curate_store
from factory.records import Record, content_id
work = Path(sys.argv[1])
warm = [{"role": "user", "content": "warm up: mail a@example.com"}]
curate([Record(id=content_id(warm, [], "ok", []), source="x", location="x", messages=warm, output_text="ok")])
cpu = time.process_time()
report = curate_store(work / "records" / "raw", work / "curated.parquet", work / "curate.jsonl", work / "report.json")
print(json.dumps({"read": report["read"], "cpu_s": time.process_time() - cpu}))
"""


def _copies(lines: list[bytes], count: int) -> bytes:
    """`count` copies of the log lines, each copy's user messages marked so its records are new."""
    out = []
    for copy in range(count):
        marker = f'"role": "user", "content": "[{copy}] '.encode()
        out += [raw.replace(b'"role": "user", "content": "', marker) for raw in lines]
    return b"".join(out)


def _python(code: str, *args: str) -> dict:
    env = {**os.environ, "FACTORY_WORKERS": "1"}  # one process: per-core figures (bench/scale.py has every core)
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, check=True,
                          capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "datasets" / "samples" / "generate.py"), "--sessions",
                        str(SESSIONS), "--out", str(tmp / "gen")], check=True, capture_output=True)
        lines = [raw for path in sorted((tmp / "gen" / "logs").glob("*.jsonl"))
                 for raw in path.read_bytes().splitlines(keepends=True)]
        sizes = {}
        for label, copies in (("10k", 1), ("100k", 10)):
            log = tmp / f"logs-{label}" / "calls.jsonl"
            log.parent.mkdir()
            log.write_bytes(_copies(lines, copies))
            sizes[label] = log
        warm = tmp / "warm.jsonl"
        warm.write_bytes(_copies(lines[:500], 1).replace(b'"content": "', b'"content": "warm '))

        small = _python(_INGEST, tmp / "run-10k", sizes["10k"], warm)
        large = _python(_INGEST, tmp / "run-100k", sizes["100k"], warm)

        sample = tmp / "curate"
        (sample / "logs").mkdir(parents=True)
        (sample / "logs" / "calls.jsonl").write_bytes(b"".join(lines[:CURATE_RECORDS + 20]))
        _python(_INGEST, sample, sample / "logs", warm)
        curated = _python(_CURATE, sample)
    return {
        "ingest_records_per_s": round(large["read"] / large["cpu_s"]),
        "ingest_wall_records_per_s": round(large["read"] / large["wall_s"]),
        "ingest_records_100k": large["read"],
        "ingest_peak_mb_10k": round(small["peak_mb"], 1),
        "ingest_peak_mb_100k": round(large["peak_mb"], 1),
        "ingest_import_mb": round(large["import_mb"], 1),
        "ingest_calibration_loop_ms": round(large["loop_ms"], 1),
        "curate_records_per_s": round(curated["read"] / curated["cpu_s"], 1),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
