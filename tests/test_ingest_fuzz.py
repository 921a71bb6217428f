"""Property-based fuzzing of the parsers and of the line and document readers.

Parsers: valid objects of every format (from tests/fixtures/formats) get 1-4 random
mutations (a value replaced by arbitrary JSON, a JSON string attribute replaced
or mutated inside, a key deleted); parsing them may only raise BadRecord.
Readers: arbitrary byte lines and damaged documents go through the whole ingest
driver, which may not raise at all and must account for every unit it read.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factory.ingest import ingest
from factory.ingest.common import BadRecord
from factory.ingest.formats import FORMATS, detect

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
JSON_STRING = "<json>"  # a path step into a string holding JSON


def _objects() -> list[tuple[str, dict[str, Any]]]:
    """(format, object) for every top-level object of every fixture."""
    found = []
    for path in sorted(FIXTURES.iterdir()):
        text = path.read_text()
        for value in [json.loads(x) for x in text.splitlines()] if path.suffix == ".jsonl" else [json.loads(text)]:
            if isinstance(value, dict) and not detect(value):
                value = value["data"]
            found += [(detect(obj), obj) for obj in (value if isinstance(value, list) else [value])]
    assert {fmt for fmt, _ in found} == set(FORMATS)
    return found


OBJECTS = _objects()
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["role", "content", "type", "parts", "messages", "choices", "message", "tool_calls",
                     "function", "name", "arguments", "text", "kwargs", "lc", "id", "value"]) | st.text(max_size=6),
    inner, max_size=3), max_leaves=10)
values = json_values | json_values.map(json.dumps) | st.sampled_from(
    ["", "[]", "{}", "null", "\\ud800", "2026-13-45", "1e400", "9" * 30, "\x00", "{\"role\": \"robot\"}"])


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return None


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(obj, dict):
        for key, value in obj.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found += _paths(value, (*prefix, i))
    elif isinstance(_decode(obj), (dict, list)):
        found += _paths(_decode(obj), (*prefix, JSON_STRING))
    return found


def _mutate(obj: Any, path: tuple, action: str, value: Any) -> Any:
    if not path:
        return value
    step, rest = path[0], path[1:]
    if step == JSON_STRING:
        return json.dumps(_mutate(_decode(obj), rest, action, value))
    if not rest and action == "delete":
        if isinstance(obj, dict):
            obj.pop(step, None)
        else:
            del obj[step]
        return obj
    obj[step] = _mutate(obj[step], rest, action, value)
    return obj


def _parse_all(fmt: str, obj: Any) -> None:
    """What the driver does with one object of a known format."""
    spec = FORMATS[fmt]
    if not isinstance(obj, dict):
        raise BadRecord("not an object")  # the readers only pass objects on
    units = [("", obj)] if spec.units is None else spec.units(obj)
    for sub, unit in units:
        try:
            spec.parse(unit, f"fuzz:{sub}")
        except BadRecord:
            pass


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_parsers_raise_only_bad_record(data):
    fmt, obj = data.draw(st.sampled_from(OBJECTS))
    obj = copy.deepcopy(obj)
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(_paths(obj)))
        obj = _mutate(obj, path, data.draw(st.sampled_from(["replace", "delete"])), data.draw(values))
    if isinstance(obj, dict):
        detect(obj)  # detection never raises
    for name in (fmt, data.draw(st.sampled_from(sorted(FORMATS)))):  # its own format, and a forced wrong one
        try:
            _parse_all(name, obj)
        except BadRecord:
            pass


def _ingest_bytes(data: bytes, suffix: str):
    with tempfile.TemporaryDirectory() as root:
        log = Path(root) / f"log{suffix}"
        log.write_bytes(data)
        stats = ingest([log], Path(root) / "records", Path(root) / "quarantine")
        assert stats.read == stats.accepted + stats.duplicates + stats.quarantined + stats.skipped
        again = ingest([log], Path(root) / "records", Path(root) / "quarantine")
        assert again.read == 0  # nothing changed: nothing read
        return stats


LINES = [json.dumps(obj).encode() for _, obj in OBJECTS if len(json.dumps(obj)) < 4000]
byte_lines = st.binary(max_size=80) | st.sampled_from(LINES) | st.sampled_from(LINES).flatmap(
    lambda line: st.integers(0, len(line)).map(lambda cut: line[:cut]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(byte_lines, max_size=8), newline=st.sampled_from([b"\n", b"\r\n"]), end=st.booleans())
def test_line_driver_survives_arbitrary_byte_lines(lines, newline, end):
    stats = _ingest_bytes(newline.join(lines) + (newline if end else b""), ".jsonl")
    assert stats.accepted <= len(lines) * 10


DOCUMENTS = [path.read_bytes() for path in sorted(FIXTURES.glob("*.json"))]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.sampled_from(DOCUMENTS), cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.binary(
    min_size=1, max_size=3)), max_size=3))
def test_document_reader_survives_damaged_documents(doc, cut, flips):
    data = bytearray(doc[: max(1, int(len(doc) * cut))])
    for where, junk in flips:
        at = int(len(data) * where)
        data[at:at + len(junk)] = junk
    _ingest_bytes(bytes(data), ".json")


shapes = st.lists(json_values, max_size=4) | json_values | st.fixed_dictionaries(
    {}, optional={"data": st.lists(json_values, max_size=4), "resourceSpans": st.lists(json_values, max_size=3),
                  "meta": json_values})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=shapes, indent=st.sampled_from([None, 1]))
def test_document_reader_survives_arbitrary_json_documents(doc, indent):
    _ingest_bytes(json.dumps(doc, indent=indent).encode() + b"\n", ".json")
