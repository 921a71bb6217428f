"""`factory serve --backend vllm|llamacpp|local`: the router on loopback in front of a fake serving engine
that is a real HTTP server replaying recorded vLLM and llama-server bodies (tests/fixtures/backends/),
and a stub upstream LLM, also a real HTTP server."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from factory import chat, constrain
from factory.models import load_tokenizer
from factory.serve.app import ServeConfig, create_app, running
from factory.serve.backends import RemoteSpecialists, confidence, lora_ids, make_specialists
from factory.serve.router import Router, load_routes, request_template
from factory.serve.specialists import Specialists

FIXTURES = Path(__file__).parent / "fixtures" / "backends"
SYSTEM = {"reply": "You draft a short reply to the customer.",
          "summary": "You summarise the support ticket in one line."}
TEACHER = "teacher answer"


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


VLLM_OK, LLAMA_OK = _fixture("vllm_completion"), _fixture("llamacpp_completion")
VLLM_CONFIDENCE = math.exp(sum(VLLM_OK["choices"][0]["logprobs"]["token_logprobs"]) / 10)  # 0.9173
LLAMA_CONFIDENCE = math.exp(sum(p["logprob"] for p in LLAMA_OK["completion_probabilities"]) / 8)  # 0.6979


def _messages(task: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM[task]}, {"role": "user", "content": "My parcel is late."}]


def _routes(path: Path, base: Path, thresholds: dict[str, float], adapters: dict[str, Path] | None = None,
            kind: str = "free_text") -> Path:
    tasks = {task: {"task": task, "kind": kind, "threshold": threshold, "coverage": 0.5,
                    "signature": {"agent": "acme", "step": task, "template": request_template(_messages(task)),
                                  "tools": []},
                    "output_schema": {}, "base_model": str(base),
                    "adapter_uri": str(adapters[task]) if adapters else f"/nowhere/{task}",
                    "max_new_tokens": 12, "dataset_version": "v1", "version": "1"}
             for task, threshold in thresholds.items()}
    path.write_text(json.dumps({"tasks": tasks}))
    return path


def _fake_engine(seen: list[dict], mode: dict) -> FastAPI:
    """vLLM's /v1/completions and llama-server's /completion replaying the fixtures; `mode["now"]`
    switches to an HTTP error, a body of another shape, or a reply slower than the router waits."""
    app = FastAPI()

    async def reply(request: Request, ok: dict, error: dict, status: int):
        seen.append({"path": request.url.path, "body": await request.json()})
        if mode["now"] == "slow":
            await asyncio.sleep(2)
        if mode["now"] == "error":
            return JSONResponse(error, status_code=status)
        return {"unexpected": True} if mode["now"] == "garbage" else ok

    @app.post("/v1/completions")
    async def vllm(request: Request):
        return await reply(request, VLLM_OK, _fixture("vllm_error_404"), 404)

    @app.post("/completion")
    async def llamacpp(request: Request):
        return await reply(request, LLAMA_OK, _fixture("llamacpp_error_400"), 400)

    return app


def _upstream() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def teacher(_request: Request):
        return {"id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "teacher-1",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": TEACHER}, "finish_reason": "stop"}]}

    return app


@pytest.fixture
def engine():
    seen: list[dict] = []
    mode = {"now": "ok"}
    with running(_fake_engine(seen, mode)) as url:
        yield url, seen, mode


@pytest.fixture
def upstream():
    with running(_upstream()) as url:
        yield url + "/v1"


def _serve(tmp_path: Path, specialists, routes: Path, upstream: str):
    config = ServeConfig(log_dir=tmp_path / "logs", upstream=upstream)
    return running(create_app(Router(load_routes(routes)), specialists, config))


def _ask(url: str, task: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"model": "gpt-4o", "messages": _messages(task), **extra},
                      headers={"X-Agent": "acme", "X-Step": task}, timeout=30)


def _prompt_ids(base: Path, task: str) -> list[int]:
    tokenizer = load_tokenizer(str(base))
    return tokenizer(chat.render_prompt(tokenizer, _messages(task), []), add_special_tokens=False)["input_ids"]


def test_vllm_backend_sends_the_adapter_and_token_ids_and_serves_by_the_returned_logprobs(
        tmp_path, tiny_model_dir, engine, upstream):
    url, seen, _mode = engine
    routes = _routes(tmp_path / "routes.json", tiny_model_dir, {"reply": 0.9, "summary": 0.95})
    specialists = RemoteSpecialists("vllm", url, load_routes(routes), timeout=5)
    with _serve(tmp_path, specialists, routes, upstream) as server:
        served = _ask(server, "reply", max_tokens=5)
        below = _ask(server, "summary")
    assert [s["body"] for s in seen] == [
        {"model": "reply", "prompt": _prompt_ids(tiny_model_dir, "reply"), "max_tokens": 5, "temperature": 0,
         "logprobs": 1},
        {"model": "summary", "prompt": _prompt_ids(tiny_model_dir, "summary"), "max_tokens": 12, "temperature": 0,
         "logprobs": 1}]
    assert {s["path"] for s in seen} == {"/v1/completions"}
    assert served.headers["x-factory-route"] == "specialist"
    assert served.json()["choices"][0]["message"]["content"] == "Sorry for the delay, it ships today."
    assert float(served.headers["x-factory-confidence"]) == pytest.approx(VLLM_CONFIDENCE, abs=1e-6)
    assert served.json()["usage"]["completion_tokens"] == 10
    # the same answer at 0.9173 falls short of a 0.95 threshold: the certified threshold still decides
    assert (below.headers["x-factory-route"], below.headers["x-factory-reason"]) == ("upstream", "below_threshold")
    assert below.json()["choices"][0]["message"]["content"] == TEACHER


def test_llamacpp_backend_turns_on_the_tasks_lora_id_and_reads_completion_probabilities(
        tmp_path, tiny_model_dir, engine, upstream):
    url, seen, _mode = engine
    routes = _routes(tmp_path / "routes.json", tiny_model_dir, {"reply": 0.7, "summary": 0.69})
    specialists = make_specialists("llamacpp", url, load_routes(routes), timeout=5)
    with _serve(tmp_path, specialists, routes, upstream) as server:
        served = _ask(server, "summary")
        below = _ask(server, "reply")  # same recorded answer, 0.6979 < 0.7
    assert [s["path"] for s in seen] == ["/completion", "/completion"]
    assert seen[0]["body"] == {"prompt": _prompt_ids(tiny_model_dir, "summary"), "n_predict": 12, "temperature": 0,
                               "repeat_penalty": 1.0, "n_probs": 1, "lora": [{"id": 1, "scale": 1.0}]}
    assert seen[1]["body"]["lora"] == [{"id": 0, "scale": 1.0}]  # ids in sorted task order, as the export
    assert served.headers["x-factory-route"] == "specialist"
    assert served.json()["choices"][0]["message"]["content"] == "Parcel delayed; customer asks for status."
    assert float(served.headers["x-factory-confidence"]) == pytest.approx(LLAMA_CONFIDENCE, abs=1e-6)
    assert below.headers["x-factory-reason"] == "below_threshold"


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}


@pytest.mark.parametrize("backend, keys", [
    ("vllm", {"model", "prompt", "max_tokens", "temperature", "logprobs", "structured_outputs"}),
    ("llamacpp", {"prompt", "n_predict", "temperature", "repeat_penalty", "n_probs", "lora", "grammar"})])
def test_remote_backends_send_the_answer_grammar_of_call_routes(tmp_path, tiny_model_dir, engine, upstream,
                                                                backend, keys):
    url, seen, _mode = engine
    routes = _routes(tmp_path / "routes.json", tiny_model_dir, {"reply": 0.0}, kind="tool_call")
    specialists = RemoteSpecialists(backend, url, load_routes(routes), timeout=5)
    with _serve(tmp_path, specialists, routes, upstream) as server:
        response = _ask(server, "reply", tools=[WEATHER])
    body = seen[0]["body"]
    grammar = body["structured_outputs"]["grammar"] if backend == "vllm" else body["grammar"]
    assert set(body) == keys
    assert grammar == constrain.for_task("tool_call", {}, [WEATHER]).gbnf
    assert grammar.startswith("root ::= ") and '"\\"get_weather\\""' in grammar  # GBNF naming the offered tool
    # the recorded answer is text, not a call: unusable for a call route, so it escalates
    assert (response.headers["x-factory-route"], response.headers["x-factory-reason"]) == ("upstream", "unusable")


@pytest.mark.parametrize("backend", ["vllm", "llamacpp"])
@pytest.mark.parametrize("mode, reason", [("error", "backend_error"), ("garbage", "backend_error"),
                                          ("slow", "backend_timeout")])
def test_backend_failures_escalate_counted_and_logged_never_500(tmp_path, tiny_model_dir, engine, upstream, caplog,
                                                                 backend, mode, reason):
    url, _seen, modes = engine
    modes["now"] = mode
    routes = _routes(tmp_path / "routes.json", tiny_model_dir, {"reply": 0.0, "summary": 0.0})
    specialists = RemoteSpecialists(backend, url, load_routes(routes), timeout=0.5)
    with _serve(tmp_path, specialists, routes, upstream) as server:
        response = _ask(server, "reply")
        metrics = httpx.get(f"{server}/metrics").text
    assert response.status_code == 200
    assert (response.headers["x-factory-route"], response.headers["x-factory-reason"]) == ("upstream", reason)
    assert response.json()["choices"][0]["message"]["content"] == TEACHER
    assert f'factory_backend_errors_total{{reason="{reason}"}} 1.0' in metrics
    assert any(reason in r.getMessage() and "reply" in r.getMessage() for r in caplog.records)
    logged = [json.loads(line) for f in (tmp_path / "logs").rglob("*.jsonl") for line in f.read_text().splitlines()]
    assert reason in json.dumps(logged)


def test_an_unreachable_backend_escalates(tmp_path, tiny_model_dir, upstream):
    routes = _routes(tmp_path / "routes.json", tiny_model_dir, {"reply": 0.0})
    specialists = RemoteSpecialists("vllm", "http://127.0.0.1:9", load_routes(routes), timeout=2)
    with _serve(tmp_path, specialists, routes, upstream) as server:
        response = _ask(server, "reply")
    assert (response.status_code, response.headers["x-factory-reason"]) == (200, "backend_error")


def test_backend_choice_is_checked_and_one_url_serves_one_base(tmp_path, tiny_model_dir, smollm2_dir):
    one = load_routes(_routes(tmp_path / "one.json", tiny_model_dir, {"reply": 0.5}))
    with pytest.raises(ValueError, match="needs --backend-url"):
        make_specialists("vllm", None, one)
    with pytest.raises(ValueError, match="needs --backend vllm or llamacpp"):
        make_specialists("local", "http://127.0.0.1:8000", one)
    with pytest.raises(ValueError, match="unknown backend 'tgi'"):
        make_specialists("tgi", "http://127.0.0.1:8000", one)
    two = load_routes(_routes(tmp_path / "two.json", tiny_model_dir, {"reply": 0.5, "summary": 0.5}))
    two["summary"] = two["summary"].__class__(**{**two["summary"].__dict__, "base_model": str(smollm2_dir)})
    with pytest.raises(ValueError, match="one base model per URL"):
        RemoteSpecialists("llamacpp", "http://127.0.0.1:8080", two)
    assert lora_ids(two) == {"reply": 0, "summary": 1}
    assert confidence([]) == 0.0 and confidence([math.log(0.25), math.log(1.0)]) == pytest.approx(0.5)


def test_local_backend_answers_as_in_process_generation_did(tmp_path, tiny_model_dir, upstream):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from factory.evaluate.generate import generate
    from factory.models import load_specialist

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                      task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    routes = _routes(tmp_path / "routes.json", tiny_model_dir, {"reply": 0.0}, {"reply": tmp_path / "adapter"})
    specialists = make_specialists("local", None, load_routes(routes))
    assert type(specialists) is Specialists
    with _serve(tmp_path, specialists, routes, upstream) as server:
        response = _ask(server, "reply")
    peft_model, tokenizer = load_specialist(str(tiny_model_dir), str(tmp_path / "adapter"))
    expected = generate(peft_model, tokenizer, [chat.render_prompt(tokenizer, _messages("reply"), [])], 12)[0]
    assert response.headers["x-factory-route"] == "specialist"
    assert response.json()["choices"][0]["message"]["content"] == chat.parse_output(expected.text)["content"]
    assert float(response.headers["x-factory-confidence"]) == pytest.approx(expected.confidence, abs=1e-6)
