"""Trainer: exact resume after a kill, 2-process DDP equals 1 process, distillation losses, NaN stop."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import checkpoint_step, kill_at_checkpoint
from safetensors.torch import load_file

from slimdiff.data.datasets import digits
from slimdiff.models.dit import DiT_models
from slimdiff.train.distill import feature_loss, outlier_mask
from slimdiff.train.trainer import TrainConfig, TrainingDiverged, train

TINY = dict(input_size=8, in_channels=1, num_classes=10, learn_sigma=False)
RUN = """
import sys, torch
torch.set_num_threads(int(__import__("os").environ["OMP_NUM_THREADS"]))
from slimdiff.data.datasets import digits
from slimdiff.models.dit import DiT_models
from slimdiff.train.trainer import TrainConfig, train
torch.manual_seed(0)
m = DiT_models["DiT-M/2"](input_size=8, in_channels=1, num_classes=10, learn_sigma=False)
train(m, digits("train"), TrainConfig(**{cfg}), sys.argv[1], resume=True, progress=False)
"""


def _config(**kw) -> TrainConfig:
    base = dict(steps=16, batch_size=16, lr=1e-3, warmup_steps=2, checkpoint_every=2, log_every=2, seed=0)
    return TrainConfig(**{**base, **kw})


def _fresh():
    torch.manual_seed(0)
    return DiT_models["DiT-M/2"](**TINY)


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    cfg = dict(steps=16, batch_size=16, lr=1e-3, warmup_steps=2, checkpoint_every=2, log_every=2, seed=0)
    reference = train(_fresh(), digits("train"), TrainConfig(**cfg), tmp_path / "a", progress=False)
    run = tmp_path / "b"
    killed_at = kill_at_checkpoint([sys.executable, "-c", RUN.format(cfg=cfg), str(run)], run, 6)
    assert 0 < killed_at < 16, f"the kill should land mid-run (checkpoint at step {killed_at})"
    resumed = train(_fresh(), digits("train"), TrainConfig(**cfg), run, resume=True, progress=False)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_two_processes_match_one(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    slimdiff = shutil.which("slimdiff", path=os.path.dirname(sys.executable))
    args = ["train", "--data", "digits", "--model", "DiT-M/2", "--steps", "6", "--batch-size", "16",
            "--warmup", "1", "--checkpoint-every", "3", "--lr", "1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([slimdiff, *args, "-o", str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", slimdiff, *args, "-o", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    moved = 0.0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    init = _fresh().state_dict()
    moved = max(float((a[k] - init[k]).abs().max()) for k in a if k in init)
    assert moved > 1e-4, "training must have changed the weights for the comparison to mean anything"


class _GoesBad(torch.utils.data.Dataset):
    """Digits that turn to NaN after ``good`` item reads (a run that diverges part way)."""

    def __init__(self, good: int):
        self.data, self.reads, self.good = digits("train"), 0, good

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        x, y = self.data[i]
        return (x if self.reads <= self.good else torch.full_like(x, float("nan"))), y


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="NaN"):
        train(_fresh(), _GoesBad(good=1 + 4 * 16), _config(steps=12), run, progress=False)  # 1 probe read
    assert checkpoint_step(run) == 4
    kept = load_file(str(run / "checkpoint" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in kept.values())


def test_distillation_modes_train_to_finite_weights(tmp_path):
    teacher = _fresh()
    for kd in ("output", "hidden", "masked"):
        s = _fresh()
        s.blocks = s.blocks[::2]
        cfg = _config(steps=3, kd=kd, layer_map={0: 1, 1: 3, 2: 5}, checkpoint_every=100)
        out = train(s, digits("train"), cfg, tmp_path / kd, teacher=teacher, progress=False)
        assert all(torch.isfinite(p).all() for p in out.parameters())


def test_half_precision_weights_train_as_an_fp32_copy(tmp_path):
    """The shipped models are stored in fp16; finetuning a copy of one trains in fp32 (with a
    half-precision teacher too) instead of failing on a Half/float mismatch."""
    teacher = _fresh().half()
    student = _fresh().half()
    out = train(student, digits("train"), _config(steps=2, kd="output", checkpoint_every=100),
                tmp_path / "ft", teacher=teacher, progress=False)
    assert {p.dtype for p in out.parameters()} == {torch.float32}
    assert all(torch.isfinite(p).all() for p in out.parameters())


def test_masked_feature_loss_ignores_outliers():
    h = torch.randn(2, 16, 32)
    spiked = h.clone()
    spiked[0, 3, 7] = 1e4  # a massive activation
    assert outlier_mask(spiked, 2.0)[0, 3, 7] == 0
    plain = feature_loss(spiked, h, masked=False, k=2.0)
    masked = feature_loss(spiked, h, masked=True, k=2.0)
    assert plain > 5e4 and masked < 1.0


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    from slimdiff.errors import UsageError

    train(_fresh(), digits("train"), _config(steps=2), tmp_path, progress=False)
    with pytest.raises(UsageError, match="other settings \\(lr\\)"):
        train(_fresh(), digits("train"), _config(steps=2, lr=5e-4), tmp_path, resume=True, progress=False)


def test_teacher_flags_are_left_alone(tmp_path):
    teacher = _fresh()
    train(_fresh(), digits("train"), _config(steps=1, kd="output"), tmp_path, teacher=teacher, progress=False)
    assert all(p.requires_grad for p in teacher.parameters())


def _caption_file(path, width: int, mask: bool = True, n: int = 6, length: int = 5, channels: int = 4):
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = dict(latents=rng.standard_normal((n, channels, 8, 8)).astype(np.float32),
                  encoder_hidden_states=rng.standard_normal((n, length, width)).astype(np.float32))
    if mask:
        arrays["encoder_attention_mask"] = (np.arange(length)[None] < rng.integers(1, length + 1, (n, 1))).astype(np.int64)
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("kind", ["pixart", "unet2d-condition"])
def test_text_models_train_on_caption_embeddings(tmp_path, kind):
    from conftest import TINY_MODELS

    from slimdiff.data.datasets import get_dataset
    from slimdiff.diffusion.losses import diffusion_loss
    from slimdiff.models.backbone import TextCondition, as_backbone

    model = TINY_MODELS[kind]()
    width = as_backbone(model)._text_dim()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def record(step, batch, cond, pred):  # the condition the model was trained with, and its loss
        seen.append((cond, float(diffusion_loss(pred.detach(), batch))))
        return pred.new_zeros(())

    data = get_dataset(_caption_file(tmp_path / "c.npz", width))
    out = train(model, data, _config(steps=2, batch_size=4, cfg_dropout=0.5, checkpoint_every=100), tmp_path / "run",
                progress=False, extra_loss=record)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in seen) and len(seen) == 2
    cond = seen[0][0]
    assert isinstance(cond, TextCondition) and cond.embeds.shape == (4, 5, width) and cond.mask.shape == (4, 5)
    dropped = [bool((c.embeds == 0).all(dim=(1, 2)).any()) for c, _ in seen]
    assert any(dropped)  # CFG dropout zeroed some captions (p = 0.5 over 8 draws)
    changed = [k for k, v in out.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    assert all(torch.isfinite(p).all() for p in out.parameters())


def test_text_model_data_errors(tmp_path):
    from conftest import tiny_pixart

    from slimdiff.data.datasets import get_dataset
    from slimdiff.errors import UsageError

    wrong = get_dataset(_caption_file(tmp_path / "w.npz", width=7))
    with pytest.raises(UsageError, match="width 7 .* takes 16"):
        train(tiny_pixart(), wrong, _config(steps=1), tmp_path / "a", progress=False)
    with pytest.raises(UsageError, match="no caption embeddings"):
        train(tiny_pixart(), digits("train"), _config(steps=1), tmp_path / "b", progress=False)
    with pytest.raises(UsageError, match="class-conditional"):
        train(_fresh(), get_dataset(_caption_file(tmp_path / "c.npz", width=16, channels=1)), _config(steps=1),
              tmp_path / "c", progress=False)
