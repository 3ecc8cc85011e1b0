"""What a model records about itself: the typed form of ``model.slimdiff_meta``.

A :class:`ModelRecord` is the model's name, its diffusion config, the
:class:`CompressionResult` (the chain of methods applied, each with its settings and what it
measured, the runtime data the methods keep in ``extras``, and the end-to-end measurements)
and any provenance (``training``, ``finetune``, ...). It converts exactly to and from the
``slimdiff_meta`` dict layout the rest of slimdiff reads, and to and from the metadata part of
``slimdiff.json`` (:mod:`slimdiff.io` writes and reads it only through this module, so saved
files keep their layout byte for byte)::

    {"name": ..., "diffusion": {...},
     "method": {"name": "a+b", "chain": [{"name", "settings", "measured"}, ...]} | None,
     "measured": {...}, "extras": {method name: data},
     ...provenance keys (in slimdiff.json: under "other_meta")}

The record is stored on the model as that dict (:func:`record_of` / :func:`set_record` convert),
so code that still reads ``slimdiff_meta`` directly keeps working.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch.nn as nn

#: The ``slimdiff_meta`` keys a :class:`ModelRecord` holds in fields; every other key is provenance.
META_KEYS = ("name", "diffusion", "method", "measured", "extras")


@dataclass
class ChainEntry:
    """One method applied to the model: its name, the settings it ran with, what it measured."""

    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ChainEntry":
        return cls(d["name"], d.get("settings", {}), d.get("measured", {}))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.method, "settings": self.settings, "measured": self.measured}


@dataclass
class CompressionResult:
    """What compression did: the chain in the order applied (named ``method``, ``a+b``), the
    methods' runtime data (``extras``, by method name) and the end-to-end measurements
    (budget, MACs ratio, ...). ``other`` keeps any further keys of a recorded ``method`` dict
    (hand-written metadata) as they were."""

    method: str | None = None
    chain: list[ChainEntry] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    other: dict[str, Any] = field(default_factory=dict)

    def add(self, method: str, settings: dict[str, Any], measured: dict[str, Any], extras: Any = None) -> None:
        """Append ``method``'s entry to the chain (and its runtime data, when not ``None``, to ``extras``)."""
        self.chain = [*self.chain, ChainEntry(method, settings, measured)]
        self.method, self.other = "+".join(e.method for e in self.chain), {}
        if extras is not None:
            self.extras = {**self.extras, method: extras}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "CompressionResult":
        """The result recorded in a ``slimdiff_meta`` dict (keys ``method``, ``extras``, ``measured``)."""
        recorded = meta.get("method") or {}
        chain = [ChainEntry.from_dict(e) for e in recorded.get("chain") or []]
        other = {k: v for k, v in recorded.items() if k not in ("name", "chain")}
        return cls(recorded.get("name"), chain, meta.get("extras") or {}, meta.get("measured") or {}, other)

    def method_dict(self) -> dict[str, Any] | None:
        """The ``slimdiff_meta["method"]`` value: ``{"name", "chain"}``, or ``None`` when nothing is recorded."""
        if self.method is None and not self.chain and not self.other:
            return None
        chain = {"chain": [e.to_dict() for e in self.chain]} if self.chain else {}
        return {"name": self.method, **chain, **self.other}


@dataclass
class ModelRecord:
    """Everything a model records besides its weights (see the module docstring)."""

    name: str | None = None
    diffusion: dict[str, Any] | None = None
    result: CompressionResult = field(default_factory=CompressionResult)
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any] | None) -> "ModelRecord":
        """The record of a ``slimdiff_meta`` dict (a ``DiffusionConfig`` object is accepted too)."""
        meta = meta or {}
        diffusion = meta.get("diffusion")
        if diffusion is not None and not isinstance(diffusion, dict) and hasattr(diffusion, "to_dict"):
            diffusion = diffusion.to_dict()
        provenance = {k: v for k, v in meta.items() if k not in META_KEYS}
        return cls(meta.get("name"), diffusion, CompressionResult.from_meta(meta), provenance)

    def to_meta(self) -> dict[str, Any]:
        """The ``slimdiff_meta`` dict: ``name``/``diffusion``/``method`` when set, ``measured``
        and ``extras`` always, then the provenance keys."""
        method = self.result.method_dict()
        meta = {k: v for k, v in (("name", self.name), ("diffusion", self.diffusion), ("method", method))
                if v is not None}
        return {**meta, "measured": self.result.measured, "extras": self.result.extras, **self.provenance}

    def with_meta(self, meta: Mapping[str, Any] | None) -> "ModelRecord":
        """This record with the ``slimdiff_meta``-layout keys of ``meta`` replacing its own
        (a whole key at a time, as ``slimdiff.save(meta=...)`` documents)."""
        return ModelRecord.from_meta({**self.to_meta(), **(meta or {})}) if meta else self

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> "ModelRecord":
        """The record stored in a ``slimdiff.json`` document (its metadata keys)."""
        meta = {k: doc[k] for k in META_KEYS if doc.get(k) is not None}
        return cls.from_meta({**meta, **(doc.get("other_meta") or {})})

    def to_doc(self) -> dict[str, Any]:
        """The metadata keys of ``slimdiff.json``; the diffusion config is completed with its defaults."""
        from slimdiff.diffusion.schedulers import DiffusionConfig

        doc = {"name": self.name, "diffusion": DiffusionConfig.from_dict(self.diffusion).to_dict(),
               "method": self.result.method_dict(), "measured": self.result.measured, "extras": self.result.extras}
        return {**doc, "other_meta": self.provenance} if self.provenance else doc


def record_of(model: nn.Module) -> ModelRecord:
    """The :class:`ModelRecord` of ``model`` (an empty one when it records nothing)."""
    return ModelRecord.from_meta(getattr(model, "slimdiff_meta", None))


def set_record(model: nn.Module, record: ModelRecord) -> nn.Module:
    """Store ``record`` on ``model`` (as its ``slimdiff_meta`` dict) and return the model."""
    model.slimdiff_meta = record.to_meta()
    return model
