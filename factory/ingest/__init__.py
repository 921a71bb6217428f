"""Ingest: agent logs in, canonical records (Parquet partitions) and a quarantine out.

Sources are log files (plain or .gz; JSONL or whole JSON documents, see
`reader`) in any of the formats of `formats.FORMATS`, detected per object unless
`fmt` forces one, and MLflow tracking servers (`ingest_mlflow`). Every unit that
is not an LLM invocation (a chain run, a tool span) is counted as skipped; every
one that should be but cannot become a record (bad JSON, invalid UTF-8, a wrong
type, an unknown role, over `MAX_RECORD_BYTES`) goes to the quarantine with its
file, line / byte offset / JSON path, and reason; the good ones around it are kept.
Exact duplicates (the content id of a record already stored or seen in this run)
are counted, not stored.

Incremental. Each read of a source range writes one partition
``<source key>-g<generation>-<start offset>.parquet`` (and a quarantine file of
the same name), and `watermarks.json` (beside the records folder) keeps per
source: the file's size and mtime when last seen, the SHA-256 of the bytes already
consumed, the byte offset and line number reached, the generation and the newest
record timestamp. A file whose size and mtime did not change is skipped without
being read; one that grew with its consumed bytes unchanged (an appended log) is
read from the offset reached, so only the new lines are parsed; one whose
consumed bytes changed (rewritten, rotated) starts a new generation read from the
start (its records already stored count as duplicates). Whole documents and gzip
files that grew are read again from the start. An unterminated last line that
does not parse is quarantined but not consumed, so a line being written is read
again once complete. Rewriting a partition first forgets its ids, so re-running
after a crash between the partition and the watermark write is idempotent.

Private: the records and the quarantine hold the logs' prompts verbatim, so both folders
are made 0700 and every partition and quarantine file is created 0600 (`_private_file`).

Memory is bounded by one row group (`ROW_GROUP` records or `ROW_GROUP_BYTES`), one
item and the set of stored ids (an int per record).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import reprlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
import pyarrow.parquet as pq

from factory.ingest.common import BadRecord
from factory.ingest.formats import FORMATS, detect
from factory.ingest.reader import CONTAINER_KEYS, MAX_RECORD_BYTES, Item, open_log, read_document, read_jsonl, sniff
from factory.io import private_dir
from factory.progress import progress
from factory.records import SCHEMA, Record, from_table, to_table
from factory.resources import check_disk

_REPR = reprlib.Repr()  # excerpts of values orjson cannot write: bounded depth and size
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxdict, _REPR.maxlist = 8, 2000, 200, 50, 50
ROW_GROUP = 5_000
ROW_GROUP_BYTES = 64 << 20
LOG_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
__all__ = ["FORMATS", "MAX_RECORD_BYTES", "IngestStats", "find_log_files", "ingest", "ingest_mlflow", "iter_records",
           "read_records", "stored_ids"]


@dataclass
class IngestStats:
    """What one ingest run did. `read` counts units (lines, items, spans): each one is
    accepted, a duplicate, quarantined, or skipped (not an LLM invocation)."""

    files: int = 0
    skipped_files: int = 0
    read: int = 0
    accepted: int = 0
    quarantined: int = 0
    duplicates: int = 0
    skipped: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    formats: Counter[str] = field(default_factory=Counter)


def find_log_files(paths: Iterable[Path]) -> list[Path]:
    """Expand folders into their log files (sorted); a missing path raises FileNotFoundError."""
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(LOG_SUFFIXES))
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such log file or directory: {path}")
    return files


def stored_ids(records_dir: Path) -> set[int]:
    """Content ids of every stored record, as ints (a third of the memory of the hex strings)."""
    ids: set[int] = set()
    for part in sorted(records_dir.glob("*.parquet")):
        ids.update(int(i, 16) for i in pq.read_table(part, columns=["id"]).column("id").to_pylist())
    return ids


def iter_records(records_dir: Path) -> Iterator[Record]:
    """Every record of a Parquet folder, partition by partition, one row group in memory at a time."""
    for part in sorted(records_dir.glob("*.parquet")):
        parquet = pq.ParquetFile(part)
        for group in range(parquet.num_row_groups):
            yield from from_table(parquet.read_row_group(group))


def read_records(records_dir: Path) -> list[Record]:
    """All records of a Parquet folder, in partition order."""
    return list(iter_records(records_dir))


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False))
    os.replace(tmp, path)


def _private_file(path: Path) -> IO[bytes]:
    """`path` truncated and opened for writing, readable by its owner alone (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a leftover of an interrupted run would keep its old mode
    return os.fdopen(fd, "wb")


def _short_reason(error: str) -> str:
    """A count key for a reason: the part before its first colon (the field, or the kind of
    failure), with list indices and other numbers dropped."""
    head = re.sub(r"\[\d+\]", "[]", error.split(":", 1)[0])
    return re.sub(r"\s*\(.*", "", re.sub(r"(?<![\w-])\d+(?![\w-])", "N", head))[:80]


class _Partition:
    """The records and rejects of one read of one source range, written atomically on close."""

    def __init__(self, records_dir: Path, quarantine_dir: Path, name: str, seen: set[int], source: str,
                 unstorable: Callable[[Record, str], None]):
        self.path = records_dir / f"{name}.parquet"
        self.quarantine = quarantine_dir / f"{name}.jsonl"
        self.tmp = records_dir / f".{name}.parquet.tmp"
        self.quarantine_tmp = quarantine_dir / f".{name}.jsonl.tmp"
        self.source, self.unstorable = source, unstorable
        if self.path.exists():  # a re-read of the same range replaces it: forget its ids first
            ids = pq.read_table(self.path, columns=["id"]).column("id").to_pylist()
            seen.difference_update(int(i, 16) for i in ids)
        self.writer: pq.ParquetWriter | None = None
        self.rejects: IO[bytes] | None = None
        self.batch: list[Record] = []
        self.batch_bytes = 0
        self.count = 0
        self.max_timestamp = ""

    def add(self, record: Record, size: int) -> None:
        self.batch.append(record)
        self.batch_bytes += size
        self.count += 1
        if record.timestamp > self.max_timestamp:
            self.max_timestamp = record.timestamp
        if len(self.batch) >= ROW_GROUP or self.batch_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def reject(self, item: Item | None, reason: str, location: str | None = None, value: Any = None) -> None:
        """Quarantine one unit: where it was (file, line, byte offset, location), why, and an excerpt."""
        if self.rejects is None:
            self.rejects = _private_file(self.quarantine_tmp)
        excerpt = item.excerpt if item is not None else ""
        if not excerpt and value is not None:
            try:
                dumped = orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)
                excerpt = dumped[:4000].decode("utf-8", "ignore")
            except TypeError:  # nested past orjson's limit, or a lone surrogate: a bounded repr
                excerpt = _REPR.repr(value)
        row = {"location": location or (item.location if item else ""), "file": self.source,
               "line": item.line if item else None, "offset": item.offset if item else None,
               "reason": reason, "excerpt": excerpt[:2000].encode("utf-8", "replace").decode()}
        self.rejects.write(orjson.dumps(row) + b"\n")

    def _flush(self) -> None:
        if self.batch:
            if self.writer is None:
                _private_file(self.tmp).close()  # pyarrow truncates and writes it, keeping the mode
                self.writer = pq.ParquetWriter(self.tmp, SCHEMA)
            try:
                table = to_table(self.batch)
            except (ValueError, TypeError, RecursionError):  # checked per record only when a batch fails
                table = to_table([r for r in self.batch if self._storable(r)])
            self.writer.write_table(table)
            self.batch, self.batch_bytes = [], 0

    def _storable(self, record: Record) -> bool:
        """Whether `record` converts to a Parquet row; if not, quarantine it and undo its acceptance.

        A lone surrogate (json.loads and ijson decode "\\ud800" to one) cannot be stored
        as UTF-8; checking this here, on the rare failing batch, keeps the check off
        the per-record path."""
        try:
            to_table([record])
            return True
        except (ValueError, TypeError, RecursionError) as err:
            self.count -= 1
            self.unstorable(record, f"record: cannot be stored ({err})")
            return False

    def close(self) -> None:
        """Publish what was written (or remove a stale partition of the same range)."""
        self._flush()
        outputs = ((self.writer, self.tmp, self.path), (self.rejects, self.quarantine_tmp, self.quarantine))
        for writer, tmp, final in outputs:
            if writer is not None:
                writer.close()
                os.replace(tmp, final)
            elif final.exists():
                final.unlink()

    def abort(self) -> None:
        for writer, tmp in ((self.writer, self.tmp), (self.rejects, self.quarantine_tmp)):
            if writer is not None:
                writer.close()
                tmp.unlink(missing_ok=True)


