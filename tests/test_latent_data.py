"""Data from the user's own pipeline: images and prompts encoded with a diffusers pipeline's VAE
and text encoder (cached latents files), samples decoded through the VAE with ``--prompt``, and
MACs counted at the pipeline's caption length. Tiny random pipelines in the real layouts."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import cli_main, tiny_diffusers_dit, tiny_pixart, tiny_unet_cond
from diffusers import (
    AutoencoderKL,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

import slimdiff
from slimdiff.data import encode
from slimdiff.data.datasets import CaptionedLatents, ImageFolder, get_dataset, latents
from slimdiff.errors import UsageError
from slimdiff.eval.compute import macs_forward
from slimdiff.models.backbone import as_backbone
from slimdiff.models.registry import pipeline_of

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _tokenizer(folder, max_length: int) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters (no merges), from files written here."""
    vocab = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                         pad_token="<|endoftext|>")


def _vae() -> AutoencoderKL:
    """A tiny AutoencoderKL with one downsampling (scale factor 2: 16x16 images <-> 8x8x4 latents)."""
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                         norm_num_groups=4, sample_size=16).eval()


def _pixart_dir(tmp_path):
    """PixArt-alpha's layout: a tiny T5 encoder (width 16), the pipeline's 120-token captions."""
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    pipe = PixArtAlphaPipeline(tokenizer=_tokenizer(tmp_path / "tok", 512), text_encoder=t5, vae=_vae(),
                               transformer=tiny_pixart(), scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(tmp_path / "pixart")
    return tmp_path / "pixart"


def _sd_dir(tmp_path):
    """Stable Diffusion's layout: a tiny CLIP text model (width 32), 77-token captions, no mask."""
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77)).eval()
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=clip, tokenizer=_tokenizer(tmp_path / "tok", 77),
                                   unet=tiny_unet_cond(), scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "sd")
    return tmp_path / "sd"


