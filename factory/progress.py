"""Progress bars for the stages that read long inputs (ingest, curate, mine).

A bar is drawn on stderr only when stderr is a terminal: tests, CI logs, cron and pipes get
neither the bar nor its carriage returns, and stdout (the summaries and tables) is never
touched. tqdm, as the trainer's and the evaluator's bars. The bar is removed when the loop
ends, so a finished stage leaves only its summary.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None, desc: str, unit: str) -> Iterable[T]:
    """`items` as they are, with a bar of `total` `unit`s named `desc` while stderr is a terminal.

    `total` None draws a counter without a percentage. Raises what iterating `items` raises.
    """
    return tqdm(items, total=total, desc=desc, unit=unit, disable=None, leave=False, dynamic_ncols=True)
