"""What two runs of the same command may differ in: their timings.

A rerun, or a run resumed after a crash, must give the same tensors and the same record
except for fields that measure time (CPU or wall seconds, measured wall-time ratios). :func:`without_times` drops
those fields from a record (or a bench entry), so "same result" is one comparison
everywhere: the resume tests and ``slimdiff.io.save``'s check for an identical result
already in the output directory.
"""
from __future__ import annotations

import re
from typing import Any

__all__ = ["TIME_KEY", "is_time_key", "without_times"]

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