def _dit_dir(tmp_path):
    pipe = DiTPipeline(transformer=tiny_diffusers_dit(num_layers=4), vae=_vae(), scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(tmp_path / "dit")
    return tmp_path / "dit"


def _images(folder, names: list[str]):
    """Random RGB images of mixed sizes (resized and cropped to the model's 16x16 on encoding)."""
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_images_and_captions_are_encoded_with_the_pipelines_vae_and_text_encoder_once(tmp_path, monkeypatch):
    pipe = _pixart_dir(tmp_path)
    images = _images(tmp_path / "imgs", ["a.png", "b.png", "c.png"])
    (images / "captions.txt").write_text("a.png\ta red cat\n")
    (images / "b.txt").write_text("blue dog")
    path = encode.encoded_data(f"images:{images}", pipe, 8, True)
    data = latents(path)
    assert isinstance(data, CaptionedLatents) and data.latents.shape == (3, 4, 8, 8)
    enc = encode.load_encoders(pipe)
    pixels = torch.stack([x for x, _ in ImageFolder(images, 16, 3)])
    assert torch.allclose(data.latents, enc.encode_images(pixels), atol=1e-5)
    want = enc.encode_prompts(["a red cat", "blue dog", ""])
    assert data.embeds.shape == (3, 120, 16) and torch.allclose(data.embeds, want.embeds, atol=1e-5)
    assert torch.equal(data.mask, want.mask) and data.mask.sum(1).tolist()[2] < data.mask.sum(1).tolist()[0]

    monkeypatch.setattr(encode, "load_encoders", lambda *a, **k: pytest.fail("the cached file was not reused"))
    assert encode.encoded_data(str(images), pipe, 8, True) == path  # a plain folder too, from the cache
    monkeypatch.undo()
    (images / "b.txt").write_text("green dog")  # other captions: another file
    assert encode.encoded_data(str(images), pipe, 8, True) != path


def test_sd_captions_are_77_tokens_without_mask(tmp_path, monkeypatch):
    monkeypatch.setenv(encode.CACHE_ENV, str(tmp_path / "cache"))
    pipe = _sd_dir(tmp_path)
    path = encode.encoded_data(f"images:{_images(tmp_path / 'imgs', ['x.jpg'])}", pipe, 8, True)
    assert path.startswith(str(tmp_path / "cache"))
    data = latents(path)
    assert data.embeds.shape == (1, 77, 32) and data.mask is None


def test_compress_a_dit_pipeline_on_class_folders_of_images(tmp_path, monkeypatch):
    pipe = _dit_dir(tmp_path)
    images = _images(tmp_path / "imgs", ["0/a.png", "0/b.png", "1/c.png", "1/d.png"])
    code = cli_main(monkeypatch, "compress", "--method", "bi-depth", "--budget", "0.52", "--model", str(pipe),
                    "--data", f"images:{images}", "--steps", "4", "-o", str(tmp_path / "out"), "--json")
    assert code == 0
    cached = latents(next((images / ".slimdiff-cache").glob("latents-*.safetensors")))
    assert cached.tensors[0].shape == (4, 4, 8, 8) and cached.tensors[1].tolist() == [0, 0, 1, 1]
    assert pipeline_of(slimdiff.load(tmp_path / "out")) == pipe.resolve()  # the result remembers its pipeline


def test_prompts_give_the_models_own_samples_with_encoded_captions(tmp_path):
    from slimdiff.cli import _data

    pipe = _pixart_dir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a cat\n\na dog\n")
    m = slimdiff.load(pipe)
    data = latents(_data(f"prompts:{tmp_path / 'prompts.txt'}", m, steps=2))
    assert data.latents.shape == (2, 4, 8, 8) and data.embeds.shape == (2, 120, 16) and data.mask is not None
    assert torch.isfinite(data.latents).all() and not torch.equal(data.latents[0], data.latents[1])


def test_text_models_count_macs_at_the_pipelines_caption_length(tmp_path):
    pipe = _pixart_dir(tmp_path)
    m = slimdiff.load(pipe)
    assert as_backbone(m).text_len == 120
    assert macs_forward(m) > macs_forward(tiny_pixart())  # the bare model: 8-token captions
    slimdiff.save(m, tmp_path / "copy")
    again = slimdiff.load(tmp_path / "copy")
    assert as_backbone(again).text_len == 120 and macs_forward(again) == macs_forward(m)


def test_sample_decodes_through_the_vae_with_prompts(tmp_path, monkeypatch):
    pipe = _pixart_dir(tmp_path)
    out = tmp_path / "grid.png"
    assert cli_main(monkeypatch, "sample", "--model", str(pipe), "--prompt", "a cat", "--prompt", "a dog",
                    "--steps", "2", "-o", str(out)) == 0
    with Image.open(out) as im:  # 2 decoded 16x16 RGB images side by side, upscaled 8x (raw latents: 8x8, 16x)
        assert im.size == ((2 * 17 + 1) * 8, (17 + 1) * 8) and im.mode == "RGB"
    assert cli_main(monkeypatch, "sample", "--model", str(pipe), "--prompt", "a", "--prompt", "b", "-n", "3",
                    "--steps", "2", "-o", str(out)) == 2


def test_prompt_on_a_class_model_is_refused(tmp_path, monkeypatch, capsys):
    pipe = _dit_dir(tmp_path)
    assert cli_main(monkeypatch, "sample", "--model", str(pipe), "--prompt", "a cat", "-o",
                    str(tmp_path / "g.png")) == 2
    assert "--prompt is for text models" in capsys.readouterr().err


def test_bad_data_forms_are_one_line_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(UsageError, match="no such directory"):
        encode.data_source(f"images:{tmp_path / 'none'}")
    with pytest.raises(UsageError, match="no such file"):
        encode.data_source(f"prompts:{tmp_path / 'none.txt'}")
    _images(tmp_path / "imgs", ["a.png"])
    with pytest.raises(UsageError, match="pipeline folder as --model"):  # a latent model without its pipeline
        get_dataset(str(tmp_path / "imgs"), size=8, channels=4)
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(UsageError, match="needs a text model loaded from a diffusers pipeline"):
        encode.encoded_data(f"prompts:{tmp_path / 'p.txt'}", None, 8, True)
    assert cli_main(monkeypatch, "compress", "--method", "first-depth", "--data", f"images:{tmp_path / 'none'}",
                    "-o", str(tmp_path / "o")) == 2
    assert "no such directory" in capsys.readouterr().err


@pytest.mark.parametrize("make", [_pixart_dir, _sd_dir], ids=["pixart", "sd"])
def test_guidance_uses_the_pipelines_encoded_empty_prompt(tmp_path, make):
    """A text model loaded from a pipeline folder is guided with the empty prompt as its text
    encoder encodes it (what the pipeline's own call does), with its mask; not zero embeddings."""
    from slimdiff.diffusion.sampling import sample
    from slimdiff.models.backbone import set_null_prompt

    folder = make(tmp_path)
    m = slimdiff.load(folder)
    want = encode.load_encoders(folder).encode_prompts([""])
    null = as_backbone(m).null_cond(None, 3)
    assert torch.equal(null.embeds, want.embeds.expand(3, -1, -1)) and want.embeds.abs().sum() > 0
    assert (null.mask is None) == (want.mask is None)  # PixArt passes the caption mask, SD does not
    cond = encode.load_encoders(folder).encode_prompts(["a cat", "a dog", "a cow"])
    guided = sample(m, sampler="ddim", steps=2, cond=cond, cfg=4.0, seed=0)
    slimdiff.save(m, tmp_path / "saved")  # the encoded prompt is a runtime cache, not saved
    again = slimdiff.load(tmp_path / "saved")
    assert torch.equal(as_backbone(again).null_cond(None, 1).embeds, want.embeds)  # encoded again from the pipeline
    set_null_prompt(m, None)  # zero embeddings: another unconditional prediction, other samples
    assert not torch.allclose(guided, sample(m, sampler="ddim", steps=2, cond=cond, cfg=4.0, seed=0))
    assert torch.equal(as_backbone(m).null_cond(None, 1), torch.zeros(1, *want.shape[1:]))
    slimdiff.save(m, tmp_path / "zeros")


def test_caption_dropout_trains_on_the_empty_prompt(tmp_path):
    from slimdiff.train.trainer import _drop_captions

    folder = _pixart_dir(tmp_path)
    bb = as_backbone(slimdiff.load(folder))
    cond = encode.load_encoders(folder).encode_prompts(["a cat", "a dog"])
    dropped = _drop_captions(cond, bb.null_cond(cond, 2), torch.tensor([True, False]))
    empty = bb.null_prompt()
    assert torch.equal(dropped.embeds[0], empty.embeds[0]) and torch.equal(dropped.mask[0], empty.mask[0])
    assert torch.equal(dropped.embeds[1], cond.embeds[1]) and torch.equal(dropped.mask[1], cond.mask[1])


def test_captions_are_preprocessed_as_the_pipeline_does(tmp_path):
    """PixArt's call lower-cases and strips captions (or cleans them with bs4 + ftfy) before
    tokenizing; Stable Diffusion's does not."""
    pixart = encode.load_encoders(_pixart_dir(tmp_path))
    assert pixart.preprocess([" A Red CAT "]) == ["a red cat"]  # without bs4/ftfy, as here
    plain = dataclasses.replace(pixart, preprocess=None)  # (the test tokenizer lower-cases by itself)
    swapped = dataclasses.replace(pixart, preprocess=lambda texts: ["dog" for _ in texts])
    assert torch.equal(swapped.encode_prompts(["cat"]).embeds, plain.encode_prompts(["dog"]).embeds)
    sd = encode.load_encoders(_sd_dir(tmp_path))
    assert sd.preprocess is None


def test_sample_guides_with_its_pipelines_empty_prompt_without_a_second_encoder(tmp_path, monkeypatch):
    """``sample --pipeline DIR --cfg`` encodes the empty prompt with the encoders it loaded (the
    recorded folder may have moved: no second text encoder is loaded from it)."""
    pipe = _pixart_dir(tmp_path)
    m = slimdiff.load(pipe)
    slimdiff.save(m, tmp_path / "model")
    monkeypatch.setattr(encode, "encode_null_prompt", lambda *a: pytest.fail("a second text encoder was loaded"))
    assert cli_main(monkeypatch, "sample", "--model", str(tmp_path / "model"), "--pipeline", str(pipe), "--prompt",
                    "a cat", "--cfg", "3", "--steps", "2", "-o", str(tmp_path / "g.png")) == 0


def test_a_moved_pipeline_folder_warns_that_guidance_uses_zeros(tmp_path):
    pipe = _pixart_dir(tmp_path)
    m = slimdiff.load(pipe)
    pipe.rename(tmp_path / "moved")
    with pytest.warns(UserWarning, match="is gone: guidance uses zero caption embeddings"):
        assert as_backbone(m).null_prompt() is None
