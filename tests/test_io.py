"""factory/io.py's file helpers."""

from __future__ import annotations

import hashlib
import os

from factory.io import sha256_file


def test_sha256_file_hashes_the_content_and_again_after_a_change(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"w" * 3_000_000)  # more than one read block
    assert sha256_file(path) == sha256_file(str(path)) == hashlib.sha256(b"w" * 3_000_000).hexdigest()
    stat = path.stat()
    path.write_bytes(b"v" * 3_000_000)  # the same size ...
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # ... a later mtime
    assert sha256_file(path) == hashlib.sha256(b"v" * 3_000_000).hexdigest()
