"""Quality from the teacher (issue 22): relabelling makes a small task trainable; DPO on a specialist's mistakes.

Relabelling: the first 44 `classify_intent` calls of acme-support's first day (failed ones
included), ingested, curated and mined with the default `min_examples` 50, so the task is
`not_enough_data`. `factory.relabel.relabel` has the teacher answer its failed calls and perturbed
inputs until it has 50 examples; the default recipe (with `min_train_steps=32`, half its
default, to keep the bench short) trains and evaluates it.

The teacher is a loopback OpenAI-compatible server answering with the sample world's own labelling
rule (the template of datasets/samples/generate.py a message was written from): the teacher that
wrote the logs, minus its planted mistakes. A real deployment points `--teacher` at its upstream.

DPO: all of that day's classify_intent calls (a ready task). The SFT specialist is undertrained
on purpose (`DPO_OVERRIDES`: 24 examples, 6 steps) so that it makes mistakes; it answers its own
training inputs, and every wrong answer becomes a pair (chosen: the reference answer, rejected:
the specialist's), which is what the router's log gives for escalations it got wrong. Then
`method: dpo` with the default `dpo:` settings continues that adapter.

Figures (merged into bench/results/latest.json):

relabel_examples_per_s        teacher answers per second through `relabel.ask` (4 workers), 200
                              perturbed inputs
relabel_endpoint_requests_per_s  baseline: the same requests sent straight to the endpoint, one at a
                              time, in the same run
relabel_step_s                the whole `relabel` of the small task (reading, perturbing, asking,
                              the centroid's embeddings, writing)
relabel_task_examples, relabel_logged_examples  the task's examples after relabelling, and logged
relabel_base_score, relabel_specialist_score  the evaluation's base and specialist scores on test
dpo_gain                      the specialist's test score after DPO minus after SFT (whatever its sign)
dpo_sft_score, dpo_score, dpo_pairs  the two scores and the number of pairs

Caveats: the small task's test split holds ~6 examples, so one example moves its scores by ~0.17;
the machine's 2 cores are shared with other jobs, so times vary by 2x.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
from fastapi import FastAPI, Request

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "datasets" / "samples"
CALLS = 44
# the DPO part's specialist is undertrained on purpose (24 examples, 6 steps), so it makes mistakes to learn from
DPO_OVERRIDES = ("max_train_samples=24", "min_train_steps=0", "epochs=2")


def _rule() -> list[tuple[re.Pattern, str]]:
    """(template regex, intent) for every classify_intent template of the sample generator."""
    spec = importlib.util.spec_from_file_location("sample_generate", SAMPLES / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    rules = []
    for intent, templates in generate.CLASSIFY.items():
        for template in templates:
            parts = re.split(r"\{\w+\}", template)
            rules.append((re.compile(".+?".join(re.escape(p) for p in parts), re.IGNORECASE), intent))
    return rules


def _teacher(rules: list[tuple[re.Pattern, str]]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        text = body["messages"][-1]["content"]
        label = next((intent for pattern, intent in rules if pattern.search(text)), "other")
        return {"id": "t", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": label}}]}

    return app


def _calls(path: Path, limit: int | None = None) -> None:
    """The first `limit` classify_intent lines of acme-support's first day (failed calls included)."""
    lines = [line for line in (SAMPLES / "logs" / "support-agent-2026-11-03.jsonl").read_text().splitlines()
             if '"step": "classify_intent"' in line]
    path.write_text("\n".join(lines[:limit]) + "\n")


def _workspace(name: str, calls: int | None, min_examples: int = 50):
    """A fresh data folder, registry and MLflow store with the calls ingested, curated and mined;
    (paths, task, entry)."""
    import mlflow

    from factory import ingest as ingest_stage
    from factory.curate import curate_store
    from factory.mine import MineConfig, mine
    from factory.paths import Paths
    from factory.records import from_table

    root = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    os.environ.update({"FACTORY_DATA_DIR": str(root / "datasets"), "FACTORY_REGISTRY_DIR": str(root / "registry"),
                       "FACTORY_REPORTS_DIR": str(root / "reports"),
                       "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
                       "FACTORY_ARTIFACT_ROOT": str(root / "artifacts")})
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    paths = Paths.from_env()
    data = paths.data
    _calls(root / "classify.jsonl", calls)
    ingest_stage.ingest([root / "classify.jsonl"], data / "records" / "raw", data / "quarantine" / "ingest")
    curate_store(data / "records" / "raw", data / "records" / "curated.parquet", data / "quarantine" / "curate.jsonl",
                 data / "curate-report.json")
    catalog = mine(from_table(pq.read_table(data / "records" / "curated.parquet")), data,
                   MineConfig(min_examples=min_examples))
    task, entry = next(iter(catalog.items()))
    return paths, task, entry


