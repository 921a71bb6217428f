"""Serving benchmark: routing overhead without generation, and the router under concurrent load.

route_p50_ms / route_p99_ms    `Router.match` + `decide` on real requests from the sample logs
                               that match a route by signature (target p50 < 1 ms), with the
                               embedding fallback installed; `route_embedding_calls` counts how
                               often it ran on them (must be 0)
route_fallback_p50_ms          the same for requests no signature matches (the fallback embeds)
serve_rps_c{N}, serve_p50_ms_c{N}, serve_p99_ms_c{N}, serve_specialist_share_c{N}
                               N = 1, 4, 16, 64 concurrent HTTP clients on loopback sending a fixed
                               number of requests: sample-log calls of three support-agent tasks, each
                               served by the real SmolLM2 base with its own LoRA adapter (small random
                               weights; routes marked free_text with threshold 0, so every matched
                               answer is the specialist's), and one call in eight with a system prompt
                               no task has, which escalates to a stub upstream on loopback that answers
                               after UPSTREAM_DELAY_S
serve_batched_speedup          serve_rps_c16 / serve_rps_c1 (the baseline: one client, same run)
serve_p99_c16_over_p50_c1      serve_p99_ms_c16 / serve_p50_ms_c1 (target <= 4)
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "datasets" / "samples" / "logs"
N_ROUTE = 2000


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


STEPS = ("classify_intent", "draft_reply", "extract_ticket")
LEVELS = {1: 24, 4: 48, 16: 96, 64: 128}  # concurrent clients: requests sent
UPSTREAM_DELAY_S = 0.2
ANSWER_TOKENS = 32


def _stub_upstream():
    import asyncio

    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat():
        await asyncio.sleep(UPSTREAM_DELAY_S)
        return {"id": "up", "object": "chat.completion", "created": 0, "model": "teacher",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "teacher"},
                             "finish_reason": "stop"}]}

    return app


def _adapters(base: Path, folder: Path) -> dict[str, Path]:
    """One LoRA adapter per task, B drawn small (0.02) so each task's answers differ from the base's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    out = {}
    for step in STEPS:
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.02)
        out[step] = folder / step
        model.save_pretrained(out[step])
    return out


def _clients(url: str, bodies: list[dict], clients: int) -> tuple[list[float], int, float]:
    """Send `bodies` from `clients` threads, each with its own keep-alive connection; (latencies, specialist
    answers, seconds from the first request to the last answer)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    queue, lock, latencies, served = list(reversed(bodies)), threading.Lock(), [], [0]

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    body = queue.pop()
                start = time.perf_counter()
                response = http.post(f"{url}/v1/chat/completions", json=body)
                seconds = time.perf_counter() - start
                assert response.status_code == 200, response.text
                with lock:
                    latencies.append(seconds)
                    served[0] += response.headers.get("x-factory-route") == "specialist"

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    return latencies, served[0], time.perf_counter() - start


def _load(url: str, bodies: list[dict], clients: int) -> tuple[list[float], int, float]:
    """`_clients` in a process of its own, as an agent fleet would be: client threads in the server's
    process would take the interpreter lock from the engine's thread and the server's. The seconds are
    timed in that process: its start (a second or two of imports) is not the server's time."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_clients, url, bodies, clients).result()


def bench_serving() -> dict[str, float]:
    from factory.base_model import ensure_checkpoint
    from factory.serve.app import ServeConfig, create_app, running
    from factory.serve.router import Router
    from factory.serve.specialists import Specialists

    base = ensure_checkpoint()
    calls = [c for c in _sample_calls() if c["metadata"]["step"] in STEPS]
    bodies = []
    for i, call in enumerate(calls[: max(LEVELS.values()) + 8]):
        messages = call["request"]["messages"]
        if i % 8 == 7:  # no task has this prompt: the router escalates it
            messages = [{"role": "system", "content": "Translate the message to French."}, *messages[1:]]
        bodies.append({"model": "gpt-4o", "messages": messages, "metadata": call["metadata"]})
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = _adapters(base, Path(tmp))
        routes = _routes(calls, str(base), "", kind="free_text")
        routes = {task: dataclasses.replace(route, adapter_uri=str(adapters[step]), max_new_tokens=ANSWER_TOKENS)
                  for task, route in routes.items() if (step := task.replace("-", "_")) in STEPS}
        assert len(routes) == len(STEPS), sorted(routes)
        specialists = Specialists(routes, max_batch=32)
        with running(_stub_upstream()) as upstream:
            config = ServeConfig(log_dir=Path(tmp) / "logs", upstream=f"{upstream}/v1")
            app = create_app(Router(routes), specialists, config)
            with running(app) as url:
                _load(url, bodies[-8:], 4)  # warm up: first forward passes, prefix caches
                for clients, count in LEVELS.items():
                    latencies, served, wall = _load(url, bodies[:count], clients)
                    figures |= {f"serve_rps_c{clients}": count / wall,
                                f"serve_p50_ms_c{clients}": _pct(latencies, 50),
                                f"serve_p99_ms_c{clients}": _pct(latencies, 99),
                                f"serve_specialist_share_c{clients}": served / count}
        specialists.close()
    figures["serve_batched_speedup"] = figures["serve_rps_c16"] / figures["serve_rps_c1"]
    figures["serve_p99_c16_over_p50_c1"] = figures["serve_p99_ms_c16"] / figures["serve_p50_ms_c1"]
    return figures


def run() -> dict[str, float]:
    """Serving runs in a process of its own, as `factory serve` does: a process whose main thread ran
    torch work (here the routing bench's embeddings) slows every other thread's torch work 1.7x on
    this machine (libgomp: a second OpenMP thread team), which would halve the one-client baseline."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        serving = pool.submit(bench_serving).result()
    return bench_routing() | serving


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
