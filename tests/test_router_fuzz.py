"""A fuzz of the router's HTTP API, against a real server on 127.0.0.1.

Requests come from Schemathesis (valid and invalid cases of every operation in the
server's own OpenAPI document, the chat body described by `protocol.ChatCompletionRequest`)
and from Hypothesis strategies made here for what the schema cannot say: the reply task's
own system prompt followed by content of any JSON type or any mix of content parts (so
the specialist and the validation both see them), broken or non-object JSON, nesting past
the parser's limit, a body over the size limit, missing or wrong keys, unknown paths and
methods. The server runs the tiny random specialists of `test_serve` with a stub upstream
on loopback, so every valid request has somewhere to go and any 5xx is a server bug.

All requests share one keep-alive session: a handler error that drops its connection
shows as a connection error. Bounded: at most MAX_EXAMPLES requests (one per example,
Hypothesis generation only, derandomised so a failure reproduces), none sent after
TIME_LIMIT seconds; the test needs MIN_REQUESTS of them. It prints
`router fuzz: N requests, S server errors, C connection errors`.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_serve import (AUTH, CLIENT_KEY, SYSTEM, UPSTREAM_KEY, _stub_upstream, adapters,  # noqa: F401 (fixtures)
                        specialists)

from factory.serve.app import ServeConfig, create_app, running
from factory.serve.router import Router

MAX_EXAMPLES, MIN_REQUESTS, TIME_LIMIT = 1100, 1000, 240.0
MAX_REQUEST_BYTES = 64 * 1024
ROLES = ["system", "developer", "user", "assistant", "tool", "function", "wizard"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
part = st.one_of(
    st.builds(lambda text: {"type": "text", "text": text}, st.text(max_size=40)),
    st.just({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}),
    st.just({"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}}),
    st.just({"type": "file", "file": {"file_id": "file-1"}}),
    st.dictionaries(st.sampled_from(["type", "text", "image_url", "refusal"]), json_values | st.sampled_from(
        ["text", "image_url", "refusal", "video"]), max_size=3))
content = st.text(max_size=60) | st.lists(part, max_size=3) | json_values
tool_call = st.fixed_dictionaries({"id": st.text(max_size=6), "type": st.just("function") | json_values,
                                   "function": st.fixed_dictionaries({"name": st.text(max_size=8),
                                                                      "arguments": st.just("{}") | json_values})})
message = st.fixed_dictionaries(
    {"role": st.sampled_from(ROLES), "content": content},
    optional={"tool_call_id": st.text(max_size=6) | json_values, "tool_calls": st.lists(tool_call, max_size=2),
              "name": st.text(max_size=6)})
system = st.sampled_from([SYSTEM["reply"], SYSTEM["summary"], "Translate to French."]).map(
    lambda text: {"role": "system", "content": text}) | st.builds(
    lambda c: {"role": "system", "content": c}, content)
tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["lookup", "refund"]) | st.text(max_size=6)},
    optional={"parameters": st.just({"type": "object"}) | json_values})})
chat = st.fixed_dictionaries(
    {"model": st.sampled_from(["gpt-4o", "factory/reply", "factory/summary", "factory/nope"]) | json_values,
     "messages": st.builds(lambda first, rest: [first, *rest], system, st.lists(message, max_size=3))},
    optional={"stream": st.booleans() | json_values, "max_tokens": st.integers(-2, 20) | json_values,
              "n": st.integers(0, 3), "logprobs": st.booleans(), "tools": st.lists(tool, max_size=2),
              "tool_choice": st.sampled_from(["auto", "none", "required"]) | json_values,
              "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
              "metadata": st.dictionaries(st.sampled_from(["agent", "step", "session_id"]), st.text(max_size=8)),
              "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]) | json_values,
              "user": st.text(max_size=8)})


valid_chat = st.fixed_dictionaries(  # requests that pass validation, so the specialist and the upstream answer
    {"model": st.sampled_from(["gpt-4o", "factory/reply", "factory/summary"]),
     "messages": st.tuples(
         st.sampled_from([SYSTEM["reply"], SYSTEM["summary"], "Translate to French."]).flatmap(
             lambda text: st.sampled_from([text, [{"type": "text", "text": text}]])),
         st.text(max_size=60) | st.lists(part.filter(lambda p: p.get("type") in ("text", "image_url")), min_size=1,
                                         max_size=3)).map(
         lambda pair: [{"role": "system", "content": pair[0]}, {"role": "user", "content": pair[1]}])},
    optional={"stream": st.booleans(), "max_tokens": st.integers(1, 16), "temperature": st.floats(0, 2),
              "metadata": st.dictionaries(st.sampled_from(["agent", "step", "session_id"]), st.text(max_size=8)),
              "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "user": st.text(max_size=8)})


def _route(response) -> str | None:
    """The X-Factory-Route header (Schemathesis gives each header as a list of values)."""
    value = response.headers.get("x-factory-route")
    return value[0] if isinstance(value, list) else value


def _dumps(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


bodies = st.one_of(
    valid_chat.map(_dumps),
    chat.map(_dumps),
    st.tuples(chat, st.integers(0, 300)).map(lambda pair: _dumps(pair[0])[:pair[1]]),  # truncated JSON
    json_values.map(_dumps),  # JSON that is not an object
    st.binary(max_size=200),
    st.integers(150, 1000).map(lambda depth: b'{"model": ' + b"[" * depth + b"]" * depth + b"}"),
    st.just(MAX_REQUEST_BYTES).map(lambda size: b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "'
                                   + b"x" * size + b'"}]}'),  # over the size limit
    st.just(b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'))
keys = st.sampled_from([AUTH] * 6 + [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {CLIENT_KEY}"}])
JSON_TYPE = {"Content-Type": "application/json"}
chat_requests = st.builds(lambda body, key: ("POST", "/v1/chat/completions", key | JSON_TYPE, body), bodies, keys)
valid_requests = valid_chat.map(lambda body: ("POST", "/v1/chat/completions", AUTH | JSON_TYPE, _dumps(body)))
paths = st.sampled_from(["/v1/chat/completions", "/v1/models", "/v1/models/factory/reply", "/v1/models/x/y",
                         "/health", "/metrics", "/docs", "/openapi.json", "/v1/completions"]) | st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789/-_.~", max_size=24).map(lambda path: "/" + path)
other_requests = st.builds(lambda method, path, body: (method, path, AUTH, body),
                           st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]), paths,
                           st.none() | st.binary(max_size=40))


@pytest.fixture(scope="module")
def server(specialists, tmp_path_factory):
    """(base URL, OpenAPI document) of a server with keys, an upstream stub, and a small request limit."""
    seen: list[dict] = []
    with running(_stub_upstream(seen)) as upstream:
        config = ServeConfig(log_dir=tmp_path_factory.mktemp("fuzz-logs"), upstream=upstream + "/v1",
                             upstream_key=UPSTREAM_KEY, upstream_model="teacher-mini",
                             api_keys=frozenset({CLIENT_KEY}), max_request_bytes=MAX_REQUEST_BYTES)
        app = create_app(Router(specialists.routes), specialists, config)
        with running(app) as url:
            yield url, app.openapi()


def test_fuzzing_the_http_api_finds_no_server_error_and_no_broken_connection(server, capsys):
    url, document = server
    schema = schemathesis.openapi.from_dict(document)
    cases = st.one_of(schema.as_strategy(schemathesis.GenerationMode.POSITIVE),
                      schema.as_strategy(schemathesis.GenerationMode.NEGATIVE))
    counts: Counter[str] = Counter()
    failures: list[str] = []
    stop = time.monotonic() + TIME_LIMIT
    session = requests.Session()

    def send(item) -> requests.Response:
        if isinstance(item, schemathesis.Case):
            return item.call(base_url=url, session=session, headers=dict(AUTH), timeout=60)  # it adds to them
        method, path, headers, body = item
        return session.request(method, url + path, headers=headers, data=body, timeout=60)

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(item=st.one_of(cases, chat_requests, valid_requests, other_requests))
    def fuzz(item):
        if time.monotonic() > stop:
            return
        counts["requests"] += 1
        try:
            response = send(item)
        except requests.RequestException as err:
            counts["connection"] += 1
            failures.append(f"{type(err).__name__}: {err} after {item!r:.300}")
            return
        counts[f"route.{_route(response)}"] += 1
        if response.status_code >= 500:
            counts["server"] += 1
            failures.append(f"HTTP {response.status_code} {response.text[:200]!r} for {item!r:.300}")

    fuzz()
    session.close()
    with capsys.disabled():
        print(f"\nrouter fuzz: {counts['requests']} requests, {counts['server']} server errors, "
              f"{counts['connection']} connection errors")
    assert counts["server"] == 0 and counts["connection"] == 0, "\n".join(failures[:10])
    assert counts["requests"] >= MIN_REQUESTS, f"only {counts['requests']} requests within {TIME_LIMIT:.0f} s"
    # the fuzz reached both answering paths, not only the validation
    assert counts["route.specialist"] > 0 and counts["route.upstream"] > 0, counts
