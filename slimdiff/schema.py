"""Validate a ``slimdiff.json`` against its schema before anything is built from it.

The file is untrusted: :func:`slimdiff.io.load` calls :func:`check_document` with the
tensor shapes read from the header of ``model.safetensors`` (no tensor data) before it
constructs a module, so a crafted file cannot grow memory without bound, set arbitrary
module attributes, or reach a constructor with values that end in a traceback.
What is checked:

* the key set of every object (required keys present, no unknown key, except in the
  free-form ``measured`` / ``settings`` / ``extras`` / provenance data);
* types and ranges: integers are integers (not bools), numbers are finite, sizes are positive;
* sizes bounded by what the tensors file holds: a width never exceeds the largest tensor
  dimension, a count never exceeds the number of tensors, a depth never exceeds the blocks
  present, and our DiT's ``pos_embed`` / patch embedding fix its image and patch sizes;
* divisibility: attention heads divide the width they split;
* ``structure.attrs`` sets only what :func:`slimdiff.io.save` writes: the head and channel
  counts of ``_FIXED_ATTRS`` (typed) and plain scalars; :func:`slimdiff.io.load` then also
  requires each to be an existing plain scalar instance attribute of the module it builds;
* the diffusion config: known objective and beta schedule, ``num_train_timesteps`` in
  ``[1, 100000]``, betas in ``(0, 1)`` with ``beta_start < beta_end``;
* method names: every name of the chain is a registered method (``known_method``).

Every violation is one :class:`~slimdiff.errors.UsageError` line naming the field, the
bad value and what is allowed.
"""
from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from slimdiff.errors import UsageError
from slimdiff.result import META_KEYS

Shapes = Mapping[str, tuple[int, ...]]

REQUIRED_KEYS = ("format_version", "slimdiff_version", "architecture", "structure", "weights", "name", "diffusion",
                 "method", "measured", "extras")
OPTIONAL_KEYS = ("other_meta",)
#: beta schedules every DDPM-family sampler slimdiff builds (DDPM, DDIM, DPM-Solver++) accepts
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
MAX_TIMESTEPS = 100_000
MAX_TEXT = 1000
MAX_LIST = 64
_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")  # a dotted module / tensor name
_ATTR = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_WORD = re.compile(r"^[A-Za-z0-9_\-.]*$")  # diffusers config strings: block types, activations, norms
_SHA = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^[A-Za-z0-9_.+!\-]*$")

#: the constructor arguments :func:`slimdiff.io._layer_spec` writes per layer type, and their kinds
LAYER_PARAMS: dict[str, dict[str, str]] = {
    "Linear": {"in_features": "size", "out_features": "size", "bias": "bool"},
    "Conv2d": {"in_channels": "size", "out_channels": "size", "kernel_size": "pair", "stride": "pair",
               "padding": "padding", "dilation": "pair", "groups": "size", "bias": "bool", "padding_mode": "mode"},
    "GroupNorm": {"num_groups": "size", "num_channels": "size", "eps": "eps", "affine": "bool"},
    "LayerNorm": {"normalized_shape": "shape", "eps": "eps", "elementwise_affine": "bool", "bias": "bool"},
    "Embedding": {"num_embeddings": "size", "embedding_dim": "size", "padding_idx": "index", "max_norm": "norm",
                  "norm_type": "positive", "scale_grad_by_freq": "bool", "sparse": "bool"},
}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
#: the attributes :func:`slimdiff.io._fixed_attrs` always records (head and channel counts) and their kinds
FIXED_ATTRS = {"num_heads": "size", "heads": "size", "inner_dim": "size", "inner_kv_dim": "size",
               "channels": "size", "out_channels": "size", "scale": "positive"}
