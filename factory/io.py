"""Files every stage writes: atomic replacement, private folders for raw prompts, dataset splits,
and the sha256 that pins a file's content (a base model's weights, the embedded GGUF).

Atomic: a file is written to a temporary sibling and moved into place with `os.replace`, so a
reader (or a rerun after `kill -9`) sees the old file or the new one, never half of one.
Private: files that hold raw prompts as the agents sent them (raw records, quarantines, the
router's request logs) are created 0600 in 0700 folders, readable by their owner alone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from factory.catalog import check_task_name

SPLITS = ("train", "validation", "test")


def write_atomic(path: Path, data: str | bytes, private: bool = False) -> None:
    """Replace `path` with `data` in one step; `private` makes it 0600 in a 0700 folder."""
    if private:
        private_dir(path.parent)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    with os.fdopen(os.open(tmp, flags, 0o600 if private else 0o666), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def private_dir(path: Path) -> Path:
    """Create `path` (and its parents) and make it 0700; returns it."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def load_split(data_dir: Path, task: str, version: str, split: str) -> list[dict[str, Any]]:
    """The examples of one split of a task's dataset version (`factory mine` writes them)."""
    path = data_dir / check_task_name(task) / version / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file's content, read in 1 MiB blocks (~1 s per GB).

    Remembered for the process by path, size and modification time, so asking again is free
    until the file changes. Trade-off: a rewrite that keeps both the size and the mtime (within
    the file system's timestamp resolution) is not noticed. Raises OSError when the file
    cannot be read.
    """
    st = os.stat(path)
    return _sha256(os.fspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
