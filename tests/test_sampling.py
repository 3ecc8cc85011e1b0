"""Sampling loops: seeding, every scheduler, guidance, callbacks and bad input."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODELS, tiny_dit, tiny_pixart, tiny_unet

from slimdiff.diffusion.losses import ForwardProcess, diffusion_loss
from slimdiff.diffusion.sampling import Trajectory, initial_noise, sample
from slimdiff.diffusion.schedulers import DiffusionConfig, make_scheduler
from slimdiff.errors import UsageError


def test_same_seed_same_tensor_and_different_seed_differs():
    m = tiny_dit()
    a = sample(m, steps=4, classes=[1, 2, 3], cfg=1.5, seed=7)
    b = sample(m, steps=4, classes=[1, 2, 3], cfg=1.5, seed=7)
    c = sample(m, steps=4, classes=[1, 2, 3], cfg=1.5, seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_ddpm_family_samplers_run(sampler):
    x = sample(tiny_dit(), sampler=sampler, steps=3, num_samples=2)
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()


def test_flow_euler_sampler_runs_and_checks_objective():
    m = tiny_dit()
    x = sample(m, sampler="euler", steps=3, num_samples=2, diffusion=DiffusionConfig(objective="flow"))
    assert torch.isfinite(x).all()
    with pytest.raises(UsageError, match="flow"):
        sample(m, sampler="euler", steps=3, num_samples=2)


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_every_backbone_samples(kind):
    m = TINY_MODELS[kind]()
    cfg = 1.0 if kind == "unet2d" else 2.0
    x = sample(m, steps=2, num_samples=2, cfg=cfg)
    assert x.shape[0] == 2 and torch.isfinite(x).all()


def test_guidance_changes_the_result_and_callbacks_see_every_step():
    m = tiny_dit()
    begun, ended = [], []
    g = sample(m, steps=5, classes=[0, 1], cfg=3.0, on_step_begin=lambda i, t: begun.append(i),
               callback=lambda i, t, x: ended.append(i))
    u = sample(m, steps=5, classes=[0, 1], cfg=1.0)
    assert begun == ended == list(range(5))
    assert not torch.allclose(g, u)


@torch.no_grad()
def test_the_loop_takes_a_model_function():
    """``sample`` is ``Trajectory.run`` with the default model function; a model function of
    one's own (DiP-GO's SuperNet, L2C's recorder) sees every step's input, in order."""
    from slimdiff.models.backbone import as_backbone

    m = tiny_dit()
    ref = sample(m, steps=4, classes=[1, 2], cfg=1.5, seed=3)
    traj = Trajectory(m, sampler="ddim", steps=4, n=2, cond=torch.tensor([1, 2]), cfg=1.5, seed=3)
    seen = []

    def model_fn(inp, t, i):
        seen.append((i, float(t)))
        return traj.predict(inp, t, i)

    x = traj.run(traj.start(initial_noise(as_backbone(m), 2, 3)), model_fn)
    assert torch.equal(x, ref)
    assert seen == [(i, float(t)) for i, t in enumerate(traj.timesteps)]


def test_padded_captions_with_guidance():
    """A TextCondition's mask reaches the model under CFG too (null captions attend everything)."""
    from slimdiff.models.backbone import TextCondition

    model = tiny_pixart()
    e = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(2))
    padded = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    a = sample(model, steps=3, cond=TextCondition(e, padded), cfg=2.0, seed=1)
    b = sample(model, steps=3, cond=TextCondition(e, torch.ones_like(padded)), cfg=2.0, seed=1)
    c = sample(model, steps=3, cond=e, cfg=2.0, seed=1)
    assert not torch.allclose(a[0], b[0], atol=1e-4)  # the padding is masked out
    assert torch.allclose(a[1], b[1], atol=1e-6) and torch.allclose(b, c, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps"),
        (dict(classes=[10]), "out of range"),
        (dict(sampler="heun"), "unknown sampler"),
        (dict(cfg=-1.0), "guidance"),
    ],
)
def test_bad_sampling_input(kwargs, match):
    with pytest.raises(UsageError, match=match):
        sample(tiny_dit(), **{"steps": 2, **kwargs})


def test_guidance_on_unconditional_model_is_refused():
    with pytest.raises(UsageError, match="unconditional"):
        sample(tiny_unet(), steps=2, cfg=2.0)


@pytest.mark.parametrize("objective", ["epsilon", "v_prediction", "flow"])
def test_losses_targets(objective):
    cfg = DiffusionConfig(objective=objective)
    proc = ForwardProcess(cfg)
    x0 = torch.randn(4, 1, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    b = proc.noisy(x0, noise, t)
    if objective == "epsilon":
        assert torch.equal(b.target, noise)
    elif objective == "flow":
        torch.testing.assert_close(b.target, noise - x0)
        s = (t / 1000.0).view(-1, 1, 1, 1)
        torch.testing.assert_close(b.x_t, (1 - s) * x0 + s * noise)
    else:
        a = make_scheduler("ddim", cfg).alphas_cumprod[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(b.target, a.sqrt() * noise - (1 - a).sqrt() * x0)
    assert diffusion_loss(b.target, b) == 0
    assert proc.sample_timesteps(1000).max() < 1000


# ---- guidance_channels: diffusers' convention (all channels) vs the official DiT's (first 3)
def _guided(m, guidance_channels):
    labels = torch.tensor([1, 2])
    traj = Trajectory(m, sampler="ddim", steps=2, n=2, cond=labels, cfg=4.0, guidance_channels=guidance_channels)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), traj.timesteps[0]
    with torch.no_grad():
        c = traj.bb(x, t, labels).float()
        u = traj.bb(x, t, traj.bb.null_cond(labels, 2)).float()
        return traj.guided(x, t), c, u


def test_guidance_channels_none_guides_every_channel():
    g, c, u = _guided(tiny_dit(), None)
    assert g.shape[1] == 4
    torch.testing.assert_close(g, u + 4.0 * (c - u), rtol=1e-5, atol=1e-5)


def test_guidance_channels_3_is_the_official_dit():
    """Official forward_with_cfg: channels 0-2 guided, channel 3 is the conditional prediction."""
    g, c, u = _guided(tiny_dit(), 3)
    torch.testing.assert_close(g[:, :3], u[:, :3] + 4.0 * (c[:, :3] - u[:, :3]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g[:, 3:], c[:, 3:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(g[:, 3:], (u + 4.0 * (c - u))[:, 3:], atol=1e-3)  # guidance would change it


def test_guidance_channels_change_samples_and_are_validated():
    m = tiny_dit()
    a = sample(m, steps=3, classes=[1, 2], cfg=4.0, seed=2)
    b = sample(m, steps=3, classes=[1, 2], cfg=4.0, seed=2, guidance_channels=3)
    assert not torch.allclose(a, b)
    assert torch.equal(a, sample(m, steps=3, classes=[1, 2], cfg=4.0, seed=2, guidance_channels=4))
    for bad in (0, 5, 2.5, True):
        with pytest.raises(UsageError, match="guidance_channels"):
            sample(m, steps=2, classes=[1], cfg=4.0, guidance_channels=bad)
