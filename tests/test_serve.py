"""`factory serve` end to end on loopback: a tiny random base with LoRA adapters made here,
a routes.json written here, and a stub upstream LLM that is a real HTTP server."""

from __future__ import annotations

import asyncio
import http.client
import json
import stat
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from factory.ingest import ingest, read_records
from factory.serve.app import ServeConfig, check_bind, create_app, load_api_keys, running
from factory.serve.router import Router, load_routes, request_template
from factory.serve.simulate import Example, Prices, examples_from_logs, examples_from_splits, replay, simulate
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
        template, tools = request_template(_messages(task)), []
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
        last = body["messages"][-1].get("content")
        if last == "slow":
            await asyncio.sleep(1)
        if last == "reject":
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


AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


def _post(client: httpx.Client, url: str, messages: list[dict], **extra) -> httpx.Response:
    headers = {**AUTH, **extra.pop("headers", {})}
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


class _Exploding:
    """The specialists, except that generation raises for the user message "explode"."""

    def __init__(self, inner: Specialists):
        self.inner, self.routes = inner, inner.routes

    def answer(self, task: str, messages: list[dict], *args):
        if messages[-1]["content"] == "explode":
            raise RuntimeError("the chat template cannot render this conversation")
        return self.inner.answer(task, messages, *args)


def test_limits_auth_errors_and_metrics(tmp_path, specialists, upstream):
    upstream_url, _ = upstream
    config = _config(tmp_path, upstream_url, max_request_bytes=2048, upstream_timeout=0.3)
    app = create_app(Router(specialists.routes), _Exploding(specialists), config)
    with running(app) as url, httpx.Client() as client:
        assert client.get(f"{url}/health").json() == {"status": "ok", "tasks": 2, "upstream": True}
        assert client.post(f"{url}/v1/chat/completions", json={"messages": _messages("reply")}).status_code == 401
        assert _post(client, url, _messages("reply", "x" * 4000)).status_code == 413
        bad = _post(client, url, [{"role": "wizard", "content": "hi"}])
        assert bad.status_code == 400 and "messages[0].role" in bad.json()["error"]["message"]
        assert _post(client, url, _messages("reply"), max_tokens=0).status_code == 400
        broken = _post(client, url, _messages("reply", "explode"))  # a failing specialist: the upstream answers
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


def test_escalation_without_upstream_is_a_clear_503(tmp_path, specialists, upstream):
    app = create_app(Router(specialists.routes), specialists, _config(tmp_path, None))
    with running(app) as url, httpx.Client() as client:
        response = _post(client, url, _messages("summary"))
        metrics = client.get(f"{url}/metrics", headers=AUTH).text
    assert response.status_code == 503 and "no upstream is configured" in response.json()["error"]["message"]
    assert response.headers["x-factory-route"] == "unavailable"
    assert 'factory_requests_total{reason="below_threshold",route="unavailable",task="summary"} 1.0' in metrics
    assert 'route="upstream"' not in metrics

    # a request pinned to a task has no upstream model of its own: without --upstream-model it cannot escalate
    upstream_url, seen = upstream
    app = create_app(Router(specialists.routes), specialists, _config(tmp_path / "pinned", upstream_url))
    with running(app) as url, httpx.Client() as client:
        pinned = _post(client, url, _messages("summary"), model="factory/summary")
    assert pinned.status_code == 503 and pinned.headers["x-factory-route"] == "unavailable"
    assert "no upstream model is configured for requests pinned to factory/summary" in pinned.json()["error"]["message"]
    assert seen == []


def _error_shape(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_content_parts_are_answered_like_strings_and_other_parts_escalate(tmp_path, specialists, upstream):
    upstream_url, seen = upstream
    app = create_app(Router(specialists.routes), specialists, _config(tmp_path, upstream_url))
    parts = [{"role": "system", "content": [{"type": "text", "text": SYSTEM["reply"]}]},
             {"role": "user", "content": [{"type": "text", "text": "My parcel"}, {"type": "text", "text": "is late."}]}]
    picture = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    image = [parts[0], {"role": "user", "content": [*parts[1]["content"], picture]}]
    with running(app) as url, httpx.Client() as client:
        as_parts = _post(client, url, parts)
        as_string = _post(client, url, _messages("reply", "My parcel\nis late."))
        with_image = _post(client, url, image)
        history = _post(client, url, [*_messages("reply"), {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "found"}]}])
        metrics = client.get(f"{url}/metrics", headers=AUTH).text

    assert as_parts.status_code == 200, as_parts.text
    assert as_parts.json()["factory"]["route"] == "specialist" and as_parts.json()["factory"]["reason"] == "confident"
    # the text parts joined with "\n" are the string the chat template gets
    assert as_parts.headers["x-factory-confidence"] == as_string.headers["x-factory-confidence"]
    assert as_parts.json()["choices"] == as_string.json()["choices"]
    assert with_image.status_code == 200 and with_image.json()["choices"][0]["message"]["content"] == TEACHER
    assert with_image.json()["factory"] | {"confidence": None} == {
        "route": "upstream", "task": "reply", "reason": "unsupported_content", "match": "signature", "confidence": None}
    assert seen[0]["body"]["messages"] == image  # forwarded as sent
    assert history.status_code == 200 and history.json()["factory"]["task"] == "reply"
    assert 'factory_requests_total{reason="unsupported_content",route="upstream",task="reply"} 1.0' in metrics


