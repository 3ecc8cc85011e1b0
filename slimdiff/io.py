"""Save and load models as a slimdiff directory: ``slimdiff.json`` + ``model.safetensors``.

(Over 500 lines on purpose: the writer and the reader of one format, each structure rule
next to its inverse, so that a change to one side cannot miss the other.)

Format (``format_version`` 1)::

    {
      "format_version": 1,
      "slimdiff_version": "0.1.0",
      "architecture": {"class": "DiT", "config": {...}},   # constructor config
      "structure": {                       # what the config alone does not rebuild
        "lengths": {"blocks": 20},         # ModuleLists shorter than the config builds (depth pruning)
        "layers": {"blocks.0.mlp.fc1": {"type": "Linear", "in_features": 64, ...}},
        "tensors": {"blocks.0.scale_shift_table": {"shape": [6, 48], "kind": "parameter"}},
        "attrs": {"blocks.0.attn": {"num_heads": 2}, "down_blocks.0.downsamplers.0": {...}}
      },
      "weights": {"file": "model.safetensors", "sha256": "...", "tensors": 151, "bytes": 123},
      "name": ..., "diffusion": {...}, "method": {...} | null, "measured": {...}, "extras": {...},
      "other_meta": {...}                  # any other keys of model.slimdiff_meta
    }

``structure.layers`` lists every ``nn.Linear`` / ``nn.Conv2d`` / ``nn.GroupNorm`` /
``nn.LayerNorm`` / ``nn.Embedding`` whose constructor arguments differ from the model
the config builds; ``tensors`` covers other parameters/buffers whose shape differs;
``attrs`` always records attention head counts (our DiT ``attn.num_heads``, diffusers
``Attention.heads``/``inner_dim``/``inner_kv_dim``/``scale``) and ``Downsample2D`` /
``Upsample2D`` channel counts, plus any plain scalar attribute (bool/int/float/str/None)
that differs from the config-built model -- the runtime settings pruning fix-ups and
converters leave behind (``sliceable_head_dim``, ``time_proj.downscale_freq_shift``, ...). Loading builds the class from the config (on the meta
device, so no random initialisation), applies the structure, and loads the weights with
``strict=True``. :func:`save` checks that exactly this rebuild reproduces the model's
keys and shapes, so a directory that saves also loads.

The metadata keys are a :class:`slimdiff.result.ModelRecord` (``to_doc`` / ``from_doc``). A
method whose result needs runtime state (a reuse plan, routers) has a restorer registered
here by the layer above (:func:`register_restorer`); :func:`load` applies it, so this module
never imports the methods.

Nothing on the load path unpickles: weights are read with safetensors only, and a
directory holding pickle files (``*.pt``, ``*.bin``, ...) is refused outright. ``slimdiff.json``
is untrusted: :func:`load` validates it whole with :mod:`slimdiff.schema` (bounded by the
tensor shapes of the safetensors header) before it builds anything, and :func:`save` runs
the same check on what it writes, so that a directory that saves also loads.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from slimdiff import atomic, schema
from slimdiff.errors import UsageError
from slimdiff.reproducible import without_times
from slimdiff.result import ModelRecord, record_of, set_record
from slimdiff.utils import hooked_modules

FORMAT_VERSION = 1
JSON_NAME = "slimdiff.json"
WEIGHTS_NAME = "model.safetensors"
DIFFUSERS_CLASSES = (
    "DiTTransformer2DModel",
    "PixArtTransformer2DModel",
    "UNet2DModel",
    "UNet2DConditionModel",
)
ARCHITECTURES = ("DiT",) + DIFFUSERS_CLASSES
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
MAX_JSON_BYTES = 64 << 20  # far above any record slimdiff writes; bounds what a crafted file can make load parse

_LAYERS: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv2d": nn.Conv2d,
    "GroupNorm": nn.GroupNorm,
    "LayerNorm": nn.LayerNorm,
    "Embedding": nn.Embedding,
}


# --------------------------------------------------------------------------- public API
def save(model: nn.Module, path, *, meta: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` to the directory ``path`` atomically and return its path.

    ``meta`` is merged over ``model.slimdiff_meta`` (keys ``name``, ``diffusion``, ``method``,
    ``measured``, ``extras``; other keys are kept under ``other_meta``). The directory is
    first written next to the target, fsynced, then renamed into place, so a failed save
    never leaves a half-written directory. An existing directory is replaced only when it
    is empty, holds an identical result, or ``overwrite=True`` and it is a slimdiff
    directory; any other non-empty directory is never replaced.
    """
    model = _unwrap(model)
    arch = architecture_name(model)
    target = Path(path).expanduser().absolute()
    existing = _check_target(target)
    record = record_of(model).with_meta(meta)
    config = _config_of(model, arch)
    structure = _structure_for_save(model, arch, config, record)
    _check_finite(model)
    try:
        tmp = atomic.temp_dir(target)
    except OSError as e:
        raise _not_writable(target.parent, e) from None

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        wpath = tmp / WEIGHTS_NAME
        tensors = _tensors_for_save(model)
        shapes = {k: tuple(t.shape) for k, t in tensors.items()}
        save_file(tensors, str(wpath), metadata={"format": "pt"})
        del tensors
        doc = {
            "format_version": FORMAT_VERSION,
            "slimdiff_version": _slimdiff_version(),
            "architecture": {"class": arch, "config": config},
            "structure": structure,
            "weights": {
                "file": WEIGHTS_NAME,
                "sha256": _sha256(wpath),
                "tensors": len(shapes),
                "bytes": wpath.stat().st_size,
            },
            **record.to_doc(),
        }
        text = _dumps(doc, what="slimdiff metadata (model.slimdiff_meta / meta)")
        # what load would refuse is refused now, so that a directory that saves also loads
        schema.check_document(json.loads(text), shapes, Path("slimdiff.save"), weights_name=WEIGHTS_NAME,
                              known_method=_known_method,
                              fix="this model or its record (meta) would not load back: fix it before saving")
        (tmp / JSON_NAME).write_text(text, encoding="utf-8")
        if existing == "slimdiff" and not overwrite:
            old = (target / JSON_NAME).read_text(encoding="utf-8", errors="replace")
            try:  # the same result, up to time-varying fields (CPU seconds): the weights' sha256 is in the JSON
                same = without_times(json.loads(old)) == without_times(json.loads(text))
            except ValueError:
                same = False
            if not same:
                raise UsageError(
                    f"{target} already holds a different slimdiff model; pass overwrite=True "
                    "(CLI: --overwrite) to replace it, or choose another path"
                )

    return atomic.write_dir(target, write, tmp=tmp, replace=existing is not None)


