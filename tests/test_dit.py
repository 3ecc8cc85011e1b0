"""Our DiT: registry, official state-dict layout, safe (de)serialisation, and exact
conversion to and from diffusers' DiTTransformer2DModel."""
from __future__ import annotations

import pickle

import pytest
import torch
from conftest import randomize_, tie_dit_embedders_, tiny_dit, tiny_diffusers_dit
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file, save_file

from slimdiff.errors import UsageError
from slimdiff.models.convert import diffusers_to_dit, dit_to_diffusers
from slimdiff.models.dit import DiT, DiT_models, Mlp, load_official
from slimdiff.models.dit import Attention as DiTAttention

ATOL = 1e-5


def _inputs(n: int = 3, c: int = 4, s: int = 8, num_classes: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, s, s, generator=g)
    t = torch.tensor([0, 437, 999, 12, 250][:n])
    y = torch.tensor([0, 7, num_classes, 3, 9][:n])  # includes the null class
    return x, t, y


def _official_keys(depth: int) -> set[str]:
    keys = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight"}
    for k in ("t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear", "final_layer.adaLN_modulation.1"):
        keys |= {f"{k}.weight", f"{k}.bias"}
    for i in range(depth):
        for k in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{i}.{k}.weight", f"blocks.{i}.{k}.bias"}
    return keys


# --------------------------------------------------------------------------- registry
def test_registry_names_and_kwargs():
    for name in ("DiT-XL/2", "DiT-XL/8", "DiT-L/4", "DiT-B/2", "DiT-S/8", "DiT-T/2", "DiT-M/1"):
        assert name in DiT_models
    m = DiT_models["DiT-T/2"](input_size=8, in_channels=1, num_classes=10, learn_sigma=False)
    assert isinstance(m, DiT)
    assert (len(m.blocks), m.x_embedder.proj.out_channels, m.blocks[0].attn.num_heads) == (12, 128, 4)
    assert m.x_embedder.proj.weight.shape == (128, 1, 2, 2) and m.pos_embed.shape == (1, 16, 128)
    assert m.out_channels == 1 and m.y_embedder.embedding_table.num_embeddings == 11
    s8 = DiT_models["DiT-S/8"](input_size=16, num_classes=3)
    assert s8.patch_size == 8 and s8.x_embedder.proj.out_channels == 384 and len(s8.blocks) == 12
    assert s8.pos_embed.shape == (1, 4, 384) and s8.out_channels == 8  # learned sigma by default
    x = torch.randn(2, 4, 16, 16)
    assert s8(x, torch.tensor([1, 2]), torch.tensor([0, 3])).shape == (2, 8, 16, 16)


def test_xl2_has_the_official_parameter_count():
    # facebookresearch/DiT prints "DiT Parameters: 675,129,632" for DiT-XL/2 (pos_embed included).
    with torch.device("meta"):
        m = DiT_models["DiT-XL/2"]()
    sd = m.state_dict()
    assert sum(v.numel() for v in sd.values()) == 675_129_632
    assert set(sd) == _official_keys(28)