REPLY_SYSTEM = {"role": "system", "content": SYSTEM["reply"]}
MALFORMED = [  # (body fields, the field the 400 names); after the reply task's system prompt unless said
    ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": True}]}, "messages[0].content"),
    ({"messages": [{"role": "system", "content": 3.5}, {"role": "user", "content": "hi"}]}, "messages[0].content"),
    ({"messages": [REPLY_SYSTEM, {"role": "user", "content": None}]}, "messages[1].content"),
    ({"messages": [REPLY_SYSTEM, {"role": "user", "content": {"text": "hi"}}]}, "messages[1].content"),
    ({"messages": [REPLY_SYSTEM, {"role": "user", "content": 7}]}, "messages[1].content"),
    ({"messages": [REPLY_SYSTEM, {"role": "user", "content": []}]}, "messages[1].content"),
    ({"messages": [REPLY_SYSTEM, {"role": "user", "content": [{"type": "text"}]}]}, "messages[1].content[0].text"),
    ({"messages": [REPLY_SYSTEM, {"role": "user", "content": [{"type": "video", "url": "x"}]}]},
     "messages[1].content[0].type"),
    ({"messages": [REPLY_SYSTEM, {"role": "tool", "content": "found"}]}, "messages[1].tool_call_id"),
    ({"messages": [REPLY_SYSTEM, {"role": "assistant", "content": None}]}, "messages[1]"),
    ({"messages": [REPLY_SYSTEM, {"content": "hi"}]}, "messages[1].role"),
    ({"messages": [REPLY_SYSTEM], "max_tokens": "8"}, "max_tokens"),
    ({"messages": [REPLY_SYSTEM], "stream": "yes"}, "stream"),
    ({"messages": [REPLY_SYSTEM], "tools": [{"type": "function"}]}, "tools[0].function"),
    ({"messages": [REPLY_SYSTEM], "model": None}, "model"),
    ({"messages": [REPLY_SYSTEM], "temperature": 7}, "temperature"),
]


def test_malformed_requests_are_400s_that_reach_neither_specialist_nor_upstream(tmp_path, specialists, upstream):
    upstream_url, seen = upstream
    app = create_app(Router(specialists.routes), specialists, _config(tmp_path, upstream_url))
    answered = []
    with running(app) as url, httpx.Client() as client:
        for fields, _ in MALFORMED:
            body = {"model": "gpt-4o"} | fields
            answered.append(client.post(f"{url}/v1/chat/completions", json=body, headers=AUTH))
        json_type = AUTH | {"content-type": "application/json"}
        raw = [client.post(f"{url}/v1/chat/completions", content=content, headers=json_type)
               for content in (b'{"model": "gpt-4o", "messages": [', b"[1, 2]", b'{"temperature": NaN}', b"\xff\xfe",
                               b'{"model": "' + b"[" * 300 + b'"}', b"[" * 300 + b"]" * 300)]
        good = _post(client, url, _messages("reply"))  # on the same connections, after all of them
        metrics = client.get(f"{url}/metrics", headers=AUTH).text

    for response, (_, param) in zip(answered, MALFORMED):
        error = _error_shape(response, 400)
        assert error["param"] == param and error["message"].startswith(param), error
    for response in raw:
        _error_shape(response, 400)
    assert good.status_code == 200 and good.headers["x-factory-route"] == "specialist"
    assert seen == [] and "factory_route_decision_seconds_count 1.0" in metrics  # only the good one was routed
    logged = [json.loads(line) for p in (tmp_path / "logs").glob("*.jsonl") for line in p.read_text().splitlines()]
    assert len(logged) == 1


