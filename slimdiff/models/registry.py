"""Names -> models: one entry point, :func:`load_model`, for every way to name a model.

Resolution order (first match wins):

1. an existing local directory: a slimdiff directory (``slimdiff.json``, via
   :func:`slimdiff.io.load`) or a diffusers one (``config.json`` of a model, or a pipeline's
   ``model_index.json`` with a ``transformer``/``unet`` folder; safetensors only; the legacy
   ``Transformer2DModel`` of ``facebook/DiT-*`` loads as diffusers loads it, a ``DiTTransformer2DModel``;
   a pipeline's folder and caption length are recorded, :func:`pipeline_of`);
2. a shipped name: a directory ``slimdiff/weights/<name>/`` (``digits-dit``, ``mnist-dit``: see
   :data:`SHIPPED`; a shipped teacher whose weights are not built yet is an error naming the
   ``make`` target that trains and ships it);
3. a DiT size name from :data:`slimdiff.models.dit.DiT_models` (``DiT-XL/2``; ``DiT-XL-2``
   also works): random init, ``kwargs`` go to the constructor;
4. an official facebookresearch/DiT ``.pt`` checkpoint of any size via
   :func:`slimdiff.models.dit.load_official` (``torch.load(weights_only=True)``; the config is
   read from the weights, ``kwargs`` are ``DiTConfig`` fields that override it: the CLI's
   ``--dit-config``, parsed by :func:`dit_options`);
5. a Hugging Face Hub name (``facebook/DiT-XL-2-256``), only with ``allow_hub=True`` and
   ``HF_HUB_OFFLINE`` unset; by default an error says how to download it yourself.

Anything else raises :class:`UsageError` listing the accepted forms and close names.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import torch.nn as nn

from slimdiff import io
from slimdiff.errors import UsageError
from slimdiff.result import ModelRecord, record_of, set_record

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
SHIPPED = {"digits-dit": "make teacher", "mnist-dit": "make teacher-mnist"}
"""The shipped teachers and the command that trains and ships each into ``slimdiff/weights/<name>/``."""
LEGACY_CLASSES = {
    ("Transformer2DModel", "ada_norm_zero"): "DiTTransformer2DModel",
    ("Transformer2DModel", "ada_norm_single"): "PixArtTransformer2DModel",
}
"""(legacy ``_class_name``, ``norm_type``) -> the class diffusers loads it as (its own remapping):
``facebook/DiT-*`` and PixArt-alpha snapshots still name ``Transformer2DModel``."""
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z][\w.-]*$")  # not "DiT-XXL/2"


def shipped_dir(name: str) -> Path:
    """The directory of the shipped model ``name`` (it may not exist)."""
    return WEIGHTS_DIR / name


def available_names() -> list[str]:
    """Shipped model names (those present) followed by the DiT size names."""
    from slimdiff.models.dit import DiT_models

    shipped = sorted(p.name for p in WEIGHTS_DIR.glob("*") if (p / "slimdiff.json").is_file()) if WEIGHTS_DIR.is_dir() else []
    return shipped + list(DiT_models)


def _source(spec: str) -> str | None:
    """What :func:`load_model` reads ``spec`` as, in its order: ``dir``, ``shipped``, ``size``,
    ``pt`` or ``hub`` (``None``: nothing it can load)."""
    from slimdiff.models.dit import DiT_models

    path = Path(spec).expanduser()
    if path.is_dir():
        return "dir"
    if spec and "/" not in spec and (shipped_dir(spec) / "slimdiff.json").is_file():
        return "shipped"
    if _size_name(spec, DiT_models) is not None:
        return "size"
    if path.suffix.lower() == ".pt":
        return "pt"
    if _HUB_NAME.match(spec) and not path.exists():
        return "hub"
    return None


def takes_options(path_or_name: str | os.PathLike) -> bool:
    """Whether :func:`load_model` builds ``path_or_name`` from options (a DiT size name or an
    official ``.pt`` checkpoint) rather than loading a complete model (a directory or a shipped name)."""
    return _source(os.fspath(path_or_name)) in ("size", "pt")


def dit_options(text: str | None, path_or_name: str | os.PathLike) -> dict:
    """The CLI's ``--dit-config`` text (``input_size=32,num_classes=1000``) as typed
    :class:`~slimdiff.models.dit.DiTConfig` fields for ``path_or_name``, checked before anything
    is loaded: an unknown field, a bad value or options for a complete model is a :class:`UsageError`."""
    from slimdiff.models.dit import DiTConfig

    if not text:
        return {}
    if not takes_options(path_or_name):
        raise UsageError(f"--dit-config applies to DiT size names and official .pt checkpoints; {os.fspath(path_or_name)!r} "
                         "is a complete model whose config is stored with it: leave --dit-config out")
    fields = DiTConfig.__dataclass_fields__
    options = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in fields:
            raise UsageError(f"--dit-config takes NAME=VALUE pairs of DiTConfig fields ({', '.join(fields)}), "
                             f"e.g. input_size=32,num_classes=1000; got {item.strip()!r}")
        kind = type(fields[key].default)
        try:
            options[key] = {"true": True, "false": False}[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError):
            raise UsageError(f"--dit-config {key}={value!r} is not a {kind.__name__}; e.g. {key}={fields[key].default}") from None
    return options


def load_model(path_or_name: str | os.PathLike, *, allow_hub: bool = False, **kwargs) -> nn.Module:
    """Load a model from a local directory, a shipped name, a DiT size name, an official
    DiT ``.pt`` checkpoint or (opt-in) a Hub name; see the module docs for the order.

    The result carries its :class:`~slimdiff.result.ModelRecord` (at least ``name`` and
    ``diffusion``; :func:`slimdiff.result.record_of` reads it).
    """
    from slimdiff.diffusion.schedulers import DiffusionConfig
    from slimdiff.models.dit import DiT_models, load_official

    if not isinstance(path_or_name, (str, os.PathLike)) or not os.fspath(path_or_name):
        raise UsageError(f"slimdiff.load: path_or_name = {path_or_name!r:.60} is not a path or name; pass a model "
                         f"directory, a shipped name or DiT size ({', '.join(available_names()[:3])}, ...) or a .pt file")
    spec = os.fspath(path_or_name)
    path = Path(spec).expanduser()
    source = _source(spec)
    if source == "dir":
        _no_kwargs(spec, kwargs, "a model directory")
        return _load_dir(path)
    if source == "shipped":
        _no_kwargs(spec, kwargs, "a shipped model")
        model = _load_dir(shipped_dir(spec)).float()  # shipped weights are stored in fp16 to stay small
        return set_record(model, replace(record_of(model), name=spec))
    if source == "size":
        size = _size_name(spec, DiT_models)
        try:
            model = DiT_models[size](**kwargs)
        except TypeError as e:
            raise UsageError(f"bad options for {size}: {e}; pass DiTConfig fields such as input_size=8, in_channels=1, num_classes=10") from e
        return set_record(model, ModelRecord(size, DiffusionConfig().to_dict())).eval()
    if source == "pt":
        if not path.is_file():
            raise UsageError(f"{path}: no such checkpoint file; pass the path of an official DiT .pt file")
        return _load_official(path, load_official, kwargs)
    if source == "hub":
        return _load_hub(spec, allow_hub, kwargs)
    if spec in SHIPPED:
        raise UsageError(f"the shipped model {spec!r} is not built yet ({shipped_dir(spec)} has no {io.JSON_NAME}): "
                         f"train and ship it with `{SHIPPED[spec]}` (long: run it in the background; rerun to resume)")
    close = difflib.get_close_matches(spec, available_names(), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UsageError(
        f"cannot load {spec!r}: no such directory, shipped name, DiT size or .pt file; {hint}accepted: a directory "
        f"written by slimdiff.save, a shipped name or DiT size ({', '.join(available_names()[:4])}, ...; see "
        "slimdiff.models.registry.available_names()), an official DiT .pt checkpoint, or a local diffusers directory"
    )


# --------------------------------------------------------------------------- helpers
def _no_kwargs(spec: str, kwargs: dict, what: str) -> None:
    if kwargs:
        raise UsageError(f"{spec!r} is {what}, which takes no options (got {', '.join(kwargs)}); options apply to DiT size names and .pt checkpoints")


def _size_name(spec: str, sizes) -> str | None:
    """``DiT-XL/2`` or its file-name spelling ``DiT-XL-2``."""
    if spec in sizes:
        return spec
    alt = re.sub(r"^(DiT-[A-Za-z]+)-(\d+)$", r"\1/\2", spec)
    return alt if alt in sizes else None


def _load_dir(path: Path) -> nn.Module:
    if (path / io.JSON_NAME).is_file() or not ((path / "config.json").is_file() or (path / "model_index.json").is_file()):
        return io.load(path)  # also reports a directory that is neither kind
    return _load_diffusers_dir(path)


def _load_diffusers_dir(path: Path) -> nn.Module:
    """A diffusers model directory or pipeline snapshot, safetensors only, no network."""
    import diffusers

    from slimdiff.data.encode import pipeline_record
    from slimdiff.diffusion.schedulers import DiffusionConfig

    folder, sub = path, None
    if (path / "model_index.json").is_file():
        sub = next((s for s in ("transformer", "unet") if (path / s / "config.json").is_file()), None)
        if sub is None:
            raise UsageError(f"{path} is a diffusers pipeline without a transformer/ or unet/ folder; pass the model folder")
        folder = path / sub
    cls_name = _diffusers_class(folder)
    if not any(folder.glob("*.safetensors")):
        raise UsageError(f"{folder} has no .safetensors weights; slimdiff never unpickles .bin files: download the safetensors variant")
    try:
        model = getattr(diffusers, cls_name).from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"cannot load {folder} with diffusers: {str(e).splitlines()[0]}") from e
    _own_config_keys(model)
    diffusion = _diffusion_from_scheduler(path / "scheduler" / "scheduler_config.json") if sub else None
    pipeline = {"pipeline": pipeline_record(path)} if sub else {}  # its VAE / text encoder, its caption length
    return set_record(model, ModelRecord(path.name, (diffusion or DiffusionConfig()).to_dict(),
                                         provenance=pipeline)).eval()


def pipeline_of(model: nn.Module) -> Path | None:
    """The diffusers pipeline folder ``model`` (or the model it was compressed from) was loaded
    from, whose VAE and text encoder its data and samples go through; None when there is none."""
    path = (record_of(model).provenance.get("pipeline") or {}).get("path")
    return Path(path) if path else None


def _diffusers_class(folder: Path) -> str:
    """The supported diffusers class that ``folder/config.json`` names; a legacy name is read as
    diffusers itself reads it (:data:`LEGACY_CLASSES`)."""
    try:
        config = json.loads((folder / "config.json").read_text())
        name = config.get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise UsageError(f"{folder / 'config.json'} is not a readable JSON config ({e}); download the model again") from e
    name = LEGACY_CLASSES.get((name, config.get("norm_type")), name)
    if name not in io.DIFFUSERS_CLASSES:
        norm = f" with norm_type {config.get('norm_type')!r}" if name == "Transformer2DModel" else ""
        raise UsageError(f"{folder} holds a {name}{norm}; slimdiff supports {', '.join(io.DIFFUSERS_CLASSES)} "
                         "(and the legacy Transformer2DModel of a DiT or PixArt: norm_type ada_norm_zero or ada_norm_single)")
    return name


def _own_config_keys(model: nn.Module) -> None:
    """Drop the config keys of a legacy class (``cross_attention_dim``, ... of a
    ``Transformer2DModel``) that diffusers carries into the class it loads but that class does
    not take: slimdiff saves a config only with its class's own keys."""
    import inspect

    from diffusers.configuration_utils import FrozenDict

    own = inspect.signature(type(model).__init__).parameters
    model._internal_dict = FrozenDict({k: v for k, v in model.config.items() if k in own or k.startswith("_")})


