"""Serving benchmark: routing overhead without generation, and requests/s with a CPU specialist.

route_p50_ms / route_p99_ms    `Router.match` + `decide` on real requests from the sample logs
                               that match a route by signature (target p50 < 1 ms), with the
                               embedding fallback installed; `route_embedding_calls` counts how
                               often it ran on them (must be 0)
route_fallback_p50_ms          the same for requests no signature matches (the fallback embeds)
serve_rps, serve_p50_ms        sequential HTTP requests to the app on loopback: the real SmolLM2
                               base with a LoRA adapter, short classification prompts, every
                               answer by the specialist (threshold 0; the route is marked free_text
                               so an untrained adapter's answer counts as usable)
direct_p50_ms                  the same generation without HTTP, interleaved with the requests;
                               serve_overhead_ms = serve_p50_ms - direct_p50_ms
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "datasets" / "samples" / "logs"
N_ROUTE, N_SERVE = 2000, 24


def _sample_calls(limit: int = 4000) -> list[dict]:
    calls = []
    for path in sorted(LOGS.glob("support-agent-*.jsonl")):
        for line in path.read_bytes().splitlines():  # the samples hold planted bad lines
            try:
                call = json.loads(line.decode())
                call["metadata"]["step"], call["request"]["messages"][0]["content"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, IndexError):
                continue
            calls.append(call)
    return calls[:limit]


def _routes(calls: list[dict], base: str, adapter: str, kind: str | None = None) -> dict:
    from factory.serve.router import parse_routes, request_template, tool_names

    tasks = {}
    for call in calls:
        step = call["metadata"]["step"].replace("_", "-")
        template = request_template(call["request"]["messages"])
        tools = tool_names(call["request"].get("tools") or [])
        tasks.setdefault(step, {"task": step, "kind": kind or "classification", "threshold": 0.0,
                                "signature": {"agent": "acme-support", "step": step, "template": template,
                                              "tools": list(tools)},
                                "output_schema": {}, "base_model": base, "adapter_uri": adapter,
                                "max_new_tokens": 8, "dataset_version": "bench"})
    return parse_routes({"tasks": tasks}, Path("bench-routes.json"))


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def bench_routing() -> dict[str, float]:
    from factory.embed import embed_texts
    from factory.mine import prompt_text
    from factory.serve.centroids import Centroids
    from factory.serve.router import Router, decide

    calls = _sample_calls()
    routes = _routes(calls, "base", "adapter")
    embedded = []

    def counted(texts):
        embedded.append(len(texts))
        return embed_texts(texts)

    vectors = {}
    for task in routes:
        texts = [prompt_text(c["request"]["messages"]) for c in calls if c["metadata"]["step"].replace("_", "-") == task]
        mean = embed_texts(texts[:32]).mean(axis=0)
        vectors[task] = mean / np.linalg.norm(mean)
    router = Router(routes, Centroids(counted, vectors, {t: r.tools for t, r in routes.items()}))
    requests = [(c["request"]["messages"], c["request"].get("tools") or [], c["metadata"].get("agent", ""),
                 c["metadata"]["step"]) for c in calls]
    timings = []
    for i in range(N_ROUTE):
        messages, tools, agent, step = requests[i % len(requests)]
        start = time.perf_counter()
        decision = decide(router.match(messages, tools, agent, step), 0.9, True)
        timings.append(time.perf_counter() - start)
        assert decision.served_by == "specialist"
    matched_embeddings = len(embedded)
    fallback = []
    for messages, _, _, _ in requests[:20]:
        edited = [{"role": "system", "content": messages[0]["content"] + " Be concise."}, *messages[1:]]
        start = time.perf_counter()
        router.match(edited, [])
        fallback.append(time.perf_counter() - start)
    return {"route_p50_ms": _pct(timings, 50), "route_p99_ms": _pct(timings, 99),
            "route_embedding_calls": float(matched_embeddings), "route_fallback_p50_ms": _pct(fallback, 50)}


def bench_serving() -> dict[str, float]:
    import httpx
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from factory.base_model import ensure_checkpoint
    from factory.serve.app import ServeConfig, create_app, running
    from factory.serve.router import Router
    from factory.serve.specialists import Specialists

    base = ensure_checkpoint()
    calls = [c for c in _sample_calls() if c["metadata"]["step"] == "classify_intent"][: N_SERVE + 2]
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          task_type="CAUSAL_LM")
        get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(adapter)
        specialists = Specialists(_routes(calls, str(base), str(adapter), kind="free_text"))
        app = create_app(Router(specialists.routes), specialists, ServeConfig(log_dir=Path(tmp) / "logs"))
        http, direct, served = [], [], 0
        with running(app) as url, httpx.Client(timeout=120) as client:
            for i, call in enumerate(calls):
                body = {"model": "gpt-4o", "messages": call["request"]["messages"], "metadata": call["metadata"]}
                start = time.perf_counter()
                response = client.post(f"{url}/v1/chat/completions", json=body)
                seconds = time.perf_counter() - start
                start = time.perf_counter()
                specialists.answer("classify-intent", call["request"]["messages"], [])
                if i >= 2:  # the first requests warm up
                    http.append(seconds)
                    direct.append(time.perf_counter() - start)
                    served += response.headers.get("x-factory-route") == "specialist"
    return {"serve_rps": len(http) / sum(http), "serve_p50_ms": statistics.median(http) * 1000,
            "direct_p50_ms": statistics.median(direct) * 1000,
            "serve_overhead_ms": (statistics.median(http) - statistics.median(direct)) * 1000,
            "serve_specialist_share": served / len(http)}


def run() -> dict[str, float]:
    return bench_routing() | bench_serving()


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