def test_model_pins_a_task_and_any_other_name_is_the_upstream_model(tmp_path, specialists, upstream):
    upstream_url, seen = upstream
    app = create_app(Router(specialists.routes), specialists,
                     _config(tmp_path, upstream_url, upstream_model="teacher-mini"))
    with running(app) as url, httpx.Client() as client:
        reply = _post(client, url, _messages("summary"), model="factory/reply")  # another task's prompt, pinned
        summary = _post(client, url, _messages("reply"), model="factory/summary")  # pinned, never confident
        unknown = _post(client, url, _messages("reply"), model="factory/draft-reply")
        other = _post(client, url, UNMATCHED, model="gpt-4.1", user="u-1")
        card = client.get(f"{url}/v1/models/factory/reply", headers=AUTH)
        no_card = client.get(f"{url}/v1/models/gpt-4o", headers=AUTH)

    assert reply.status_code == 200 and reply.json()["model"] == "factory/reply"
    assert reply.json()["factory"] | {"confidence": None} == {
        "route": "specialist", "task": "reply", "reason": "confident", "match": "model", "confidence": None}
    assert summary.json()["factory"]["task"] == "summary" and summary.json()["factory"]["route"] == "upstream"
    # a pinned escalation asks the configured upstream model; any other name goes upstream as sent
    assert [s["body"] for s in seen] == [{"model": "teacher-mini", "messages": _messages("reply")},
                                         {"model": "gpt-4.1", "messages": UNMATCHED, "user": "u-1"}]
    assert other.json()["factory"]["reason"] == "no_match"
    error = _error_shape(unknown, 404)
    assert (error["code"], error["param"]) == ("model_not_found", "model") and "factory/draft-reply" in error["message"]
    assert card.json() == {"id": "factory/reply", "object": "model", "created": 0, "owned_by": "slm-factory"}
    assert _error_shape(no_card, 404)["code"] == "model_not_found"


def test_a_learned_policy_is_left_out_of_the_prompt_and_another_policy_escalates(tmp_path, tiny_model_dir, adapters,
                                                                                  upstream):
    from factory.chat import policy_fingerprint
    from factory.models import load_tokenizer
    from factory.serve.specialists import fit_request

    upstream_url, seen = upstream
    path = write_routes(tmp_path / "routes.json", tiny_model_dir, adapters, {"reply": 0.0})
    routes = json.loads(path.read_text())
    routes["tasks"]["reply"]["policy"] = policy_fingerprint(_messages("reply"), [])
    path.write_text(json.dumps(routes))
    learned = Specialists(load_routes(path))
    route = learned.routes["reply"]
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt, _ = fit_request(route, tokenizer, learned._models[route.base_model].config, _messages("reply"), [], None)
    assert "My parcel is late." in prompt and SYSTEM["reply"] not in prompt

    reworded = [{"role": "system", "content": SYSTEM["reply"] + " Be brief."}, {"role": "user", "content": "Hi"}]
    app = create_app(Router(learned.routes), learned, _config(tmp_path, upstream_url, upstream_model="teacher-mini"))
    with running(app) as url, httpx.Client() as client:
        served = _post(client, url, _messages("reply"), model="factory/reply")
        changed = _post(client, url, reworded, model="factory/reply")
        metrics = client.get(f"{url}/metrics", headers=AUTH).text
    new_tool = [{"type": "function", "function": {"name": "refund", "parameters": {"type": "object"}}}]
    replayed = replay([Example("log:1", _messages("reply"), new_tool, {"content": TEACHER, "tool_calls": []})],
                      Router(learned.routes), learned)  # the same prompt, a tool the policy did not offer
    learned.close()
    assert (replayed[0]["task"], replayed[0]["served_by"], replayed[0]["reason"]) == ("reply", "upstream",
                                                                                      "policy_changed")
    assert served.json()["factory"]["route"] == "specialist"
    assert changed.status_code == 200 and changed.json()["factory"]["reason"] == "policy_changed"
    assert changed.json()["choices"][0]["message"]["content"] == TEACHER
    assert [s["body"]["messages"] for s in seen] == [reworded]
    assert 'factory_requests_total{reason="policy_changed",route="upstream",task="reply"} 1.0' in metrics


def test_errors_are_openai_shaped_and_the_api_docs_are_off_behind_keys(tmp_path, specialists):
    keyed = create_app(Router(specialists.routes), specialists, _config(tmp_path, None))
    with running(keyed) as url, httpx.Client() as client:
        not_found = client.post(f"{url}/v1/chat/complete", json={}, headers=AUTH)
        wrong_method = client.get(f"{url}/v1/chat/completions", headers=AUTH)
        docs = [client.get(f"{url}{path}", headers=AUTH).status_code for path in ("/docs", "/redoc", "/openapi.json")]
    assert _error_shape(not_found, 404)["code"] == "not_found"
    assert _error_shape(wrong_method, 405)["code"] == "method_not_allowed" and wrong_method.headers["allow"] == "POST"
    assert docs == [404, 404, 404]

    open_app = create_app(Router(specialists.routes), specialists, ServeConfig(log_dir=tmp_path / "open"))
    with running(open_app) as url, httpx.Client() as client:
        schema = client.get(f"{url}/openapi.json").json()
        page = client.get(f"{url}/docs")
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["model", "messages"] and "UserMessage" in schema["components"]["schemas"]
    assert page.status_code == 200 and "swagger" in page.text.lower()


