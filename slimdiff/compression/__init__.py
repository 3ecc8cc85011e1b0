"""Machinery shared by the compression methods, below them in the layers.

``width`` (torch-pruning wrapper, budget search, width baselines), ``depth`` (gating,
extraction, shape-for-budget, depth baselines), ``reuse_plans`` (threshold / rank
post-processing, DeepCache / L2C / fewer-steps plans), ``calibration`` (calibration
batches), ``lora`` (LoRA insertion and merging). A method module in
:mod:`slimdiff.methods` keeps only what its paper adds.
"""
