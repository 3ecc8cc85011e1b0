"""Small shared helpers."""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, TextIO, TypeVar

import numpy as np
import torch

from slimdiff.errors import UsageError

T = TypeVar("T")


def hooked_modules(model: torch.nn.Module) -> list[str]:
    """Names of ``model``'s modules ("" for the model itself) that carry a diffusers ``ModelHook``:
    every slimdiff runtime (reuse plans, branch caches, routing, diffusers' caches, depth gates) is one."""
    return [name for name, m in model.named_modules() if getattr(getattr(m, "_diffusers_hook", None), "hooks", None)]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (N, C, H, W) -> uint8 (N, H, W, C)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int | None = None) -> Path:
    """Write images in [-1, 1] as one PNG grid (small images are upscaled to be visible)."""
    from PIL import Image

    imgs = to_uint8(x[:, :3] if x.shape[1] >= 3 else x[:, :1])
    n, h, w, c = imgs.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    pad = 1
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = im
    scale = scale or max(1, 128 // max(h, w))
    img = Image.fromarray(grid.squeeze(-1) if c == 1 else grid)
    img = img.resize((img.width * scale, img.height * scale), resample=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


class ProgressTask:
    """Progress of one long loop: a rich bar on a terminal, plain log lines elsewhere.

    A transient bar is invisible when stdout is redirected (a log file, ``nohup``, CI), so a
    non-terminal ``stream`` gets one line ``description: done/total (pct%), elapsed, ETA``
    (plus the latest ``note``) each time another ``every`` of the total is done or
    ``interval`` seconds have passed, and at the end. A context manager; :meth:`update` takes
    the number of items done so far (``start`` when resuming).
    """

    def __init__(self, description: str, total: int | None = None, start: int = 0, *, transient: bool = True,
                 stream: TextIO | None = None, every: float = 0.1, interval: float = 60.0):
        self.description, self.total, self.start = description, total, start
        self.stream = stream or sys.stdout
        self.every, self.interval = every, interval
        self.bar = None
        if _is_terminal(self.stream):
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=Console(file=self.stream), transient=transient)
            self.bar.add_task(description, total=total, completed=start)
        self.began = self.last_line = time.perf_counter()
        self.next_mark = self._mark_after(start)

    def __enter__(self) -> "ProgressTask":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, done: int, note: str | None = None) -> None:
        """``done`` items of the total are finished; ``note`` (e.g. the loss) joins the description."""
        if self.bar is not None:
            text = f"{self.description} {note}" if note else self.description
            self.bar.update(self.bar.task_ids[0], completed=done, description=text)
            return
        now = time.perf_counter()
        if done >= self.next_mark or done == self.total or now - self.last_line >= self.interval:
            self.stream.write(self._line(done, now - self.began, note) + "\n")
            self.stream.flush()
            self.last_line, self.next_mark = now, self._mark_after(done)

    def _mark_after(self, done: int) -> float:
        """The next multiple of ``every`` x total after ``done`` (infinite without a total)."""
        if not self.total:
            return math.inf
        step = max(1, math.ceil(self.every * self.total))
        return (done // step + 1) * step

    def _line(self, done: int, elapsed: float, note: str | None) -> str:
        line = f"{self.description}: {done}"
        if self.total:
            line += f"/{self.total} ({100 * done / self.total:.0f}%)"
        line += f", {_duration(elapsed)} elapsed"
        if self.total and done > self.start:
            line += f", ETA {_duration(elapsed / (done - self.start) * (self.total - done))}"
        return f"{line} | {note}" if note else line


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``1h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress(iterable: Iterable[T], description: str, enabled: bool = True, total: int | None = None,
             stream: TextIO | None = None) -> Iterable[T]:
    """``iterable`` with a :class:`ProgressTask` (a transient bar on a terminal, log lines
    elsewhere) when ``enabled`` (long loops only)."""
    if not enabled:
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return _tracked(iterable, ProgressTask(description, total, stream=stream))


def _tracked(iterable: Iterable[T], task: ProgressTask) -> Iterator[T]:
    with task:
        for i, item in enumerate(iterable, 1):
            yield item
            task.update(i)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (CUDA when torch sees a GPU, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` as a device.

    ``auto`` and ``cuda`` pick this process's GPU under ``accelerate launch`` (``LOCAL_RANK``).
    """
    spec = "auto" if spec is None else str(spec)
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec != "cuda" and not (spec.startswith("cuda:") and spec[5:].isdigit()):
        raise UsageError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UsageError(f"device {spec!r} was asked for but torch sees no CUDA device; use --device cpu "
                         "(or install a CUDA build of torch)")
    index = int(spec[5:]) if ":" in spec else int(os.environ.get("LOCAL_RANK", 0))
    if index >= torch.cuda.device_count():
        raise UsageError(f"device {spec!r}: torch sees only {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)
