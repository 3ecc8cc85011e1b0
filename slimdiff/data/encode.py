"""A diffusers pipeline's own encoders: images to latents through its VAE, captions to embeddings
through its text encoder, and latents back to images.

A latent model (DiT-XL-2-256, PixArt, Stable Diffusion) trains, calibrates and samples in the
latent space of *its* VAE and with captions from *its* text encoder, so slimdiff uses the ones
in the pipeline folder the model came from. Images (and their captions) are encoded once and
cached as a latents file in the format :func:`slimdiff.data.datasets.latents` reads, keyed by a
hash of the images, captions and encoder weights, so a rerun reads the file instead.

``--data`` forms handled here (:func:`encoded_data`):

* ``images:DIR`` (or a plain ``DIR`` when the model's pipeline has a VAE): every PNG/JPEG under
  ``DIR`` resized and centre-cropped to the model's sample size x the VAE's scale factor,
  encoded as ``latent_dist.mean`` x ``scaling_factor``; class sub-folders give labels. Text
  models also get captions: the line ``FILE<TAB>caption`` of ``DIR/captions.txt``, else the
  image's ``.txt`` sidecar (``cat.png`` -> ``cat.txt``), else the empty prompt.
* ``prompts:FILE``: one prompt per line, encoded with the text encoder; the latents are the
  model's own samples for those prompts (drawn by the caller), so methods that calibrate or
  recover on ``(latents, captions)`` run without images.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from slimdiff import atomic
from slimdiff.errors import UsageError
from slimdiff.models.conditions import TextCondition

__all__ = ["Encoders", "pipeline_record", "load_encoders", "encoded_data", "data_source", "read_prompts"]

LIBRARIES = ("diffusers", "transformers")
"""The only libraries a ``model_index.json`` entry may name (no other module is imported)."""
CAPTIONS = "captions.txt"
BATCH = 8
CACHE_ENV = "SLIMDIFF_CACHE"
"""Folder for encoded latents files (default: ``.slimdiff-cache/`` inside the image folder)."""
ENCODING = 2
"""Version of how captions and images are encoded, part of every cache key (2: captions
preprocessed as the pipeline does; cached files of an earlier version are encoded again)."""


def _index(folder: Path) -> dict:
    try:
        return json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{folder / 'model_index.json'} is not a readable pipeline index ({e}); "
                         "pass a diffusers pipeline folder") from None


def _component(folder: Path, name: str) -> tuple[str, str] | None:
    """``(library, class)`` of pipeline component ``name`` when the folder has it, else None."""
    entry = _index(folder).get(name)
    if not isinstance(entry, list) or len(entry) != 2 or None in entry or not (folder / name).is_dir():
        return None
    return entry[0], entry[1]


def _text_len(folder: Path) -> int | None:
    """Tokens per caption of the pipeline's prompts: its call's ``max_sequence_length`` default
    (PixArt-alpha 120, Sigma 300), else the tokenizer's ``model_max_length`` (CLIP 77); read from
    configs only, so loading a model stays cheap."""
    if _component(folder, "text_encoder") is None or _component(folder, "tokenizer") is None:
        return None
    default = _call_parameters(folder).get("max_sequence_length")
    if default is not None and isinstance(default.default, int):
        return default.default
    try:
        length = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text()).get("model_max_length")
    except (OSError, ValueError):
        return None
    return int(length) if isinstance(length, (int, float)) and 0 < length < 1e6 else None


def _masked(folder: Path) -> bool:
    """Whether the pipeline passes the captions' attention mask to its denoiser (PixArt does, SD does not)."""
    return "prompt_attention_mask" in _call_parameters(folder)


def _pipeline_class(folder: Path) -> type | None:
    """The diffusers pipeline class ``folder``'s ``model_index.json`` names (None: one diffusers lacks)."""
    import diffusers

    cls = getattr(diffusers, str(_index(folder).get("_class_name")), None)
    return cls if isinstance(cls, type) else None


def _call_parameters(folder: Path) -> Mapping[str, inspect.Parameter]:
    """The parameters of the pipeline class's ``__call__`` (empty for a class diffusers lacks)."""
    cls = _pipeline_class(folder)
    return inspect.signature(cls.__call__).parameters if cls is not None else {}


