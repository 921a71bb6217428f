"""The ingest driver: quarantine, bad input, incremental re-ingest, watermarks, the CLI."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from factory.cli import app
from factory.ingest import MAX_RECORD_BYTES, ingest, read_records

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "datasets" / "samples" / "logs"
FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def call(i: int, user: str | None = None, **extra) -> dict:
    return {"id": f"call-{i}", "timestamp": f"2026-11-03T09:{i // 60 % 60:02d}:{i % 60:02d}Z",
            "metadata": {"agent": "acme", "step": "classify", "session_id": f"s-{i}"},
            "request": {"model": "gpt-4o", "messages": [{"role": "user", "content": user or f"question number {i}"}]},
            "response": {"choices": [{"message": {"role": "assistant", "content": f"answer {i}"}}]}, **extra}


def line(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode()


class Store:
    """A records / quarantine / watermarks layout under one tmp folder."""

    def __init__(self, root: Path):
        self.root = root
        self.records, self.quarantine = root / "records" / "raw", root / "quarantine"
        self.watermarks = root / "records" / "watermarks.json"

    def ingest(self, *paths: Path, fmt: str | None = None):
        return ingest(list(paths), self.records, self.quarantine, fmt)

    def rejects(self) -> list[dict]:
        return [json.loads(x) for p in sorted(self.quarantine.glob("*.jsonl")) for x in p.read_text().splitlines()]

    def marks(self) -> dict:
        return json.loads(self.watermarks.read_text())


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


def test_sample_logs_quarantine_their_ten_malformed_lines_and_rerun_adds_nothing(store):
    stats = store.ingest(SAMPLES)
    assert (stats.files, stats.accepted, stats.quarantined) == (9, 3172, 10)  # 2,365 acme-support, 807 acme-desk
    assert stats.read == stats.accepted + stats.duplicates + stats.quarantined + stats.skipped
    rejects = store.rejects()
    assert len(rejects) == 10 and all(r["file"] and r["line"] and r["offset"] is not None for r in rejects)
    reasons = " | ".join(r["reason"] for r in rejects)
    for expected in ("invalid JSON", "invalid UTF-8", "unknown role 'customer'", "expected one JSON object per line",
                     "unrecognised log shape"):
        assert expected in reasons
    partitions = sorted(p.name for p in store.records.glob("*.parquet"))
    again = store.ingest(SAMPLES)
    assert (again.skipped_files, again.read, again.accepted) == (9, 0, 0)
    assert sorted(p.name for p in store.records.glob("*.parquet")) == partitions
    assert len(read_records(store.records)) == 3172


def test_bad_input_is_quarantined_with_a_reason_and_the_good_lines_around_it_kept(store, tmp_path):
    log = tmp_path / "mixed.jsonl"
    bad_types = call(3)
    bad_types["request"]["messages"] = "hello"
    bad_role = call(4)
    bad_role["request"]["messages"][0]["role"] = "robot"
    huge = call(5, user="x" * (MAX_RECORD_BYTES + 10))
    log.write_bytes(b"".join([
        line(call(1)),
        line(call(2))[:40] + b"\n",                      # truncated JSON
        line(bad_types),                                   # wrong type
        line(bad_role),                                    # unknown role
        line(huge),                                        # over 1 MB
        line(call(6)).replace(b"question", b"caf\xe9"),    # invalid UTF-8
        b"\n   \n",                                        # blank lines are not records
        line([call(7)]),                                   # not an object
        line({"hello": "world"}),                          # no known shape
        line(call(8, latency_ms="fast")),                  # wrong type for a number
        b'{"data": [' * 400 + b'{"a": 1}' + b"]}" * 400 + b"\n",  # pages nested 400 deep
        line(call(9)),
    ]))
    stats = store.ingest(log)
    assert stats.accepted == 2 and stats.quarantined == 9
    by_line = {r["line"]: r["reason"] for r in store.rejects()}
    assert by_line[2].startswith("invalid JSON")
    assert by_line[3] == "request.messages: expected list, got str"
    assert by_line[4] == "request.messages[0].role: unknown role 'robot'"
    assert by_line[5].startswith(f"line is over the {MAX_RECORD_BYTES} byte limit")
    assert by_line[6].startswith("invalid UTF-8 at byte")
    assert by_line[9] == "expected one JSON object per line, got list"
    assert by_line[10].startswith("unrecognised log shape")
    assert by_line[11] == "latency_ms: expected a number, got 'fast'"
    assert by_line[12].startswith("unrecognised log shape")
    assert [r.source_id for r in read_records(store.records)] == ["call-1", "call-9"]
    assert all(len(r["excerpt"]) <= 2000 for r in store.rejects())


def test_empty_files_and_a_folder_of_mixed_formats(store, tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(FIXTURES, logs)
    (logs / "empty.jsonl").write_bytes(b"")
    (logs / "blank.json").write_bytes(b"\n\n")
    with gzip.open(logs / "calls.jsonl.gz", "wb") as f:
        f.write(line(call(1)) + line(call(2)))
    (logs / "notes.txt").write_text("not a log")  # not a log suffix: not read
    stats = store.ingest(logs)
    assert stats.files == 12 and stats.quarantined == 0
    assert set(stats.formats) == {"openai", "openai_ft", "otel", "mlflow", "langfuse", "langsmith"}
    assert stats.formats["openai"] == 6


def test_a_broken_document_keeps_the_items_before_the_break(store, tmp_path):
    doc = tmp_path / "runs.json"
    runs = json.loads((FIXTURES / "langsmith_runs.json").read_text())
    huge = [{"role": "user", "content": "x" * (MAX_RECORD_BYTES + 1)}]
    runs.insert(2, {"run_type": "llm", "inputs": {"messages": huge}})
    text = json.dumps(runs, indent=1)
    doc.write_text(text[: text.rindex('"Draft a reply')])  # cut inside the last run
    stats = store.ingest(doc)
    assert stats.accepted == 2 and stats.skipped == 1
    reasons = [r["reason"] for r in store.rejects()]
    assert reasons[0] == f"item is over the {MAX_RECORD_BYTES} byte limit"
    assert reasons[1].startswith("invalid JSON document")
    assert [r["location"].rsplit(":", 1)[1] for r in store.rejects()] == ["$[2]", "$"]


def test_a_document_array_of_anything_quarantines_what_is_not_an_object(store, tmp_path):
    doc = tmp_path / "export.json"
    doc.write_text(json.dumps({"data": [1, "two", None, [3], call(1)], "meta": {"page": 1}}, indent=1))
    stats = store.ingest(doc)
    assert (stats.accepted, stats.quarantined) == (1, 4)
    assert [r["location"].rsplit(":", 1)[1] for r in store.rejects()] == [f"$.data[{i}]" for i in range(4)]
    assert store.rejects()[0]["reason"] == "expected a JSON object, got int"


def test_an_appended_log_is_read_from_where_the_last_ingest_stopped(store, tmp_path):
    log = tmp_path / "agent.jsonl"
    log.write_bytes(line(call(1)) + line(call(2)))
    assert store.ingest(log).accepted == 2
    mark = store.marks()[str(log.resolve())]
    assert (mark["offset"], mark["line"], mark["records"]) == (log.stat().st_size, 2, 2)
    assert mark["max_timestamp"] == "2026-11-03T09:00:02.000000Z"

    with open(log, "ab") as f:
        f.write(line(call(3)) + line(call(4))[:30])  # the last line is still being written
    stats = store.ingest(log)
    assert (stats.read, stats.accepted, stats.quarantined) == (2, 1, 1)
    assert store.rejects()[0]["reason"].endswith("(incomplete last line: it is read again once the file grows)")
    assert store.rejects()[0]["line"] == 4

    with open(log, "ab") as f:
        f.write(line(call(4))[30:] + line(call(5)))
    stats = store.ingest(log)  # the last partition (line 3 on) is read again and replaced
    assert (stats.read, stats.accepted, stats.quarantined) == (3, 3, 0)
    records = read_records(store.records)
    assert [r.source_id for r in records] == ["call-1", "call-2", "call-3", "call-4", "call-5"]
    assert records[4].location == f"{log}:5"
    assert store.rejects() == []  # the partition that quarantined the partial line was replaced
    assert store.marks()[str(log.resolve())]["records"] == 5
    assert store.ingest(log).read == 0


def test_a_rewritten_log_starts_a_new_generation_and_a_touched_one_is_skipped(store, tmp_path):
    log = tmp_path / "agent.jsonl"
    log.write_bytes(line(call(1)) + line(call(2)))
    store.ingest(log)
    os.utime(log, ns=(1, 1))
    assert store.ingest(log).skipped_files == 1
    log.write_bytes(line(call(2)) + line(call(3)) + line(call(4)))  # rotated: different bytes at the start
    stats = store.ingest(log)
    assert (stats.read, stats.accepted, stats.duplicates) == (3, 2, 1)
    assert store.marks()[str(log.resolve())]["generation"] == 1
    assert len(read_records(store.records)) == 4


def test_an_appended_gzip_member_is_read_without_repeating_the_first(store, tmp_path):
    log = tmp_path / "agent.jsonl.gz"
    log.write_bytes(gzip.compress(line(call(1))))
    store.ingest(log)
    with open(log, "ab") as f:
        f.write(gzip.compress(line(call(2))))
    stats = store.ingest(log)
    assert (stats.read, stats.accepted) == (1, 1)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_truncated_gzip_stops_ingest_naming_it_and_the_files_before_it_are_kept(store, tmp_path, workers):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.jsonl").write_bytes(b"".join(line(call(i)) for i in range(50)))
    whole = gzip.compress(b"".join(line(call(i)) for i in range(100, 3000)))
    (logs / "b.jsonl.gz").write_bytes(whole[:len(whole) // 2])  # still being written
    (logs / "c.jsonl").write_bytes(b"".join(line(call(i)) for i in range(200, 250)))
    with pytest.raises(OSError, match=r"b\.jsonl\.gz: cannot be read: Compressed file ended"):
        ingest([logs], store.records, store.quarantine, workers=workers)
    assert len(read_records(store.records)) == 50 and list(store.marks()) == [str((logs / "a.jsonl").resolve())]
    assert not [p for p in store.records.iterdir() if p.name.startswith(".")]
    (logs / "b.jsonl.gz").write_bytes(whole)
    stats = ingest([logs], store.records, store.quarantine, workers=workers)
    assert stats.skipped_files == 1 and stats.accepted == 2900 and stats.duplicates == 50
    assert len(read_records(store.records)) == 2950


def test_rerunning_after_losing_the_watermarks_is_idempotent(store, tmp_path):
    log = tmp_path / "agent.jsonl"
    log.write_bytes(line(call(1)) + line(call(2)))
    store.ingest(log)
    store.watermarks.unlink()  # as if the run died between the partition and the watermark write
    stats = store.ingest(log)
    assert stats.accepted == 2  # the same partition is rewritten, not duplicated
    assert len(read_records(store.records)) == 2 and len(list(store.records.glob("*.parquet"))) == 1


def test_the_same_file_at_two_paths_adds_its_records_once(store, tmp_path):
    shutil.copy(FIXTURES / "openai_calls.jsonl", tmp_path / "copy.jsonl")
    store.ingest(FIXTURES / "openai_calls.jsonl")
    stats = store.ingest(tmp_path / "copy.jsonl")
    assert (stats.accepted, stats.duplicates) == (0, 4)


def test_cli_prints_counts_and_fails_only_when_nothing_could_be_ingested(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORY_DATA_DIR", str(tmp_path / "datasets"))
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(FIXTURES / "openai_calls.jsonl")])
    assert result.exit_code == 0, result.output
    assert "read 4, accepted 4, quarantined 0, duplicates 0" in " ".join(result.output.split())
    again = runner.invoke(app, ["ingest", str(FIXTURES / "openai_calls.jsonl")])
    assert again.exit_code == 0 and "(1 unchanged)" in again.output

    (tmp_path / "bad.jsonl").write_text("not json\n{\"also\": \"bad\"}\n")
    bad = runner.invoke(app, ["ingest", str(tmp_path / "bad.jsonl")])
    assert bad.exit_code == 1 and "nothing could be ingested" in " ".join(bad.output.split())
    assert "quarantined     1  invalid JSON" in bad.output

    (tmp_path / "empty.jsonl").write_text("")
    assert runner.invoke(app, ["ingest", str(tmp_path / "empty.jsonl")]).exit_code == 0
    missing = runner.invoke(app, ["ingest", str(tmp_path / "missing.jsonl")])
    assert missing.exit_code == 1 and "no such log file" in missing.output and "Traceback" not in missing.output
    unknown = runner.invoke(app, ["ingest", "--format", "xml", str(FIXTURES / "openai_calls.jsonl")])
    assert unknown.exit_code == 1 and "unknown format 'xml'" in unknown.output
    assert runner.invoke(app, ["ingest"]).exit_code == 1


def test_ingest_from_an_mlflow_tracking_store(store, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("acme-support")

    def trace(question: str, answer: str) -> None:
        with mlflow.start_span(name="classify_intent", span_type="AGENT"):
            with mlflow.start_span(name="ChatOpenAI", span_type="CHAT_MODEL") as span:
                span.set_inputs({"model": "gpt-4o", "messages": [{"role": "user", "content": question}]})
                span.set_outputs({"choices": [{"message": {"role": "assistant", "content": answer}}]})

    try:
        trace("Where is order A12345?", "shipping")
        trace("Refund my order", "billing")
        from factory.ingest import ingest_mlflow

        stats = ingest_mlflow(uri, store.records, store.quarantine)
        assert (stats.accepted, stats.skipped) == (2, 2)
        records = read_records(store.records)
        assert {r.output_text for r in records} == {"shipping", "billing"}
        assert all(r.step == "classify_intent" and r.location.startswith(f"mlflow:{uri}#tr-") for r in records)
        assert ingest_mlflow(uri, store.records, store.quarantine).accepted == 0
        trace("My card was charged twice", "billing")
        stats = ingest_mlflow(uri, store.records, store.quarantine)
        assert stats.accepted == 1 and stats.read <= 4  # only the newest traces are read again
        assert store.marks()[f"mlflow:{uri}"]["records"] == 3
    finally:
        mlflow.set_tracking_uri(None)


def test_a_record_that_cannot_be_stored_is_quarantined_when_its_batch_is_written(store, tmp_path):
    traces = json.loads((FIXTURES / "mlflow_traces.json").read_text())
    broken = json.loads(json.dumps(traces[1]))
    llm = next(s for s in broken["data"]["spans"] if "CHAT_MODEL" in s["attributes"]["mlflow.spanType"])
    llm["attributes"]["mlflow.llm.model"] = '"gpt\\ud800"'  # json.loads makes a lone surrogate of it
    llm["attributes"]["mlflow.spanInputs"] = llm["attributes"]["mlflow.spanInputs"].replace("parcel", "box")
    log = tmp_path / "traces.jsonl"
    log.write_text(json.dumps(traces[0]) + "\n" + json.dumps(broken) + "\n")
    stats = store.ingest(log)
    assert (stats.accepted, stats.quarantined, stats.skipped) == (1, 1, 2)
    assert stats.read == stats.accepted + stats.quarantined + stats.skipped
    (reject,) = store.rejects()
    assert reject["reason"].startswith("record: cannot be stored") and reject["location"].endswith(":2:data.spans[1]")
    assert len(read_records(store.records)) == 1


def test_ingest_counts_files_on_stderr_only_when_it_is_a_terminal(store, tmp_path, monkeypatch, stderr):
    logs = tmp_path / "logs"
    logs.mkdir()
    for i in range(2):
        (logs / f"calls-{i}.jsonl").write_bytes(line(call(i)))
    monkeypatch.setattr(sys, "stderr", stderr)
    assert store.ingest(logs).accepted == 2
    drawn = stderr.getvalue()
    assert ("ingest:" in drawn and "/2 " in drawn) is stderr.terminal and (drawn == "") is not stderr.terminal