class _Run:
    """State shared by the sources of one ingest: the store, the ids seen, the stats."""

    def __init__(self, records_dir: Path, quarantine_dir: Path, watermarks: Path | None, fmt: str | None):
        if fmt is not None and fmt not in FORMATS:
            raise KeyError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
        private_dir(records_dir)
        private_dir(quarantine_dir)
        self.records_dir, self.quarantine_dir, self.fmt = records_dir, quarantine_dir, fmt
        self.watermarks = watermarks or records_dir.parent / "watermarks.json"
        self.marks: dict[str, dict[str, Any]] = (
            json.loads(self.watermarks.read_text()) if self.watermarks.exists() else {})
        self.seen = stored_ids(records_dir)
        self.stats = IngestStats()
        self.last_kind: str | None = None

    def partition(self, source: str, name: str) -> _Partition:
        part = _Partition(self.records_dir, self.quarantine_dir, name, self.seen, source,
                          lambda record, reason: self._unstorable(part, record, reason))
        return part

    def _unstorable(self, part: _Partition, record: Record, reason: str) -> None:
        self.seen.discard(int(record.id, 16))
        self.stats.accepted -= 1
        self.stats.formats[record.source] -= 1
        self.stats.read -= 1  # _reject counts it again
        self._reject(part, None, reason, record.location)

    def save_mark(self, source: str, mark: dict[str, Any]) -> None:
        self.marks[source] = mark
        _write_json_atomic(self.watermarks, self.marks)

    def consume(self, items: Iterable[Item], part: _Partition) -> Iterator[Item]:
        """Turn items into records, duplicates, skips and rejects; yields each item once handled."""
        for item in items:
            if item.error is not None:
                self._reject(part, item, item.error)
            elif item.fmt is not None:
                self._unit(part, item, item.fmt, item.value, item.location)
            elif not isinstance(item.value, dict):  # a document's array may hold anything
                self._reject(part, item, f"expected a JSON object, got {type(item.value).__name__}", value=item.value)
            else:
                self._object(part, item, item.value, item.location)
            yield item

    def _object(self, part: _Partition, item: Item, value: dict[str, Any], location: str,
                expand: bool = True) -> None:
        kind = self.fmt
        if kind is None:
            # a file is usually one format: try the last one seen before all of them
            last = self.last_kind
            kind = last if last is not None and FORMATS[last].detect(value) == last else detect(value)
            self.last_kind = kind
        if kind is None:
            containers = [k for k in CONTAINER_KEYS if isinstance(value.get(k), list)] if expand else []
            if not containers:
                self._reject(part, item, "unrecognised log shape: not a logged OpenAI call, fine-tuning example, "
                             "OTLP export, MLflow trace, Langfuse observation or LangSmith run", value=value)
            for key in containers:
                for i, element in enumerate(value[key]):
                    where = f"{location}:{key}[{i}]"
                    if isinstance(element, dict):
                        self._object(part, item, element, where, expand=False)  # one page level, no deeper
                    else:
                        self._reject(part, item, f"{key}[{i}]: expected an object", where, element)
            return
        split = FORMATS[kind].units
        if split is None:
            self._unit(part, item, kind, value, location)
            return
        units = split(value)
        while True:
            try:
                sub, unit = next(units)
            except StopIteration:
                return
            except BadRecord as err:
                self._reject(part, item, str(err), location, value)
                return
            self._unit(part, item, kind, unit, f"{location}:{sub}" if sub else location)

    def _unit(self, part: _Partition, item: Item, kind: str, unit: Any, location: str) -> None:
        try:
            record = FORMATS[kind].parse(unit, location)
        except BadRecord as err:
            self._reject(part, item, str(err), location, unit)
            return
        stats = self.stats
        stats.read += 1
        if record is None:
            stats.skipped += 1
            return
        key = int(record.id, 16)
        if key in self.seen:
            stats.duplicates += 1
            return
        self.seen.add(key)
        stats.accepted += 1
        stats.formats[kind] += 1
        part.add(record, item.size)

    def _reject(self, part: _Partition, item: Item | None, reason: str, location: str | None = None,
                value: Any = None) -> None:
        self.stats.read += 1
        self.stats.quarantined += 1
        self.stats.reasons[_short_reason(reason)] += 1
        part.reject(item, reason, location, value)


