"""`factory serve` end to end on loopback: a tiny random base with LoRA adapters made here,
a routes.json written here, and a stub upstream LLM that is a real HTTP server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from factory.ingest import ingest, read_records
from factory.serve.app import ServeConfig, check_bind, create_app, load_api_keys, running
from factory.serve.router import Router, load_routes, request_signature
from factory.serve.simulate import Example, Prices, examples_from_logs, examples_from_splits, simulate
from factory.serve.specialists import Specialists

CLIENT_KEY, UPSTREAM_KEY = "client-key-123", "upstream-secret-456"
SYSTEM = {"reply": "You draft a short reply to the customer.",
          "summary": "You summarise the support ticket in one line."}
TEACHER = "teacher answer"
UNMATCHED = [{"role": "system", "content": "Translate to French."}, {"role": "user", "content": "hello"}]


def _messages(task: str, user: str = "My parcel is late.") -> list[dict]:
    return [{"role": "system", "content": SYSTEM[task]}, {"role": "user", "content": user}]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two LoRA adapters on the tiny base; random B matrices so each changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for seed, task in enumerate(SYSTEM):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                          task_type="CAUSAL_LM"))
        out[task] = tmp_path_factory.mktemp(f"adapter-{task}")
        model.save_pretrained(out[task])
    return out


def write_routes(path: Path, base: Path, adapters: dict[str, Path], thresholds: dict[str, float | None]) -> Path:
    tasks = {}
    for task, threshold in thresholds.items():
        template, tools = request_signature(_messages(task), [])
        tasks[task] = {"task": task, "kind": "free_text", "threshold": threshold, "coverage": 0.5,
                       "signature": {"agent": "acme", "step": task, "template": template, "tools": list(tools)},
                       "output_schema": {}, "base_model": str(base), "adapter_uri": str(adapters[task]),
                       "max_new_tokens": 8, "dataset_version": "v1", "version": "1"}
    path.write_text(json.dumps({"tasks": tasks}))
    return path


@pytest.fixture(scope="module")
def specialists(tiny_model_dir, adapters, tmp_path_factory) -> Specialists:
    # reply always answers (threshold 0), summary never reaches its threshold (1.01 > any probability)
    path = write_routes(tmp_path_factory.mktemp("routes") / "routes.json", tiny_model_dir, adapters,
                        {"reply": 0.0, "summary": 1.01})
    return Specialists(load_routes(path))


def _stub_upstream(seen: list[dict]) -> FastAPI:
    """An OpenAI-compatible teacher that always answers TEACHER, streaming or not."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append({"authorization": request.headers.get("authorization"), "body": body})
        if body["messages"][-1]["content"] == "slow":
            await asyncio.sleep(1)
        if body["messages"][-1]["content"] == "reject":
            return JSONResponse({"error": {"message": "Incorrect API key provided"}}, status_code=401)
        head = {"id": "chatcmpl-up", "created": 1, "model": "teacher-1"}
        if not body.get("stream"):
            return head | {"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": TEACHER}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}}
        chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": part}, "finish_reason": None}]}
                  for part in ("teacher ", "answer")]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        chunks.append({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}})
        events = [f"data: {json.dumps(head | {'object': 'chat.completion.chunk'} | c)}\n\n" for c in chunks]
        return StreamingResponse(iter(events + ["data: [DONE]\n\n"]), media_type="text/event-stream")

    return app


@pytest.fixture
def upstream():
    seen: list[dict] = []
    with running(_stub_upstream(seen)) as url:
        yield url + "/v1", seen


def _config(tmp_path: Path, upstream_url: str | None, **kw) -> ServeConfig:
    return ServeConfig(log_dir=tmp_path / "logs", upstream=upstream_url, upstream_key=UPSTREAM_KEY,
                       api_keys=frozenset({CLIENT_KEY}), **kw)


def _post(client: httpx.Client, url: str, messages: list[dict], **extra) -> httpx.Response:
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", **extra.pop("headers", {})}
    return client.post(f"{url}/v1/chat/completions", json={"model": "gpt-4o", "messages": messages, **extra},
                       headers=headers, timeout=30)


def _ingested(tmp_path: Path):
    ingest([tmp_path / "logs"], tmp_path / "records", tmp_path / "quarantine")
    return sorted(read_records(tmp_path / "records"), key=lambda r: r.timestamp)