def encode_null_prompt(model: nn.Module) -> TextCondition | None:
    """The empty prompt encoded by the text encoder of the pipeline folder ``model`` was loaded
    from (what the pipeline guides with); None when it has none (or the folder is gone)."""
    from slimdiff.models.registry import pipeline_of

    folder = pipeline_of(model)
    if folder is not None and not folder.is_dir():
        warnings.warn(f"the pipeline folder {folder} the model was loaded from is gone: guidance uses zero caption "
                      "embeddings, not its encoded empty prompt (set it with set_null_prompt, or pass --pipeline DIR)",
                      stacklevel=3)
        return None
    if folder is None or _text_len(folder) is None:
        return None
    device = next(model.parameters()).device
    return load_encoders(folder, device, only=("text_encoder", "tokenizer")).encode_prompts([""])


def pipeline_record(folder: Path) -> dict[str, Any]:
    """What a model loaded from pipeline ``folder`` records about it: the folder's absolute
    ``path`` and, for text pipelines, ``text_len`` (the caption length MACs are counted at)."""
    length = _text_len(folder)
    return {"path": str(folder.resolve()), **({"text_len": length} if length else {})}


@dataclass
class Encoders:
    """A pipeline's VAE, text encoder and tokenizer (each None when the pipeline has none)."""

    folder: Path
    vae: nn.Module | None
    text_encoder: nn.Module | None
    tokenizer: Any
    text_len: int | None
    masked: bool
    preprocess: Callable[[list[str]], list[str]] | None = None
    """The pipeline's own caption preprocessing (PixArt: lower-case and strip, or its
    ``clean_caption`` when bs4 and ftfy are installed, as its call's default); None: as given."""

    def encode_prompts(self, prompts: list[str]) -> TextCondition:
        """Caption embeddings ``(N, text_len, D)`` as the pipeline makes them (preprocessed,
        padded to its length, truncated), with the attention mask when the pipeline passes one."""
        if self.text_encoder is None:
            raise UsageError(f"{self.folder} has no text_encoder/ and tokenizer/; pass the pipeline folder that has them")
        device = next(self.text_encoder.parameters()).device
        if self.preprocess is not None:
            prompts = self.preprocess(list(prompts))
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.text_len, truncation=True,
                                return_tensors="pt")
        mask = tokens["attention_mask"].to(device)
        with torch.no_grad():
            embeds = self.text_encoder(tokens["input_ids"].to(device), attention_mask=mask if self.masked else None)[0]
        return TextCondition(embeds.float().cpu(), mask.long().cpu() if self.masked else None)

    @property
    def _vae_place(self) -> tuple[torch.device, torch.dtype, float, float]:
        """The VAE's device, dtype, ``shift_factor`` (0 when none) and ``scaling_factor``."""
        p, config = next(self.vae.parameters()), self.vae.config
        return p.device, p.dtype, getattr(config, "shift_factor", None) or 0.0, config.scaling_factor

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Latents of images ``x`` in [-1, 1]: the posterior mean, shifted and scaled as the pipeline does."""
        device, dtype, shift, scale = self._vae_place
        with torch.no_grad():
            z = self.vae.encode(x.to(device, dtype)).latent_dist.mean.float()
        return ((z - shift) * scale).cpu()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] of latents (the inverse of :meth:`encode_images`)."""
        device, dtype, shift, scale = self._vae_place
        z = latents.float() / scale + shift
        with torch.no_grad():
            out = torch.cat([self.vae.decode(b.to(device, dtype)).sample.float().cpu() for b in z.split(BATCH)])
        return out.clamp(-1, 1)


