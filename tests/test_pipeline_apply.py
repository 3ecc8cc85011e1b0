"""slimdiff.apply: compressed models with reuse plans inside stock diffusers pipelines, at the
pipelines' own schedulers and step counts, at the reported MACs (counted inside the call)."""
from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from conftest import (
    tiny_diffusers_dit,
    tiny_dit,
    tiny_pixart,
    tiny_unet,
    tiny_unet_cond,
)
from diffusers import (
    AutoencoderKL,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

import slimdiff
from slimdiff.cli import app
from slimdiff.errors import UsageError
from slimdiff.methods.base import Context, compress
from slimdiff.models.convert import diffusers_to_dit
from slimdiff.models.diffusers_adapter import DiffusersDiT
from slimdiff.models.dit import DiT
from slimdiff.result import record_of
from slimdiff.runtime.branch_cache import (
    apply_branch_cache,
    get_branch_cache,
    remove_branch_cache,
)
from slimdiff.runtime.reuse import (
    ReusePlan,
    apply_block_reuse,
    get_block_reuse,
    scheduler_timesteps,
)
from slimdiff.runtime.routing import apply_dydit, default_config

STEPS = 6


def _ctx() -> Context:
    return Context(sampler="ddim", steps=STEPS, progress=False)


def _vae() -> AutoencoderKL:
    """A tiny AutoencoderKL: 4 latent channels, no downsampling (8x8 latents, 8x8 images)."""
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                         norm_num_groups=4, sample_size=8).eval()


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dit_pipe() -> DiTPipeline:
    """DiT-XL-2-256's layout at toy size: 1000 classes (CFG's null label 1000 exists) and the
    hub pipeline's DPM-Solver++ scheduler."""
    return _quiet(DiTPipeline(transformer=tiny_diffusers_dit(num_embeds_ada_norm=1000, num_layers=4), vae=_vae(),
                              scheduler=DPMSolverMultistepScheduler()))


def _ddpm_pipe() -> DDPMPipeline:
    return _quiet(DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()))


def _pixart_pipe() -> PixArtAlphaPipeline:
    """PixArt-alpha's pipeline (DPM-Solver++); no text encoder: the calls pass caption embeddings."""
    return _quiet(PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=_vae(), transformer=tiny_pixart(),
                                      scheduler=DPMSolverMultistepScheduler()))


def _sd_pipe() -> StableDiffusionPipeline:
    """Stable Diffusion 1.5's pipeline and scheduler (PNDM, PLMS: its first timestep repeats)."""
    return _quiet(StableDiffusionPipeline(vae=_vae(), text_encoder=None, tokenizer=None, unet=tiny_unet_cond(),
                                          scheduler=PNDMScheduler(skip_prk_steps=True), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False))


def _captions(width: int) -> dict:
    """Seeded caption embeddings (2 prompts, 8 tokens: the length slimdiff counts MACs at) and negatives."""
    g = torch.Generator().manual_seed(1)
    return {"prompt_embeds": torch.randn(2, 8, width, generator=g),
            "negative_prompt_embeds": torch.randn(2, 8, width, generator=g)}


def _call_kwargs(pipe) -> dict:
    """Each pipeline's call, CFG on where it has one."""
    if isinstance(pipe, DiTPipeline):
        return {"class_labels": [3, 5], "guidance_scale": 4.0}
    if isinstance(pipe, PixArtAlphaPipeline):
        mask = torch.ones(2, 8, dtype=torch.long)
        return {**_captions(16), "prompt_attention_mask": mask, "negative_prompt_attention_mask": mask,
                "negative_prompt": None, "guidance_scale": 4.5, "use_resolution_binning": False}
    if isinstance(pipe, StableDiffusionPipeline):
        return {**_captions(32), "guidance_scale": 7.5}
    return {"batch_size": 2}


def _run(pipe, steps: int = STEPS) -> tuple:
    """(images, MACs of the denoiser inside the call) of one seeded call."""
    name = "transformer" if hasattr(pipe, "transformer") else "unet"
    kw = _call_kwargs(pipe)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        images = pipe(num_inference_steps=steps, output_type="np", generator=torch.Generator().manual_seed(0),
                      **kw).images
    return images, sum(counter.get_flop_counts()[type(getattr(pipe, name)).__name__].values()) // 2


