"""Atomic writes: a file or directory is either absent, the old one, or complete, never half-written.

The one place slimdiff writes results, checkpoints and bench entries that a crash must not
corrupt: write to a temporary name beside the target, fsync, then rename into place.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, sync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    fsync(tmp)
    os.replace(tmp, path)