def load_encoders(folder: str | Path, device: torch.device | str = "cpu",
                  only: tuple[str, ...] = ("vae", "text_encoder", "tokenizer")) -> Encoders:
    """The VAE, text encoder and tokenizer of the diffusers pipeline ``folder`` (safetensors only,
    no network); only those named in ``only`` are loaded (the others are None)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise UsageError(f"{folder} is not a diffusers pipeline folder (no model_index.json); pass the folder "
                         "that holds model_index.json, vae/ and, for text models, text_encoder/ and tokenizer/")
    parts = {name: _load_part(folder, name, device) if name in only else None
             for name in ("vae", "text_encoder", "tokenizer")}
    text = parts["text_encoder"] is not None and parts["tokenizer"] is not None
    return Encoders(folder, parts["vae"], parts["text_encoder"] if text else None, parts["tokenizer"] if text else None,
                    _text_len(folder) if text else None, _masked(folder), _preprocessing(folder))


def _preprocessing(folder: Path) -> Callable[[list[str]], list[str]] | None:
    """The caption preprocessing of the pipeline class of ``folder``, as its call runs it by
    default (PixArt's ``_text_preprocessing`` with ``clean_caption=True``, which needs bs4 and
    ftfy: without them the pipeline lower-cases and strips, and so does this)."""
    from diffusers.utils import is_bs4_available, is_ftfy_available

    cls = _pipeline_class(folder)
    if cls is None or not hasattr(cls, "_text_preprocessing"):
        return None
    clean = is_bs4_available() and is_ftfy_available()
    return lambda texts: cls._text_preprocessing(cls.__new__(cls), texts, clean_caption=clean)


def _load_part(folder: Path, name: str, device) -> Any:
    found = _component(folder, name)
    if found is None:
        return None
    library, cls_name = found
    cls = getattr(importlib.import_module(library), cls_name, None) if library in LIBRARIES else None
    if cls is None:
        raise UsageError(f"{folder / 'model_index.json'} names {library}.{cls_name} for {name}; slimdiff loads "
                         f"{name} classes of {' or '.join(LIBRARIES)} only")
    try:
        if name == "tokenizer":  # vocabulary files only; the class its tokenizer_config.json names
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(folder / name), local_files_only=True)
        return cls.from_pretrained(str(folder / name), use_safetensors=True, local_files_only=True).to(device).eval()
    except (OSError, ValueError, ImportError) as e:  # ImportError: e.g. a T5 tokenizer without sentencepiece
        fix = "install what it names" if isinstance(e, ImportError) else "it needs .safetensors weights and configs"
        raise UsageError(f"cannot load {folder / name}: {(str(e).splitlines() or [type(e).__name__])[0]}; {fix} "
                         "(slimdiff never unpickles .bin files)") from None


# --------------------------------------------------------------------------- --data
def data_source(spec: str) -> tuple[str, Path] | None:
    """``("images", DIR)`` or ``("prompts", FILE)`` for ``--data images:DIR`` / ``prompts:FILE``
    (checked before any model loads), ``("folder", DIR)`` for a plain directory, else None."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("images", "prompts"):
        path = Path(rest).expanduser()
        if kind == "images" and not path.is_dir():
            raise UsageError(f"--data images:{rest}: no such directory; pass a folder of PNG/JPEG images")
        if kind == "prompts" and not path.is_file():
            raise UsageError(f"--data prompts:{rest}: no such file; pass a text file with one prompt per line")
        return kind, path
    return ("folder", Path(spec)) if Path(spec).is_dir() else None


def read_prompts(path: Path) -> list[str]:
    """The non-empty lines of a prompts file."""
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"{path} holds no prompts; write one prompt per line")
    return prompts


def encoded_data(spec: str, pipeline: Path | None, sample_size: int, text: bool, *, device: Any = "cpu",
                 generate: Callable[[TextCondition, int], torch.Tensor] | None = None, generate_key: str = "") -> str:
    """The ``--data`` value to load for a model of ``sample_size`` (``text``: captioned) loaded
    from ``pipeline`` (None: not from a pipeline): a cached latents file for images of a pipeline
    with a VAE, or for prompts (latents from ``generate(captions, index of the first)``, the
    model's own samples, which ``generate_key`` names in the cache key); pixel images as their
    folder; anything else as given."""
    source = data_source(spec)
    if source is None:
        return spec
    kind, path = source
    if kind == "prompts":
        if pipeline is None or not text or _text_len(pipeline) is None or generate is None:
            raise UsageError(f"--data prompts:{path} needs a text model loaded from a diffusers pipeline folder with "
                             "text_encoder/ and tokenizer/: pass that folder as --model")
        prompts = read_prompts(path)
        key = _key(pipeline, ["prompts", prompts, generate_key], ("text_encoder", "tokenizer"))
        return str(_cached(path.parent, key, lambda: _prompt_arrays(load_encoders(pipeline, device), prompts, generate)))
    if pipeline is None or _component(pipeline, "vae") is None:
        return str(path)  # pixel images: read as they are
    if text and _text_len(pipeline) is None:
        raise UsageError(f"{pipeline} has no text_encoder/ and tokenizer/ to caption the images for this text model; "
                         "pass the full pipeline folder, or a latents file with encoder_hidden_states")
    from slimdiff.data.datasets import ImageFolder

    images = ImageFolder(path, sample_size * _vae_scale(json.loads((pipeline / "vae" / "config.json").read_text())), 3)
    captions = _captions(images) if text else []
    parts = [images.size, captions, [p.relative_to(images.root).as_posix() for p in images.files],
             [_file_digest(p) for p in images.files]]
    key = _key(pipeline, parts, ("vae", "text_encoder", "tokenizer") if text else ("vae",))
    return str(_cached(path, key, lambda: _image_arrays(load_encoders(pipeline, device), images, captions)))


