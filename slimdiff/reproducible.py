"""What two runs of the same command may differ in: their timings.

A rerun, or a run resumed after a crash, must give the same tensors and the same record
except for fields that measure time (CPU or wall seconds, measured wall-time ratios). :func:`without_times` drops
those fields from a record (or a bench entry), so "same result" is one comparison
everywhere: the resume tests and ``slimdiff.io.save``'s check for an identical result
already in the output directory.
"""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["TIME_KEY", "Spent", "is_time_key", "without_times"]

TIME_KEY = re.compile(r"(?:^|_)(?:cpu|wall)_(?:s|seconds|ratio)$")
"""Keys of time measurements: ``compress_cpu_s``, ``recover_cpu_s``, ``search_cpu_s``,
``cpu_seconds``, ``compress_wall_s``, ``eval_wall_s``, and a bench entry's measured
``wall_ratio`` (student / teacher sampling time)."""


def is_time_key(key: str) -> bool:
    """Whether ``key`` names a CPU- or wall-seconds measurement."""
    return bool(TIME_KEY.search(key))


def without_times(doc: Any) -> Any:
    """``doc`` (JSON-like: dicts, lists, scalars) without any time-measurement field, at any depth."""
    if isinstance(doc, dict):
        return {k: without_times(v) for k, v in doc.items() if not (isinstance(k, str) and is_time_key(k))}
    if isinstance(doc, list):
        return [without_times(v) for v in doc]
    return doc


class Spent:
    """CPU and wall seconds a resumable job has spent over all its attempts.

    A job killed and rerun resumes from its checkpoints, so timing the last attempt alone
    reports the cost of resuming (a DiP-GO bench entry once showed 1 CPU-s for a 1,300 CPU-s
    optimisation finished by an earlier attempt). ``with Spent(path) as spent:`` reads what
    earlier attempts recorded in ``path``, keeps the running totals there (rewritten atomically
    every ``every`` seconds from a daemon thread, so a killed attempt loses at most that much,
    and at exit); ``spent.cpu_s`` / ``spent.wall_s`` are the totals. CPU seconds are the
    process's (``time.process_time``): one job per process.
    """

    def __init__(self, path: str | Path, every: float = 15.0):
        self.path, self.every = Path(path), every
        self.prior = {"cpu_s": 0.0, "wall_s": 0.0}
        self._frozen: tuple[float, float] | None = None

    def __enter__(self) -> Spent:
        try:
            earlier = json.loads(self.path.read_text())
            self.prior = {k: float(earlier[k]) for k in ("cpu_s", "wall_s")}
        except (OSError, ValueError, KeyError, TypeError):  # no earlier attempt, or a damaged file: count afresh
            pass
        self._cpu0, self._wall0, self._frozen = time.process_time(), time.perf_counter(), None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name="slimdiff-spent", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._frozen = (self.cpu_s, self.wall_s)
        self._write()

    @property
    def cpu_s(self) -> float:
        return self._frozen[0] if self._frozen else self.prior["cpu_s"] + time.process_time() - self._cpu0

    @property
    def wall_s(self) -> float:
        return self._frozen[1] if self._frozen else self.prior["wall_s"] + time.perf_counter() - self._wall0

    def _keep(self) -> None:
        while not self._stop.wait(self.every):
            self._write()

    def _write(self) -> None:
        from slimdiff.atomic import write_file

        totals = {"cpu_s": self.cpu_s, "wall_s": self.wall_s}
        write_file(self.path, lambda tmp: tmp.write_text(json.dumps(totals)))
