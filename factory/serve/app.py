"""The OpenAI-compatible server: specialists first, the upstream LLM when they should not answer.

Endpoints: POST /v1/chat/completions (JSON or `stream: true` server-sent events),
GET /v1/models and /v1/models/{id}, GET /health (no auth), GET /metrics (Prometheus text
format), and the OpenAPI document (/openapi.json, /docs, /redoc) only on a server without
keys: a browser page cannot send a bearer key, so with keys they are off.

Per request: validate the body (`protocol.ChatCompletionRequest`: every invalid request
gets a 400 naming the field and reaches neither a specialist nor the upstream), match a
task (`router.Router`; `"model": "factory/<task>"` pins one instead), let its specialist
answer, `router.decide`; an escalated request is forwarded byte for byte to
`{upstream}/chat/completions` with the upstream key (the client's own Authorization
header is never forwarded), and its answer returned, streamed through when the client
streams. Any other `model` is the client's upstream model and goes upstream unchanged; a
pinned request has no upstream model of its own, so it escalates with `model` replaced by
`ServeConfig.upstream_model` (without one it gets a 503). Content parts reach the router
and the specialists as plain strings (`protocol.plain_messages`); a request with image,
audio or file parts escalates (reason `unsupported_content`). A streaming client whose
request the specialist answers gets the whole answer in one content chunk: the answer
has to be complete before its confidence is known, so streaming token by token and
then escalating is not possible. Every response says who served it: headers
`X-Factory-Route` / `-Task` / `-Reason` / `-Confidence` and a `factory` field in the
body (in every chunk when streaming); route `unavailable` is an escalation with no
upstream to go to (503). Routing hints: `metadata.agent` / `.step` / `.session_id` in
the body, or the `X-Agent` / `X-Step` / `X-Session-Id` headers.

Errors are in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, 404 and
405 included. An exception no handler expected is logged with its traceback and answered
with a JSON 500 (`_JsonServerErrors`), so the connection stays usable.

Auth: bearer keys (`ServeConfig.api_keys`); `check_bind` refuses an open server on a
non-loopback address. Limits: request bodies over `max_request_bytes` get 413 (the
default keeps a logged call under ingest's 1 MiB line limit), JSON nested deeper than
pydantic's parser allows (about 200 levels) gets 400, upstream calls time out after
`upstream_timeout` seconds (504). A specialist backend that fails or times out (the in-process
`engine.Engine`, or a vLLM / llama.cpp server: `backends`) escalates the request with reason
`backend_error` / `backend_timeout`, and one whose queue is full with reason `overloaded` (a 503
with `Retry-After: 1` when there is no upstream): the router sheds load to the upstream LLM
rather than queueing without bound. All three are counted in `factory_backend_errors`. A request to a
task whose specialist learned its policy into the weights, carrying another system prompt or tool list,
escalates with reason `policy_changed`. Every served request is logged
(`requestlog.RequestLog`); invalid and unauthorised requests are not.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydantic_core
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from factory.serve.protocol import (ChatCompletionRequest, InvalidRequest, openapi_components, parse_request,
                                    plain_messages, plain_tools)
from factory.serve.requestlog import RequestLog, log_entry
from factory.serve.router import SPECIALIST, UPSTREAM, Decision, Match, Route, Router, decide, failure_reason
from factory.serve.backends import RemoteSpecialists
from factory.serve.engine import BackendError
from factory.serve.specialists import Answer, Specialists

logger = logging.getLogger(__name__)
PREFIX = "factory/"  # the model name of a task: `factory/<task>`
UNAVAILABLE = "unavailable"  # the route of an escalation with no upstream to go to (503)


@dataclass(frozen=True)
class ServeConfig:
    log_dir: Path
    upstream: str | None = None
    upstream_key: str | None = field(default=None, repr=False)
    upstream_timeout: float = 60.0
    upstream_model: str | None = None  # what a request pinned to `factory/<task>` asks the upstream for
    api_keys: frozenset[str] = field(default=frozenset(), repr=False)
    max_request_bytes: int = 512 * 1024
    log_max_records: int = 1000
    log_max_seconds: float = 300.0


class ApiError(Exception):
    """An error answered in OpenAI's shape with HTTP `status`."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_keys: frozenset[str]) -> None:
    """Raise ValueError when serving on `host` without API keys would expose the server."""
    if not api_keys and not is_loopback(host):
        raise ValueError(f"refusing to serve on {host} without API keys: set an API key (env var or key file) "
                         "or bind to 127.0.0.1")


