"""Reading log files: JSONL line by line, whole JSON documents as a stream of items.

Both readers yield `Item`s, one per JSON object (or per failure), in bounded
memory: a JSONL line is read with a size cap (a longer line is skipped in 1 MiB
steps, never held whole), and a document is parsed incrementally with ijson
(yajl), so only one item is ever built at a time. Readers never raise for bad
content; an I/O error (unreadable file, corrupt gzip stream) propagates.

A file is a document when its first non-blank line is not a JSON object on its
own (a pretty-printed or single-line JSON array / object) and its second is not
either; otherwise it is JSONL (a truncated first line then only loses that line).

In a document, the items are: each element of a top-level array; each element of
a top-level object's ``data`` / ``runs`` / ``traces`` / ``observations`` array (API
pages); each span of an OTLP ``resourceSpans`` tree, with its resource attributes
and scope (so a 100k-span export streams span by span; the resource must come
before its scope spans, as exporters write it); otherwise the whole object.
Several concatenated documents are read in turn. Locations are
``<file>:<line>`` for JSONL and ``<file>:$<json path>`` for documents.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import ijson
import orjson

from factory.ingest.common import MAX_DEPTH, BadRecord
from factory.ingest.otel import attributes

MAX_RECORD_BYTES = 1 << 20
CONTAINER_KEYS = frozenset({"data", "runs", "traces", "observations"})
OTLP_KEYS = frozenset({"resourceSpans", "resource_spans"})
EXCERPT_CHARS = 2000
_SKIP_CHUNK = 1 << 20


@dataclass(slots=True)
class Item:
    """One JSON object read from a file, or the reason it could not be read.

    `fmt` is set when the reader already split a document down to one unit of a
    known format (an OTLP span); `end` is the byte offset after a JSONL line, and
    `committed` is False for an unterminated last line that did not parse (it may
    still be being written, so the watermark stays before it).
    """

    location: str
    value: Any = None
    error: str | None = None
    line: int | None = None
    offset: int | None = None
    end: int | None = None
    fmt: str | None = None
    excerpt: str = ""
    committed: bool = True
    size: int = 0


class Line(NamedTuple):
    """One line of a JSONL file, framed but not parsed: what ingest sends to a worker."""

    number: int
    start: int
    end: int
    raw: bytes
    whole: bool  # False: over MAX_RECORD_BYTES, `raw` is its head


def open_log(path: Path) -> IO[bytes]:
    """The file's bytes, gunzipped when the name ends in .gz. Raises OSError."""
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb", buffering=1 << 20)


def _excerpt(raw: bytes) -> str:
    return raw[:EXCERPT_CHARS * 2].decode("utf-8", errors="replace")[:EXCERPT_CHARS]


def _json_error(body: bytes, err: orjson.JSONDecodeError) -> str:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"invalid UTF-8 at byte {bad.start}"
    return f"invalid JSON: {err.msg} at column {err.colno}"