def test_official_state_dict_keys_and_shapes():
    m = tiny_dit()  # D=32, 2 blocks, patch 2, 4 channels, 10 classes, learned sigma
    sd = m.state_dict()
    assert set(sd) == _official_keys(2)
    expected = {
        "pos_embed": (1, 16, 32),
        "x_embedder.proj.weight": (32, 4, 2, 2),
        "t_embedder.mlp.0.weight": (32, 256),
        "t_embedder.mlp.2.weight": (32, 32),
        "y_embedder.embedding_table.weight": (11, 32),
        "blocks.0.attn.qkv.weight": (96, 32),
        "blocks.0.attn.proj.weight": (32, 32),
        "blocks.0.mlp.fc1.weight": (128, 32),
        "blocks.1.mlp.fc2.weight": (32, 128),
        "blocks.0.adaLN_modulation.1.weight": (192, 32),
        "final_layer.linear.weight": (2 * 2 * 8, 32),
        "final_layer.adaLN_modulation.1.weight": (64, 32),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k


def test_paper_init_zeroes_adaln_and_output():
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    x, t, y = _inputs()
    assert torch.count_nonzero(m(x, t, y)) == 0  # adaLN-Zero: the untrained model predicts zero
    assert torch.count_nonzero(tiny_dit()(x, t, y)) > 0  # the test factory is not trivial


# --------------------------------------------------------------------------- serialisation
def test_safetensors_round_trip(tmp_path):
    m = tiny_dit(seed=0)
    save_file(m.state_dict(), str(tmp_path / "model.safetensors"))
    other = tiny_dit(seed=1)
    x, t, y = _inputs()
    with torch.no_grad():
        assert not torch.allclose(m(x, t, y), other(x, t, y))
        other.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
        assert torch.equal(m(x, t, y), other(x, t, y))


def test_load_official_round_trip(tmp_path):
    m = tiny_dit(learn_sigma=True)
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    x, t, y = _inputs()
    torch.save(m.state_dict(), tmp_path / "plain.pt")  # the released DiT-XL-2-256.pt layout
    torch.save({"ema": m.state_dict()}, tmp_path / "ema.pt")  # a training checkpoint's EMA
    with torch.no_grad():
        ref = m(x, t, y)
        for name in ("plain.pt", "ema.pt"):
            loaded = load_official(str(tmp_path / name), **cfg).eval()
            assert torch.equal(loaded(x, t, y), ref)


class _Payload:  # pickled by reference: loading it would import and run code
    pass


def test_load_official_refuses_pickled_objects(tmp_path):
    torch.save({"ema": tiny_dit().state_dict(), "args": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_official(str(tmp_path / "evil.pt"), input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10)


# --------------------------------------------------------------------------- diffusers conversion
@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("freq_shift", [0, 1])
def test_dit_to_diffusers_and_back_is_exact(learn_sigma, freq_shift):
    m = tiny_dit(learn_sigma=learn_sigma, freq_shift=freq_shift)
    d = dit_to_diffusers(m)
    assert isinstance(d, DiTTransformer2DModel) and not d.training
    assert d.out_channels == (8 if learn_sigma else 4) and d.config.num_layers == 2
    x, t, y = _inputs()
    with torch.no_grad():
        ref = m(x, t, y)
        out = d(x, timestep=t, class_labels=y).sample
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
        back = diffusers_to_dit(d)
        assert back.config.freq_shift == freq_shift and back.config.learn_sigma == learn_sigma
        torch.testing.assert_close(back(x, t, y), ref, atol=ATOL, rtol=0)
    assert ref.abs().mean() > 0.1  # outputs are far from zero, so the comparison means something


@pytest.mark.parametrize("out_channels", [8, None])
def test_diffusers_to_dit_is_exact(out_channels):
    d = tiny_diffusers_dit(out_channels=out_channels)
    m = diffusers_to_dit(d)
    assert m.config.freq_shift == 1 and m.config.learn_sigma == (out_channels == 8)
    assert m.config.num_classes == 10 and m.y_embedder.embedding_table.num_embeddings == 11
    x, t, y = _inputs()
    with torch.no_grad():
        ref = d(x, timestep=t, class_labels=y).sample
        torch.testing.assert_close(m(x, t, y), ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(dit_to_diffusers(m)(x, timestep=t, class_labels=y).sample, ref, atol=ATOL, rtol=0)
    assert ref.abs().mean() > 0.1


@pytest.mark.parametrize("norm_eps", [1e-5, 1e-2])
def test_diffusers_norm_eps_converts_exactly(norm_eps):
    # 1e-5: the hub's DiT configs keep diffusers' default; 1e-2 makes a dropped eps visible.
    d = tiny_diffusers_dit(norm_eps=norm_eps)
    m = diffusers_to_dit(d)
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, y), d(x, timestep=t, class_labels=y).sample, atol=ATOL, rtol=0)


def test_freq_shift_is_runtime_only_in_diffusers(tmp_path):
    """save_pretrained drops the official (shift 0) convention: diffusers' own comes back."""
    m = tiny_dit(freq_shift=0)
    d = dit_to_diffusers(m)
    d.save_pretrained(tmp_path)
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        ref = m(x, t, y)
        torch.testing.assert_close(d(x, timestep=t, class_labels=y).sample, ref, atol=ATOL, rtol=0)
        out = reloaded(x, timestep=t, class_labels=y).sample
        assert (out - ref).abs().max() > 1e-3
        shifted = tiny_dit(freq_shift=1)
        shifted.load_state_dict(m.state_dict())
        torch.testing.assert_close(out, shifted(x, t, y), atol=ATOL, rtol=0)


def test_class_dropout_zero_gets_a_zero_null_row():
    m = tiny_dit(class_dropout_prob=0.0)
    assert m.y_embedder.embedding_table.num_embeddings == 10
    d = dit_to_diffusers(m)
    table = d.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight
    assert table.shape[0] == 11 and torch.count_nonzero(table[10]) == 0
    x, t, _ = _inputs()
    y = torch.tensor([0, 5, 9])
    with torch.no_grad():
        torch.testing.assert_close(d(x, timestep=t, class_labels=y).sample, m(x, t, y), atol=ATOL, rtol=0)


def _narrow(m: DiT, heads: int, head_dim: int, mlp: int, blocks=None, seed: int = 3) -> DiT:
    """Replace blocks' attention/MLP by narrower random ones (what width pruning yields)."""
    D = m.x_embedder.proj.out_channels
    for i in blocks if blocks is not None else range(len(m.blocks)):
        m.blocks[i].attn = DiTAttention(D, heads, head_dim)
        m.blocks[i].mlp = Mlp(D, mlp)
    return randomize_(m, seed).eval()


def test_uniformly_width_pruned_dit_converts_both_ways():
    m = _narrow(tiny_dit(), heads=1, head_dim=8, mlp=48)
    d = dit_to_diffusers(m)
    a = d.transformer_blocks[0].attn1
    assert a.heads == 1 and a.to_q.out_features == 8 and d.transformer_blocks[1].ff.net[2].in_features == 48
    x, t, y = _inputs()
    with torch.no_grad():
        ref = m(x, t, y)
        torch.testing.assert_close(d(x, timestep=t, class_labels=y).sample, ref, atol=ATOL, rtol=0)
        back = diffusers_to_dit(d)
        assert back.blocks[1].attn.num_heads == 1 and back.blocks[1].mlp.fc1.out_features == 48
        torch.testing.assert_close(back(x, t, y), ref, atol=ATOL, rtol=0)


def test_per_block_widths_refused_for_diffusers_but_read_back():
    m = _narrow(tiny_dit(), heads=1, head_dim=16, mlp=64, blocks=[1])
    with pytest.raises(UsageError, match="different widths"):
        dit_to_diffusers(m)
    # The other direction keeps per-block widths (e.g. a torch-pruned diffusers model).
    d = tiny_diffusers_dit()
    blk = d.transformer_blocks[1]
    with torch.no_grad():
        for lin in (blk.attn1.to_q, blk.attn1.to_k, blk.attn1.to_v):  # keep head 0 of 2
            lin.weight.data, lin.bias.data = lin.weight[:16].clone(), lin.bias[:16].clone()
            lin.out_features = 16
        blk.attn1.to_out[0].weight.data = blk.attn1.to_out[0].weight[:, :16].clone()
        blk.attn1.to_out[0].in_features = 16
    blk.attn1.heads = 1
    ours = diffusers_to_dit(d)
    assert [b.attn.num_heads for b in ours.blocks] == [2, 1]
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), d(x, timestep=t, class_labels=y).sample, atol=ATOL, rtol=0)