def _diffusion_from_scheduler(path: Path):
    """DiffusionConfig from a pipeline's scheduler config (None when there is none)."""
    from slimdiff.diffusion.schedulers import DiffusionConfig

    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    if "FlowMatch" in cfg.get("_class_name", ""):
        return DiffusionConfig(objective="flow", num_train_timesteps=cfg.get("num_train_timesteps", 1000))
    objective = cfg.get("prediction_type", "epsilon")
    return DiffusionConfig.from_dict({**cfg, "objective": objective if objective in ("epsilon", "v_prediction") else "epsilon"})


def _load_official(path: Path, load_official, kwargs: dict) -> nn.Module:
    import pickle

    from slimdiff.diffusion.schedulers import DiffusionConfig

    try:
        model = load_official(str(path), **kwargs)
    except pickle.UnpicklingError as e:
        raise UsageError(
            f"{path} is not a plain tensor checkpoint: it holds Python objects that torch.load(weights_only=True) "
            "refuses to unpickle (they could run code); use the official DiT-*.pt files or a slimdiff directory"
        ) from e
    except RuntimeError as e:  # load_state_dict: "Error(s) in loading state_dict for DiT:" then the first mismatch
        given = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        raise UsageError(
            f"{path} does not fit a DiT built with {given + ' over ' if given else ''}the config read from its weights: "
            f"{' '.join(line.strip() for line in str(e).splitlines()[:2])}; pass the DiTConfig fields that differ "
            "(CLI: --dit-config num_heads=N,...) or leave out a wrong one"
        ) from e
    return set_record(model, ModelRecord(path.stem, DiffusionConfig().to_dict())).eval()


def _load_hub(name: str, allow_hub: bool, kwargs: dict) -> nn.Module:
    how = f"run `hf download {name} --local-dir DIR` (huggingface_hub) and pass DIR"
    if not allow_hub:
        raise UsageError(f"{name!r} looks like a Hugging Face Hub name; slimdiff does not download by default: {how}, or pass allow_hub=True")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off"):
        raise UsageError(f"cannot download {name!r}: HF_HUB_OFFLINE is set; {how} on a machine with network access")
    _no_kwargs(name, kwargs, "a Hub model")
    from huggingface_hub import snapshot_download

    local = snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])
    return _load_diffusers_dir(Path(local))
