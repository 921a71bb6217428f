"""The per-record work of ingest: items read from a log in, records, quarantine rows and counts out.

`parse_items` runs wherever the engine puts it (this process, a pool worker, a Ray task) and
touches no file: which records are duplicates, the partitions and the watermarks are the
driver's (`factory.ingest`). Its results depend only on its items, so the same items parse to
the same rows on every engine. Formats are detected per JSON object (`formats.detect`), trying
the last format seen in the same call first (a file is usually one format).
"""

from __future__ import annotations

import gc
import io
import re
import reprlib
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa

from factory.ingest.common import BadRecord
from factory.ingest.formats import FORMATS, detect
from factory.ingest.reader import CONTAINER_KEYS, Item, Line, frame_jsonl, jsonl_items
from factory.records import Record, to_table

_REPR = reprlib.Repr()  # excerpts of values orjson cannot write: bounded depth and size
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxdict, _REPR.maxlist = 8, 2000, 200, 50, 50


@dataclass
class Parsed:
    """What a run of items parsed to, in their order.

    `records` holds every storable record, duplicates included (the driver knows what is
    stored); `sizes` the bytes of the item each came from (bounds a row group); `rejects` the
    quarantine rows as JSON lines; `read` counts units (records, skips and rejects); `end` is
    (byte offset, line) after the last committed JSONL line, None when none ended here; `tail`
    is True when an unterminated last line did not parse (not committed)."""

    records: pa.Table
    sizes: list[int]
    rejects: list[bytes]
    read: int = 0
    skipped: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    end: tuple[int, int] | None = None
    tail: bool = False


def _short_reason(error: str) -> str:
    """A count key for a reason: the part before its first colon (the field, or the kind of
    failure), with list indices and other numbers dropped."""
    head = re.sub(r"\[\d+\]", "[]", error.split(":", 1)[0])
    return re.sub(r"\s*\(.*", "", re.sub(r"(?<![\w-])\d+(?![\w-])", "N", head))[:80]


def parse_jsonl(fmt: str | None, name: str, data: bytes, offset: int, line: int, end: int | None = None) -> Parsed:
    """`parse_items` over the JSONL lines in `data`, which starts at byte `offset` of file `name`
    after `line` lines (the unit of work an engine maps). With `end`, `data` is the head of one
    line that ends at byte `end`, too long to be a record."""
    lines = [Line(line + 1, offset, end, data, False)] if end is not None else frame_jsonl(io.BytesIO(data), offset, line)
    return parse_items(jsonl_items(lines, name), fmt, name)


def parse_items(items: Iterable[Item], fmt: str | None, source: str) -> Parsed:
    """Records, rejects and counts of `items` read from `source` (a file name); `fmt` forces a
    format, None detects it. Raises nothing for bad content: that is what the rejects are."""
    parser = _Parser(fmt, source)
    end, tail = None, False
    with fewer_gc_passes():
        for item in items:
            parser.item(item)
            if not item.committed:
                tail = True
            elif item.end is not None:
                end = item.end, item.line
        return parser.result(end, tail)


@contextmanager
def fewer_gc_passes() -> Iterator[None]:
    """Run the cyclic garbage collector less often (restored after; ingest's driver holds it
    around the whole run, so each piece's restore changes nothing there).

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


class _Parser:
    def __init__(self, fmt: str | None, source: str):
        self.fmt, self.source = fmt, source
        self.last_kind: str | None = None
        self.records: list[Record] = []
        self.sizes: list[int] = []
        self.rejects: list[bytes] = []
        self.read = self.skipped = 0
        self.reasons: Counter[str] = Counter()

    def item(self, item: Item) -> None:
        if item.error is not None:
            self._reject(item, item.error)
        elif item.fmt is not None:
            self._unit(item, item.fmt, item.value, item.location)
        elif not isinstance(item.value, dict):  # a document's array may hold anything
            self._reject(item, f"expected a JSON object, got {type(item.value).__name__}", value=item.value)
        else:
            self._object(item, item.value, item.location)

    def _object(self, item: Item, value: dict[str, Any], location: str, expand: bool = True) -> None:
        kind = self.fmt
        if kind is None:
            last = self.last_kind
            kind = last if last is not None and FORMATS[last].detect(value) == last else detect(value)
            self.last_kind = kind
        if kind is None:
            containers = [k for k in CONTAINER_KEYS if isinstance(value.get(k), list)] if expand else []
            if not containers:
                self._reject(item, "unrecognised log shape: not a logged OpenAI call, fine-tuning example, "
                             "OTLP export, MLflow trace, Langfuse observation or LangSmith run", value=value)
            for key in containers:
                for i, element in enumerate(value[key]):
                    where = f"{location}:{key}[{i}]"
                    if isinstance(element, dict):
                        self._object(item, element, where, expand=False)  # one page level, no deeper
                    else:
                        self._reject(item, f"{key}[{i}]: expected an object", where, element)
            return
        split = FORMATS[kind].units
        if split is None:
            self._unit(item, kind, value, location)
            return
        units = split(value)
        while True:
            try:
                sub, unit = next(units)
            except StopIteration:
                return
            except BadRecord as err:
                self._reject(item, str(err), location, value)
                return
            self._unit(item, kind, unit, f"{location}:{sub}" if sub else location)

    def _unit(self, item: Item, kind: str, unit: Any, location: str) -> None:
        try:
            record = FORMATS[kind].parse(unit, location)
        except BadRecord as err:
            self._reject(item, str(err), location, unit)
            return
        self.read += 1
        if record is None:
            self.skipped += 1
            return
        self.records.append(record)
        self.sizes.append(item.size)

    def _reject(self, item: Item | None, reason: str, location: str | None = None, value: Any = None) -> None:
        """Quarantine one unit: where it was (file, line, byte offset, location), why, and an excerpt."""
        self.read += 1
        self.reasons[_short_reason(reason)] += 1
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
        self.rejects.append(orjson.dumps(row) + b"\n")

    def result(self, end: tuple[int, int] | None, tail: bool) -> Parsed:
        try:
            table = to_table(self.records)
        except (ValueError, TypeError, RecursionError):  # checked per record only when the batch fails
            kept = [i for i, record in enumerate(self.records) if self._storable(record)]
            table = to_table([self.records[i] for i in kept])
            self.sizes = [self.sizes[i] for i in kept]
        return Parsed(table, self.sizes, self.rejects, self.read, self.skipped, self.reasons, end, tail)

    def _storable(self, record: Record) -> bool:
        """Whether `record` converts to a Parquet row; if not, quarantine it.

        A lone surrogate (json.loads and ijson decode "\\ud800" to one) cannot be stored
        as UTF-8; checking this here, on the rare failing batch, keeps the check off
        the per-record path."""
        try:
            to_table([record])
            return True
        except (ValueError, TypeError, RecursionError) as err:
            self.read -= 1  # _reject counts it again
            self._reject(None, f"record: cannot be stored ({err})", record.location)
            return False
