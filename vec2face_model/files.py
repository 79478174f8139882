"""Files that appear complete or not at all, and their hashes: the one home of "write beside, then
``os.replace``".

A file is written beside its final name (``.<name>.tmp-<pid>``, hidden so that ``hsface push``
and globbing readers skip it), fsynced, then ``os.replace``d: a reader (or a retry after a kill -9)
sees the old file or the new one, never half of one. Permissions are the ordinary 0666 minus the
umask, like any file a program creates (``tempfile`` would give 0600). A failed write removes its
temporary file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_write", "sha256_file", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file object whose content replaces ``path`` only when the ``with`` block succeeds.

    For writers that stream into a file (``np.savez(f, ...)``, ``figure.savefig(f)``); for data in
    memory use :func:`write_bytes_atomic`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """``path`` holds ``data`` completely, or keeps what it held before (also across a kill -9)."""
    with atomic_write(path) as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, value) -> None:
    """``value`` as indented JSON with sorted keys and a final newline, written atomically."""
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")