#: diffusers config keys that count repeated modules -> the module lists (a regex) they fill; the
#: ``_PER_BLOCK`` ones hold one entry per block (the count is the list's length), the others counts
_DIFFUSERS_COUNTS = {
    "num_layers": r"^transformer_blocks",
    "block_out_channels": r"^down_blocks", "down_block_types": r"^down_blocks", "up_block_types": r"^up_blocks",
    "layers_per_block": r"^down_blocks\.\d+\.resnets",
    "transformer_layers_per_block": r"attentions\.\d+\.transformer_blocks",
    "reverse_transformer_layers_per_block": r"attentions\.\d+\.transformer_blocks",
}
_PER_BLOCK = ("block_out_channels", "down_block_types", "up_block_types")
#: diffusers float arguments whose range the constructor does not check: (low, high, low excluded)
_DIFFUSERS_RANGES = {"norm_eps": (0.0, 1.0, True), "dropout": (0.0, 1.0, False),
                     "mid_block_scale_factor": (0.0, 1e6, True), "resnet_out_scale_factor": (0.0, 1e6, True)}


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


def _show(v: Any) -> str:
    text = repr(v).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    """The limits one tensors file sets, and typed checks that fail with one line."""

    def __init__(self, where: Path, shapes: Shapes, fix: str):
        self.where, self.shapes, self.fix = where, shapes, fix
        self.max_dim = max((d for s in shapes.values() for d in s), default=1)
        self.n_tensors = len(shapes)
        self.numel = sum(math.prod(s) for s in shapes.values())
        self.ceiling = max(self.max_dim, self.n_tensors)

    def fail(self, field: str, value: Any, allowed: str) -> None:
        raise UsageError(f"{self.where}: {field} = {_show(value)} is invalid ({allowed}); {self.fix}")

    def obj(self, field: str, v: Any, required: tuple = (), optional: tuple = ()) -> dict:
        if not isinstance(v, dict):
            self.fail(field, v, "expected an object")
        for k in required:
            if k not in v:
                self.fail(f"{field}.{k}", _Missing(), "a required key")
        if required or optional:
            for k in v:
                if k not in required and k not in optional:
                    self.fail(f"{field}.{k}", v[k], f"unknown key; allowed: {', '.join((*required, *optional))}")
        return v

    def int_(self, field: str, v: Any, lo: int, hi: int) -> int:
        if type(v) is not int or not lo <= v <= hi:
            self.fail(field, v, f"an integer in [{lo}, {hi}]")
        return v

    def num(self, field: str, v: Any, lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> float:
        ok = type(v) in (int, float) and math.isfinite(v) and (v > lo if open_lo else v >= lo) and (
            v < hi if open_hi else v <= hi)
        if not ok:
            self.fail(field, v, f"a finite number in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}")
        return v

    def bool_(self, field: str, v: Any) -> bool:
        if type(v) is not bool:
            self.fail(field, v, "true or false")
        return v

    def choice(self, field: str, v: Any, choices: tuple) -> Any:
        if not isinstance(v, (str, int, type(None))) or v not in choices:
            self.fail(field, v, f"one of {', '.join(map(str, choices))}")
        return v

    def text(self, field: str, v: Any, *, optional: bool = False, pattern: re.Pattern | None = None) -> str | None:
        if v is None and optional:
            return v
        if not isinstance(v, str) or len(v) > MAX_TEXT or (pattern is not None and not pattern.match(v)):
            form = f" of the form {pattern.pattern}" if pattern else ""
            self.fail(field, v, f"a string{form} of at most {MAX_TEXT} characters" + (" or null" if optional else ""))
        return v

    def most(self, pattern: str) -> int:
        """The longest module list matching ``pattern`` in the file: 1 + the largest ``i`` of a
        tensor named ``<pattern>.<i>.*``."""
        found = re.compile(f"(?:{pattern})\\.(\\d+)\\.")
        return max((int(m.group(1)) + 1 for k in self.shapes for m in [found.search(k)] if m), default=0)

    def shape(self, field: str, value: Any, key: str, want: tuple, compare: slice | None = None) -> None:
        """The file holds ``key`` with shape ``want`` (only the dimensions ``compare``, when given)."""
        have = self.shapes.get(key)
        if have is None or (have[compare] != want[compare] if compare else have != want):
            self.fail(field, value, f"it builds {key} of shape {list(want)}, model.safetensors holds "
                                    f"{list(have) if have is not None else 'no such tensor'}: the weights belong "
                                    "to a different architecture")


# --------------------------------------------------------------------------- the document
LOAD_FIX = "the file is damaged or was edited: restore it or re-save the model with slimdiff.save"


def check_document(doc: dict, shapes: Shapes, where: Path, *, weights_name: str,
                   known_method: Callable[[str], bool], fix: str = LOAD_FIX) -> None:
    """Raise :class:`UsageError` unless ``doc`` (a parsed ``slimdiff.json``) is valid for the
    tensors whose shapes are ``shapes`` (the header of ``weights_name``); ``known_method(name)``
    says whether a method name is registered; ``fix`` ends the message (what the user should do)."""
    from slimdiff.io import ARCHITECTURES, FORMAT_VERSION

    c = _Checker(where, shapes, fix)
    c.obj("slimdiff.json", doc, REQUIRED_KEYS, OPTIONAL_KEYS)
    c.int_("format_version", doc["format_version"], 1, FORMAT_VERSION)
    c.text("slimdiff_version", doc["slimdiff_version"], pattern=_VERSION)
    arch = c.obj("architecture", doc["architecture"], ("class", "config"))
    cls = c.choice("architecture.class", arch["class"], ARCHITECTURES)
    structure = c.obj("structure", doc["structure"], (), ("lengths", "layers", "tensors", "attrs"))
    config = c.obj("architecture.config", arch["config"])
    _structure(c, structure)
    if cls == "DiT":
        _dit_config(c, config, structure)
    else:
        _diffusers_config(c, cls, config, structure)
    _weights(c, doc["weights"], weights_name)
    c.text("name", doc["name"], optional=True)
    _diffusion(c, doc["diffusion"])
    _method(c, doc["method"], known_method)
    for key in ("measured", "extras"):
        c.obj(key, doc[key])
    other = c.obj("other_meta", doc.get("other_meta", {}))
    for k in other:
        if k in META_KEYS:
            c.fail(f"other_meta.{k}", other[k], f"provenance may not repeat the record keys {', '.join(META_KEYS)}")


def _weights(c: _Checker, w: Any, weights_name: str) -> None:
    c.obj("weights", w, ("file", "sha256", "tensors", "bytes"))
    c.choice("weights.file", w["file"], (weights_name,))
    c.text("weights.sha256", w["sha256"], pattern=_SHA)
    c.int_("weights.tensors", w["tensors"], c.n_tensors, c.n_tensors)
    c.int_("weights.bytes", w["bytes"], 0, 2**53)


def _diffusion(c: _Checker, d: Any) -> None:
    from slimdiff.diffusion.schedulers import OBJECTIVES, DiffusionConfig

    c.obj("diffusion", d, tuple(f.name for f in fields(DiffusionConfig)))
    c.choice("diffusion.objective", d["objective"], OBJECTIVES)
    c.int_("diffusion.num_train_timesteps", d["num_train_timesteps"], 1, MAX_TIMESTEPS)
    c.choice("diffusion.beta_schedule", d["beta_schedule"], BETA_SCHEDULES)
    start = c.num("diffusion.beta_start", d["beta_start"], 0, 1, open_lo=True, open_hi=True)
    end = c.num("diffusion.beta_end", d["beta_end"], 0, 1, open_lo=True, open_hi=True)
    if start >= end:
        c.fail("diffusion.beta_start", start, f"it must be below diffusion.beta_end = {end}")
    c.bool_("diffusion.clip_sample", d["clip_sample"])


def _method(c: _Checker, m: Any, known_method: Callable[[str], bool]) -> None:
    if m is None:
        return
    c.obj("method", m)  # keys besides name and chain: hand-written metadata, kept as they are
    chain = m.get("chain", [])
    if not isinstance(chain, list) or len(chain) > MAX_LIST:
        c.fail("method.chain", chain, f"a list of at most {MAX_LIST} entries")
    names = []
    for i, entry in enumerate(chain):
        c.obj(f"method.chain[{i}]", entry, ("name",), ("settings", "measured"))
        names.append(_method_name(c, f"method.chain[{i}].name", entry["name"], known_method))
        for k in ("settings", "measured"):
            c.obj(f"method.chain[{i}].{k}", entry.get(k, {}))
    name = c.text("method.name", m.get("name"), optional=True)
    if chain and name != "+".join(names):
        c.fail("method.name", name, f"the chain's names joined by '+': {'+'.join(names)!r}")
    if not chain and name is not None:
        for part in name.split("+"):
            _method_name(c, "method.name", part, known_method)


def _method_name(c: _Checker, field: str, name: Any, known_method: Callable[[str], bool]) -> str:
    if not isinstance(name, str) or not known_method(name):
        c.fail(field, name, "not a registered method (`slimdiff methods` lists them); register the method's "
                            "module before loading")
    return name


# --------------------------------------------------------------------------- architectures
def _dit_config(c: _Checker, cfg: dict, structure: dict) -> None:
    from slimdiff.models.dit import DiTConfig

    c.obj("architecture.config", cfg, tuple(f.name for f in fields(DiTConfig)))
    p = "architecture.config."
    hidden = c.int_(p + "hidden_size", cfg["hidden_size"], 1, c.max_dim)
    heads = c.int_(p + "num_heads", cfg["num_heads"], 1, hidden)
    if hidden % heads:
        c.fail(p + "num_heads", heads, f"a divisor of hidden_size {hidden}")
    patch = c.int_(p + "patch_size", cfg["patch_size"], 1, c.max_dim)
    size = c.int_(p + "input_size", cfg["input_size"], patch, c.ceiling * patch)
    channels = c.int_(p + "in_channels", cfg["in_channels"], 1, c.max_dim)
    c.num(p + "mlp_ratio", cfg["mlp_ratio"], 1 / hidden, c.max_dim / hidden)
    c.num(p + "class_dropout_prob", cfg["class_dropout_prob"], 0, 1)
    c.int_(p + "num_classes", cfg["num_classes"], 0, c.max_dim)
    c.bool_(p + "learn_sigma", cfg["learn_sigma"])
    c.int_(p + "freq_shift", cfg["freq_shift"], 0, 1)  # 0: official DiT, 1: diffusers' Timesteps
    # before construction: the sine-cosine table is computed for (input_size // patch_size)^2 tokens; the
    # file's table fixes that number (its width too, unless the structure records a pruned residual width)
    pruned_residual = "pos_embed" in structure.get("tensors", {})
    c.shape("architecture.config (input_size, patch_size, hidden_size)", (size, patch, hidden), "pos_embed",
            (1, (size // patch) ** 2, hidden), compare=slice(1, 2) if pruned_residual else None)
    if "x_embedder.proj" not in structure.get("layers", {}):
        c.shape("architecture.config (hidden_size, in_channels, patch_size)", (hidden, channels, patch),
                "x_embedder.proj.weight", (hidden, channels, patch, patch))
    trimmed = "blocks" in (structure.get("lengths") or {})  # depth pruning that left the config as it was
    c.int_(p + "depth", cfg["depth"], 1, c.n_tensors if trimmed else c.most("^blocks"))


def _diffusers_config(c: _Checker, cls: str, cfg: dict, structure: dict) -> None:
    import diffusers

    params = {k: p for k, p in inspect.signature(getattr(diffusers, cls).__init__).parameters.items()
              if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    c.obj("architecture.config", cfg, (), tuple(params))
    for k, v in cfg.items():
        _config_value(c, f"architecture.config.{k}", v, _kinds(params[k]))
        if k in _DIFFUSERS_RANGES and v is not None:
            lo, hi, open_lo = _DIFFUSERS_RANGES[k]
            c.num(f"architecture.config.{k}", v, lo, hi, open_lo=open_lo)
    if not structure.get("lengths"):  # else depth pruning left the config's counts as they were
        for key, pattern in _DIFFUSERS_COUNTS.items():
            v = cfg.get(key)
            counts = [len(v)] if key in _PER_BLOCK and isinstance(v, list) else _ints(v)
            for n in counts:
                c.int_(f"architecture.config.{key}", n, 0, max(c.most(pattern), 1))
    if cls in ("DiTTransformer2DModel", "PixArtTransformer2DModel"):
        # the positional table is built at construction for (sample_size // patch_size)^2 tokens
        size, patch = cfg.get("sample_size"), cfg.get("patch_size")
        heads, dim = cfg.get("num_attention_heads"), cfg.get("attention_head_dim")
        if all(isinstance(v, int) and v > 0 for v in (size, patch, heads, dim)):
            tokens = (size // patch) ** 2
            if tokens * heads * dim > 4 * c.numel:
                c.fail("architecture.config.sample_size", size,
                       f"its positional table ({tokens} tokens x {heads * dim}) exceeds the model's weights")


def _ints(v: Any) -> list[int]:
    """The integers in a config value: an int, or a list of ints / lists of ints."""
    if type(v) is int:
        return [v]
    return [n for x in v for n in _ints(x)] if isinstance(v, list) else []


def _kinds(param: inspect.Parameter) -> set[str]:
    """The JSON kinds a diffusers constructor argument takes, from its annotation (else its default)."""
    ann, default = param.annotation, param.default
    text = ann.__name__ if isinstance(ann, type) else "" if ann is inspect.Parameter.empty else str(ann)
    if not text:
        text = {bool: "bool", str: "str", float: "float", int: "int", tuple: "Tuple[int]", list: "Tuple[int]"}.get(
            type(default), "")
    kinds = {kind for kind, word in (("int", r"\bint\b"), ("float", r"\bfloat\b"), ("str", r"\bstr\b"),
                                     ("bool", r"\bbool\b"), ("list", r"Tuple|List|tuple|list"),
                                     ("none", r"Optional|None")) if re.search(word, text)}
    if "float" in kinds:
        kinds.add("int")
    if default is None:
        kinds.add("none")
    return kinds


def _kind(v: Any) -> str:
    kinds = {type(None): "none", bool: "bool", int: "int", float: "float", str: "str", list: "list"}
    return kinds.get(type(v), "other")


def _config_value(c: _Checker, field: str, v: Any, kinds: set[str], depth: int = 0) -> None:
    """A diffusers constructor argument: a JSON scalar or a short (nested) list of the kinds its
    annotation names (any scalar when it names none); integers bounded, numbers finite."""
    kind = _kind(v)
    if (kinds and kind not in kinds) or kind == "other":
        c.fail(field, v, f"{' or '.join(sorted(kinds or {'a JSON scalar or list'}))}, as the argument's type says")
    if kind == "int":  # widths, groups, embedding sizes; the module counts are bounded by the file above
        c.int_(field, v, 0, max(c.ceiling, MAX_TIMESTEPS))
    elif kind == "float":
        c.num(field, v, -c.ceiling, c.ceiling)
    elif kind == "str":
        c.text(field, v, pattern=_WORD)
    elif kind == "list":
        if depth > 1 or len(v) > MAX_LIST:
            c.fail(field, v, f"a list of at most {MAX_LIST} values, nested at most twice")
        for i, x in enumerate(v):
            _config_value(c, f"{field}[{i}]", x, kinds - {"none"}, depth + 1)


# --------------------------------------------------------------------------- structure
def _structure(c: _Checker, s: dict) -> None:
    for key in ("lengths", "layers", "tensors", "attrs"):
        section = c.obj(f"structure.{key}", s.get(key, {}))
        most = 4 * c.n_tensors + 64 if key == "attrs" else c.n_tensors  # attrs: parameter-free modules too
        if len(section) > most:
            c.fail(f"structure.{key}", f"{len(section)} entries", f"at most {most} for {c.n_tensors} tensors")
        for name in section:  # attrs may name the model itself ("")
            c.text(f"structure.{key} name", name, pattern=_NAME if name or key != "attrs" else None)
    for name, n in s.get("lengths", {}).items():
        c.int_(f"structure.lengths[{name!r}]", n, 0, c.n_tensors)
    for name, spec in s.get("layers", {}).items():
        field = f"structure.layers[{name!r}]"
        kind = c.choice(f"{field}.type", c.obj(field, spec).get("type"), tuple(LAYER_PARAMS))
        params = LAYER_PARAMS[kind]
        c.obj(field, spec, ("type", *params))
        for k, how in params.items():
            _layer_value(c, f"{field}.{k}", spec[k], how)
    for key, spec in s.get("tensors", {}).items():
        field = f"structure.tensors[{key!r}]"
        c.obj(field, spec, ("shape", "kind"))
        c.choice(f"{field}.kind", spec["kind"], ("parameter", "buffer"))
        if key not in c.shapes or spec["shape"] != list(c.shapes[key]):
            c.fail(f"{field}.shape", spec["shape"], f"the shape of {key} in model.safetensors: "
                                                    f"{list(c.shapes[key]) if key in c.shapes else 'no such tensor'}")
    for name, values in s.get("attrs", {}).items():
        _attrs(c, name, values)


def _layer_value(c: _Checker, field: str, v: Any, how: str) -> None:
    if how == "size":
        c.int_(field, v, 1, c.max_dim)
    elif how == "bool":
        c.bool_(field, v)
    elif how == "pair" or how == "shape":
        if not isinstance(v, list) or not (len(v) == 2 if how == "pair" else 1 <= len(v) <= 4):
            c.fail(field, v, "a list of 2 integers" if how == "pair" else "a list of 1 to 4 integers")
        for i, x in enumerate(v):
            c.int_(f"{field}[{i}]", x, 1, c.max_dim)
    elif how == "padding":
        if isinstance(v, str):
            c.choice(field, v, ("same", "valid"))
        elif not isinstance(v, list) or len(v) != 2:
            c.fail(field, v, "a list of 2 integers, 'same' or 'valid'")
        else:
            for i, x in enumerate(v):
                c.int_(f"{field}[{i}]", x, 0, c.max_dim)
    elif how == "mode":
        c.choice(field, v, PADDING_MODES)
    elif how == "eps":
        c.num(field, v, 0, 1, open_lo=True)
    elif how == "positive":
        c.num(field, v, 0, c.ceiling, open_lo=True)
    elif how == "index" and v is not None:
        c.int_(field, v, -c.max_dim, c.max_dim - 1)
    elif how == "norm" and v is not None:
        c.num(field, v, 0, math.inf, open_lo=True, open_hi=True)


def _attrs(c: _Checker, name: str, values: Any) -> None:
    """Head and channel counts (typed, and dividing the widths they split) or plain scalars."""
    field = f"structure.attrs[{name!r}]"
    c.obj(field, values)
    for k, v in values.items():
        if not isinstance(k, str) or not _ATTR.match(k) or k == "training":
            c.fail(f"{field} key", k, "a public attribute name")
        if k in FIXED_ATTRS:
            _layer_value(c, f"{field}.{k}", v, FIXED_ATTRS[k])
        elif v is not None and type(v) not in (bool, int, float, str):
            c.fail(f"{field}.{k}", v, "a boolean, number, string or null")
        elif type(v) is float and not math.isfinite(v):
            c.fail(f"{field}.{k}", v, "a finite number")
        elif type(v) is str and len(v) > MAX_TEXT:
            c.fail(f"{field}.{k}", v, f"a string of at most {MAX_TEXT} characters")
    heads = values.get("num_heads")
    qkv = c.shapes.get(f"{name}.qkv.weight")
    if heads is not None and qkv is not None and qkv[0] % (3 * heads):
        c.fail(f"{field}.num_heads", heads, f"a divisor of {name}.qkv's {qkv[0]} outputs / 3")
    heads, inner = values.get("heads"), values.get("inner_dim")
    if heads is not None and inner is not None and inner % heads:
        c.fail(f"{field}.heads", heads, f"a divisor of inner_dim {inner}")