def check_output(path) -> Path:
    """Fail before any work when :func:`save` could not write ``path``: a file, a non-empty
    directory that is not a slimdiff result, or a place that cannot be created or written.

    Creates the missing parent directories (as ``save`` would) and returns the absolute path.
    Whether an existing slimdiff result differs is only known at :func:`save` time.
    """
    target = Path(path).expanduser().absolute()
    _check_target(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(prefix=f".{target.name}.probe-", dir=target.parent).cleanup()
    except OSError as e:
        raise _not_writable(target.parent, e) from None
    return target


def _not_writable(where: Path, e: OSError) -> UsageError:
    return UsageError(f"cannot write to {where} ({e.strerror or type(e).__name__}); choose a writable output path")


def load(path) -> nn.Module:
    """Rebuild the model saved by :func:`save` in ``path``, in ``eval()`` mode.

    No pickle and no network: ``slimdiff.json`` is untrusted and validated whole against
    :mod:`slimdiff.schema` (with the tensor shapes of the ``model.safetensors`` header) before
    anything is built; then the class is built from it, the recorded structure applied, and
    ``model.safetensors`` loaded with ``strict=True``. Every failure raises :class:`UsageError`
    with one line naming the file, the problem and the fix.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"slimdiff.io.load: path = {path!r:.60} is not a path; pass the directory slimdiff.save wrote")
    d = Path(path).expanduser()
    if d.is_file() and d.name in (JSON_NAME, WEIGHTS_NAME):
        d = d.parent
    if d.is_file() and d.suffix.lower() in PICKLE_SUFFIXES:
        raise UsageError(
            f"{d} is a pickle checkpoint; slimdiff.load reads only slimdiff directories (slimdiff.json + "
            f"model.safetensors) and never unpickles files; for an official DiT checkpoint use "
            f"slimdiff.models.registry.load_model({str(d)!r})"
        )
    if not d.is_dir():
        raise UsageError(f"{d}: no such model directory; pass a directory written by slimdiff.save")
    pickles = sorted(p.name for p in d.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UsageError(
            f"{d} contains pickle file(s) {', '.join(pickles)}; slimdiff never unpickles model files "
            f"(they can run arbitrary code): delete them, keep only {JSON_NAME} + {WEIGHTS_NAME}"
        )
    doc = _read_json(d / JSON_NAME)
    arch, config, structure = _read_architecture(doc, d / JSON_NAME)
    shapes = _read_shapes(d / WEIGHTS_NAME, doc)
    schema.check_document(doc, shapes, d / JSON_NAME, weights_name=WEIGHTS_NAME, known_method=_known_method)
    tensors = _read_weights(d / WEIGHTS_NAME, doc)

    record = ModelRecord.from_doc(doc)
    model = _build(arch, config, structure, where=d / JSON_NAME, record=record)
    _check_fit(model, tensors, arch, d / WEIGHTS_NAME)
    model = _materialize(model, arch, config, structure, d / JSON_NAME, record)
    _match_dtypes(model, tensors)
    model.load_state_dict(tensors, strict=True)
    set_record(model, record)
    return model.eval()


def export_diffusers(model: nn.Module, path) -> Path:
    """Write ``model`` with diffusers' ``save_pretrained`` so plain diffusers can load it.

    Works for diffusers models and our DiT (converted with
    ``slimdiff.models.convert.dit_to_diffusers``) when the model is exactly what its
    config builds (uniform widths; depth pruning with an updated config). Per-layer widths
    cannot be written in a diffusers config: those models raise :class:`UsageError`.
    """
    model = _unwrap(model)
    _refuse_hooked(model, "export to diffusers")
    arch = architecture_name(model)
    if arch == "DiT":  # the converter handles depth; its output is checked below
        try:
            from slimdiff.models.convert import dit_to_diffusers
        except ImportError as e:
            raise UsageError(f"cannot export DiT to diffusers: the converter is unavailable ({e})") from e
        model = dit_to_diffusers(model)
        arch = architecture_name(model)
    _require_plain(model, arch, "export to diffusers")
    target = Path(path).expanduser().absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(f"{target} exists and is not an empty directory; choose a new path for the diffusers export")
    model.save_pretrained(str(target), safe_serialization=True)
    return target


def _refuse_hooked(model: nn.Module, action: str) -> None:
    hooked = [n or "the model" for n in hooked_modules(model)]
    if hooked:  # a reuse plan, cache or router runs in hooks, which save_pretrained would silently drop
        raise UsageError(f"cannot {action}: {hooked[0]} carries a slimdiff runtime (reuse plan, cache or "
                         "routing) that a diffusers folder cannot hold; install the result in your pipeline with "
                         "slimdiff.apply(pipe, result) instead (slimdiff.save_pipeline saves that pipeline)")


def diffusers_refusal(model: nn.Module) -> str | None:
    """Why diffusers' own ``save_pretrained`` of the diffusers model ``model`` would not give it
    back (a slimdiff runtime in hooks, per-layer widths its config cannot hold), or None."""
    action = "save it with diffusers' save_pretrained"
    try:
        _refuse_hooked(model, action)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # runtime settings only warn: not a refusal
            _require_plain(model, architecture_name(model), action)
    except UsageError as e:
        return str(e)
    return None


def architecture_name(model: nn.Module) -> str:
    """The ``architecture.class`` name of ``model``, or :class:`UsageError` if unsupported.

    Exact classes only: a subclass may change ``forward``, which a rebuild from the base
    class would silently drop.
    """
    from slimdiff.models.dit import DiT

    cls = type(_unwrap(model))
    if cls is DiT:
        return "DiT"
    if cls.__name__ in DIFFUSERS_CLASSES and cls.__module__.startswith("diffusers."):
        return cls.__name__
    raise UsageError(
        f"cannot save a {cls.__module__}.{cls.__name__}: slimdiff directories hold exactly one of "
        f"{', '.join(ARCHITECTURES)}"
    )


# --------------------------------------------------------------------------- method runtimes
Restorer = Callable[[nn.Module, Any], None]
_RESTORERS: dict[str, Restorer | None] = {}  # every known method name; None: nothing to restore


def register_restorer(method: str, restore: Restorer | None) -> None:
    """Make ``method`` a known method name (:func:`load` refuses a chain naming any other) and
    make :func:`load` call ``restore(model, extras)`` for a model whose chain names it
    (``extras``: what the method recorded in ``extras[method]``); ``None``: nothing to restore.

    The layers above fill this registry (the methods layer, for each spec it registers), so
    that loading a model never imports them. :func:`unregister_method` forgets a name.
    """
    _RESTORERS[method] = restore


def unregister_method(method: str) -> None:
    """Forget ``method`` (registered with :func:`register_restorer`): loading names it no more."""
    _RESTORERS.pop(method, None)


def restore_runtime(model: nn.Module, record: ModelRecord | None = None) -> nn.Module:
    """Re-apply every runtime (reuse plan, routing tables) recorded in ``record`` (default: the
    model's own) to ``model``, in chain order; returns the model."""
    record = record_of(model) if record is None else record
    for entry in record.result.chain:
        restore = _restorer(entry.method)
        if restore is not None:
            restore(model, record.result.extras.get(entry.method))
    return model


def _restorer(method: str) -> Restorer | None:
    """The restorer of ``method``; on a miss the package facade first registers the built-in
    methods (their modules load only when a saved chain names one)."""
    _known_method(method)
    return _RESTORERS.get(method)


def _known_method(method: str) -> bool:
    """Whether ``method`` is registered, after asking the facade to register the built-in methods."""
    if method not in _RESTORERS:
        import slimdiff

        slimdiff.register_builtin_restorers()
    return method in _RESTORERS


# --------------------------------------------------------------------------- structure
def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def _model_class(arch: str):
    if arch == "DiT":
        from slimdiff.models.dit import DiT

        return DiT
    import diffusers

    return getattr(diffusers, arch)


def _config_of(model: nn.Module, arch: str) -> dict:
    if arch == "DiT":
        return asdict(model.config)
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return json.loads(_dumps(cfg, what=f"{arch} config"))


def _construct(arch: str, config: dict, device: str) -> nn.Module:
    cls = _model_class(arch)
    with torch.device(device):
        return cls(**config) if arch == "DiT" else cls.from_config(config)


def _layer_spec(m: nn.Module) -> dict | None:
    t = type(m)
    if t is nn.Linear:
        return {"type": "Linear", "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
    if t is nn.Conv2d:
        return {
            "type": "Conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
            "kernel_size": list(m.kernel_size), "stride": list(m.stride),
            "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
            "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
            "padding_mode": m.padding_mode,
        }  # fmt: skip
    if t is nn.GroupNorm:
        return {"type": "GroupNorm", "num_groups": m.num_groups, "num_channels": m.num_channels, "eps": m.eps, "affine": m.affine}
    if t is nn.LayerNorm:
        return {
            "type": "LayerNorm", "normalized_shape": list(m.normalized_shape), "eps": m.eps,
            "elementwise_affine": m.elementwise_affine, "bias": getattr(m, "bias", None) is not None,
        }  # fmt: skip
    if t is nn.Embedding:
        return {
            "type": "Embedding", "num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
            "padding_idx": m.padding_idx, "max_norm": m.max_norm, "norm_type": m.norm_type,
            "scale_grad_by_freq": m.scale_grad_by_freq, "sparse": m.sparse,
        }  # fmt: skip
    return None


def _fixed_attrs(m: nn.Module) -> dict | None:
    """Attributes always recorded: attention head counts and Down/Upsample channel checks."""
    cls = type(m)
    if cls.__name__ == "Attention" and cls.__module__ == "slimdiff.models.dit":
        return {"num_heads": m.num_heads}
    if not cls.__module__.startswith("diffusers."):
        return None
    if cls.__name__ in ("Downsample2D", "Upsample2D"):
        return {"channels": m.channels, "out_channels": m.out_channels}
    if isinstance(getattr(m, "heads", None), int):
        names = ("heads", "inner_dim", "inner_kv_dim", "scale")
        return {k: getattr(m, k) for k in names if isinstance(vars(m).get(k), (int, float))}
    return None


_SCALARS = (bool, int, float, str, type(None))


def _scalar_diffs(m: nn.Module, fresh: nn.Module | None) -> dict:
    """Plain instance attributes (eps, frequency shifts, ...) set after construction."""
    if fresh is None or type(fresh) is not type(m):
        return {}
    fv, missing = vars(fresh), object()
    return {
        k: v for k, v in vars(m).items()
        if not k.startswith("_") and k != "training" and isinstance(v, _SCALARS)
        and not (type(fv.get(k, missing)) is type(v) and fv[k] == v)
    }  # fmt: skip


def _structure(model: nn.Module, fresh: nn.Module) -> dict:
    """What must be applied to ``fresh`` (built from the config) to get ``model``'s layout."""
    fmods = dict(fresh.named_modules(remove_duplicate=False))
    lengths, layers, attrs, covered = {}, {}, {}, set()
    runtime = _runtime_prefixes(model)
    for name, mod in model.named_modules(remove_duplicate=False):
        if name.startswith(runtime):
            continue
        f = fmods.get(name)
        if isinstance(mod, nn.ModuleList) and isinstance(f, nn.ModuleList) and len(mod) != len(f):
            lengths[name] = len(mod)
        spec = _layer_spec(mod)
        if spec is not None:
            covered.add(name)
            if name not in layers and (f is None or _layer_spec(f) != spec):
                layers[name] = spec
        a = {**(_fixed_attrs(mod) or {}), **({} if spec is not None else _scalar_diffs(mod, f))}
        if a:
            attrs[name] = a
    # Aliases (one module under two names) need only one entry: load replaces all names.
    seen, unique_layers = set(), {}
    for name, spec in layers.items():
        mid = id(model.get_submodule(name))
        if mid not in seen:
            seen.add(mid)
            unique_layers[name] = spec
    fshapes = {k: tuple(v.shape) for k, v in fresh.state_dict(keep_vars=True).items()}
    tensors = {}
    for key, v in model.state_dict(keep_vars=True).items():
        owner, _, attr = key.rpartition(".")
        if owner in covered or fshapes.get(key) == tuple(v.shape) or key.startswith(runtime):
            continue
        kind = "parameter" if attr in model.get_submodule(owner)._parameters else "buffer"
        tensors[key] = {"shape": list(v.shape), "kind": kind}
    return {"lengths": lengths, "layers": unique_layers, "tensors": tensors, "attrs": attrs}


def _runtime_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes of method-runtime subtrees (modules with ``slimdiff_runtime = True``, e.g.
    DyDiT's routers): the method's restorer rebuilds them on load, so the structure skips them
    (their weights are still saved and loaded)."""
    return tuple(f"{n}." for n, m in model.named_modules() if n and getattr(m, "slimdiff_runtime", False))


def _apply_structure(model: nn.Module, structure: dict, where: Path) -> None:
    """Turn a model built from its config into the recorded layout (any device context)."""
    try:
        for name, n in (structure.get("lengths") or {}).items():
            ml = model.get_submodule(name)
            if not isinstance(ml, nn.ModuleList) or len(ml) < n:
                raise UsageError(f"{where}: structure asks for {n} modules in {name!r}, the config builds fewer")
            del ml[n:]
        for name, spec in (structure.get("layers") or {}).items():
            spec = dict(spec)
            kind = spec.pop("type")
            if kind not in _LAYERS:
                raise UsageError(f"{where}: unknown layer type {kind!r} for {name!r}; upgrade slimdiff")
            new = _LAYERS[kind](**spec)
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            old = parent._modules.get(attr)
            targets = [(parent, attr)]
            if old is not None:  # replace every name under which the old layer is registered
                targets = [
                    (p, a) for _, p in model.named_modules(remove_duplicate=False)
                    for a, c in p._modules.items() if c is old
                ]  # fmt: skip
            for p, a in targets:
                setattr(p, a, new)
        for key, spec in (structure.get("tensors") or {}).items():
            owner_name, _, attr = key.rpartition(".")
            owner = model.get_submodule(owner_name)
            old = getattr(owner, attr, None)
            dtype = old.dtype if isinstance(old, torch.Tensor) else torch.float32
            empty = torch.empty(spec["shape"], dtype=dtype)
            if spec.get("kind") == "buffer":
                owner.register_buffer(attr, empty)
            else:
                req = old.requires_grad if isinstance(old, nn.Parameter) else True
                setattr(owner, attr, nn.Parameter(empty, requires_grad=req))
        for name, values in (structure.get("attrs") or {}).items():
            mod = model.get_submodule(name)
            for k, v in values.items():
                _check_attr(mod, name, k, v, where)
                setattr(mod, k, v)
    except (AttributeError, TypeError, ValueError, KeyError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(
            f"{where}: the recorded structure does not fit the architecture ({e}); the file is damaged "
            "or was written for another model; re-save the model"
        ) from e


def _check_attr(mod: nn.Module, name: str, attr: str, value: Any, where: Path) -> None:
    """Only what :func:`save` records may be set: an existing plain scalar instance attribute
    (a head count, an eps, a frequency shift), given a value of a compatible type."""
    old = vars(mod).get(attr, _MISSING)
    numbers = (int, float)
    fits = old is None or value is None or type(old) is type(value) or (
        type(old) in numbers and type(value) in numbers)
    if old is _MISSING or not isinstance(old, _SCALARS) or not fits:
        held = "no such attribute" if old is _MISSING else f"a {type(old).__name__}"
        raise UsageError(
            f"{where}: structure.attrs[{name!r}].{attr} = {value!r:.60} is invalid ({type(mod).__name__} holds {held}; "
            "only existing plain number/string/bool settings may be recorded); the file is damaged or was edited: "
            "re-save the model"
        )


_MISSING = object()


def _structure_for_save(model: nn.Module, arch: str, config: dict, record: ModelRecord) -> dict:
    """Record the structure and prove that load's rebuild reproduces every key and shape."""
    structure = _structure(model, _construct(arch, config, "meta"))
    fresh = _build(arch, config, structure, Path("<structure>"), record=record)
    want, got = _shapes(model), _shapes(fresh)
    if want != got:
        extra = sorted(set(want) - set(got))[:3]
        missing = sorted(set(got) - set(want))[:3]
        raise UsageError(
            f"cannot save this {arch}: its layout is not a {arch} with changed widths/heads/depth "
            f"(keys not rebuildable from the config: {extra or 'none'}; keys it lacks: {missing or 'none'}); "
            "save modules added by a method as data in the record's extras (methods.base.record) instead"
        )
    return structure


def _require_plain(model: nn.Module, arch: str, action: str) -> None:
    """Raise unless ``model`` has exactly the tensors and head counts its config builds.

    Runtime settings that a diffusers config does not store (a LayerNorm eps, a timestep
    frequency shift set after construction) only warn: plain diffusers reloads the model
    with the config's values.
    """
    fresh = _construct(arch, _config_of(model, arch), "meta")
    want, got = _shapes(model), _shapes(fresh)
    problems = [f"{k} has shape {want[k]}, the config builds {got.get(k, 'no such tensor')}" for k in want if want[k] != got.get(k)]
    problems += [f"{k} is missing (the config builds {got[k]})" for k in got if k not in want]
    fmods = dict(fresh.named_modules())
    runtime = []
    for name, m in model.named_modules():
        f = fmods.get(name)
        a, fa = _fixed_attrs(m), (_fixed_attrs(f) if f is not None else None)
        if a and a != fa:
            problems.append(f"{name} has {a}, the config builds {fa}")
        runtime += [f"{name}.{k}={v!r}" for k, v in _scalar_diffs(m, f).items() if not (a and k in a)]
    if problems:
        raise UsageError(
            f"cannot {action}: {len(problems)} tensor(s)/layer(s) differ from what the {arch} config builds "
            f"(e.g. {'; '.join(problems[:2])}); a diffusers config holds one width per block type, so "
            "per-layer widths need the slimdiff directory (slimdiff.save / slimdiff.load)"
        )
    if runtime:
        warnings.warn(
            f"{len(runtime)} runtime setting(s) differ from the {arch} config and are not stored by "
            f"save_pretrained (e.g. {', '.join(runtime[:3])}); plain diffusers reloads them with the config's "
            "values, so outputs may differ slightly; slimdiff.save keeps them",
            stacklevel=3,
        )


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}


# --------------------------------------------------------------------------- save helpers
def _check_target(target: Path) -> str | None:
    """None (absent), "empty" or "slimdiff"; raise for anything we must not replace."""
    if not target.exists():
        return None
    if not target.is_dir():
        raise UsageError(f"{target} exists and is a file; choose a directory path for slimdiff.save")
    if not any(target.iterdir()):
        return "empty"
    if not (target / JSON_NAME).is_file():
        raise UsageError(
            f"{target} is a non-empty directory without {JSON_NAME}; slimdiff.save never replaces it "
            "(not even with overwrite=True): choose a new or empty path"
        )
    return "slimdiff"


def _check_finite(model: nn.Module) -> None:
    """Refuse to save NaN/inf weights: such a model samples garbage, and a saved one hides where it broke."""
    for k, v in model.state_dict().items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise UsageError(
                f"slimdiff.save: tensor {k!r} holds {bad} non-finite value(s) (NaN/inf); the model diverged or was "
                "loaded wrongly: fix it (e.g. a lower learning rate, fp32 instead of fp16) before saving"
            )


def _tensors_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors; a tensor sharing storage with an earlier one is cloned."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        t = v.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr in seen or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        if ptr is not None:
            seen.add(ptr)
        out[k] = t
    return out


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return o.as_posix()
    if isinstance(o, torch.dtype):
        return str(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if hasattr(o, "to_dict") and callable(o.to_dict):
        return o.to_dict()
    raise TypeError(f"a {type(o).__name__} is not JSON-serialisable")


def _dumps(doc: dict, *, what: str) -> str:
    try:
        return json.dumps(doc, indent=2, default=_json_default, allow_nan=True) + "\n"
    except (TypeError, ValueError) as e:
        raise UsageError(f"cannot save: {what} holds {e}; store plain dicts, lists, strings and numbers") from e


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _slimdiff_version() -> str:
    from slimdiff import __version__

    return __version__


# --------------------------------------------------------------------------- load helpers
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"{path} is missing: {path.parent} is not a slimdiff model directory; pass a directory written by slimdiff.save")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise UsageError(f"{path} is {size} bytes, over the {MAX_JSON_BYTES >> 20} MiB a slimdiff.json may hold; the "
                         "file is damaged or not slimdiff's: restore it or re-save the model")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        what = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise UsageError(f"{path} is not valid JSON ({what}); the file is damaged: restore it or re-save the "
                         "model") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("format_version"), int):
        raise UsageError(f"{path} has no integer 'format_version': not a slimdiff.json; re-save the model with slimdiff.save")
    if doc["format_version"] > FORMAT_VERSION:
        raise UsageError(
            f"{path} has format_version {doc['format_version']} and was written by a newer slimdiff "
            f"({doc.get('slimdiff_version', '?')}); this slimdiff reads up to {FORMAT_VERSION}: upgrade slimdiff"
        )
    return doc


def _read_architecture(doc: dict, where: Path) -> tuple[str, dict, dict]:
    arch = doc.get("architecture")
    if not isinstance(arch, dict) or not isinstance(arch.get("config"), dict):
        raise UsageError(f"{where} lacks 'architecture.config'; the file is damaged: re-save the model")
    cls = arch.get("class")
    if cls not in ARCHITECTURES:
        raise UsageError(f"{where}: unknown architecture class {cls!r} (known: {', '.join(ARCHITECTURES)}); upgrade slimdiff")
    structure = doc.get("structure") or {}
    if not isinstance(structure, dict):
        raise UsageError(f"{where}: 'structure' is not an object; the file is damaged: re-save the model")
    return cls, arch["config"], structure


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5)


def _read_shapes(path: Path, doc: dict) -> dict[str, tuple[int, ...]]:
    """The tensor shapes in the header of the weights file (no tensor data is read): what
    :func:`slimdiff.schema.check_document` bounds the recorded sizes with."""
    if not path.is_file():
        others = sorted(p.name for p in path.parent.iterdir() if p.name != JSON_NAME)
        raise UsageError(
            f"{path} is missing (directory holds: {', '.join(others) or 'nothing else'}); "
            "copy the whole directory written by slimdiff.save"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # SafetensorError is a plain Exception subclass
        raise _unreadable(path, doc, e) from e


def _unreadable(path: Path, doc: dict, e: Exception) -> UsageError:
    """The one-line error for a weights file safetensors cannot read: a pickle, truncated, corrupted."""
    if _looks_like_pickle(path):
        return UsageError(
            f"{path} is a pickle / torch.save file, not safetensors; slimdiff never unpickles model "
            "files: convert it to safetensors in a trusted environment, or re-save the model"
        )
    expected = doc.get("weights") if isinstance(doc.get("weights"), dict) else {}
    size, want = path.stat().st_size, expected.get("bytes")
    if type(want) is int and size < want:
        return UsageError(f"{path} is truncated ({size} of {want} bytes); copy the file again or re-save the model")
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return UsageError(f"{path} is corrupted and cannot be read as safetensors ({msg}); copy it again or re-save "
                      "the model")


def _read_weights(path: Path, doc: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the (header-checked) weights file, once its sha256 matches the record."""
    want_sha, got = doc["weights"]["sha256"], _sha256(path)
    if got != want_sha:
        raise UsageError(
            f"{path}: sha256 mismatch (file {got[:16]}..., {JSON_NAME} says {want_sha[:16]}...): the "
            "weights changed or were corrupted after saving; copy them again or re-save the model"
        )
    try:
        from safetensors.torch import load_file

        return load_file(str(path))
    except Exception as e:  # SafetensorError is a plain Exception subclass
        raise _unreadable(path, doc, e) from e


def _build(arch: str, config: dict, structure: dict, where: Path, device: str = "meta",
           record: ModelRecord | None = None) -> nn.Module:
    """Construct from config, apply the recorded structure, then let the methods in ``record``'s
    chain add what they need (routers, reuse hooks) before any weight is loaded."""
    try:
        model = _construct(arch, config, device)
    except _BUILD_ERRORS as e:
        raise UsageError(f"{where}: cannot build {arch} from the stored config ({_first_line(e)}); the file is "
                         "damaged or from another slimdiff version") from e
    with torch.device(device):
        _apply_structure(model, structure, where)
        if record is not None:
            set_record(model, record)
            try:
                restore_runtime(model, record)
            except _BUILD_ERRORS as e:
                if isinstance(e, UsageError):
                    raise
                raise UsageError(f"{where}: the recorded method runtime (extras of {record.result.method}) does not "
                                 f"fit the model ({_first_line(e)}); the file is damaged: re-save the model") from e
    return model


# what a constructor or a restorer raises on values the schema lets through but the code rejects
_BUILD_ERRORS = (TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError, AssertionError,
                 RuntimeError, NameError)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_fit(model: nn.Module, tensors: dict[str, torch.Tensor], arch: str, where: Path) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    shapes = [f"{k} {have[k]} vs {want[k]}" for k in want if k in have and have[k] != want[k]]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) e.g. {', '.join(missing[:3])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) e.g. {', '.join(unexpected[:3])}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) (file vs model) e.g. {'; '.join(shapes[:3])}")
    raise UsageError(
        f"{where}: the weights belong to a different architecture than the {arch} described in {JSON_NAME} "
        f"({'; '.join(parts)}); keep the two files of one slimdiff.save together or re-save the model"
    )


def _meta_unsafe(model: nn.Module) -> bool:
    """True if a meta-built model cannot be materialised by ``to_empty`` + ``load_state_dict``."""
    persistent = set(model.state_dict(keep_vars=True))
    if any(n not in persistent for n, _ in model.named_buffers()):
        return True  # non-persistent buffers hold values computed at construction
    ids = [id(p) for m in model.modules() for p in m._parameters.values() if p is not None]
    if len(ids) != len(set(ids)):
        return True  # parameters tied across modules would be untied by to_empty
    return any(
        isinstance(v, torch.Tensor) and v.is_meta and not isinstance(v, nn.Parameter)
        for m in model.modules() for v in vars(m).values()
    )  # fmt: skip


def _materialize(model: nn.Module, arch: str, config: dict, structure: dict, where: Path,
                 record: ModelRecord) -> nn.Module:
    if _meta_unsafe(model):
        return _build(arch, config, structure, where, device="cpu", record=record)
    return model.to_empty(device="cpu")


def _match_dtypes(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters(remove_duplicate=False):
        t = tensors.get(name)
        if t is not None and t.dtype != p.dtype:
            p.data = p.data.to(t.dtype)
    for name, b in list(model.named_buffers(remove_duplicate=False)):
        t = tensors.get(name)
        if t is not None and t.dtype != b.dtype:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = b.to(t.dtype)