def _relabelled(url: str) -> tuple[dict[str, float], list[dict]]:
    """A task under 50 examples made trainable by `relabel`, trained and evaluated; (figures, its train rows)."""
    from factory.catalog import load_catalog
    from factory.io import load_split
    from factory.pipeline import finetune
    from factory.relabel import Teacher, relabel

    paths, task, entry = _workspace("relabel", CALLS)
    assert entry["status"] == "not_enough_data", entry
    start = time.perf_counter()
    report = relabel(task, paths.data, Teacher(f"{url}/v1"), workers=4)
    seconds = time.perf_counter() - start
    entry = load_catalog(paths.data / "tasks.yaml")[task]
    done = finetune(task, entry, paths, None, ("min_train_steps=32",), SAMPLES / "truth.jsonl")
    columns = done.evaluation["columns"]
    return {"relabel_logged_examples": float(report["logged"]), "relabel_task_examples": float(entry["size"]),
            "relabel_step_s": round(seconds, 2), "relabel_base_score": round(columns["base"]["score"], 4),
            "relabel_specialist_score": round(columns["specialist"]["score"], 4),
            "relabel_test_examples": float(done.evaluation["n_test"])}, \
        load_split(paths.data, task, entry["dataset_version"], "train")


def _throughput(url: str, rows: list[dict], n: int = 200) -> dict[str, float]:
    """`relabel.ask` (4 workers) on `n` perturbed inputs against a plain sequential loop of the same requests."""
    from factory.relabel import Teacher, _input_key, ask, perturb

    items = [{"key": _input_key(v["messages"], v["tools"]), "messages": v["messages"], "tools": v["tools"],
              "origin": "synthetic"} for v in perturb(rows, n)]
    start = time.perf_counter()
    ask(Teacher(f"{url}/v1"), items, {}, workers=4)
    relabel_s = time.perf_counter() - start
    with httpx.Client() as client:
        start = time.perf_counter()
        for item in items:
            client.post(f"{url}/v1/chat/completions",
                        json={"model": "teacher", "messages": item["messages"]}).raise_for_status()
        direct_s = time.perf_counter() - start
    return {"relabel_examples_per_s": round(len(items) / relabel_s, 1),
            "relabel_endpoint_requests_per_s": round(len(items) / direct_s, 1)}


def _dpo() -> dict[str, float]:
    """An undertrained specialist's real mistakes on its training inputs as DPO pairs; DPO minus SFT on test."""
    from factory import kinds
    from factory.evaluate.run import judge_split, load_for_eval, load_truth
    from factory.io import load_split
    from factory.pipeline import finetune
    from factory.recipe import load_recipe
    from factory.relabel import PREFERENCES

    paths, task, entry = _workspace("dpo", None)
    truth = SAMPLES / "truth.jsonl"
    sft = finetune(task, entry, paths, None, DPO_OVERRIDES, truth)
    recipe = load_recipe(task, None, list(DPO_OVERRIDES))[0]
    version = entry["dataset_version"]
    rows = load_split(paths.data, task, version, "train")
    model, tokenizer, budget, prompt_budget = load_for_eval(task, recipe, sft.trained.adapter_dir, version,
                                                            paths.data, sft.trained.seq_budget)
    judged = judge_split(model, tokenizer, kinds.get(entry["kind"]), entry["output_schema"], rows,
                         load_truth(truth), budget, prompt_budget, recipe.eval_batch_size, "specialist on train")
    pairs = [{"id": row["id"], "session_id": row["session_id"], "messages": row["messages"],
              "tools": row.get("tools") or [], "chosen": ref, "rejected": output}
             for row, ref, output, score in zip(judged.rows, judged.refs, judged.outputs, judged.scores) if score < 1]
    (paths.data / task / version / PREFERENCES).write_text("".join(json.dumps(p) + "\n" for p in pairs))
    dpo = finetune(task, entry, paths, None, (*DPO_OVERRIDES, "method=dpo"), truth)
    sft_score = sft.evaluation["columns"]["specialist"]["score"]
    dpo_score = dpo.evaluation["columns"]["specialist"]["score"]
    return {"dpo_pairs": float(len(pairs)), "dpo_train_examples": float(len(rows)),
            "dpo_test_examples": float(dpo.evaluation["n_test"]), "dpo_sft_score": round(sft_score, 4),
            "dpo_score": round(dpo_score, 4), "dpo_gain": round(dpo_score - sft_score, 4)}


def run() -> dict[str, float]:
    from factory.serve.app import running

    with running(_teacher(_rule())) as url:
        results, train_rows = _relabelled(url)
        results.update(_throughput(url, train_rows))
    results.update(_dpo())
    return results