def _reported(model) -> float:
    return record_of(model).result.measured["macs_ratio"]


DIT_CASES = [("dipgo", 0.6, {"opt_steps": 2}), ("deepcache-style", 0.6, {}), ("fewer-steps", 0.5, {})]


@pytest.mark.parametrize("method,budget,opts", DIT_CASES, ids=[c[0] for c in DIT_CASES])
def test_dit_pipeline_runs_a_plan_at_the_reported_macs(tmp_path, method, budget, opts):
    pipe = _dit_pipe()
    _, full = _run(pipe)
    result = compress(copy.deepcopy(pipe.transformer), method, budget, _ctx(), opts)
    slimdiff.save(result, tmp_path / "r")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # as many calls as the plan has rows: no warning
        slimdiff.apply(pipe, tmp_path / "r")
    plan = get_block_reuse(pipe.transformer)
    assert plan.sampler == "DPMSolverMultistepScheduler" and len(plan.timesteps) == STEPS
    (a, macs), (b, _) = _run(pipe), _run(pipe)  # state resets per pipeline call
    assert (a == b).all()
    assert macs / full == pytest.approx(_reported(result), rel=1e-3)


TEXT_CASES = [(_pixart_pipe, "dipgo", 0.6, {"opt_steps": 2}), (_pixart_pipe, "l2c-block", 0.6, {}),
              (_sd_pipe, "deepcache", 0.6, {}), (_sd_pipe, "dipgo", 0.6, {"opt_steps": 2})]


@pytest.mark.parametrize("make,method,budget,opts", TEXT_CASES,
                         ids=[f"{c[0].__name__[1:-5]}-{c[1]}" for c in TEXT_CASES])