def _loads_object(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return None


def sniff(f: IO[bytes]) -> str:
    """"jsonl" or "document" (see the module docstring); leaves `f` at its start."""
    lines = []
    while len(lines) < 2:
        raw = f.readline(MAX_RECORD_BYTES + 2)
        if not raw:
            break
        if raw.strip():
            lines.append(raw.strip())
    f.seek(0)
    if not lines:
        return "jsonl"
    first = _loads_object(lines[0])
    if isinstance(first, dict):
        return "jsonl"
    if isinstance(first, list):
        return "document"
    if first is not None or lines[0][:1] not in (b"[", b"{"):
        return "jsonl"
    return "jsonl" if len(lines) > 1 and isinstance(_loads_object(lines[1]), dict) else "document"


def frame_jsonl(f: IO[bytes], offset: int = 0, line: int = 0) -> Iterator[Line]:
    """The lines of `f`, which is positioned at byte `offset` after `line` lines, as `Line`s.

    A line over MAX_RECORD_BYTES is skipped in 1 MiB steps, never held whole: its `raw` is its
    first MAX_RECORD_BYTES + 2 bytes and `whole` is False."""
    readline = f.readline
    while True:
        raw = readline(MAX_RECORD_BYTES + 2)
        if not raw:
            return
        line += 1
        start, offset = offset, offset + len(raw)
        whole = True
        if len(raw) > MAX_RECORD_BYTES and len(raw.rstrip(b"\r\n")) > MAX_RECORD_BYTES:
            whole, terminated = False, raw[-1:] == b"\n"
            while not terminated and (chunk := readline(_SKIP_CHUNK)):
                offset += len(chunk)
                terminated = chunk[-1:] == b"\n"
        yield Line(line, start, offset, raw, whole)


def jsonl_items(lines: Iterable[Line], name: str) -> Iterator[Item]:
    """One Item per non-blank line."""
    for number, start, end, raw, whole in lines:
        if not whole:
            yield Item(f"{name}:{number}", error=f"line is over the {MAX_RECORD_BYTES} byte limit "
                       f"({end - start} bytes)", line=number, offset=start, end=end, excerpt=_excerpt(raw))
            continue
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as err:
            body = raw.strip()
            if not body:
                continue
            reason = _json_error(body, err)
            committed = raw[-1:] == b"\n" or not reason.startswith("invalid JSON")
            if not committed:
                reason = f"{reason} (incomplete last line: it is read again once the file grows)"
            yield Item(f"{name}:{number}", error=reason, line=number, offset=start, end=end,
                       excerpt=_excerpt(body), committed=committed)
            continue
        if not isinstance(value, dict):
            yield Item(f"{name}:{number}", error=f"expected one JSON object per line, got {type(value).__name__}",
                       line=number, offset=start, end=end, excerpt=_excerpt(raw))
            continue
        yield Item(f"{name}:{number}", value=value, line=number, offset=start, end=end, size=len(raw))


class _Rejected(Exception):
    """An item whose events were consumed but which was too large or too deep to build."""


def _build(first: tuple[str, str, Any], events: Iterator[tuple[str, str, Any]], budget: int) -> tuple[Any, int]:
    """(value, approximate size in bytes) of the value that starts with event `first`,
    consuming exactly its events.

    Raises _Rejected (after consuming them) when it is over `budget` bytes of keys
    and strings or nested deeper than MAX_DEPTH; the partial value is dropped as
    soon as that is known, so memory stays within the budget.
    """
    _, event, value = first
    if event not in ("start_map", "start_array"):
        return value, len(value) if isinstance(value, str) else 8
    builder: ijson.ObjectBuilder | None = ijson.ObjectBuilder()
    builder.event(event, value)
    depth, size, problem = 1, 0, None
    while depth:
        _, event, value = next(events)
        if event == "start_map" or event == "start_array":
            depth += 1
            if depth > MAX_DEPTH and problem is None:
                problem = f"nested deeper than {MAX_DEPTH} levels"
        elif event == "end_map" or event == "end_array":
            depth -= 1
        size += len(value) if isinstance(value, str) else 8
        if problem is None and size > budget:
            problem = f"item is over the {budget} byte limit"
        if problem is None:
            builder.event(event, value)
        else:
            builder = None
    if problem is not None:
        raise _Rejected(problem)
    return builder.value, size


def _array(events: Iterator[tuple[str, str, Any]], where: str) -> Iterator[tuple[str, Any, int, str | None]]:
    """(location, value, size, error) for each element of the array whose start_array was just read."""
    index = 0
    for first in events:
        if first[1] == "end_array":
            return
        location = f"{where}[{index}]"
        index += 1
        try:
            value, size = _build(first, events, MAX_RECORD_BYTES)
        except _Rejected as err:
            yield location, None, 0, str(err)
        else:
            yield location, value, size, None


def _map_keys(events: Iterator[tuple[str, str, Any]]) -> Iterator[tuple[str, tuple[str, str, Any]]]:
    """(key, first event of its value) for the map whose start_map was just read; the caller
    must consume each value (with _build, _array or _skip) before asking for the next key."""
    for _, event, key in events:
        if event == "end_map":
            return
        yield key, next(events)


def _skip(first: tuple[str, str, Any], events: Iterator[tuple[str, str, Any]]) -> None:
    if first[1] in ("start_map", "start_array"):
        depth = 1
        for _, event, _ in events:
            depth += event in ("start_map", "start_array")
            depth -= event in ("end_map", "end_array")
            if not depth:
                return


def _small(first: tuple[str, str, Any], events: Iterator[tuple[str, str, Any]]) -> Any:
    try:
        return _build(first, events, MAX_RECORD_BYTES)[0]
    except _Rejected:
        return None


def _otlp(events: Iterator[tuple[str, str, Any]], where: str) -> Iterator[Item]:
    """One Item per span of a resourceSpans array whose start_array was just read."""
    for i, first in enumerate(events):
        if first[1] == "end_array":
            return
        resource_where = f"{where}[{i}]"
        if first[1] != "start_map":
            _skip(first, events)
            yield Item(resource_where, error=f"{resource_where}: expected an object")
            continue
        resource: dict[str, Any] = {}
        for key, value_first in _map_keys(events):
            if key == "resource":
                raw = _small(value_first, events)
                try:
                    resource = attributes((raw or {}).get("attributes") if isinstance(raw, dict) else None,
                                          "resource.attributes")
                except BadRecord as err:
                    yield Item(f"{resource_where}.resource", error=str(err))
            elif key in ("scopeSpans", "scope_spans") and value_first[1] == "start_array":
                yield from _scope_spans(events, f"{resource_where}.{key}", resource)
            else:
                _skip(value_first, events)


def _scope_spans(events: Iterator[tuple[str, str, Any]], where: str, resource: dict[str, Any]) -> Iterator[Item]:
    for j, first in enumerate(events):
        if first[1] == "end_array":
            return
        if first[1] != "start_map":
            _skip(first, events)
            yield Item(f"{where}[{j}]", error=f"{where}[{j}]: expected an object")
            continue
        scope = ""
        for key, value_first in _map_keys(events):
            if key == "scope":
                raw = _small(value_first, events)
                scope = raw.get("name", "") if isinstance(raw, dict) else ""
            elif key == "spans" and value_first[1] == "start_array":
                for location, span, size, error in _array(events, f"{where}[{j}].spans"):
                    yield Item(location, value=None if error else {"resource": resource, "scope": scope, "span": span},
                               error=error, fmt="otel", size=size)
            else:
                _skip(value_first, events)


def read_document(f: IO[bytes], name: str) -> Iterator[Item]:
    """Items of one or more concatenated JSON documents; a syntax error ends the stream with one
    failed Item (the items before it are kept: past a syntax error a JSON document cannot be
    resynchronised)."""
    events = ijson.parse(f, multiple_values=True, use_float=True)
    where = f"{name}:$"
    try:
        for number, first in enumerate(events):
            where = f"{name}:${number or ''}"
            if first[1] == "start_array":
                for location, value, size, error in _array(events, where):
                    yield Item(location, value=value, error=error, size=size)
            elif first[1] == "start_map":
                yield from _document_map(events, where)
            else:
                yield Item(where, error=f"expected a JSON object or array, got {first[1]}")
    except (ijson.JSONError, UnicodeDecodeError) as err:
        yield Item(where, error=f"invalid JSON document: {str(err)[:300]}")


def _document_map(events: Iterator[tuple[str, str, Any]], where: str) -> Iterator[Item]:
    rest: dict[str, Any] = {}
    streamed = False
    budget = MAX_RECORD_BYTES
    for key, first in _map_keys(events):
        if key in CONTAINER_KEYS and first[1] == "start_array":
            streamed = True
            for location, value, size, error in _array(events, f"{where}.{key}"):
                yield Item(location, value=value, error=error, size=size)
        elif key in OTLP_KEYS and first[1] == "start_array":
            streamed = True
            yield from _otlp(events, f"{where}.{key}")
        elif budget > 0:
            try:
                rest[key], size = _build(first, events, budget)
                budget -= size
            except _Rejected as err:
                budget = 0
                rest, reason = {}, str(err)
                yield Item(where, error=f"document is over the {MAX_RECORD_BYTES} byte limit ({reason})")
        else:
            _skip(first, events)
    if not streamed and rest:
        yield Item(where, value=rest, size=MAX_RECORD_BYTES - budget)
