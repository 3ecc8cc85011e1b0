"""Real layouts users hold (issue 23, item 5), as tiny random models: facebook/DiT-XL-2-256's legacy
``Transformer2DModel`` folder and DiTPipeline, official DiT ``.pt`` files of any size (config read from
the weights, ``--dit-config`` overrides), and diffusers DiTs whose per-block embedders are not tied."""
from __future__ import annotations

import copy
import time
import json
from pathlib import Path

import diffusers
import pytest
import torch
from conftest import cli_main, evil_pickle, tiny_diffusers_dit, tiny_dit, tiny_pixart

from slimdiff.compression.depth import extract_blocks
from slimdiff.errors import UsageError
from slimdiff.models.backbone import as_backbone
from slimdiff.models.convert import diffusers_to_dit, untied_embedders
from slimdiff.models.dit import DiT, official_config
from slimdiff.models.registry import dit_options, load_model

# facebook/DiT-XL-2-256 transformer/config.json (diffusers 0.12 layout), less its sizes: the tiny
# model's are kept. No norm_eps: the hub file leaves diffusers' default.
LEGACY_DIT = {"_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0", "activation_fn": "gelu-approximate",
              "attention_bias": True, "cross_attention_dim": None, "dropout": 0.0, "norm_elementwise_affine": False,
              "norm_num_groups": 32, "norm_type": "ada_norm_zero", "num_vector_embeds": None,
              "only_cross_attention": False, "upcast_attention": False, "use_linear_projection": False}


def _legacy(folder: Path, **changes) -> Path:
    """Rewrite ``folder/config.json`` (a saved DiTTransformer2DModel) to the legacy layout."""
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in config.items() if k != "norm_eps"} | LEGACY_DIT | changes
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _dit_inputs(n: int = 2, size: int = 8, channels: int = 4, classes: int = 10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, channels, size, size, generator=g), torch.tensor([999, 10][:n]), torch.randint(0, classes, (n,), generator=g)


def _diffusers_out(model, x, t, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


@pytest.fixture(scope="module")
def dit_pipeline(tmp_path_factory) -> Path:
    """A DiTPipeline folder as facebook/DiT-XL-2-256's: legacy transformer, DDIM scheduler, a VAE."""
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=16)
    pipe = diffusers.DiTPipeline(tiny_diffusers_dit(), vae, diffusers.DDIMScheduler(), id2label={i: str(i) for i in range(10)})
    folder = tmp_path_factory.mktemp("layouts") / "DiT-tiny-256"
    pipe.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "transformer": ["diffusers", "Transformer2DModel"]}))
    _legacy(folder / "transformer")
    return folder


# --------------------------------------------------------------------------- legacy Transformer2DModel
def test_legacy_dit_folder_loads_as_diffusers_does(dit_pipeline):
    folder = dit_pipeline / "transformer"
    reference = diffusers.Transformer2DModel.from_pretrained(folder)  # diffusers' own reading of the layout
    x, t, y = _dit_inputs()
    for spec in (folder, dit_pipeline):
        model = load_model(spec)
        assert type(model) is diffusers.DiTTransformer2DModel and type(reference) is diffusers.DiTTransformer2DModel
        assert torch.equal(_diffusers_out(model, x, t, y), _diffusers_out(reference, x, t, y))
    assert diffusers.DiTPipeline.from_pretrained(dit_pipeline).transformer.config.num_layers == 2  # a real pipeline