def test_specialist_answers_confident_requests_and_escalates_the_rest_and_logs_all(tmp_path, specialists, upstream):
    upstream_url, seen = upstream
    app = create_app(Router(specialists.routes), specialists, _config(tmp_path, upstream_url))
    with running(app) as url, httpx.Client() as client:
        served = _post(client, url, _messages("reply"), metadata={"agent": "acme", "session_id": "s-1"},
                       headers={"X-Step": "reply"})
        unconfident = _post(client, url, _messages("summary"), headers={"X-Session-Id": "s-2"})
        unmatched = _post(client, url, UNMATCHED)

    assert served.status_code == 200, served.text
    assert served.headers["x-factory-route"] == "specialist" and served.headers["x-factory-task"] == "reply"
    body = served.json()
    assert body["factory"] == {"route": "specialist", "task": "reply", "reason": "confident", "match": "signature",
                               "confidence": pytest.approx(float(served.headers["x-factory-confidence"]), abs=1e-6)}
    specialist_text = body["choices"][0]["message"]["content"]
    assert specialist_text and specialist_text != TEACHER and body["model"] == "factory/reply"

    for response, task, reason in ((unconfident, "summary", "below_threshold"), (unmatched, None, "no_match")):
        assert response.status_code == 200, response.text
        assert response.headers["x-factory-route"] == "upstream"
        assert response.json()["factory"]["reason"] == reason and response.json()["factory"]["task"] == task
        assert response.json()["choices"][0]["message"]["content"] == TEACHER
    # the upstream got the original requests with the upstream key, never the client's key
    assert [s["body"]["messages"] for s in seen] == [_messages("summary"), UNMATCHED]
    assert all(s["authorization"] == f"Bearer {UPSTREAM_KEY}" for s in seen)

    logged = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.jsonl"))
    assert CLIENT_KEY not in logged and UPSTREAM_KEY not in logged
    assert not list((tmp_path / "logs").glob("*.open"))

    records = _ingested(tmp_path)
    assert len(records) == 3
    by_route = {(r.metadata["route"], r.metadata["reason"]): r for r in records}
    mine = by_route[("specialist", "confident")]
    assert (mine.agent, mine.step, mine.session_id, mine.metadata["task"]) == ("acme", "reply", "s-1", "reply")
    assert mine.output_text == specialist_text and mine.model == "factory/reply"
    assert mine.metadata["confidence"] == body["factory"]["confidence"]
    escalated = by_route[("upstream", "below_threshold")]
    assert escalated.output_text == TEACHER and escalated.model == "teacher-1" and escalated.outcome == "ok"
    assert escalated.session_id == "s-2" and escalated.metadata["task"] == "summary"
    assert escalated.metadata["confidence"] < 1.01 and escalated.usage == {"prompt_tokens": 11, "completion_tokens": 2}
    assert by_route[("upstream", "no_match")].metadata["task"] is None


