"""The judge: a small CNN classifier of a shipped data set's images that scores generated samples.

Its 64-wide penultimate features define FD (a Frechet distance in the spirit of FID,
on a feature space that fits the data and works offline), and its predictions define
class accuracy (does a sample look like the class it was conditioned on). See
``/work/shared/BENCHMARK.md`` section 1.

One judge per shipped data set (:data:`slimdiff.data.datasets.BUILTIN`): 8x8 digits in
``slimdiff/weights/digits-judge/``, 32x32 MNIST in ``slimdiff/weights/mnist-judge/``
(``model.safetensors`` + ``judge.json``), reproduced by ``python scripts/train_judge.py
[--data mnist]``.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimdiff.errors import UsageError
from slimdiff.result import ModelRecord, set_record

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
JUDGE_DIR = WEIGHTS / "digits-judge"
TRAIN_COMMAND = "python scripts/train_judge.py"
DEFAULT_EPOCHS = 40


def judge_dir(data: str = "digits") -> Path:
    """Where the judge of shipped data set ``data`` lives."""
    return WEIGHTS / f"{data}-judge"


def _command(data: str, seed: int = 0, epochs: int = DEFAULT_EPOCHS) -> str:
    """The ``scripts/train_judge.py`` command line that trains this judge (non-default options only)."""
    args = [("--data", data, "digits"), ("--seed", seed, 0), ("--epochs", epochs, DEFAULT_EPOCHS)]
    return " ".join([TRAIN_COMMAND] + [f"{flag} {value}" for flag, value, default in args if value != default])


class Judge(nn.Module):
    """CNN for (N, 1, S, S) images in [-1, 1]: three 3x3 convs, a 64-wide feature layer, a linear head.

    ``image_size`` 8 (digits) sees the pixels directly; a larger size (32: MNIST) first goes
    through a stem of stride-2 3x3 convs down to 8x8.

    ``features`` are the penultimate activations (SiLU, so no dead all-zero units that
    would make the feature covariance singular); ``forward`` returns class logits.
    """

    num_features = 64

    def __init__(self, num_classes: int = 10, width: int = 32, image_size: int = 8):
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise UsageError(f"the judge takes square images of 8, 16, 32, ... pixels, got {image_size}")
        self.num_classes, self.width, self.image_size = num_classes, width, image_size
        stem, channels, size = [], 1, image_size
        while size > 8:
            stem += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.SiLU()]
            channels, size = width, size // 2
        self.stem = nn.Sequential(*stem) if stem else None
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 2 * 2, self.num_features)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) -> (N, 64) penultimate features."""
        s = self.image_size
        if x.ndim != 4 or x.shape[1:] != (1, s, s):
            raise UsageError(f"this judge takes (N, 1, {s}, {s}) images, got shape {tuple(x.shape)}")
        h = F.silu(self.conv1(self.stem(x) if self.stem is not None else x))
        h = F.max_pool2d(F.silu(self.conv2(h)), 2)  # 4x4
        h = F.max_pool2d(F.silu(self.conv3(h)), 2)  # 2x2
        return F.silu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) -> (N, num_classes) logits."""
        return self.head(self.dropout(self.features(x)))


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with background (-1)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    oy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w)
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    batch = torch.arange(n)[:, None, None, None].expand(n, c, h, w)
    chan = torch.arange(c)[None, :, None, None].expand(n, c, h, w)
    return padded[batch, chan, rows, cols]


@torch.no_grad()
def accuracy(judge: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of ``x`` that ``judge`` classifies as ``y``."""
    judge.eval()
    hits = sum(
        (judge(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
        for i in range(0, len(x), batch_size)
    )
    return hits / len(x)


def train_judge(
    seed: int = 0, epochs: int = DEFAULT_EPOCHS, out: str | Path | None = None, batch_size: int = 64,
    lr: float = 2e-3, max_shift: int = 1, data: str = "digits",
) -> tuple[Judge, float]:
    """Train a :class:`Judge` on the ``data`` set's train split (``digits`` or ``mnist``) and
    return it with its test-split accuracy.

    AdamW with a cosine learning-rate decay, random shifts of up to ``max_shift`` pixels
    as augmentation, a fixed number of epochs (the test split is never used to choose
    anything). Deterministic given ``seed`` (all randomness comes from seeded generators).
    With ``out``, writes ``model.safetensors`` and ``judge.json`` there.
    """
    from slimdiff.data.datasets import builtin

    if epochs < 1:
        raise UsageError(f"epochs must be >= 1, got {epochs}")
    x_tr, y_tr = builtin(data, "train").tensors
    x_te, y_te = builtin(data, "test").tensors
    torch.manual_seed(seed)  # initialisation and dropout draw from the global generator
    gen = torch.Generator().manual_seed(seed)
    judge = Judge(image_size=x_tr.shape[-1])
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(x_tr) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for _ in range(epochs):
        judge.train()
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), batch_size):
            idx = order[i : i + batch_size]
            xb = random_shift(x_tr[idx], max_shift, gen) if max_shift else x_tr[idx]
            loss = F.cross_entropy(judge(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    judge.eval()
    test_acc = accuracy(judge, x_te, y_te)
    if out is not None:
        info = {
            "test_accuracy": test_acc,
            "train_accuracy": accuracy(judge, x_tr, y_tr),
            "seed": seed,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "augmentation": f"random shifts of up to {max_shift} px, background fill -1",
            "data": f"slimdiff.data.datasets.{data}: train {len(x_tr)} / test {len(x_te)}",
            "architecture": {"class": "slimdiff.eval.judge.Judge", "num_classes": judge.num_classes,
                             "width": judge.width, "num_features": judge.num_features,
                             "image_size": judge.image_size},
            "command": _command(data, seed, epochs),
            "torch": torch.__version__,
        }
        save_judge(judge, out, info)
    return judge, test_acc


def save_judge(judge: Judge, out: str | Path, info: dict) -> None:
    """Write ``model.safetensors`` and ``judge.json`` (``info``) into directory ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(out / "model.safetensors"))
    (out / "model.safetensors").chmod(0o644)  # safetensors creates it owner-only; it ships as package data
    (out / "judge.json").write_text(json.dumps(info, indent=2) + "\n")


@functools.lru_cache(maxsize=4)
def _shipped(data: str) -> Judge:
    return load_judge(judge_dir(data), data=data)


def load_judge(path: str | Path | None = None, data: str = "digits") -> Judge:
    """Load the shipped judge of data set ``data`` (or one saved by :func:`train_judge` at
    ``path``), in eval mode."""
    from safetensors.torch import load_file

    d = Path(path) if path is not None else judge_dir(data)
    weights, meta = d / "model.safetensors", d / "judge.json"
    if not weights.is_file() or not meta.is_file():
        raise UsageError(f"no judge at {d} (needs model.safetensors + judge.json); create it with `{_command(data)}`")
    arch = json.loads(meta.read_text()).get("architecture", {})
    judge = Judge(num_classes=arch.get("num_classes", 10), width=arch.get("width", 32),
                  image_size=arch.get("image_size", 8))
    judge.load_state_dict(load_file(str(weights)))
    set_record(judge, ModelRecord(d.name, provenance={"judge": json.loads(meta.read_text())}))
    return judge.eval()


def shipped_judge(data: str = "digits") -> Judge:
    """The shipped judge of ``data``, loaded once per process (do not modify it)."""
    return _shipped(data)


def judge_info(path: str | Path | None = None, data: str = "digits") -> dict:
    """A shipped judge's ``judge.json`` (test accuracy, seed, epochs, command, FD floor)."""
    meta = (Path(path) if path is not None else judge_dir(data)) / "judge.json"
    if not meta.is_file():
        raise UsageError(f"no {meta}; create it with `{_command(data)}`")
    return json.loads(meta.read_text())


__all__ = ["Judge", "train_judge", "load_judge", "shipped_judge", "judge_dir", "save_judge", "judge_info", "random_shift",
           "accuracy"]
