"""Ingest: agent-log files in, canonical records (Parquet) and a quarantine out.

Each input file becomes one Parquet partition named after the hash of the file's
bytes, so re-ingesting a file adds nothing and new files append. Lines are read
one at a time and written in row groups, so memory stays flat however large the
file. A line that cannot become a record (bad JSON, invalid UTF-8, a wrong type,
an unknown role, over `MAX_LINE_BYTES`) goes to the quarantine with its file,
line number and reason; the good lines around it are kept. Exact duplicates (same
content id as a record already stored or seen in this run) are counted, not stored.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow.parquet as pq

from factory.ingest.openai import PARSERS, BadRecord, detect
from factory.records import SCHEMA, Record, from_table, to_table

MAX_LINE_BYTES = 1 << 20
ROW_GROUP = 5_000
LOG_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


@dataclass
class IngestStats:
    files: int = 0
    skipped_files: int = 0
    read: int = 0
    accepted: int = 0
    quarantined: int = 0
    duplicates: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def find_log_files(paths: list[Path]) -> list[Path]:
    """Expand directories into their log files (sorted); a missing path raises FileNotFoundError."""
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(LOG_SUFFIXES))
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such log file or directory: {path}")
    return files


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:24]


def _lines(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (line number, decoded JSON or None, error reason or None) for each non-blank line."""
    with _open(path) as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if len(raw) > MAX_LINE_BYTES:
                yield number, None, f"line is {len(raw)} bytes, over the {MAX_LINE_BYTES} byte limit"
                continue
            try:
                yield number, json.loads(raw.decode("utf-8")), None
            except UnicodeDecodeError as err:
                yield number, None, f"invalid UTF-8 at byte {err.start}"
            except json.JSONDecodeError as err:
                yield number, None, f"invalid JSON: {err.msg} at column {err.colno}"


def parse_file(path: Path, fmt: str | None = None) -> Iterator[tuple[str, Record | None, str | None, str]]:
    """Yield (location, record, error, raw line excerpt) for every line of one log file.

    The format is detected per line unless `fmt` forces one, so a file that mixes
    proxy calls and fine-tuning examples is read whole.
    """
    for number, obj, error in _lines(path):
        location = f"{path}:{number}"
        if error is None:
            kind = fmt or detect(obj)
            if kind is None:
                error = "unrecognised log shape: expected request/response or messages"
            else:
                try:
                    yield location, PARSERS[kind](obj, location), None, ""
                    continue
                except BadRecord as err:
                    error = str(err)
        yield location, None, error, "" if obj is None else json.dumps(obj, ensure_ascii=False)[:2000]


def stored_ids(records_dir: Path) -> set[str]:
    ids: set[str] = set()
    for part in sorted(records_dir.glob("*.parquet")):
        ids.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
    return ids


def read_records(records_dir: Path) -> list[Record]:
    """All records of a Parquet folder, in partition order."""
    return [r for part in sorted(records_dir.glob("*.parquet")) for r in from_table(pq.read_table(part))]


def _write_quarantine(path: Path, rows: list[dict[str, str]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    os.replace(tmp, path)


def ingest(paths: list[Path], records_dir: Path, quarantine_dir: Path, fmt: str | None = None) -> IngestStats:
    """Ingest log files into `records_dir`; rejected lines go to `quarantine_dir`.

    Raises FileNotFoundError for a missing input path and KeyError for an unknown `fmt`.
    """
    if fmt is not None and fmt not in PARSERS:
        raise KeyError(f"unknown format {fmt!r}; known: {', '.join(PARSERS)}")
    records_dir.mkdir(parents=True, exist_ok=True)
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    stats = IngestStats()
    seen = stored_ids(records_dir)
    for path in find_log_files(paths):
        digest = file_digest(path)
        part = records_dir / f"{digest}.parquet"
        stats.files += 1
        if part.exists():
            stats.skipped_files += 1
            continue
        tmp = part.with_suffix(".tmp")
        batch: list[Record] = []
        bad: list[dict[str, str]] = []
        with pq.ParquetWriter(tmp, SCHEMA) as writer:
            for location, record, error, excerpt in parse_file(path, fmt):
                stats.read += 1
                if record is None:
                    stats.quarantined += 1
                    reason = error.split(":")[0] if error else "unknown"
                    stats.reasons[reason] = stats.reasons.get(reason, 0) + 1
                    bad.append({"location": location, "reason": error or "", "line": excerpt})
                elif record.id in seen:
                    stats.duplicates += 1
                else:
                    seen.add(record.id)
                    stats.accepted += 1
                    batch.append(record)
                    if len(batch) >= ROW_GROUP:
                        writer.write_table(to_table(batch))
                        batch = []
            if batch:
                writer.write_table(to_table(batch))
        _write_quarantine(quarantine_dir / f"{digest}.jsonl", bad)
        os.replace(tmp, part)
    return stats