def _captions(images) -> list[str]:
    """Each image's caption (see the module docstring)."""
    table: dict[str, str] = {}
    listing = images.root / CAPTIONS
    if listing.is_file():
        for n, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip():
                continue
            name, sep, caption = line.partition("\t")
            if not sep:
                raise UsageError(f"{listing} line {n}: write FILE<TAB>caption (the image's path under {images.root})")
            table[name.strip()] = caption.strip()
    out = []
    for p in images.files:
        side = p.with_suffix(".txt")
        caption = table.get(p.relative_to(images.root).as_posix())
        out.append(caption if caption is not None else side.read_text().strip() if side.is_file() else "")
    return out


def _image_arrays(enc: Encoders, images, captions: list[str]) -> dict[str, torch.Tensor]:
    z, labels, embeds, masks = [], [], [], []
    for start in range(0, len(images), BATCH):
        batch = [images[i] for i in range(start, min(start + BATCH, len(images)))]
        z.append(enc.encode_images(torch.stack([x for x, _ in batch])))
        labels.append(torch.stack([y for _, y in batch]))
        if captions:
            cond = enc.encode_prompts(captions[start:start + BATCH])
            embeds.append(cond.embeds)
            masks.append(cond.mask)
    arrays = {"latents": torch.cat(z), "labels": torch.cat(labels)}
    return {**arrays, **(_text_arrays(embeds, masks) if captions else {})}


def _prompt_arrays(enc: Encoders, prompts: list[str], generate) -> dict[str, torch.Tensor]:
    starts = range(0, len(prompts), BATCH)
    conds = [enc.encode_prompts(prompts[s:s + BATCH]) for s in starts]
    latents = torch.cat([generate(c, s).float().cpu() for c, s in zip(conds, starts)])
    return {"latents": latents, **_text_arrays([c.embeds for c in conds], [c.mask for c in conds])}


def _text_arrays(embeds: list[torch.Tensor], masks: list[torch.Tensor | None]) -> dict[str, torch.Tensor]:
    out = {"encoder_hidden_states": torch.cat(embeds)}
    return {**out, "encoder_attention_mask": torch.cat(masks)} if masks[0] is not None else out


def _vae_scale(vae_config: dict) -> int:
    """Image pixels per latent pixel of a VAE config: diffusers' ``vae_scale_factor``."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


# --------------------------------------------------------------------------- cache
def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _key(pipeline: Path, parts: list, components: tuple[str, ...]) -> str:
    """Hash of ``parts`` and the encoders' configs and weight files (name, size, modification
    time: hashing gigabytes of weights on every run would cost more than it saves)."""
    h = hashlib.sha256(json.dumps([ENCODING, parts], default=str).encode())
    for name in components:
        for f in sorted((pipeline / name).glob("*")) if (pipeline / name).is_dir() else []:
            stat = f.stat()
            h.update(f"{name}/{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            if f.suffix == ".json":
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _cached(beside: Path, key: str, make: Callable[[], dict[str, torch.Tensor]]) -> Path:
    """The latents file for ``key`` (in ``$SLIMDIFF_CACHE``, else ``beside/.slimdiff-cache``), made once."""
    from safetensors.torch import save_file

    folder = Path(os.environ.get(CACHE_ENV) or beside / ".slimdiff-cache")
    path = folder / f"latents-{key}.safetensors"
    if path.is_file():
        return path
    arrays = {k: v.contiguous() for k, v in make().items()}
    try:  # a killed run leaves no half-written cache entry
        atomic.write_file(path, lambda tmp: save_file(arrays, str(tmp)))
    except OSError as e:
        raise UsageError(f"cannot write the latents cache {path} ({e.strerror or e}); set {CACHE_ENV} to a "
                         "writable folder") from None
    return path