def test_text_pipelines_run_a_plan_at_the_reported_macs(make, method, budget, opts):
    """PixArt's DPM-Solver++ makes one call per step: the plan as made. SD's PNDM makes
    steps + 1 (its first timestep repeats): at the plan's step count the mapped plan runs at
    the ratio the warning states; one step fewer runs the plan as made."""
    pipe = make()
    name = "transformer" if hasattr(pipe, "transformer") else "unet"
    full, fewer = _run(pipe)[1], _run(pipe, STEPS - 1)[1]  # the uncompressed pipeline
    result = compress(copy.deepcopy(getattr(pipe, name)), method, budget, _ctx(), opts)
    plan = copy.deepcopy(get_block_reuse(result) or get_branch_cache(result))
    repeats = isinstance(pipe.scheduler, PNDMScheduler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        slimdiff.apply(pipe, copy.deepcopy(result))
    expected = _realised(caught, f"num_inference_steps={STEPS - 1} runs") if repeats else _reported(result)
    assert _run(pipe)[1] / full == pytest.approx(expected, rel=1e-3)
    if repeats:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            slimdiff.apply(pipe, result, num_inference_steps=STEPS - 1)
        assert torch.equal(get_block_reuse(result).compute if get_block_reuse(result) else
                           get_branch_cache(result).compute, plan.compute)
        assert _run(pipe, STEPS - 1)[1] / fewer == pytest.approx(_reported(result), rel=1e-3)


def _realised(caught, says: str = "") -> float:
    """The realised MACs ratio stated by the mapping warning in ``caught`` (which also ``says``)."""
    message = next(str(w.message) for w in caught if "realised MACs ratio" in str(w.message))
    assert says in message
    return float(message.split("realised MACs ratio ")[1].split()[0])


def test_all_compute_plans_give_the_uncompressed_pipeline(tmp_path):
    pipe = _dit_pipe()
    ref, _ = _run(pipe)
    model = copy.deepcopy(pipe.transformer)
    apply_block_reuse(model, ReusePlan.full("ddim", STEPS, model))  # slimdiff's trailing DDIM timesteps
    slimdiff.apply(pipe, model)
    assert (_run(pipe)[0] == ref).all()

    unet_pipe = _ddpm_pipe()
    ref, _ = _run(unet_pipe)
    unet = compress(copy.deepcopy(unet_pipe.unet), "deepcache", 0.6, _ctx())
    plan = get_branch_cache(unet)
    remove_branch_cache(unet)
    apply_branch_cache(unet, ReusePlan(torch.ones(plan.shape, dtype=torch.bool), plan.sampler, plan.steps,
                                       plan.timesteps, plan.blocks))
    slimdiff.apply(unet_pipe, unet)
    assert (_run(unet_pipe)[0] == ref).all()


def test_ddpm_pipeline_runs_deepcache_at_the_reported_macs():
    pipe = _ddpm_pipe()
    _, full = _run(pipe)
    result = compress(copy.deepcopy(pipe.unet), "deepcache", 0.6, _ctx())
    slimdiff.apply(pipe, result)
    assert get_branch_cache(pipe.unet).sampler == "DDPMScheduler"
    _, macs = _run(pipe)
    assert macs / full == pytest.approx(_reported(result), rel=1e-3)


def test_other_step_counts_map_by_relative_position_and_warn_the_realised_ratio():
    pipe = _dit_pipe()
    _, full = _run(pipe, 2 * STEPS)
    result = compress(copy.deepcopy(pipe.transformer), "deepcache-style", 0.6, _ctx())
    assert get_block_reuse(result).rows_for(2 * STEPS) == ([j // 2 for j in range(2 * STEPS)], False)
    with pytest.warns(UserWarning, match="same relative position") as caught:
        slimdiff.apply(pipe, result, num_inference_steps=2 * STEPS)
    _, macs = _run(pipe, 2 * STEPS)
    assert macs / full == pytest.approx(_realised(caught), abs=1e-3)
    made = get_block_reuse(result).origin
    slimdiff.apply(pipe, result)  # applied again: the plan as made, not the mapped one
    assert torch.equal(get_block_reuse(result).compute, made.compute)


def test_fewer_steps_runs_at_its_own_step_count():
    pipe = _dit_pipe()
    _, full = _run(pipe)  # the uncompressed pipeline at the plan's step count
    result = compress(copy.deepcopy(pipe.transformer), "fewer-steps", 0.5, _ctx())
    k = get_block_reuse(result).sampling_steps
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        slimdiff.apply(pipe, result, num_inference_steps=k)
    assert all(get_block_reuse(pipe.transformer).step_compute)
    _, macs = _run(pipe, k)
    assert macs / full == pytest.approx(_reported(result), rel=1e-3)


def test_mismatches_name_slimdiff_apply():
    pipe = _dit_pipe()
    result = compress(copy.deepcopy(pipe.transformer), "deepcache-style", 0.6, _ctx())
    pipe.register_modules(transformer=result)  # installed by hand: keyed to slimdiff's DDIM timesteps
    with pytest.raises(UsageError, match=r"slimdiff\.apply\(pipe, result, num_inference_steps=N\)"):
        _run(pipe)
    slimdiff.apply(pipe, result)
    with pytest.raises(UsageError, match=f"num_inference_steps={STEPS} .*slimdiff.apply"):
        _run(pipe, STEPS + 1)
    with pytest.raises(UsageError, match="DiTPipeline.transformer takes a DiTTransformer2DModel.*compress the"):
        slimdiff.apply(pipe, tiny_unet())
    with pytest.raises(UsageError, match="num_inference_steps must be a positive integer"):
        slimdiff.apply(pipe, result, num_inference_steps=0)


def test_export_diffusers_of_a_runtime_result_is_refused_before_work(tmp_path):
    out = CliRunner().invoke(app, ["compress", "--method", "dipgo", "--model", "digits-dit", "-o", str(tmp_path / "r"),
                                   "--export-diffusers", str(tmp_path / "hf")])
    assert isinstance(out.exception, UsageError) and "slimdiff.apply(pipe" in str(out.exception)
    assert not (tmp_path / "r").exists() and not (tmp_path / "hf").exists()


def test_python_export_of_a_model_with_a_plan_is_refused(tmp_path):
    from slimdiff.io import export_diffusers

    model = _dit_pipe().transformer
    apply_block_reuse(model, ReusePlan.full("ddim", STEPS, model))
    with pytest.raises(UsageError, match="carries a slimdiff runtime .*slimdiff.apply"):
        export_diffusers(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------- DyDiT and our own DiT
DYDIT_TOLERANCE = 0.1
"""|MACs ratio in the pipeline - reported|: routed tokens depend on the input (the pipeline's
noise, labels, CFG's null half, scheduler), so the two agree only loosely."""


def _latents(path, shape: tuple[int, int, int] = (4, 8, 8), classes: int | None = 1000,
             text_width: int | None = None) -> str:
    """A seeded latents file of 16 samples of ``shape`` (labels below ``classes``; captions of ``text_width``)."""
    rng = np.random.default_rng(0)
    arrays = {"latents": rng.standard_normal((16, *shape)).astype(np.float32)}
    if classes is not None:
        arrays["labels"] = rng.integers(0, classes, 16)
    if text_width is not None:
        arrays["encoder_hidden_states"] = rng.standard_normal((16, 8, text_width)).astype(np.float32)
    np.savez(path, **arrays)
    return str(path)


def _dydit(model, tmp_path, text_width: int | None = None):
    ctx = Context(sampler="ddim", steps=STEPS, progress=False, batch_size=4, work_dir=tmp_path / "work",
                  data=_latents(tmp_path / "latents.npz", text_width=text_width))
    return compress(model, "dydit", 0.6, ctx, {"train_steps": 5, "heldout_samples": 2})


def test_our_dit_runs_in_a_dit_pipeline_as_the_diffusers_dit_it_converts_from():
    pipe = _dit_pipe()
    ref, full = _run(pipe)
    slimdiff.apply(pipe, diffusers_to_dit(pipe.transformer))
    assert isinstance(pipe.transformer, DiffusersDiT) and pipe.transformer.config.sample_size == 8
    images, macs = _run(pipe)
    assert np.allclose(images, ref, atol=1e-5) and macs < full  # one shared embedder, not one per block
    slimdiff.apply(pipe, pipe.transformer)  # an installed wrapper is unwrapped, not wrapped twice
    assert isinstance(pipe.transformer.dit, DiT)


@pytest.mark.parametrize("mode", ["dynamic", "off"])
def test_dydit_routers_all_on_or_off_give_the_uncompressed_pipeline(mode):
    """Routers whose logits are their biases keep every head, group and token (sliced execution);
    "off" runs no router."""
    pipe = _dit_pipe()
    ref, _ = _run(pipe)
    model = diffusers_to_dit(pipe.transformer)
    apply_dydit(model, default_config(model, router_init="zeros")).set_mode(mode)
    slimdiff.apply(pipe, model)
    assert np.allclose(_run(pipe)[0], ref, atol=1e-5)


@pytest.mark.parametrize("source", ["dit", "diffusers-dit"])
def test_dydit_runs_in_a_dit_pipeline_near_the_reported_macs(tmp_path, source):
    """DyDiT of our DiT or of the pipeline's diffusers DiT (converted by the method), saved and
    applied: width tables at the pipeline's DPM-Solver++ timesteps, CFG on."""
    pipe = _dit_pipe()
    if source == "dit":
        slimdiff.apply(pipe, tiny_dit(num_classes=1000, depth=4))  # the uncompressed pipeline is our DiT's
    _, full = _run(pipe)
    slimdiff.save(_dydit(copy.deepcopy(pipe.transformer.dit if source == "dit" else pipe.transformer), tmp_path),
                  tmp_path / "r")
    slimdiff.apply(pipe, tmp_path / "r")
    routing = pipe.transformer.dit.dydit
    assert sorted(routing.tables) == sorted(scheduler_timesteps(pipe.scheduler, STEPS))
    (a, macs), (b, _) = _run(pipe), _run(pipe)
    assert (a == b).all() and not any(isinstance(k, float) for k in routing._memo)  # every call read the tables
    reported = _reported(pipe.transformer.dit)
    print(f"DyDiT of {source} in DiTPipeline: MACs ratio in the pipeline {macs / full:.3f}, reported {reported:.3f}")
    assert macs < full and abs(macs / full - reported) <= DYDIT_TOLERANCE


def test_pixart_dydit_runs_in_its_pipeline_near_the_reported_macs(tmp_path):
    """At a step count other than the one compressed for: tables at the pipeline's timesteps."""
    pipe = _pixart_pipe()
    _, full = _run(pipe, STEPS + 2)
    result = _dydit(copy.deepcopy(pipe.transformer), tmp_path, text_width=16)
    slimdiff.apply(pipe, result, num_inference_steps=STEPS + 2)
    assert result.dydit.table_info == {"sampler": "DPMSolverMultistepScheduler", "steps": STEPS + 2}
    _, macs = _run(pipe, STEPS + 2)
    print(f"DyDiT of PixArt in PixArtAlphaPipeline: MACs ratio in the pipeline {macs / full:.3f}, "
          f"reported {_reported(result):.3f}")
    assert macs < full and abs(macs / full - _reported(result)) <= DYDIT_TOLERANCE


def test_a_dit_pipeline_warns_when_its_null_class_is_not_the_models():
    pipe = _dit_pipe()
    with pytest.warns(UserWarning, match="label 1000 as the null class, but this model has 10 classes"):
        slimdiff.apply(pipe, tiny_dit(num_classes=10, depth=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        slimdiff.apply(pipe, tiny_dit(num_classes=1000, depth=2))


# --------------------------------------------------------------------------- save_pipeline / from_pretrained
def _roundtrip(pipe, tmp_path, steps: int = STEPS):
    """(images and MACs before, after) saving ``pipe`` with save_pipeline and loading it back."""
    before = _run(pipe, steps)
    slimdiff.save_pipeline(pipe, tmp_path / "pipe")
    loaded = _quiet(slimdiff.from_pretrained(tmp_path / "pipe"))
    return before, _run(loaded, steps), loaded


def test_a_pipeline_with_a_plan_round_trips_at_its_step_count(tmp_path):
    """SD's PNDM at one step fewer than the plan (the step count that runs it as made): the
    saved pipeline is applied again at that count, same images and MACs."""
    pipe = _sd_pipe()
    result = compress(copy.deepcopy(pipe.unet), "deepcache", 0.6, _ctx())
    slimdiff.apply(pipe, result, num_inference_steps=STEPS - 1)
    (a, macs), (b, macs_loaded), loaded = _roundtrip(pipe, tmp_path, STEPS - 1)
    assert np.array_equal(a, b) and macs_loaded == macs
    assert get_branch_cache(loaded.unet).steps == STEPS - 1
    assert type(loaded.scheduler) is PNDMScheduler


def test_per_layer_widths_and_routers_round_trip(tmp_path):
    """What no diffusers config holds: Diff-Pruning's per-layer widths (DDPM UNet) and DyDiT's
    routers (our DiT wrapped for DiTPipeline)."""
    pipe = _ddpm_pipe()
    ctx = Context(sampler="ddim", steps=STEPS, progress=False, batch_size=4,
                  data=_latents(tmp_path / "images.npz", (3, 16, 16), classes=None))
    slimdiff.apply(pipe, compress(copy.deepcopy(pipe.unet), "diff-pruning", 0.65, ctx, {"stride": 500}))
    with pytest.raises(UsageError, match="differ from what the UNet2DModel config builds.*slimdiff.save_pipeline"):
        pipe.save_pretrained(str(tmp_path / "plain"))  # it would write widths its config cannot hold
    pickle.loads(pickle.dumps(pipe.unet))  # the refusal does not stop the model from pickling
    (a, macs), (b, macs_loaded), _ = _roundtrip(pipe, tmp_path / "unet")
    assert np.allclose(a, b, atol=1e-6) and macs_loaded == macs
    for kwargs in ({"dtype": torch.float64}, {"torch_dtype": {"unet": torch.float64, "default": torch.float64}}):
        wide = _quiet(slimdiff.from_pretrained(tmp_path / "unet" / "pipe", **kwargs))  # the denoiser follows the dtype
        assert wide.unet.dtype == torch.float64  # (its noise is drawn in float64: other images, so none compared)
        assert np.isfinite(_run(wide)[0]).all()

    pipe = _dit_pipe()
    slimdiff.apply(pipe, _dydit(copy.deepcopy(pipe.transformer), tmp_path))
    (a, macs), (b, macs_loaded), loaded = _roundtrip(pipe, tmp_path / "dit")
    assert isinstance(loaded.transformer, DiffusersDiT) and loaded.transformer.dit.dydit.table_info["steps"] == STEPS
    assert np.allclose(a, b, atol=1e-6) and macs_loaded == macs



def test_saving_and_loading_a_pipeline_refuse_what_would_lose_the_compression(tmp_path):
    from diffusers import DiffusionPipeline

    pipe = _dit_pipe()
    slimdiff.apply(pipe, tiny_dit(num_classes=1000, depth=2))
    with pytest.raises(UsageError, match="slimdiff.save_pipeline"):  # diffusers could not load the class back
        pipe.save_pretrained(str(tmp_path / "plain"))
    slimdiff.save_pipeline(pipe, tmp_path / "pipe")
    with pytest.raises(UsageError, match="exists; choose a new folder"):
        slimdiff.save_pipeline(pipe, tmp_path / "pipe")
    with pytest.raises(ValueError, match="expected .*transformer"):  # plain diffusers: refused, not half-loaded
        DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"))
    sd = _sd_pipe()  # a plan in hooks on a diffusers model: diffusers would write the weights without it
    slimdiff.apply(sd, compress(copy.deepcopy(sd.unet), "deepcache", 0.6, _ctx()))
    with pytest.raises(UsageError, match="carries a slimdiff runtime[^;]*; save the pipeline with slimdiff.save_pipeline"):
        sd.save_pretrained(str(tmp_path / "sd"))
    depth = _dit_pipe()  # what a diffusers config holds: diffusers' own save stays
    slimdiff.apply(depth, compress(copy.deepcopy(depth.transformer), "first-depth", 0.6, _ctx()))
    depth.save_pretrained(str(tmp_path / "depth"))
    _dit_pipe().save_pretrained(str(tmp_path / "stock"))
    with pytest.raises(UsageError, match="not written by slimdiff.save_pipeline.*slimdiff.apply"):
        slimdiff.from_pretrained(tmp_path / "stock")
    with pytest.raises(UsageError, match="not a diffusers pipeline folder"):
        slimdiff.from_pretrained(tmp_path / "nowhere")


# --------------------------------------------------------------------------- the committed matrix
def test_the_committed_pipeline_matrix_covers_every_method_and_layout():
    """``bench/pipelines/matrix.json`` (scripts/pipeline_matrix.py) has a row for every registered
    method in every layout it applies to, and every compressed result ran in its stock pipeline and
    came back from save_pipeline with the same images and MACs: rerun the script after adding a
    method or changing one of these paths."""
    import json
    from pathlib import Path

    from slimdiff.methods import registry

    matrix = json.loads((Path(__file__).parents[1] / "bench" / "pipelines" / "matrix.json").read_text())
    assert matrix["commit"] and "scripts/pipeline_matrix.py" in matrix["command"]  # what produced it
    rows = matrix["rows"]
    makers = {"DiTPipeline": _dit_pipe, "PixArtAlphaPipeline": _pixart_pipe, "StableDiffusionPipeline": _sd_pipe,
              "DDPMPipeline": _ddpm_pipe}
    for layout, make in makers.items():
        pipe = make()
        denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
        want = {name for name, spec in registry().items() if spec.applies is None or spec.applies(denoiser)}
        have = {r["method"] for r in rows if r["layout"].startswith(layout)}
        assert have == want, f"{layout}: rerun scripts/pipeline_matrix.py (missing {want - have}, extra {have - want})"
    for r in rows:
        if r["compress"]["ok"]:
            assert r["apply"]["ok"] and r["save_pipeline"]["ok"] and r["save_pipeline"]["same_images"], r
            assert r["save_pipeline"]["macs_ratio"] == pytest.approx(r["apply"]["macs_ratio"]), r
        else:  # only a budget out of reach on a tiny model
            assert "budget" in r["compress"]["error"] or "does not fit" in r["compress"]["error"], r
