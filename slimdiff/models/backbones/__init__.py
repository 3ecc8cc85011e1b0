"""The :class:`~slimdiff.models.backbone.Backbone` adapters, one module per family of
architectures (:mod:`.dit`: our DiT; :mod:`.diffusers`: diffusers DiT and PixArt; :mod:`.unet`:
diffusers UNets), and :mod:`.sync` (attribute fix-up after structural pruning).

Import them through :mod:`slimdiff.models.backbone`, which registers them all.
"""
import slimdiff.models.backbone  # noqa: F401  (defines the base class, then imports and registers the adapters)