def test_openai_client_talks_to_the_server_unchanged(tmp_path, specialists, upstream):
    upstream_url, _ = upstream
    app = create_app(Router(specialists.routes), specialists, _config(tmp_path, upstream_url))
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0)
        assert {m.id for m in client.models.list()} == {"factory/reply", "factory/summary"}

        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=_messages("reply"), metadata={"agent": "acme", "step": "reply"})
        served = raw.parse()
        assert raw.headers["x-factory-route"] == "specialist"
        assert served.model_extra["factory"]["route"] == "specialist" and served.choices[0].message.content

        stream = client.chat.completions.create(model="gpt-4o", messages=_messages("reply"), stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == served.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == served.usage.completion_tokens
        assert {c.model_extra["factory"]["route"] for c in chunks} == {"specialist"}

        escalated = client.chat.completions.create(model="gpt-4o", messages=_messages("summary"))
        assert escalated.choices[0].message.content == TEACHER
        assert escalated.model_extra["factory"]["route"] == "upstream"

        chunks = list(client.chat.completions.create(model="gpt-4o", messages=_messages("summary"), stream=True,
                                                     stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEACHER
        assert {c.model_extra["factory"]["route"] for c in chunks} == {"upstream"} and chunks[-1].usage.total_tokens == 13

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()

    # every call is logged (ingest folds identical calls into one record by content id)
    lines = [json.loads(line) for path in sorted((tmp_path / "logs").glob("*.jsonl"))
             for line in path.read_text().splitlines()]
    assert [line["metadata"]["route"] for line in lines] == ["specialist"] * 2 + ["upstream"] * 2
    contents = [line["response"]["choices"][0]["message"]["content"] for line in lines]
    assert contents == [served.choices[0].message.content] * 2 + [TEACHER] * 2
    assert lines[3]["response"]["usage"]["completion_tokens"] == 2 and lines[3]["request"]["stream"] is True


def test_limits_auth_errors_and_metrics(tmp_path, specialists, upstream):
    upstream_url, _ = upstream
    config = _config(tmp_path, upstream_url, max_request_bytes=2048, upstream_timeout=0.3)
    app = create_app(Router(specialists.routes), specialists, config)
    with running(app) as url, httpx.Client() as client:
        assert client.get(f"{url}/health").json() == {"status": "ok", "tasks": 2, "upstream": True}
        assert client.post(f"{url}/v1/chat/completions", json={"messages": _messages("reply")}).status_code == 401
        assert _post(client, url, _messages("reply", "x" * 4000)).status_code == 413
        bad = _post(client, url, [{"role": "wizard", "content": "hi"}])
        assert bad.status_code == 400 and "messages[0].role" in bad.json()["error"]["message"]
        assert _post(client, url, _messages("reply"), max_tokens=0).status_code == 400
        history = [*_messages("reply"), {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "found"}]
        broken = _post(client, url, history)  # SmolLM2's chat template cannot render this history
        assert broken.status_code == 200 and broken.json()["factory"]["reason"] == "specialist_error"
        assert broken.json()["choices"][0]["message"]["content"] == TEACHER
        rejected = _post(client, url, _messages("summary", "reject"))  # the upstream refuses the server's key
        assert rejected.status_code == 502 and "Incorrect API key" in rejected.json()["error"]["message"]
        slow = _post(client, url, _messages("summary", "slow"))
        assert slow.status_code == 504 and slow.headers["x-factory-route"] == "upstream"
        metrics = client.get(f"{url}/metrics", headers={"Authorization": f"Bearer {CLIENT_KEY}"}).text
    assert 'factory_requests_total{reason="below_threshold",route="upstream",task="summary"} 2.0' in metrics
    assert "factory_route_decision_seconds_count 3.0" in metrics
    records = _ingested(tmp_path)  # the timed-out call is logged as a failed call, the rejected ones are not
    assert [(r.metadata["reason"], r.outcome) for r in records] == [("specialist_error", "ok"),
                                                                   ("below_threshold", "error"),
                                                                   ("below_threshold", "error")]


def test_escalation_without_upstream_is_a_clear_503(tmp_path, specialists):
    app = create_app(Router(specialists.routes), specialists, _config(tmp_path, None))
    with running(app) as url, httpx.Client() as client:
        response = _post(client, url, _messages("summary"))
    assert response.status_code == 503 and "no upstream is configured" in response.json()["error"]["message"]


def test_concurrent_requests_keep_their_own_adapter(tmp_path, specialists, upstream):
    from concurrent.futures import ThreadPoolExecutor

    expected = {task: f"{specialists.answer(task, _messages(task), []).confidence:.6f}" for task in SYSTEM}
    app = create_app(Router(specialists.routes), specialists, _config(tmp_path, upstream[0]))
    tasks = list(SYSTEM) * 4
    with running(app) as url, httpx.Client() as client, ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda task: _post(client, url, _messages(task)), tasks))
    assert [r.headers["x-factory-confidence"] for r in responses] == [expected[t] for t in tasks]


def test_adapters_switch_per_request(specialists):
    reply = specialists.answer("reply", _messages("reply"), [])
    summary = specialists.answer("summary", _messages("reply"), [])
    assert reply.output != summary.output
    assert specialists.answer("reply", _messages("reply"), []).output == reply.output


def test_binding_and_keys(tmp_path, monkeypatch):
    check_bind("127.0.0.1", frozenset())
    check_bind("0.0.0.0", frozenset({"k"}))
    with pytest.raises(ValueError, match="without API keys"):
        check_bind("0.0.0.0", frozenset())
    monkeypatch.setenv("MY_KEYS", "a, b")
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nc\n\n")
    assert load_api_keys("MY_KEYS", keys) == {"a", "b", "c"}
    keys.write_text("# none\n")
    with pytest.raises(ValueError, match="no API keys"):
        load_api_keys(None, keys)
    assert "secret" not in repr(ServeConfig(log_dir=tmp_path, upstream_key="secret", api_keys=frozenset({"secret"})))


def test_simulate_replays_held_out_calls_and_reports_savings(tmp_path, specialists):
    for task in SYSTEM:
        rows = [{"id": f"{task}-{i}", "source_id": f"call-{task}-{i}", "session_id": f"s{i}",
                 "messages": _messages(task, f"Ticket {i}: my parcel is late."), "tools": [],
                 "output": {"content": "Sorry, we are on it.", "tool_calls": []}} for i in range(3)]
        (tmp_path / task / "v1").mkdir(parents=True)
        (tmp_path / task / "v1" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    router = Router(specialists.routes)
    examples = examples_from_splits(router, tmp_path, limit=2)
    examples.append(Example(location="x:1", messages=UNMATCHED, tools=[], output={"content": "Bonjour"},
                            usage={"prompt_tokens": 1000, "completion_tokens": 100}, latency_ms=2000.0))
    truth = {"call-summary-0": {"content": "Something else entirely.", "tool_calls": []}}
    result = simulate(examples, router, specialists, tmp_path / "out", Prices(teacher_latency_ms=5000), truth)

    rows = {r["task"]: r for r in result["rows"]}
    assert [rows[t]["n"] for t in ("reply", "summary", "(unmatched)", "all")] == [2, 2, 1, 5]
    assert (rows["reply"]["served"], rows["summary"]["served"], rows["all"]["served"]) == (1.0, 0.0, 0.4)
    assert rows["reply"]["cost_saving"] > 0.99 and rows["reply"]["latency_saving"] > 0
    assert rows["reply"]["quality"] < 1.0  # a random model does not write the teacher's reply
    assert rows["summary"]["quality"] == 1.0 and rows["summary"]["cost_saving"] < 0  # escalated: pays both
    assert rows["(unmatched)"]["cost"] == pytest.approx((1000 * 2.5 + 100 * 10) / 1e6)
    assert rows["(unmatched)"]["quality"] is None and rows["(unmatched)"]["latency_saving"] == 0.0
    assert (tmp_path / "out" / "simulate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "out" / "simulate.json").read_text())["rows"] == result["rows"]

    log = tmp_path / "calls.jsonl"
    log.write_text(json.dumps({"id": "c1", "timestamp": "2026-11-03T00:00:00Z", "metadata": {"agent": "acme"},
                               "request": {"model": "gpt-4o", "messages": _messages("reply")},
                               "response": {"choices": [{"message": {"role": "assistant", "content": "ok"}}],
                                            "usage": {"prompt_tokens": 20, "completion_tokens": 1}}}) + "\n")
    [example] = examples_from_logs([log])
    assert example.messages == _messages("reply") and example.usage == {"prompt_tokens": 20, "completion_tokens": 1}


def test_cli_simulate_and_serve_refusals(tmp_path, tiny_model_dir, adapters, monkeypatch):
    from typer.testing import CliRunner

    from factory.cli import app

    monkeypatch.setenv("FACTORY_DATA_DIR", str(tmp_path / "datasets"))
    monkeypatch.setenv("FACTORY_REGISTRY_DIR", str(tmp_path / "registry"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("FACTORY_API_KEYS", raising=False)
    routes = write_routes(tmp_path / "routes.json", tiny_model_dir, adapters, {"reply": 0.0, "summary": None})
    for task in SYSTEM:
        (tmp_path / "datasets" / task / "v1").mkdir(parents=True)
        row = {"id": task, "messages": _messages(task), "tools": [], "output": {"content": "ok", "tool_calls": []}}
        (tmp_path / "datasets" / task / "v1" / "test.jsonl").write_text(json.dumps(row) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["simulate", "--routes", str(routes), "--no-embedding", "--out", str(tmp_path / "sim")])
    assert result.exit_code == 0, result.output
    assert "Simulated serving" in result.output and (tmp_path / "sim" / "simulate.png").exists()
    rows = {r["task"]: r for r in json.loads((tmp_path / "sim" / "simulate.json").read_text())["rows"]}
    assert (rows["reply"]["served"], rows["summary"]["served"]) == (1.0, 0.0)  # a null threshold never serves

    refused = runner.invoke(app, ["serve", "--host", "0.0.0.0", "--routes", str(routes)])
    assert refused.exit_code == 1 and "without API keys" in refused.output
    missing = runner.invoke(app, ["serve", "--routes", str(tmp_path / "nope.json")])
    assert missing.exit_code == 1 and "no routing table" in missing.output


def test_tool_call_answers_stream_in_the_openai_shape_and_fold_back():
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    from factory.serve.app import _chunks, _completion, accumulate
    from factory.serve.specialists import Answer

    answer = Answer(output={"content": None, "tool_calls": [{"name": "issue_refund", "arguments": {"order_id": "A1"}}]},
                    confidence=0.9, usable=True, prompt_tokens=30, completion_tokens=12, seconds=0.1)
    completion = _completion("chatcmpl-1", "order-action", answer)
    message = ChatCompletion.model_validate(completion).choices[0].message
    assert message.tool_calls[0].function.name == "issue_refund"
    assert json.loads(message.tool_calls[0].function.arguments) == {"order_id": "A1"}
    chunks = _chunks(completion, include_usage=True)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    folded = accumulate(chunks)
    assert folded["choices"][0]["message"] == completion["choices"][0]["message"]
    assert folded["choices"][0]["finish_reason"] == "tool_calls" and folded["usage"] == completion["usage"]
