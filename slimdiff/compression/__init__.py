"""Machinery shared by the compression methods, below them in the layers.

``width`` (torch-pruning wrapper, importance bookkeeping, budget search, the width-pruning
driver), ``depth`` (N:M groups, depth gates as ``ModelHook``s, block extraction,
shape-for-budget, the depth driver ``finish_depth``), ``reuse_plans`` (plan post-processing,
``prepare`` / ``finish`` / ``restore_plan`` / ``draw_plan``, teacher trajectories),
``calibration`` (calibration batches), ``lora`` (LoRA insertion and merging). A method
module in :mod:`slimdiff.methods` (paper methods and baselines) keeps only what its paper
adds; nothing here imports a method module.
"""