def test_a_handler_bug_is_a_logged_json_500_and_the_connection_stays_open(tmp_path, specialists, caplog):
    class Buggy(Router):
        def match(self, messages, *args, **kwargs):
            if messages[-1]["content"] == "crash":
                raise RuntimeError("a routing bug")
            return super().match(messages, *args, **kwargs)

    app = create_app(Buggy(specialists.routes), specialists, _config(tmp_path, None))
    with running(app) as url:
        connection = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=30)
        connection.connect()
        connection.auto_open = 0  # a closed connection raises instead of being reopened
        answers = []
        for user in ("crash", "My parcel is late."):
            body = json.dumps({"model": "gpt-4o", "messages": _messages("reply", user)})
            connection.request("POST", "/v1/chat/completions", body, AUTH | {"Content-Type": "application/json"})
            response = connection.getresponse()
            answers.append((response.status, json.loads(response.read())))
        connection.close()
    assert answers[0] == (500, {"error": {"message": "the server had an error while processing the request",
                                          "type": "server_error", "param": None, "code": "internal_error"}})
    assert answers[1][0] == 200 and answers[1][1]["factory"]["route"] == "specialist"
    [record] = [r for r in caplog.records if r.name == "factory.serve.app" and r.exc_info]
    assert "a routing bug" in caplog.text and record.exc_info[0] is RuntimeError


def test_prompts_on_disk_are_private(tmp_path):
    from factory.serve.requestlog import RequestLog, log_entry

    logs = tmp_path / "logs"
    log = RequestLog(logs / "serve")
    log.write(log_entry("c1", {"model": "gpt-4o", "messages": _messages("reply")},
                        {"choices": [{"message": {"role": "assistant", "content": "ok"}}]}, agent="a", step="s",
                        session_id="", route="upstream", task="reply", confidence=0.5, reason="below_threshold",
                        match="signature", latency_ms=1.0))
    log.close()
    (logs / "broken.jsonl").write_text('{"messages": [\n')
    ingest([logs], tmp_path / "records" / "raw", tmp_path / "quarantine" / "ingest")
    folders = [logs / "serve", tmp_path / "records" / "raw", tmp_path / "quarantine" / "ingest"]
    files = [next(folder.iterdir()) for folder in folders]
    assert [stat.S_IMODE(p.stat().st_mode) for p in folders] == [0o700] * 3
    assert [stat.S_IMODE(p.stat().st_mode) for p in files] == [0o600] * 3, files
    assert [p.suffix for p in files] == [".jsonl", ".parquet", ".jsonl"]


def test_routes_name_every_task_that_lost_its_champion(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import RegisteredModel, RegisteredModelAlias
    from typer.testing import CliRunner

    from factory.cli import app as cli
    from factory.registry import HISTORY_TAG, TASK_TAG, _lost_champion

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("FACTORY_REGISTRY_DIR", str(tmp_path / "registry"))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def task(name: str, versions: int, champions: list[str]) -> None:
        client.create_registered_model(name, tags={TASK_TAG: name, HISTORY_TAG: json.dumps(champions)})
        for _ in range(versions):
            client.create_model_version(name, source=str(tmp_path))
        if champions:
            client.set_registered_model_alias(name, "champion", champions[-1])

    task("fresh", 0, [])  # nothing registered yet: nothing lost
    task("never-promoted", 1, [])
    task("alias-deleted", 1, ["1"])
    client.delete_registered_model_alias("alias-deleted", "champion")  # as the MLflow UI does
    task("version-deleted", 2, ["1", "2"])
    client.delete_model_version("version-deleted", "2")
    runner = CliRunner()
    plain, strict = runner.invoke(cli, ["routes"]), runner.invoke(cli, ["routes", "--strict"])

    assert plain.exit_code == 0, plain.output
    text = " ".join(plain.output.split())
    assert "never-promoted: no 'champion' alias: no version was ever promoted" in text
    assert "alias-deleted: no 'champion' alias (the last champion was v1; the alias was deleted)" in text
    assert "version-deleted: no 'champion' alias (the last champion was v2; that version was deleted)" in text
    assert "fresh" not in text
    assert strict.exit_code == 1 and "3 task(s) without a champion" in " ".join(strict.output.split())
    assert json.loads((tmp_path / "registry" / "routes.json").read_text()) == {"tasks": {}}
    # a store that keeps the alias of a deleted version (sqlite drops it with the version)
    dangling = RegisteredModel("kept-alias", aliases=[RegisteredModelAlias("champion", "3")])
    assert _lost_champion(client, dangling) == "its 'champion' alias points at v3, which no longer exists"


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