def test_untied_diffusers_embedders_are_refused():
    d = randomize_(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, num_layers=2, sample_size=8,
                                         num_embeds_ada_norm=10, norm_num_groups=1))
    with pytest.raises(UsageError, match=r"transformer_blocks\[1\].*embedder"):
        diffusers_to_dit(d)
    tie_dit_embedders_(d)
    diffusers_to_dit(d)  # fine once the copies agree


def test_converters_reject_wrong_types():
    with pytest.raises(UsageError):
        dit_to_diffusers(tiny_diffusers_dit())
    with pytest.raises(UsageError):
        diffusers_to_dit(tiny_dit())


# ---- forward_with_cfg: standard (all epsilon channels) vs the official default (3 channels)
def _cfg_parts(m: DiT, guidance_channels):
    x, t, _ = _inputs(2)
    half = x[:1]
    y = torch.tensor([7, m.num_classes])  # [cond; null]
    with torch.no_grad():
        out = m.forward_with_cfg(torch.cat([half, half]), t[:1].repeat(2), y, 4.0, guidance_channels=guidance_channels)
        cond = m(half, t[:1], y[:1])
        uncond = m(half, t[:1], y[1:])
    return out, cond, uncond


def test_forward_with_cfg_default_guides_every_epsilon_channel():
    m = tiny_dit()  # learned sigma: 8 output channels
    out, c, u = _cfg_parts(m, None)
    want = u[:, :4] + 4.0 * (c[:, :4] - u[:, :4])
    torch.testing.assert_close(out[:1, :4], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:, :4], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:1, 4:], c[:, 4:], rtol=1e-5, atol=1e-5)  # each half's own sigma values
    torch.testing.assert_close(out[1:, 4:], u[:, 4:], rtol=1e-5, atol=1e-5)


def test_forward_with_cfg_official_three_channels():
    """facebookresearch/DiT models.py 262: eps, rest = model_out[:, :3], model_out[:, 3:]."""
    m = tiny_dit()
    out, c, u = _cfg_parts(m, 3)
    torch.testing.assert_close(out[:1, :3], u[:, :3] + 4.0 * (c[:, :3] - u[:, :3]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:1, 3:], c[:, 3:], rtol=1e-5, atol=1e-5)  # the half sample.py keeps
    torch.testing.assert_close(out[1:, 3:], u[:, 3:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:1, 3], _cfg_parts(m, None)[0][:1, 3], atol=1e-3)
    with pytest.raises(UsageError, match="guidance_channels"):
        m.forward_with_cfg(torch.zeros(2, 4, 8, 8), torch.zeros(2), torch.tensor([1, 10]), 4.0, guidance_channels=9)
