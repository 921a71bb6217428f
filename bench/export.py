"""Exports of a trained specialist: how faithful its GGUF files are, and how long writing them takes.

The `classify-intent` champion that `make demo` registered (in FACTORY_REGISTRY_DIR, registry/, with
its dataset in FACTORY_DATA_DIR, datasets/) is exported as GGUF in f16, q8_0 and q4_0 into a temporary
folder, each checked by `factory.export.export`'s own fidelity check on the first PROMPTS (64) of
the 125 test prompts: about 70 s on 2 idle cores (the whole split took 7 minutes on a busy machine).
Nothing is recorded on the version (the bench only reads the registry) and nothing is trained: without
that champion the bench stops and says so.

Figures (merged into bench/results/latest.json):

export_gguf_agreement_f16, _q8_0, _q4_0   share of greedy answers identical to the PyTorch specialist's
export_gguf_task_score_f16, _q8_0, _q4_0  the GGUF's task score (accuracy for this task) against the logged outputs
export_specialist_task_score              the PyTorch specialist's on the same prompts, for comparison
export_s                                  seconds to write the three GGUFs, the adapter merge included
                                          (loading and the fidelity generations are not counted)

q4_0 is the 4-bit type: the gguf package cannot write q4_k_m (its K-quants only dequantize).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow

from factory.export import export, version_of
from factory.paths import Paths

TASK = "classify-intent"
QUANTS = ["f16", "q8_0", "q4_0"]
PROMPTS = 64


def run() -> dict[str, float]:
    paths = Paths.from_env()
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(paths.registry / 'mlflow.db').resolve()}")
    version = version_of(TASK, None, "champion")  # ExportError when `make demo` has not registered it
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        done = export(TASK, version, "gguf", QUANTS, Path(tmp), paths.data, n_prompts=PROMPTS, record=False)
    figures = {}
    for item in done:
        quant = item.key.split(".", 1)[1]
        figures[f"export_gguf_agreement_{quant}"] = item.fidelity["agreement"]
        figures[f"export_gguf_task_score_{quant}"] = item.fidelity["task_score"]
    figures["export_specialist_task_score"] = done[0].fidelity["specialist_score"]
    figures["export_s"] = round(sum(item.seconds for item in done), 2)
    return figures
