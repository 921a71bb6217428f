"""The serving log: every request in the proxy-call shape `factory ingest` reads.

One JSON object per line:

    {"id", "timestamp", "latency_ms",
     "metadata": {"agent", "step", "session_id", "route", "task", "confidence", "reason", "match",
                  ["specialist_answer"]},
     "request": <the request body as received>, "response": <the body returned, or {"error": ...}>}

`route` is "specialist", "upstream" or "unavailable" (an escalation with no upstream to go
to); escalated calls carry the teacher's answer and so become the next round's training
examples. An escalated call whose specialist did answer (below the threshold) also carries that
answer, `specialist_answer` ({"content", "tool_calls"}): with the teacher's answer it makes a
preference pair (factory.relabel.preference_pairs). Specialist-served calls carry the
specialist's own answer: a later stage must not train on them as teacher labels (they are
marked by `metadata.route`, which ingest keeps in the record's metadata).

Nothing from the HTTP headers is written (no Authorization header, no upstream key). The
prompts are written as the agents sent them, so the folder is made 0700 and every segment
is created 0600 (`factory.io`): only the server's user can read them.

Files are segments: lines are appended and flushed to `serve-<time>-<pid>-<n>.jsonl.open`,
a name ingest does not read, and the segment is renamed to `.jsonl` (atomic) when it
reaches `max_records`, is older than `max_seconds` at a write, or the log is closed. So
ingest never sees a half-written line, at the price of a closed segment appearing only
after rotation. A segment left `.open` by a crash is finalised (complete lines kept) when
the next log opens the folder.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from factory.io import private_dir, write_atomic

OPEN_SUFFIX = ".open"


def log_entry(call_id: str, request: dict[str, Any], response: dict[str, Any], *, agent: str, step: str,
              session_id: str, route: str, task: str | None, confidence: float | None, reason: str,
              match: str, latency_ms: float, specialist_answer: dict[str, Any] | None = None) -> dict[str, Any]:
    metadata = {"agent": agent, "step": step, "session_id": session_id, "route": route, "task": task,
                "confidence": confidence, "reason": reason, "match": match}
    if specialist_answer is not None and route != "specialist":
        metadata["specialist_answer"] = specialist_answer
    return {
        "id": call_id,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "metadata": metadata,
        "request": request,
        "response": response,
        "latency_ms": round(latency_ms, 2),
    }


def _finalise(path: Path) -> None:
    """Rename an `.open` segment to its log name, dropping a trailing incomplete line."""
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    final = path.with_name(path.name.removesuffix(OPEN_SUFFIX))
    if complete:
        write_atomic(final, complete, private=True)
    path.unlink()


class RequestLog:
    """Thread-safe JSONL segment writer; see the module docstring."""

    def __init__(self, log_dir: Path, max_records: int = 1000, max_seconds: float = 300.0):
        self.log_dir = log_dir
        self.max_records = max_records
        self.max_seconds = max_seconds
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._path: Path | None = None
        self._count = 0
        self._opened = 0.0
        self._segments = 0
        private_dir(log_dir)
        for leftover in sorted(log_dir.glob(f"*.jsonl{OPEN_SUFFIX}")):
            _finalise(leftover)

    def write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            if self._file is None:
                self._segments += 1
                stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
                self._path = self.log_dir / f"serve-{stamp}-{os.getpid()}-{self._segments}.jsonl{OPEN_SUFFIX}"
                fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                self._file = os.fdopen(fd, "a", encoding="utf-8")
                self._count, self._opened = 0, time.monotonic()
            self._file.write(line)
            self._file.flush()
            self._count += 1
            if self._count >= self.max_records or time.monotonic() - self._opened >= self.max_seconds:
                self._rotate()

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
            _finalise(self._path)
            self._file, self._path = None, None

    def close(self) -> None:
        """Close the current segment so ingest can read it."""
        with self._lock:
            self._rotate()
