"""Small shared helpers."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from slimdiff.errors import UsageError


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


def progress(iterable, description: str, enabled: bool = True, total: int | None = None):
    """``iterable`` with a transient rich progress bar when ``enabled`` (long loops only)."""
    if not enabled:
        return iterable
    from rich.progress import track

    return track(iterable, description=description, total=total, transient=True)


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