def test_legacy_pixart_folder_loads_as_diffusers_does(tmp_path):
    folder = tmp_path / "transformer"
    tiny_pixart().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "Transformer2DModel", "num_vector_embeds": None}))
    model, reference = load_model(folder), diffusers.Transformer2DModel.from_pretrained(folder)
    assert type(model) is type(reference) is diffusers.PixArtTransformer2DModel
    inputs = as_backbone(model).example_inputs(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(as_backbone(model)(*inputs), as_backbone(reference)(*inputs))


def test_legacy_folder_of_another_norm_is_refused(tmp_path):
    folder = tmp_path / "t"
    tiny_diffusers_dit().save_pretrained(folder)
    _legacy(folder, norm_type="layer_norm")
    with pytest.raises(UsageError, match="holds a Transformer2DModel with norm_type 'layer_norm'; slimdiff supports") as e:
        load_model(folder)
    assert "\n" not in str(e.value)


def test_cli_info_sample_compress_on_the_legacy_pipeline(dit_pipeline, tmp_path, monkeypatch, capsys):
    assert cli_main(monkeypatch, "info", str(dit_pipeline), "--json", "--steps", "2") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "diffusers-dit" and info["blocks"] == 2
    assert cli_main(monkeypatch, "sample", "--model", str(dit_pipeline), "--steps", "2", "-n", "2",
                    "-o", str(tmp_path / "grid.png")) == 0
    assert (tmp_path / "grid.png").is_file() and "wrote" in capsys.readouterr().err
    assert cli_main(monkeypatch, "compress", "--method", "first-depth", "--model", str(dit_pipeline), "--steps", "2", "--budget", "0.6",
                    "-o", str(tmp_path / "out"), "--json") == 0
    assert json.loads(capsys.readouterr().out)["macs_ratio"] < 1
    assert len(load_model(tmp_path / "out").transformer_blocks) == 1


# --------------------------------------------------------------------------- official .pt of any size
OFFICIAL = {  # DiTConfig of tiny checkpoints whose width is a size table's (heads inferred)
    "M-width": dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10,
                    learn_sigma=True),
    "S-width": dict(input_size=8, patch_size=4, in_channels=1, hidden_size=384, depth=1, num_heads=6, num_classes=3,
                    learn_sigma=False, mlp_ratio=2.0),
}


def _official(tmp_path: Path, name: str, ema: bool = False, **config) -> tuple[DiT, Path]:
    model = tiny_dit(**config)
    path = tmp_path / f"{name}.pt"
    torch.save({"ema": model.state_dict()} if ema else model.state_dict(), path)
    return model, path


def _same_dit(a: DiT, b: DiT, config: dict) -> bool:
    x, t, y = _dit_inputs(size=config["input_size"], channels=config["in_channels"], classes=config["num_classes"])
    with torch.no_grad():
        return torch.equal(a(x, t, y), b(x, t, y))


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_config_is_read_from_the_weights(tmp_path, name):
    config = OFFICIAL[name]
    model, path = _official(tmp_path, name, ema=name == "S-width", **config)
    loaded = load_model(path)
    assert vars(loaded.config) == vars(model.config) and _same_dit(loaded, model, config)
    assert official_config(model.state_dict(), class_dropout_prob=0.0)["num_classes"] == config["num_classes"] + 1


def test_official_width_outside_the_table_needs_num_heads(tmp_path, monkeypatch, capsys):
    config = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    model, path = _official(tmp_path, "DiT-tiny", **config)
    with pytest.raises(UsageError, match="cannot tell the head count of a DiT of width 32.*--dit-config num_heads=N"):
        load_model(path)
    assert _same_dit(load_model(path, num_heads=2), model, config)
    assert cli_main(monkeypatch, "info", str(path), "--json", "--steps", "2") == 2
    assert "num_heads=N" in capsys.readouterr().err
    assert cli_main(monkeypatch, "info", str(path), "--json", "--steps", "2", "--dit-config", "num_heads=2") == 0
    assert json.loads(capsys.readouterr().out)["structure"][0]["heads"] == 2


def test_cli_loads_official_checkpoints_with_no_flags(tmp_path, monkeypatch, capsys):
    _, path = _official(tmp_path, "DiT-M-2-tiny", **OFFICIAL["M-width"])
    assert cli_main(monkeypatch, "info", str(path), "--json", "--steps", "2") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "dit" and info["blocks"] == 2 and info["structure"][0]["heads"] == 4
    assert cli_main(monkeypatch, "sample", "--model", str(path), "--steps", "2", "-n", "2", "--dit-config",
                    "input_size=8", "-o", str(tmp_path / "grid.png")) == 0


