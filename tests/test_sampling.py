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
