"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every file busfed replaces in place (accountant state, ingest state and manifests, resend
cache, certificates, the SuperNode's state file, re-encoded videos) goes through
``atomic_path``: the data is written beside the target under a hidden temporary name, then
renamed over it (``os.replace`` is atomic on one file system). A failure leaves the target
as it was and removes the temporary file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path, *, mode: int | None = None, sync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path``; on a clean exit it replaces ``path``.

    ``mode`` sets the file's permissions before the rename (a private file is never visible
    under its final name with looser ones); ``sync`` flushes it to disk first.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        if sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes, *, mode: int | None = None) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_path(path, mode=mode) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