def load_api_keys(env_var: str | None = None, path: Path | None = None) -> frozenset[str]:
    """Keys from a comma-separated env var and/or a file (one per line, '#' comments).

    Raises FileNotFoundError for a missing key file and ValueError for one without keys.
    """
    keys = {k.strip() for k in os.environ.get(env_var or "", "").split(",") if k.strip()}
    if path is not None:
        lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
        found = {line for line in lines if line}
        if not found:
            raise ValueError(f"{path}: no API keys in the key file")
        keys |= found
    return frozenset(keys)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("factory_requests", "Chat requests by who served them", ["route", "task", "reason"],
                                registry=self.registry)
        self.seconds = Histogram("factory_request_seconds", "Request latency", ["route"], registry=self.registry)
        self.routing = Histogram("factory_route_decision_seconds", "Task matching time (no generation)",
                                 buckets=(1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1), registry=self.registry)
        self.confidence = Histogram("factory_specialist_confidence", "Specialist confidence", ["task"],
                                    buckets=[i / 10 for i in range(1, 11)], registry=self.registry)
        self.upstream_errors = Counter("factory_upstream_errors", "Failed upstream calls", ["kind"],
                                       registry=self.registry)
        self.backend_errors = Counter("factory_backend_errors", "Specialist answers a remote backend did not give",
                                      ["reason"], registry=self.registry)