@pytest.mark.parametrize("text, match", [
    ("widht=3", "NAME=VALUE pairs of DiTConfig fields"), ("input_size", "NAME=VALUE"),
    ("input_size=x", "input_size='x' is not a int"), ("learn_sigma=maybe", "is not a bool"),
])
def test_dit_config_text_is_checked(text, match):
    with pytest.raises(UsageError, match=match):
        dit_options(text, "DiT-XL-2-256.pt")


def test_dit_config_parses_and_applies_only_where_options_do(tmp_path, monkeypatch, capsys):
    assert dit_options("input_size=32, num_classes=1000,learn_sigma=false,mlp_ratio=2", "x.pt") == dict(
        input_size=32, num_classes=1000, learn_sigma=False, mlp_ratio=2.0)
    assert dit_options(None, tmp_path) == {}
    with pytest.raises(UsageError, match="complete model"):
        dit_options("input_size=8", tmp_path)
    # a wrong override is refused with what was read and what was given; before any output is written
    _, path = _official(tmp_path, "DiT-M-2-tiny", **OFFICIAL["M-width"])
    with pytest.raises(UsageError, match="does not fit a DiT built with input_size=16 over the config read from its weights"):
        load_model(path, input_size=16)
    assert cli_main(monkeypatch, "compress", "--method", "first-depth", "--model", "digits-dit", "--dit-config",
                    "input_size=8", "-o", str(tmp_path / "out")) == 2
    assert "complete model" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_official_loader_never_unpickles(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pt").write_bytes(evil_pickle(marker))
    assert cli_main(monkeypatch, "info", str(tmp_path / "evil.pt")) == 2
    assert not marker.exists() and "refuses to unpickle" in capsys.readouterr().err
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UsageError, match="not an official DiT state dict"):
        load_model(tmp_path / "other.pt")


# --------------------------------------------------------------------------- untied per-block embedders
def _untied(layers: int = 4) -> diffusers.DiTTransformer2DModel:
    """A DiT as trained in diffusers: every block its own embedder."""
    model = tiny_diffusers_dit(num_layers=layers, in_channels=1, out_channels=2)
    with torch.no_grad():
        for i, blk in enumerate(model.transformer_blocks[1:], start=1):
            blk.norm1.emb.class_embedder.embedding_table.weight.add_(0.1 * i)
    return model


def test_untied_embedders_are_refused_with_the_reason_and_the_way_out():
    model = _untied()
    assert untied_embedders(model) == [1, 2, 3] and untied_embedders(tiny_diffusers_dit()) == []
    with pytest.raises(UsageError, match=r"transformer_blocks\[1\] \(and 2 more blocks\).*own timestep/class embedder"
                                         r".*cannot become slimdiff's DiT.*DyDiT.*diff-pruning") as e:
        diffusers_to_dit(model)
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="block 0 cannot be removed: the output layer reads block 0's embedder.*first-depth"):
        extract_blocks(copy.deepcopy(model), [1, 2])
    x = torch.randn(2, 1, 8, 8)
    kept = extract_blocks(copy.deepcopy(model), [0, 2])  # the advice holds: keeping block 0 is exact
    t, y = torch.tensor([5, 500]), torch.tensor([1, 2])
    assert torch.equal(_diffusers_out(kept, x, t, y), _diffusers_out(_only(model, [0, 2]), x, t, y))
    from slimdiff.methods import get_method
    from slimdiff.methods.base import Context

    start = time.monotonic()  # TinyFusion's search could drop block 0: refused before it runs, not after
    with pytest.raises(UsageError, match="block 0 cannot be removed"):
        get_method("tinyfusion")(copy.deepcopy(model), 0.5, Context(steps=2, progress=False), search_steps=10 ** 6)
    assert time.monotonic() - start < 5


def _only(model, kept):
    """``model`` with only the blocks ``kept``, built by hand (the reference for extraction)."""
    model = copy.deepcopy(model)
    model.transformer_blocks = torch.nn.ModuleList([model.transformer_blocks[i] for i in kept])
    return model
