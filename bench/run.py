"""Run the benchmarks of every stage and write `bench/results/latest.json`.

Each stage module in this folder has `run() -> dict[str, float]`: it measures its
figures and its baseline in the same run and returns them under the keys the issues
name. Stages run in pipeline order; `python -m bench.run ingest mine` runs a subset, and
`python -m bench.run million` (a 1M-record curate, ~15 minutes) runs only when named.
`calibration` needs trained specialists: it uses the ones `make demo` left, and trains
the sample tasks first when there are none (see bench/calibration.py).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

from rich.console import Console

STAGES = ["ingest", "mine", "scale", "train", "train_memory", "evaluate", "select", "calibration", "serve",
          "constrained", "real_logs", "export", "quality"]
RESULTS = Path(__file__).parent / "results" / "latest.json"


def main(argv: list[str]) -> None:
    console = Console()
    stages = argv or [s for s in STAGES if (Path(__file__).parent / f"{s}.py").exists()]
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for stage in stages:
        console.rule(f"bench {stage}")
        start = time.perf_counter()
        figures = importlib.import_module(f"bench.{stage}").run()
        for key, value in figures.items():
            console.print(f"{key:>32} = {value:,.3f}")
        results.update(figures)
        results[f"_{stage}_bench_s"] = round(time.perf_counter() - start, 1)
    results["_machine"] = f"{platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True))
    os.replace(tmp, RESULTS)
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main(sys.argv[1:])