def _error(message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _JsonServerErrors:
    """ASGI middleware: an exception no handler turned into a response becomes a logged JSON 500.

    Starlette's last-resort handler answers in plain text and re-raises, and uvicorn then
    closes the connection, so a keep-alive client's next request fails with a reset.
    Caught here, inside it, the request ends normally. A streamed response that fails after
    its headers went out cannot become a 500: that error is re-raised, and the closed
    connection is how the client learns the stream is incomplete.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # the lifespan: a failing startup must stop the server
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if started:
                raise
            error = _error("the server had an error while processing the request", "server_error",
                           code="internal_error")
            await JSONResponse(error, status_code=500)(scope, receive, send)


async def _read_body(request: Request, limit: int) -> tuple[bytes, dict[str, Any]]:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over the {limit} byte limit",
                       code="request_too_large")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"request body is over the {limit} byte limit", code="request_too_large")
    try:  # strict JSON: no NaN / Infinity, no lone surrogates, bounded nesting (a log line must round-trip)
        body = pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as err:
        raise ApiError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return raw, body


def _parse(body: dict[str, Any]) -> ChatCompletionRequest:
    """The typed request; raises ApiError 400 naming the invalid field."""
    try:
        return parse_request(body)
    except InvalidRequest as err:
        raise ApiError(400, err.message, param=err.param, code="invalid_value") from None


def _context(metadata: dict[str, str], headers) -> tuple[str, str, str]:
    return tuple(headers.get(h) or metadata.get(k) or ""
                 for k, h in (("agent", "x-agent"), ("step", "x-step"), ("session_id", "x-session-id")))


def _model_card(task: str) -> dict[str, Any]:
    return {"id": f"{PREFIX}{task}", "object": "model", "created": 0, "owned_by": "slm-factory"}


def _completion(call_id: str, task: str, answer: Answer) -> dict[str, Any]:
    calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
              "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
             for c in answer.output["tool_calls"]]
    message: dict[str, Any] = {"role": "assistant", "content": answer.output["content"]}
    if calls:
        message["tool_calls"] = calls
    return {"id": call_id, "object": "chat.completion", "created": int(time.time()), "model": f"{PREFIX}{task}",
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop",
                         "logprobs": None}],
            "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                      "total_tokens": answer.prompt_tokens + answer.completion_tokens}}


def _chunks(completion: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """A whole completion as chat.completion.chunk objects: one delta, the finish reason, usage."""
    head = {k: completion[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    choice = completion["choices"][0]
    delta = dict(choice["message"])
    if "tool_calls" in delta:
        delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(delta["tool_calls"])]
    chunks = [head | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
              head | {"choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]}]
    if include_usage:
        chunks.append(head | {"choices": [], "usage": completion["usage"]})
    return chunks


def accumulate(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Fold streamed chat.completion.chunk objects (first choice) into one chat.completion."""
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish, usage = None, None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            content.append(delta.get("content") or "")
            for call in delta.get("tool_calls") or []:
                slot = calls.setdefault(call.get("index", 0), {"id": "", "type": "function",
                                                               "function": {"name": "", "arguments": ""}})
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                slot["function"]["name"] += function.get("name") or ""
                slot["function"]["arguments"] += function.get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    text = "".join(content)
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    first = chunks[0] if chunks else {}
    response = {"id": first.get("id", ""), "object": "chat.completion", "created": first.get("created", 0),
                "model": first.get("model", ""), "choices": [{"index": 0, "message": message, "finish_reason": finish}]}
    return response | ({"usage": usage} if usage else {})


def create_app(router: Router, specialists: Specialists | RemoteSpecialists, config: ServeConfig) -> FastAPI:
    """The FastAPI app; the upstream client and the request log live for the app's lifespan. `specialists`
    generates in-process or on a vLLM / llama.cpp server (`backends`); the routing is the same."""
    metrics = _Metrics()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state["log"] = RequestLog(config.log_dir, config.log_max_records, config.log_max_seconds)
        state["client"] = httpx.AsyncClient(timeout=config.upstream_timeout)
        try:
            yield
        finally:
            await state["client"].aclose()
            state["log"].close()

    app = FastAPI(title="SLM Factory router", lifespan=lifespan,
                  openapi_url=None if config.api_keys else "/openapi.json")
    app.add_middleware(_JsonServerErrors)
    body_schema, components = openapi_components()

    def openapi() -> dict[str, Any]:
        """FastAPI's document plus the request model's schemas (the chat route reads its body itself,
        so FastAPI does not know them)."""
        if app.openapi_schema is None:
            FastAPI.openapi(app).setdefault("components", {}).setdefault("schemas", {}).update(components)
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError):
        return JSONResponse(_error(err.message, err.kind, err.param, err.code), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        """404 (no such path) and 405 (wrong method) in OpenAI's shape."""
        message = f"{err.detail}: {request.method} {request.url.path}"
        code = str(err.detail).lower().replace(" ", "_")
        return JSONResponse(_error(message, code=code), status_code=err.status_code, headers=err.headers)

    def authorize(request: Request) -> None:
        if not config.api_keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.encode(), k.encode())
                                                 for k in config.api_keys):
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", "authentication_error",
                           code="invalid_api_key")

    def pinned(model: str) -> Route | None:
        """The route a `factory/<task>` model name pins; None for any other name (the client's
        upstream model). Raises ApiError 404 for an unknown task."""
        if not model.startswith(PREFIX):
            return None
        route = router.routes.get(model.removeprefix(PREFIX))
        if route is None:
            raise ApiError(404, f"The model '{model}' does not exist; known: {', '.join(sorted(router.routes))}",
                           param="model", code="model_not_found")
        return route

    @app.get("/health")
    async def health():
        return {"status": "ok", "tasks": len(router.routes), "upstream": config.upstream is not None}

    @app.get("/metrics")
    async def prometheus(request: Request):
        authorize(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [_model_card(task) for task in sorted(router.routes)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorize(request)
        if pinned(model_id) is None:
            raise ApiError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return _model_card(model_id.removeprefix(PREFIX))

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": body_schema}}}})
    async def chat(request: Request):
        authorize(request)
        start = time.perf_counter()
        raw, body = await _read_body(request, config.max_request_bytes)
        chat_request = _parse(body)
        pin = pinned(chat_request.model)
        messages, dropped = plain_messages(chat_request)
        agent, step, session_id = _context(chat_request.metadata or {}, request.headers)
        match, answer, decision = await _route(chat_request, messages, plain_tools(chat_request), agent, step, pin,
                                               dropped)
        task = match.route.task if match.route else None
        upstream_body = raw if pin is None else _repinned(body)
        served_by = decision.served_by
        if served_by == UPSTREAM and (config.upstream is None or upstream_body is None):
            served_by = UNAVAILABLE
        info = {"route": served_by, "task": task, "reason": decision.reason, "match": match.method,
                "confidence": None if answer is None else round(answer.confidence, 6)}
        headers = {"X-Factory-Route": served_by, "X-Factory-Task": task or "", "X-Factory-Reason": decision.reason}
        if answer is not None:
            headers["X-Factory-Confidence"] = f"{answer.confidence:.6f}"

        def finish(response: dict[str, Any]) -> None:
            seconds = time.perf_counter() - start
            metrics.requests.labels(served_by, task or "", decision.reason).inc()
            metrics.seconds.labels(served_by).observe(seconds)
            state["log"].write(log_entry(
                f"req-{uuid.uuid4().hex}", body, response, agent=agent, step=step, session_id=session_id,
                route=served_by, task=task, confidence=info["confidence"], reason=decision.reason,
                match=match.method, latency_ms=seconds * 1000,
                specialist_answer=None if answer is None else answer.output))

        stream = bool(chat_request.stream)
        if served_by == SPECIALIST:
            completion = _completion(f"chatcmpl-{uuid.uuid4().hex}", task, answer)
            finish(completion)
            if not stream:
                return JSONResponse(completion | {"factory": info}, headers=headers)
            include_usage = bool(chat_request.stream_options and chat_request.stream_options.include_usage)
            events = [f"data: {json.dumps(c | {'factory': info}, ensure_ascii=False)}\n\n"
                      for c in _chunks(completion, include_usage)] + ["data: [DONE]\n\n"]
            return StreamingResponse(iter(events), media_type="text/event-stream", headers=headers)
        if served_by == UNAVAILABLE:
            missing = ("no upstream is configured" if config.upstream is None else
                       f"no upstream model is configured for requests pinned to {chat_request.model}")
            error = _error(f"escalation needed ({decision.reason}) but {missing}", "server_error",
                           code="upstream_unavailable")
            finish(error)
            if decision.reason == "overloaded":  # the specialists' queue is full: worth a retry soon
                headers["Retry-After"] = "1"
            return JSONResponse(error, status_code=503, headers=headers)
        return await _forward(upstream_body, stream, info, headers, finish)

    def _repinned(body: dict[str, Any]) -> bytes | None:
        """The body a pinned request escalates with: `model` set to the upstream model (None without one)."""
        if config.upstream_model is None:
            return None
        return json.dumps(body | {"model": config.upstream_model}, ensure_ascii=False).encode()

    async def _route(chat_request: ChatCompletionRequest, messages: list[dict[str, Any]],
                     tools: list[dict[str, Any]], agent: str, step: str, pin: Route | None,
                     dropped: bool) -> tuple[Match, Answer | None, Decision]:
        """Match the task (or take the pinned one), let its specialist answer when it may, decide who serves."""
        if pin is not None:
            match = Match(pin, "model")
        else:
            start = time.perf_counter()
            match = router.match(messages, tools, agent, step)
            metrics.routing.observe(time.perf_counter() - start)
        if dropped:
            return match, None, Decision(UPSTREAM, "unsupported_content")
        if chat_request.n not in (None, 1) or chat_request.logprobs:
            return match, None, Decision(UPSTREAM, "unsupported")
        if match.route is None or not match.route.serves:
            return match, None, decide(match)
        try:
            answer = await run_in_threadpool(specialists.answer, match.route.task, messages, tools,
                                             chat_request.budget)
        except BackendError as err:  # the serving engine failed or timed out: the upstream answers
            metrics.backend_errors.labels(err.reason).inc()
            logger.warning("specialist %s: %s; escalating (%s)", match.route.task, err, err.reason)
            return match, None, Decision(UPSTREAM, err.reason)
        except Exception as err:  # a failing specialist must not fail the request: the upstream answers
            reason = failure_reason(err)
            if reason == "specialist_error":
                logger.exception("specialist %s failed; escalating", match.route.task)
            return match, None, Decision(UPSTREAM, reason)
        metrics.confidence.labels(match.route.task).observe(answer.confidence)
        return match, answer, decide(match, answer.confidence, answer.usable, answer.output)

    async def _forward(raw: bytes, stream: bool, info: dict[str, Any], headers: dict[str, str], finish):
        client: httpx.AsyncClient = state["client"]
        upstream_headers = {"content-type": "application/json"}
        if config.upstream_key:
            upstream_headers["authorization"] = f"Bearer {config.upstream_key}"
        url = config.upstream.rstrip("/") + "/chat/completions"
        try:
            response = await client.send(client.build_request("POST", url, content=raw, headers=upstream_headers),
                                         stream=stream)
        except httpx.TimeoutException:
            metrics.upstream_errors.labels("timeout").inc()
            error = _error(f"upstream timed out after {config.upstream_timeout:g} s", "upstream_error",
                           code="upstream_timeout")
            finish(error)
            return JSONResponse(error, status_code=504, headers=headers)
        except httpx.HTTPError as err:
            metrics.upstream_errors.labels("connection").inc()
            error = _error(f"upstream unreachable: {type(err).__name__}", "upstream_error", code="upstream_unreachable")
            finish(error)
            return JSONResponse(error, status_code=502, headers=headers)
        if response.status_code != 200 or not stream:
            data = await _json_or_error(response)
            if response.status_code != 200 or "error" in data:
                # the upstream rejecting the server's own key is not the client's fault
                status = 502 if response.status_code in (200, 401, 403) else response.status_code
                metrics.upstream_errors.labels(f"http_{response.status_code}").inc()
                data = data if "error" in data else _error("upstream error", "upstream_error", code="upstream_error")
                finish(data)
                return JSONResponse(data, status_code=status, headers=headers)
            finish(data)
            return JSONResponse(data | {"factory": info}, headers=headers)

        async def relay():
            chunks: list[dict[str, Any]] = []
            failed = None
            try:
                async for line in response.aiter_lines():
                    payload = line.removeprefix("data:").strip()
                    if not line.startswith("data:") or payload == "[DONE]":
                        if line:
                            yield f"{line}\n\n"
                        continue
                    chunk = json.loads(payload)
                    chunks.append(chunk)
                    yield f"data: {json.dumps(chunk | {'factory': info}, ensure_ascii=False)}\n\n"
            except (httpx.HTTPError, ValueError, TypeError) as err:  # a broken connection or a non-JSON chunk
                metrics.upstream_errors.labels("stream").inc()
                failed = _error(f"upstream stream broke: {type(err).__name__}", "upstream_error", code="upstream_error")
            finally:
                await response.aclose()
                finish(failed or (accumulate(chunks) if chunks else _error("empty upstream stream", "upstream_error",
                                                                           code="upstream_error")))

        return StreamingResponse(relay(), media_type="text/event-stream", headers=headers)

    async def _json_or_error(response: httpx.Response) -> dict[str, Any]:
        await response.aread()
        await response.aclose()
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return _error(f"upstream returned a non-JSON body (HTTP {response.status_code})", "upstream_error",
                          code="upstream_error")
        return data

    return app


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` with uvicorn in a background thread; yields its base URL (`port=0`: a free port).

    Stops the server (running the app's shutdown: the request log is closed) on exit.
    Raises RuntimeError when the server does not start within `timeout` seconds.
    """
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
