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

Parallel. This process (the driver) reads each JSONL file in pieces of whole lines
(`PIECE_BYTES`; reading and finding newlines only) and the engine (`factory.engine.map_each`:
this machine's cores by default, or Ray tasks) frames and parses them (`parse.parse_jsonl`);
the driver takes the results in file order, drops the duplicates, writes the partitions and
the watermarks. Pieces are cut the same way on every engine and parsing a piece depends on
nothing else, so every engine writes the same bytes. JSON documents and MLflow traces are
parsed in the driver (one streaming parser a source). Trade-off: the driver still reads every
byte and writes every record (~10 us a record, Parquet encoding the most of it), which caps
ingest at about 2x one core's rate however many workers parse.

Memory is bounded by a few pieces per worker, one row group (`ROW_GROUP` records or
`ROW_GROUP_BYTES`) and the set of stored ids (an int per record).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from factory.engine import engine_name, map_each
from factory.ingest.formats import FORMATS
from factory.ingest.parse import Parsed, fewer_gc_passes, parse_items, parse_jsonl
from factory.ingest.reader import MAX_RECORD_BYTES, Item, open_log, read_document, sniff
from factory.io import private_dir
from factory.progress import progress
from factory.records import SCHEMA, Record, from_table
from factory.resources import check_disk

ROW_GROUP = 5_000
ROW_GROUP_BYTES = 64 << 20
PIECE_BYTES = 4 << 20  # of log lines: the unit of work a worker parses (~2,000 calls)
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


class _Partition:
    """The records and rejects of one read of one source range, written atomically on close."""

    def __init__(self, records_dir: Path, quarantine_dir: Path, name: str, seen: set[int]):
        self.path = records_dir / f"{name}.parquet"
        self.quarantine = quarantine_dir / f"{name}.jsonl"
        self.tmp = records_dir / f".{name}.parquet.tmp"
        self.quarantine_tmp = quarantine_dir / f".{name}.jsonl.tmp"
        if self.path.exists():  # a re-read of the same range replaces it: forget its ids first
            ids = pq.read_table(self.path, columns=["id"]).column("id").to_pylist()
            seen.difference_update(int(i, 16) for i in ids)
        self.writer: pq.ParquetWriter | None = None
        self.rejects: IO[bytes] | None = None
        self.pending: list[pa.Table] = []
        self.pending_sizes: list[int] = []
        self.count = 0
        self.max_timestamp = ""

    def add(self, table: pa.Table, sizes: list[int]) -> None:
        """Append records (`sizes`: the bytes each came from); a row group is written once it
        reaches ROW_GROUP records or ROW_GROUP_BYTES, cut where a record-by-record count would."""
        self.count += table.num_rows
        self.max_timestamp = max(self.max_timestamp, pc.max(table["timestamp"]).as_py() or "")
        self.pending.append(table)
        self.pending_sizes += sizes
        while self.pending_sizes:
            full = np.cumsum(self.pending_sizes) >= ROW_GROUP_BYTES
            full[ROW_GROUP - 1:] = True
            if not full.any():
                return
            cut = int(full.argmax()) + 1
            pending = pa.concat_tables(self.pending)
            self._write(pending.slice(0, cut))
            self.pending, self.pending_sizes = [pending.slice(cut)], self.pending_sizes[cut:]

    def reject(self, rows: list[bytes]) -> None:
        if rows:
            if self.rejects is None:
                self.rejects = _private_file(self.quarantine_tmp)
            self.rejects.writelines(rows)

    def _write(self, table: pa.Table) -> None:
        if self.writer is None:
            _private_file(self.tmp).close()  # pyarrow truncates and writes it, keeping the mode
            self.writer = pq.ParquetWriter(self.tmp, SCHEMA)
        self.writer.write_table(table)

    def close(self) -> None:
        """Publish what was written (or remove a stale partition of the same range)."""
        if self.pending_sizes:
            self._write(pa.concat_tables(self.pending))
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

    def partition(self, name: str) -> _Partition:
        return _Partition(self.records_dir, self.quarantine_dir, name, self.seen)

    def save_mark(self, source: str, mark: dict[str, Any]) -> None:
        self.marks[source] = mark
        _write_json_atomic(self.watermarks, self.marks)

    def merge(self, part: _Partition, parsed: Parsed) -> None:
        """Count a parsed run of items and store its records not seen before, in order."""
        stats = self.stats
        stats.read += parsed.read
        stats.skipped += parsed.skipped
        stats.quarantined += len(parsed.rejects)
        stats.reasons.update(parsed.reasons)
        part.reject(parsed.rejects)
        table, sizes = parsed.records, parsed.sizes
        keep = []
        for row, value in enumerate(table.column("id").to_pylist()):
            key = int(value, 16)
            if key not in self.seen:
                self.seen.add(key)
                keep.append(row)
        stats.duplicates += table.num_rows - len(keep)
        if not keep:
            return
        if len(keep) < table.num_rows:
            table, sizes = table.take(pa.array(keep)), [sizes[row] for row in keep]
        stats.accepted += table.num_rows
        stats.formats.update(table.column("source").to_pylist())
        part.add(table, sizes)

    def merge_items(self, part: _Partition, items: Iterable[Item], source: str) -> None:
        """Parse and merge `items` here, PIECE_BYTES of them at a time (documents, MLflow traces)."""
        batch: list[Item] = []
        size = 0
        for item in items:
            batch.append(item)
            size += item.size
            if size >= PIECE_BYTES:
                self.merge(part, parse_items(batch, self.fmt, source))
                batch, size = [], 0
        self.merge(part, parse_items(batch, self.fmt, source))


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


@dataclass
class _File:
    """One log file to read this run: from where, how, and into which partition."""

    path: Path
    source: str  # the resolved path: the watermark's key
    name: str  # the path as given, in locations
    stat: os.stat_result | None  # None with `error`
    previous: dict[str, Any] | None
    start: int
    line: int
    generation: int
    before: int
    mode: str = "jsonl"
    error: OSError | None = None  # raised when ingest reaches this file


def _planned(run: _Run, path: Path) -> _File | None:
    """What to read of `path`, or None when it is unchanged (counted as skipped)."""
    source = os.fsencode(path.resolve()).decode("utf-8", "replace")
    name = os.fsencode(path).decode("utf-8", "replace")  # a non-UTF-8 file name must not poison the records
    run.stats.files += 1
    try:
        stat = path.stat()
        previous = run.marks.get(source)
        plan = _plan(path, stat, previous)
        if plan is None:
            run.stats.skipped_files += 1
            if previous is not None and previous["mtime_ns"] != stat.st_mtime_ns:
                run.save_mark(source, {**previous, "mtime_ns": stat.st_mtime_ns})
            return None
        file = _File(path, source, name, stat, previous, *plan)
        if file.start == 0:
            with open_log(path) as f:
                file.mode = sniff(f)
    except OSError as err:
        return _File(path, source, name, None, None, 0, 0, 0, 0, error=err)
    return file


class _Piece(NamedTuple):
    """JSONL lines of one file, unparsed: `data` starts at byte `offset` after `line` lines. With
    `end` set, `data` is the head of one line too long to be a record, which ends at byte `end`."""

    name: str
    data: bytes
    offset: int
    line: int
    end: int | None
    last: bool  # the file's last piece


def _pieces(files: Iterable[_File]) -> Iterator[_Piece]:
    """The JSONL files' new bytes in pieces of whole lines, about PIECE_BYTES each (a line too
    long to be a record is skipped here, past its head); at least one piece a file. Only reads
    and finds newlines (C speed): the framing and parsing are the workers'. Raises OSError as
    the file's reading does."""
    for file in files:
        if file.error is not None or file.mode != "jsonl":
            continue
        offset, line, carry = file.start, file.line, b""
        with _naming_errors(file.name), open_log(file.path) as f:
            if file.start:
                f.seek(file.start)
            while chunk := f.read(PIECE_BYTES):
                data = carry + chunk
                if cut := data.rfind(b"\n") + 1:
                    yield _Piece(file.name, data[:cut], offset, line, None, False)
                    offset, line, carry = offset + cut, line + data.count(b"\n", 0, cut), data[cut:]
                elif len(data) > MAX_RECORD_BYTES + 2:
                    end, carry = offset + len(data), b""
                    while chunk := f.read(PIECE_BYTES):
                        if (newline := chunk.find(b"\n")) >= 0:
                            end, carry = end + newline + 1, chunk[newline + 1:]
                            break
                        end += len(chunk)
                    yield _Piece(file.name, data[:MAX_RECORD_BYTES + 2], offset, line, end, False)
                    offset, line = end, line + 1
                else:
                    carry = data
        yield _Piece(file.name, carry, offset, line, None, True)


@contextmanager
def _naming_errors(name: str) -> Iterator[None]:
    """Reading errors as OSError naming the file (a truncated gzip stream raises EOFError, a
    corrupt one "CRC check failed")."""
    try:
        yield
    except (OSError, EOFError) as err:
        raise OSError(f"{name}: cannot be read: {err}") from err


def _parse_piece(fmt: str | None, piece: _Piece) -> tuple[bool, Parsed]:
    return piece.last, parse_jsonl(fmt, piece.name, piece.data, piece.offset, piece.line, piece.end)


def _ingest_file(run: _Run, file: _File, pieces: Iterator[tuple[bool, Parsed]]) -> None:
    """Store one file's new records: its JSONL pieces as `pieces` yields them parsed, or its
    document parsed here; then its watermark."""
    if file.error is not None:
        raise file.error
    key = hashlib.sha256(file.source.encode()).hexdigest()[:16]
    part = run.partition(f"{key}-g{file.generation}-{file.start:015d}")
    offset, line, tail = file.start, file.line, False
    try:
        if file.mode == "jsonl":
            last = False
            while not last:
                last, parsed = next(pieces)
                run.merge(part, parsed)
                tail = tail or parsed.tail
                if parsed.end is not None:
                    offset, line = parsed.end
        else:
            with _naming_errors(file.name), open_log(file.path) as f:
                run.merge_items(part, read_document(f, file.name), file.name)
    except BaseException:
        part.abort()
        raise
    part.close()
    path, stat, previous = file.path, file.stat, file.previous
    size = offset if file.mode == "jsonl" and not path.name.endswith(".gz") else stat.st_size
    kept = previous.get("max_timestamp", "") if previous is not None and previous["generation"] == file.generation else ""
    run.save_mark(file.source, {
        "kind": "file", "mode": file.mode, "generation": file.generation, "offset": offset, "line": line,
        "size": size, "prefix_sha256": _prefix_digest(path, size),
        "file_size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "tail": tail,
        "partition_start": file.start, "partition_line": file.line, "records_before": file.before,
        "records": file.before + part.count, "max_timestamp": max(part.max_timestamp, kept),
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


def ingest(paths: Iterable[Path], records_dir: Path, quarantine_dir: Path, fmt: str | None = None,
           watermarks: Path | None = None, engine: str | None = None, workers: int | None = None) -> IngestStats:
    """Ingest log files (or folders of them) into `records_dir`; rejects go to `quarantine_dir`.

    This process reads the files and keeps the store (duplicates, partitions, watermarks, in
    file order); the parsing of JSONL pieces is mapped by `engine` (`factory.engine.map_each`:
    this machine's cores, or Ray tasks; `workers`: the local engine's processes, default
    `local_workers()`), so every engine writes the same files. JSON documents are parsed here
    (one streaming parser a file).

    Raises FileNotFoundError for a missing input path, KeyError for an unknown
    `fmt`, and OSError when a file cannot be read (a corrupt gzip stream
    included); sources finished before the error keep their partitions and marks.
    Before anything is written, `resources.ResourceError` (a FactoryError) when the disk
    has no room for the bytes not ingested yet (`_unread_bytes`), or for an invalid
    `FACTORY_MIN_FREE_MB`; FactoryError for an unknown engine. A progress bar counts the
    files on stderr when it is a terminal (`factory.progress`).
    """
    engine = engine_name(engine)
    unique: dict[Path, Path] = {}
    for path in find_log_files(paths):
        unique.setdefault(path.resolve(), path)  # a file named twice is read once
    files = list(unique.values())
    check_disk(records_dir, _unread_bytes(files, watermarks or records_dir.parent / "watermarks.json"))
    run = _Run(records_dir, quarantine_dir, watermarks, fmt)
    todo = [file for path in files if (file := _planned(run, path)) is not None]
    with closing(map_each(partial(_parse_piece, fmt), _pieces(todo), engine, workers)) as pieces, fewer_gc_passes():
        for file in progress(todo, len(todo), "ingest", "file"):
            _ingest_file(run, file, pieces)
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
    part = run.partition(f"{key}-t{since or 0:015d}")
    newest = since or 0

    def items() -> Iterator[Item]:
        nonlocal newest
        for trace_id, trace, request_ms in read_tracking(uri, since):
            newest = max(newest, request_ms)
            size = len(orjson.dumps(trace, default=str, option=orjson.OPT_NON_STR_KEYS))  # bounds the row group
            yield Item(f"{source}#{trace_id}", value=trace, size=size)

    try:
        with fewer_gc_passes():
            run.merge_items(part, items(), source)
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