def _prefix_digest(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = size
        while remaining > 0 and (chunk := f.read(min(remaining, 1 << 20))):
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def _plan(path: Path, stat: os.stat_result, mark: dict[str, Any] | None) -> tuple[int, int, int, int] | None:
    """(start offset, start line, generation, records stored before the start) to read `path`
    from, or None when nothing changed.

    A log that grew is read from where the last read stopped, or, when that read
    left an unterminated last line unconsumed, from the start of its partition
    again (which is then replaced, so the quarantine no longer lists the line)."""
    if mark is None:
        return 0, 0, 0, 0
    if stat.st_size == mark["file_size"] and stat.st_mtime_ns == mark["mtime_ns"]:
        return None
    if stat.st_size >= mark["size"] and _prefix_digest(path, mark["size"]) == mark["prefix_sha256"]:
        if stat.st_size == mark["file_size"]:
            return None  # touched, not changed
        if mark["mode"] != "jsonl":
            return 0, 0, mark["generation"], 0
        if mark["tail"]:
            return mark["partition_start"], mark["partition_line"], mark["generation"], mark["records_before"]
        return mark["offset"], mark["line"], mark["generation"], mark["records"]
    return 0, 0, mark["generation"] + 1, 0


def _ingest_file(run: _Run, path: Path) -> None:
    source = os.fsencode(path.resolve()).decode("utf-8", "replace")
    stat = path.stat()
    previous = run.marks.get(source)
    plan = _plan(path, stat, previous)
    run.stats.files += 1
    if plan is None:
        run.stats.skipped_files += 1
        if previous is not None and previous["mtime_ns"] != stat.st_mtime_ns:
            run.save_mark(source, {**previous, "mtime_ns": stat.st_mtime_ns})
        return
    start, first_line, generation, before = plan
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    name = os.fsencode(path).decode("utf-8", "replace")  # a non-UTF-8 file name must not poison the records
    part = run.partition(name, f"{key}-g{generation}-{start:015d}")
    offset, line, tail = start, first_line, False
    try:
        with open_log(path) as f:
            mode = sniff(f) if start == 0 else "jsonl"
            if start:
                f.seek(start)
            items = read_jsonl(f, name, start, line) if mode == "jsonl" else read_document(f, name)
            for item in run.consume(items, part):
                if not item.committed:
                    tail = True
                elif item.end is not None:
                    offset, line = item.end, item.line
    except BaseException:
        part.abort()
        raise
    part.close()
    size = offset if mode == "jsonl" and not path.name.endswith(".gz") else stat.st_size
    kept = previous.get("max_timestamp", "") if previous is not None and previous["generation"] == generation else ""
    run.save_mark(source, {
        "kind": "file", "mode": mode, "generation": generation, "offset": offset, "line": line,
        "size": size, "prefix_sha256": _prefix_digest(path, size),
        "file_size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "tail": tail,
        "partition_start": start, "partition_line": first_line, "records_before": before,
        "records": before + part.count, "max_timestamp": max(part.max_timestamp, kept),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


def _unread_bytes(files: list[Path], watermarks: Path) -> int:
    """Bytes of `files` past their watermark (all of a file never read): what a run may store."""
    try:
        marks = json.loads(watermarks.read_text()) if watermarks.exists() else {}
    except (OSError, ValueError):
        marks = {}
    total = 0
    for path in files:
        mark = marks.get(os.fsencode(path.resolve()).decode("utf-8", "replace")) or {}
        total += max(path.stat().st_size - int(mark.get("size") or 0), 0)
    return total


@contextmanager
def _fewer_gc_passes() -> Iterator[None]:
    """Run the cyclic garbage collector less often (restored after).

    Parsing allocates millions of short-lived containers, which trigger a
    collection every 700 allocations by default; those passes cost ~15% of ingest
    time and find nothing, as parsed records hold no reference cycles.
    """
    thresholds = gc.get_threshold()
    gc.set_threshold(100_000, 50, 1000)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


def ingest(paths: Iterable[Path], records_dir: Path, quarantine_dir: Path, fmt: str | None = None,
           watermarks: Path | None = None) -> IngestStats:
    """Ingest log files (or folders of them) into `records_dir`; rejects go to `quarantine_dir`.

    Raises FileNotFoundError for a missing input path, KeyError for an unknown
    `fmt`, and OSError when a file cannot be read (a corrupt gzip stream
    included); sources finished before the error keep their partitions and marks.
    Before anything is written, `resources.ResourceError` (a FactoryError) when the disk
    has no room for the bytes not ingested yet (`_unread_bytes`), or for an invalid
    `FACTORY_MIN_FREE_MB`. A progress bar counts the files on stderr when it is a
    terminal (`factory.progress`).
    """
    files = find_log_files(paths)
    check_disk(records_dir, _unread_bytes(files, watermarks or records_dir.parent / "watermarks.json"))
    run = _Run(records_dir, quarantine_dir, watermarks, fmt)
    with _fewer_gc_passes():
        for path in progress(files, len(files), "ingest", "file"):
            _ingest_file(run, path)
    return run.stats


def ingest_mlflow(uri: str, records_dir: Path, quarantine_dir: Path, watermarks: Path | None = None) -> IngestStats:
    """Ingest the traces of every experiment of an MLflow tracking server (or store URI).

    The watermark is the newest trace request time read; the next run reads from
    it (inclusive; repeats are counted as duplicates). Raises KeyError never (the
    format is fixed) and mlflow's MlflowException when the server cannot be read.
    """
    from factory.ingest.mlflow_traces import read_tracking

    run = _Run(records_dir, quarantine_dir, watermarks, "mlflow")
    source = f"mlflow:{uri}"
    previous = run.marks.get(source) or {}
    since = previous.get("max_request_ms")
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    part = run.partition(source, f"{key}-t{since or 0:015d}")
    newest = since or 0

    def items() -> Iterator[Item]:
        nonlocal newest
        for trace_id, trace, request_ms in read_tracking(uri, since):
            newest = max(newest, request_ms)
            size = len(orjson.dumps(trace, default=str, option=orjson.OPT_NON_STR_KEYS))  # bounds the row group
            yield Item(f"{source}#{trace_id}", value=trace, size=size)

    try:
        with _fewer_gc_passes():
            for _ in run.consume(items(), part):
                pass
    except BaseException:
        part.abort()
        raise
    part.close()
    run.stats.files += 1
    run.save_mark(source, {
        "kind": "mlflow", "max_request_ms": newest,
        "max_timestamp": max(part.max_timestamp, previous.get("max_timestamp", "")),
        "records": previous.get("records", 0) + part.count,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return run.stats
