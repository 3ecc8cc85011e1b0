"""Sample quality: FD on judge features, class accuracy, SSIM/PSNR to the teacher, extras.

* **FD** (:func:`fd`) is the Frechet distance between Gaussians fitted to the digits
  judge's 64-d penultimate features of generated and real images, i.e. FID with the
  Inception network replaced by a judge that fits 8x8 digits and works offline.
  :func:`frechet_distance` computes it in float64 with symmetric eigendecompositions:
  ``tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1)))``. That matrix is symmetric
  positive semi-definite, so (unlike ``scipy.linalg.sqrtm`` of the non-symmetric
  ``S1 S2``) there are no complex parts to discard and singular covariances (fewer
  samples than dimensions, constant features) need no epsilon fudge.
* FD is biased upwards for small sample sizes, so compare numbers only at equal sample
  counts, and read them against :func:`fd_floor` (real train vs. real test).
* **SSIM/PSNR** compare a student's samples with the teacher's from the same noise;
  images are in [-1, 1] (data range 2).
* **Inception FID / CLIP score** are optional extras for users with real image models:
  they need ``pip install slimdiff[fid]`` (torch-fidelity) or CLIP weights present
  locally; when something is missing they raise :class:`~slimdiff.errors.UsageError`
  at once and never wait on the network.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from slimdiff.errors import UsageError

FLOOR_SEEDS = 5
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
DEFAULT_CLIP = "openai/clip-vit-base-patch16"


# --------------------------------------------------------------------------- Frechet distance
def _as_float64(a, name: str) -> np.ndarray:
    arr = a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    if arr.ndim != 2:
        raise UsageError(f"{name} must be a 2-D (samples, features) array, got shape {arr.shape}")
    if len(arr) < 2:
        raise UsageError(f"{name} needs at least 2 samples to estimate a covariance, got {len(arr)}")
    if not np.isfinite(arr).all():
        raise UsageError(f"{name} contains NaN or inf; check the images fed to the feature extractor")
    return arr


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_gaussian(mu1, cov1, mu2, cov2) -> float:
    """Frechet (2-Wasserstein squared) distance between N(mu1, cov1) and N(mu2, cov2).

    ``|mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((sqrt(cov1) cov2 sqrt(cov1))^(1/2))``.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    cov1, cov2 = np.asarray(cov1, dtype=np.float64), np.asarray(cov2, dtype=np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mu1), len(mu1)):
        raise UsageError(f"mismatched Gaussian shapes: mu {mu1.shape}/{mu2.shape}, cov {cov1.shape}/{cov2.shape}")
    r1 = _psd_sqrt(cov1)
    cross = np.linalg.eigvalsh(r1 @ cov2 @ r1)
    tr_covmean = np.sqrt(np.clip(cross, 0, None)).sum()
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_covmean)
    return max(d, 0.0)


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D).

    Means and unbiased covariances in float64; see the module docstring for the method.
    """
    a, b = _as_float64(feats_a, "feats_a"), _as_float64(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise UsageError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance_gaussian(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


# --------------------------------------------------------------------------- judge-based metrics
def _check_images(images: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise UsageError(f"{name} must be a (N, C, H, W) tensor in [-1, 1], got {shape}")
    return images.detach().float().cpu()


def _judge_or_default(judge: nn.Module | None, data: str = "digits") -> nn.Module:
    if judge is None:
        from slimdiff.eval.judge import shipped_judge

        judge = shipped_judge(data)
    return judge


@torch.no_grad()
def judge_features(images: torch.Tensor, judge: nn.Module | None = None, batch_size: int = 512) -> torch.Tensor:
    """The judge's (N, 64) features of ``images`` (clamped to [-1, 1], as when saved)."""
    images = _check_images(images, "images").clamp(-1, 1)
    judge = _judge_or_default(judge).eval()
    return torch.cat([judge.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def fd(images: torch.Tensor, real_images: torch.Tensor, judge: nn.Module | None = None) -> float:
    """FD between ``images`` and ``real_images`` in the judge's feature space (default: shipped judge)."""
    judge = _judge_or_default(judge)
    return frechet_distance(judge_features(images, judge), judge_features(real_images, judge))


def fd_floor(judge: nn.Module | None = None, seeds: int = FLOOR_SEEDS, data: str = "digits") -> dict:
    """FD of the real train vs. the real test split of ``data``: the best a generator can be
    expected to reach.

    ``fd_train_test`` uses the whole train split (digits: 1,437 images). Because FD depends on
    sample size, ``subsample_mean``/``subsample_std`` give its spread over ``seeds`` random
    subsets of the train split of the test split's size (digits: 360, drawn without
    replacement), each compared with the whole test split.
    """
    from slimdiff.data.datasets import builtin

    if seeds < 2:
        raise UsageError(f"fd_floor needs seeds >= 2 for a spread, got {seeds}")
    judge = _judge_or_default(judge, data)
    f_tr = judge_features(builtin(data, "train").tensors[0], judge)
    f_te = judge_features(builtin(data, "test").tensors[0], judge)
    subs = []
    for s in range(seeds):
        idx = torch.randperm(len(f_tr), generator=torch.Generator().manual_seed(s))[: len(f_te)]
        subs.append(frechet_distance(f_tr[idx], f_te))
    return {
        "fd_train_test": frechet_distance(f_tr, f_te),
        "subsample_mean": float(np.mean(subs)),
        "subsample_std": float(np.std(subs, ddof=1)),
        "subsample_fds": subs,
        "subsample_size": len(f_te),
        "seeds": list(range(seeds)),
        "n_train": len(f_tr),
        "n_test": len(f_te),
    }


@torch.no_grad()
def class_accuracy(images: torch.Tensor, labels: torch.Tensor, judge: nn.Module | None = None) -> float:
    """Fraction of ``images`` that the judge classifies as the label each was conditioned on."""
    images = _check_images(images, "images").clamp(-1, 1)
    labels = torch.as_tensor(labels).long().cpu()
    if labels.shape != (len(images),):
        raise UsageError(f"need one label per image: {len(images)} images, labels of shape {tuple(labels.shape)}")
    judge = _judge_or_default(judge).eval()
    preds = torch.cat([judge(images[i : i + 512]).argmax(1) for i in range(0, len(images), 512)])
    return (preds == labels).sum().item() / len(labels)


# --------------------------------------------------------------------------- teacher agreement
def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _check_images(a, "a"), _check_images(b, "b")
    if a.shape != b.shape:
        raise UsageError(f"images to compare must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def ssim_window(height: int, width: int) -> int:
    """Gaussian window for SSIM: the largest odd size <= min(H, W) / 2, between 3 and 11."""
    side = min(height, width)
    if side < 3:
        raise UsageError(f"SSIM needs images of at least 3x3 pixels, got {height}x{width}")
    win = min(11, side // 2)
    win -= 1 - win % 2
    return max(win, 3)


def ssim(a: torch.Tensor, b: torch.Tensor, win_size: int | None = None) -> float:
    """Mean SSIM between image batches ``a`` and ``b`` in [-1, 1] (pytorch_msssim, data range 2).

    ``win_size`` defaults to :func:`ssim_window` (3 for 8x8 digits; 11, the standard, from 22 px).
    """
    from pytorch_msssim import ssim as _ssim

    a, b = _pair(a, b)
    win = win_size or ssim_window(*a.shape[-2:])
    # pytorch_msssim expects data in [0, data_range]; shift [-1, 1] to [0, 2].
    return _ssim(a.clamp(-1, 1) + 1, b.clamp(-1, 1) + 1, data_range=2.0, win_size=win, size_average=True).item()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of ``10 log10(2^2 / MSE)`` for ``a``, ``b`` in [-1, 1] (inf if identical)."""
    a, b = _pair(a, b)
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse)).mean().item()


# --------------------------------------------------------------------------- optional extras
def _to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    images = _check_images(images, "images").clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    if images.shape[1] != 3:
        raise UsageError(f"need 1- or 3-channel images, got {images.shape[1]} channels")
    return ((images + 1) * 127.5).round().to(torch.uint8)


def inception_fid(
    images: torch.Tensor, real_images: torch.Tensor, weights_path: str | Path | None = None, batch_size: int = 64
) -> float:
    """Standard Inception-v3 FID (torchmetrics + torch-fidelity) of images in [-1, 1].

    Needs ``pip install slimdiff[fid]`` and the Inception weights on disk: ``weights_path``,
    else ``$SLIMDIFF_INCEPTION_WEIGHTS``, else torch hub's ``checkpoints/`` folder. Nothing
    is downloaded here.
    """
    if importlib.util.find_spec("torch_fidelity") is None:
        raise UsageError(
            "inception_fid needs torch-fidelity: `pip install slimdiff[fid]` (on CPU-only machines it pulls a "
            "CUDA torch build; use the offline `fd` metric instead)"
        )
    path = Path(
        weights_path
        or os.environ.get("SLIMDIFF_INCEPTION_WEIGHTS")
        or Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    )
    if not path.is_file():
        raise UsageError(
            f"Inception weights not found at {path}; download {INCEPTION_WEIGHTS_URL} on a machine with network "
            "and pass weights_path= or set SLIMDIFF_INCEPTION_WEIGHTS"
        )
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))
    for real, batch in ((True, real_images), (False, images)):
        batch = _to_uint8_rgb(batch)
        for i in range(0, len(batch), batch_size):
            metric.update(batch[i : i + batch_size], real=real)
    return metric.compute().item()


def _local_clip_dir(model: str) -> str:
    if Path(model).is_dir():
        return str(model)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, local_files_only=True)
    except Exception as e:  # not in the local cache (or not a valid id): never go online
        raise UsageError(
            f"CLIP weights {model!r} are not available offline ({type(e).__name__}); on a machine with network run "
            f"`huggingface-cli download {model}` (or pass a local directory holding a transformers CLIP model)"
        ) from None


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: list[str], model: str = DEFAULT_CLIP, batch_size: int = 32) -> float:
    """Mean CLIP score ``max(100 cos(E_image, E_text), 0)`` of images in [-1, 1] and their prompts.

    ``model`` is a local directory or a Hugging Face id already in the local cache
    (transformers CLIP); nothing is downloaded.
    """
    images = _to_uint8_rgb(images)
    if isinstance(prompts, str) or len(prompts) != len(images):
        raise UsageError(f"need one prompt per image: {len(images)} images, got {type(prompts).__name__} prompts")
    if importlib.util.find_spec("transformers") is None:
        raise UsageError("clip_score needs transformers: `pip install slimdiff[fid]`")
    local = _local_clip_dir(model)
    from transformers import CLIPModel, CLIPProcessor

    clip = CLIPModel.from_pretrained(local, local_files_only=True, use_safetensors=True).eval()  # never unpickle
    processor = CLIPProcessor.from_pretrained(local, local_files_only=True)
    scores = []
    for i in range(0, len(images), batch_size):
        batch = [im.permute(1, 2, 0).numpy() for im in images[i : i + batch_size]]
        inputs = processor(text=list(prompts[i : i + batch_size]), images=batch, return_tensors="pt", padding=True)
        out = clip(**inputs)
        img, txt = out.image_embeds, out.text_embeds
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        scores.append((100 * cos).clamp(min=0))
    return torch.cat(scores).mean().item()


__all__ = [
    "frechet_distance", "frechet_distance_gaussian", "judge_features", "fd", "fd_floor", "class_accuracy",
    "ssim", "ssim_window", "psnr", "inception_fid", "clip_score",
]
