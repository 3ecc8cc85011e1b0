"""Atomic writes: a file or directory is either absent, the old one, or complete, never half-written.

The one place slimdiff writes results, checkpoints and bench entries that a crash must not
corrupt: write to a temporary name beside the target, fsync, then rename into place.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk.

    A directory that cannot be opened or synced (some platforms refuse) is skipped: its
    entries are then as durable as the platform makes them.
    """
    is_dir = Path(path).is_dir()
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
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


def temp_dir(target: Path) -> Path:
    """A new empty directory ``.<name>.tmp-XXXX`` beside ``target`` (parents created): where
    :func:`write_dir` writes. Raises ``OSError`` when the place is not writable."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def write_dir(target: Path, write: Callable[[Path], Any], *, tmp: Path | None = None, replace: bool = True,
              backup: Path | None = None) -> Path:
    """Write the directory ``target`` atomically: ``write(tmp)`` fills a fresh :func:`temp_dir`
    (or ``tmp``, one made by it), every file and the directory are fsynced, then it is renamed
    into place; on any error (``write`` may raise to refuse) the temporary directory is removed.

    An existing ``target`` is first renamed to ``backup`` (default: a unique hidden name beside
    it; a stale ``backup`` left by a crash is removed first), which is deleted once the new
    directory is in place, or renamed back if that rename fails. A crash therefore leaves the
    old directory (under its name or ``backup``) or the new one complete. With
    ``replace=False`` the caller has checked that ``target`` is absent: it is a plain rename.
    """
    target = Path(target)
    tmp = Path(tmp) if tmp is not None else temp_dir(target)
    try:
        write(tmp)
        for p in sorted(tmp.rglob("*")):
            fsync(p)
        fsync(tmp)
        backup = backup or target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        if replace and target.exists():
            _swap(tmp, target, backup)
        else:
            os.rename(tmp, target)
            fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)  # the old directory, or a stale one from a crash
    return target


def _swap(tmp: Path, target: Path, backup: Path) -> None:
    """Move ``target`` aside to ``backup`` and ``tmp`` into place (``target`` back on failure)."""
    if backup.exists():
        shutil.rmtree(backup)
    os.rename(target, backup)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(backup, target)
        raise
    fsync(target.parent)


@contextmanager
def exclusive(target: Path, what: str) -> Iterator[None]:
    """Hold an advisory lock on the output ``target`` (the file ``.<name>.lock`` beside it)
    while the block runs, or refuse at once.

    Two slimdiff runs writing into one output would interleave their checkpoints and results;
    the second is refused at start with a :class:`UsageError` naming ``what``. The lock is
    released when the block ends or the process dies (``kill -9`` included), so a crashed run
    never blocks its own resume; the lock file is removed when the block ends.
    """
    import fcntl

    from slimdiff.errors import UsageError

    target = Path(target)
    lock = target.parent / f".{target.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"{what} is in use by another slimdiff run (lock {lock}); wait for it to finish, "
                         "or choose another output") from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
