"""Every supported log format, from its documented example, round-trips into canonical records.

The fixtures in tests/fixtures/formats/ follow the formats' documentation:
OpenTelemetry GenAI semantic conventions (the spec's Weather-in-Paris messages and
get_current_weather tool definition; OpenLLMetry's indexed gen_ai.prompt.N.*
attributes; the older prompt/completion span events), MLflow traces exported by
MLflow 3 itself (`mlflow.openai.autolog` over a mocked OpenAI transport, as
`Trace.to_json()` and as `search_traces()`'s DataFrame `to_json(orient="records")`),
Langfuse's public-API observations page (ObservationsView fields) and LangSmith
runs (Run schema; LangChain serialized messages and OpenAI wrapper outputs).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from factory.ingest import ingest, read_records
from factory.records import Record, content_id

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def records_of(tmp_path: Path, name: str, fmt: str | None = None) -> tuple[list[Record], object]:
    stats = ingest([FIXTURES / name], tmp_path / "records", tmp_path / "quarantine", fmt)
    records = read_records(tmp_path / "records")
    for record in records:  # every record survives its Parquet row unchanged
        assert Record.from_row(record.to_row()) == record
        assert record.id == content_id(record.messages, record.tools, record.output_text, record.output_tool_calls)
    return records, stats


def by_step(records: list[Record]) -> dict[str, Record]:
    return {r.step: r for r in records}


def test_openai_proxy_calls_with_tools_tool_messages_and_function_call(tmp_path):
    records, stats = records_of(tmp_path, "openai_calls.jsonl")
    assert (stats.read, stats.accepted, stats.quarantined) == (4, 4, 0)
    first, second, legacy, failed = records
    assert first.source == "openai" and first.location.endswith("openai_calls.jsonl:1")
    assert (first.agent, first.step, first.session_id) == ("acme-support", "order_action", "s-1")
    assert first.source_id == "call-1"
    assert first.model == "gpt-4o-2024-08-06" and first.timestamp == "2026-11-03T09:00:00.000000Z"
    assert first.output_text is None
    assert first.output_tool_calls == [{"name": "get_order_status", "arguments": {"order_id": "A12345"}}]
    assert first.tools[0]["function"]["name"] == "get_order_status"
    assert first.usage == {"prompt_tokens": 80, "completion_tokens": 17}
    assert (first.latency_ms, first.cost, first.feedback, first.outcome) == (812.5, 0.00037, 1.0, "ok")
    assert [m["role"] for m in second.messages] == ["user", "assistant", "tool"]
    assert second.messages[2]["tool_call_id"] == "call_abc"
    assert second.output_text == "Order A12345 has shipped." and second.timestamp == "2026-11-03T09:00:02.250000Z"
    assert legacy.output_tool_calls == [{"name": "cancel_order", "arguments": {"order_id": "A12345"}}]
    assert legacy.tools == [{"type": "function", "function": {
        "name": "cancel_order", "description": "Cancel an order.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}}}}]
    assert (failed.outcome, failed.output_text) == ("error", None)


def test_openai_finetuning_chat_shape(tmp_path):
    records, _ = records_of(tmp_path, "openai_finetune.jsonl")
    text, tool = records
    assert text.source == "openai_ft"
    assert [m["role"] for m in text.messages] == ["system", "user"] and text.output_text == "billing"
    assert tool.output_tool_calls == [{"name": "get_order_status", "arguments": {"order_id": "A12345"}}]
    assert len(tool.tools) == 1


def test_otel_current_semantic_conventions(tmp_path):
    records, stats = records_of(tmp_path, "otel_semconv.json")
    assert (stats.read, stats.accepted, stats.skipped) == (5, 3, 2)  # invoke_agent and execute_tool skipped
    chat, structured, failed = records
    assert chat.source == "otel"
    assert chat.location.endswith("otel_semconv.json:$.resourceSpans[0].scopeSpans[0].spans[1]")
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "tool"]
    assert chat.messages[0]["content"].startswith("You are an Agent that greet users")
    assert chat.messages[2]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                             "arguments": '{"location": "Paris"}'}
    assert chat.messages[3] == {"role": "tool", "content": "rainy, 57°F",
                                "tool_call_id": "call_VSPygqKTWdrhaFErNvMV18Yl"}
    assert chat.output_text == "The weather in Paris is currently rainy with a temperature of 57°F."
    assert chat.tools[0]["function"]["name"] == "get_current_weather"
    assert chat.model == "gpt-4-0613" and chat.agent == "weather-agent" and chat.step == "chat gpt-4"
    assert chat.session_id == "conv_5j66UpCpwteGg4YSxUnt7lPY" and chat.source_id == "eee19b7ec3c1b174"
    assert chat.usage == {"prompt_tokens": 100, "completion_tokens": 180}
    assert chat.timestamp == "2025-11-03T09:00:00.000000Z" and chat.latency_ms == 1250.0
    assert chat.metadata["provider"] == "openai" and chat.metadata["trace_id"] == "5b8efff798038103d269b633813fc60c"
    # structured (kvlist / array) attribute values, a tool call as output
    assert structured.messages == [{"role": "user", "content": "Weather in Paris for order A12345?"}]
    assert structured.output_tool_calls == [{"name": "get_weather", "arguments": {"location": "Paris"}}]
    assert structured.session_id == "5b8efff798038103d269b633813fc60c"  # no conversation id: the trace id
    assert failed.outcome == "error" and failed.metadata["error_type"] == "timeout"


def test_otel_indexed_attributes_one_request_per_jsonl_line(tmp_path):
    records, stats = records_of(tmp_path, "otel_indexed.jsonl")
    assert stats.accepted == 2
    call, answer = records
    assert call.location.endswith("otel_indexed.jsonl:1:resourceSpans[0].scopeSpans[0].spans[0]")
    assert [m["role"] for m in call.messages] == ["system", "user"]
    assert call.output_tool_calls == [{"name": "get_order_status", "arguments": {"order_id": "A12345"}}]
    assert call.tools == [{"type": "function", "function": {
        "name": "get_order_status", "description": "Look up the status of an order.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}]
    assert call.usage == {"prompt_tokens": 31, "completion_tokens": 9} and call.agent == "acme-support"
    assert answer.output_text == "Yes, every Acme order is insured in transit."


def test_otel_prompt_and_completion_span_events(tmp_path):
    records, _ = records_of(tmp_path, "otel_events.json")
    content_events, message_events = records
    assert content_events.messages == [{"role": "system", "content": "Classify the intent."},
                                       {"role": "user", "content": "Cancel order A12345 please"}]
    assert content_events.output_text == "returns"
    assert [m["content"] for m in message_events.messages] == ["Classify the intent.", "Refund order A12345"]
    assert message_events.output_text == "billing"


@pytest.mark.parametrize("name", ["mlflow_traces.json", "mlflow_search_traces_df.json"])
def test_mlflow_trace_exports(tmp_path, name):
    records, stats = records_of(tmp_path, name)
    assert (stats.accepted, stats.skipped) == (2, 2)  # the AGENT spans are skipped
    action, classify = sorted(records, key=lambda r: r.step)[1], sorted(records, key=lambda r: r.step)[0]
    assert classify.source == "mlflow" and classify.step == "classify_intent"  # the parent span's name
    assert classify.messages == [{"role": "system", "content": "Classify the intent."},
                                 {"role": "user", "content": "Where is my parcel for order A12345?"}]
    assert classify.output_text == "shipping" and classify.model == "gpt-4o-2024-08-06"
    assert classify.usage == {"prompt_tokens": 31, "completion_tokens": 2}
    assert classify.cost == pytest.approx(9.75e-05) and classify.feedback == 1.0  # the thumbs-up assessment
    assert classify.session_id.startswith("tr-") and classify.latency_ms > 0
    assert action.output_tool_calls == [{"name": "get_order_status", "arguments": {"order_id": "A12345"}}]
    assert action.tools[0]["function"]["name"] == "get_order_status" and action.feedback is None


def test_langfuse_observations_page(tmp_path):
    records, stats = records_of(tmp_path, "langfuse_observations.json")
    assert (stats.accepted, stats.skipped) == (3, 2)  # the SPAN and TOOL observations
    steps = by_step(records)
    classify = steps["classify_intent"]
    assert classify.source == "langfuse" and classify.location.endswith("langfuse_observations.json:$.data[1]")
    assert classify.output_text == "shipping" and classify.model == "gpt-4o-2024-08-06"
    assert classify.usage == {"prompt_tokens": 59, "completion_tokens": 2}
    assert classify.cost == pytest.approx(0.0001675) and classify.latency_ms == pytest.approx(695.0)
    assert classify.feedback == 1.0 and classify.agent == "acme-support" and classify.session_id == "trace-7f3a"
    action = steps["order_action"]  # metadata.langgraph_node names the step
    assert action.output_tool_calls == [{"name": "get_order_status", "arguments": {"order_id": "A12345"}}]
    assert len(action.tools) == 1
    assert steps["draft_reply"].outcome == "error"


def test_langsmith_runs(tmp_path):
    records, stats = records_of(tmp_path, "langsmith_runs.json")
    assert (stats.accepted, stats.skipped) == (3, 1)  # the chain run
    lc, wrapped, failed = records
    assert lc.source == "langsmith" and lc.step == "classify_intent" and lc.session_id == "thread-42"
    assert lc.messages == [{"role": "system", "content": "Classify the customer's message into exactly one intent."},
                           {"role": "user", "content": "Where is order A12345?"}]
    assert lc.output_text == "shipping" and lc.model == "gpt-4o" and lc.agent == "acme-support"
    assert lc.usage == {"prompt_tokens": 59, "completion_tokens": 2} and lc.cost == pytest.approx(0.0001675)
    assert lc.feedback == -1.0 and lc.latency_ms == pytest.approx(800.0)  # feedback avg 0 of [0, 1]: thumbs down
    assert wrapped.output_tool_calls == [{"name": "get_order_status", "arguments": {"order_id": "A12345"}}]
    assert wrapped.usage == {"prompt_tokens": 80, "completion_tokens": 17} and len(wrapped.tools) == 1
    assert failed.outcome == "error" and failed.output_text is None


def test_format_can_be_forced_and_a_wrong_one_quarantines(tmp_path):
    _, stats = records_of(tmp_path / "a", "langsmith_runs.json", fmt="langsmith")
    assert stats.accepted == 3
    stats = ingest([FIXTURES / "openai_calls.jsonl"], tmp_path / "b" / "records", tmp_path / "b" / "q", "langfuse")
    assert (stats.accepted, stats.skipped) == (0, 4)  # not GENERATION observations
    stats = ingest([FIXTURES / "openai_calls.jsonl"], tmp_path / "c" / "records", tmp_path / "c" / "q", "otel")
    assert (stats.accepted, stats.quarantined) == (0, 4)
    assert "resourceSpans" in (tmp_path / "c" / "q").glob("*.jsonl").__next__().read_text()
    with pytest.raises(KeyError, match="unknown format 'xml'"):
        ingest([FIXTURES / "openai_calls.jsonl"], tmp_path / "d", tmp_path / "e", "xml")


# --- canaries through ingest and curate, for every format ----------------------

CANARY = ("A12345 (write to {fmt}.jane.doe@example.com, card 4111 1111 1111 1111, "
          "key sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv)")
FRAGMENTS = ["jane.doe@example.com", "jane.doe", "4111 1111", "1111 1111 1111", "Ab3dEf6hIj9kLm2nOp5qRs8tUv"]


@pytest.fixture(scope="module")
def curated_canaries(tmp_path_factory):
    from factory.curate import curate_store

    root = tmp_path_factory.mktemp("canaries")
    logs = root / "logs"
    shutil.copytree(FIXTURES, logs)
    for path in logs.iterdir():
        fmt = path.name.split("_")[0]
        path.write_text(path.read_text().replace("A12345", CANARY.format(fmt=fmt)))
    ingest([logs], root / "raw", root / "quarantine" / "ingest")
    report = curate_store(root / "raw", root / "curated.parquet", root / "quarantine" / "curate.jsonl",
                          root / "report.json")
    return root, report


def test_canaries_reach_every_format_and_leave_no_trace(curated_canaries):
    root, report = curated_canaries
    raw = read_records(root / "raw")
    assert {r.source for r in raw} == {"openai", "openai_ft", "otel", "mlflow", "langfuse", "langsmith"}
    assert all("jane.doe@example.com" in json.dumps(r.to_row()) for r in raw)  # planted in every record
    curated = [Record.from_row(row) for row in pq.read_table(root / "curated.parquet").to_pylist()]
    removed = [json.loads(line) for line in (root / "quarantine" / "curate.jsonl").read_text().splitlines()]
    assert {r.source for r in curated} | {row["source"] for row in removed} == {r.source for r in raw}
    assert report["read"] == len(raw) == len(curated) + len(removed) and report["kept"] == len(curated)
    assert {"EMAIL", "CREDIT_CARD", "API_KEY"} <= set(report["pii_placeholders"])
    for blob in ((root / "curated.parquet").read_bytes().decode("utf-8", "replace"),
                 json.dumps([r.to_row() for r in curated]),
                 (root / "quarantine" / "curate.jsonl").read_text(),
                 (root / "report.json").read_text()):
        assert [f for f in FRAGMENTS if f in blob] == []
    assert "<EMAIL_1>" in json.dumps([r.to_row() for r in curated])
    assert (root / "quarantine" / "curate.jsonl").read_text().count("<EMAIL_1>") >= 4  # the failed calls, scrubbed
