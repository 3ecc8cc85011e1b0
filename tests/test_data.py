"""Datasets: the fixed digits split, image folders and latents files, with clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from slimdiff.data.datasets import ImageFolder, digits, get_dataset, latents
from slimdiff.errors import UsageError


def test_digits_split_is_fixed_disjoint_and_scaled():
    tr, te = digits("train"), digits("test")
    assert len(tr) == 1437 and len(te) == 360
    x, y = tr.tensors
    assert x.shape[1:] == (1, 8, 8) and x.min() == -1 and x.max() == 1
    assert torch.equal(digits("train").tensors[0], x)  # deterministic
    assert set(y.tolist()) == set(range(10)) and set(te.tensors[1].tolist()) == set(range(10))
    flat_tr = {tuple(v) for v in x.flatten(1).tolist()}
    overlap = sum(tuple(v) in flat_tr for v in te.tensors[0].flatten(1).tolist())
    assert overlap <= 2  # sklearn digits holds a few exact duplicates; the split itself is disjoint
    with pytest.raises(UsageError, match="split"):
        digits("val")


def _write(path, size, color=128, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=color).save(path)


def test_image_folder_resizes_center_crops_and_labels(tmp_path):
    _write(tmp_path / "cats" / "a.png", (40, 20), color=(255, 0, 0))
    _write(tmp_path / "dogs" / "b.jpg", (16, 32), color=(0, 0, 255))
    ds = ImageFolder(tmp_path, size=16)
    assert len(ds) == 2
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y.item() == 0
    torch.testing.assert_close(x[0], torch.ones(16, 16))  # red channel at max after scaling to [-1, 1]
    assert ds[1][1].item() == 1
    gray = ImageFolder(tmp_path, size=8, channels=1)
    assert gray[0][0].shape == (1, 8, 8)


def test_numbered_class_folders_are_their_class_indices(tmp_path):
    """``207/`` is class 207 (an ImageNet DiT's golden retriever), ``10/`` is 10, not sorted-name
    position 1; a folder beyond the model's classes is refused, a named subset warned about."""
    for name in ("9", "10", "207"):
        _write(tmp_path / "num" / name / "a.png", (8, 8))
    ds = ImageFolder(tmp_path / "num", size=8)
    assert sorted(int(ds[i][1]) for i in range(len(ds))) == [9, 10, 207]
    ds.check_labelled(1000)
    with pytest.raises(UsageError, match="class folder 207/ is not a class of this model .*0..99"):
        ds.check_labelled(100)
    _write(tmp_path / "named" / "otter" / "a.png", (8, 8))
    with pytest.warns(UserWarning, match="1 class folders for a model of 1000 classes get labels 0..0 .*e.g. 207/"):
        ImageFolder(tmp_path / "named", size=8).check_labelled(1000)
    _write(tmp_path / "named" / "stoat" / "a.png", (8, 8))
    with pytest.raises(UsageError, match="2 class folders are more than this model's classes"):
        ImageFolder(tmp_path / "named", size=8).check_labelled(1)
    for bad, message in ((("3", "cat"), "some class folders are numbers"), (("7", "007"), "the same class index"),
                         (("²",), "")):
        root = tmp_path / f"bad-{'-'.join(bad)}"
        for name in bad:
            _write(root / name / "a.png", (8, 8))
        if message:
            with pytest.raises(UsageError, match=message):
                ImageFolder(root, size=8)
        else:  # not an ASCII number: a name, label 0 (no traceback from int("²"))
            assert ImageFolder(root, size=8)[0][1].item() == 0


@pytest.mark.parametrize("case", ["empty", "corrupt", "missing"])
def test_image_folder_errors(tmp_path, case):
    if case == "corrupt":
        (tmp_path / "bad.png").write_bytes(b"not a png at all")
        with pytest.raises(UsageError, match="bad.png"):
            ImageFolder(tmp_path, size=8)[0]
        return
    root = tmp_path if case == "empty" else tmp_path / "nope"
    with pytest.raises(UsageError, match="no PNG|does not exist"):
        ImageFolder(root, size=8)


def test_latents_npz_and_safetensors(tmp_path):
    lat = np.random.default_rng(0).standard_normal((5, 4, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "l.npz", latents=lat, labels=np.arange(5))
    ds = latents(tmp_path / "l.npz")
    assert torch.equal(ds.tensors[0], torch.from_numpy(lat)) and ds.tensors[1].tolist() == list(range(5))
    save_file({"latents": torch.from_numpy(lat)}, str(tmp_path / "l.safetensors"))
    assert latents(tmp_path / "l.safetensors").tensors[1].tolist() == [-1] * 5
    np.savez(tmp_path / "bad.npz", images=lat)
    with pytest.raises(UsageError, match="latents"):
        latents(tmp_path / "bad.npz")
    with pytest.raises(UsageError, match="unknown --data"):
        get_dataset("imagenet")


def test_latents_with_caption_embeddings_yield_text_conditions(tmp_path):
    from slimdiff.data.datasets import CaptionedLatents, text_shape
    from slimdiff.models.backbone import TextCondition

    rng = np.random.default_rng(0)
    lat = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    emb = rng.standard_normal((3, 5, 16)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    np.savez(tmp_path / "c.npz", latents=lat, encoder_hidden_states=emb, encoder_attention_mask=mask)
    ds = get_dataset(str(tmp_path / "c.npz"))
    assert isinstance(ds, CaptionedLatents) and len(ds) == 3 and text_shape(ds) == (5, 16)
    x, c = ds[2]
    assert isinstance(c, TextCondition) and torch.equal(c.embeds, torch.from_numpy(emb[2]))
    assert c.mask.tolist() == [1, 0, 0, 0, 0] and torch.equal(x, torch.from_numpy(lat[2]))
    save_file({"latents": torch.from_numpy(lat), "encoder_hidden_states": torch.from_numpy(emb)},
              str(tmp_path / "c.safetensors"))
    ds = latents(tmp_path / "c.safetensors")
    assert ds[0][1].mask is None and text_shape(ds) == (5, 16)
    assert text_shape(digits("test")) is None
    bad = {
        "width": dict(encoder_hidden_states=emb[:, :, 0]),  # (N, L): not (N, L, D)
        "count": dict(encoder_hidden_states=emb[:2]),
        "mask shape": dict(encoder_hidden_states=emb, encoder_attention_mask=mask[:, :3]),
        "mask values": dict(encoder_hidden_states=emb, encoder_attention_mask=mask * 2),
        "empty caption": dict(encoder_hidden_states=emb, encoder_attention_mask=mask * 0),
        "mask alone": dict(encoder_attention_mask=mask),
    }
    for name, arrays in bad.items():
        np.savez(tmp_path / "bad.npz", latents=lat, **arrays)
        with pytest.raises(UsageError, match="encoder_"):
            latents(tmp_path / "bad.npz")


def test_training_checks_every_label_of_data_in_memory(tmp_path):
    """A latents file (what encoded images become) whose later labels exceed the model's classes is
    refused before training, not at the step that draws them."""
    from conftest import tiny_dit

    from slimdiff.models.backbone import as_backbone
    from slimdiff.train.trainer import check_conditioning

    x = np.zeros((4, 4, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "ok.npz", latents=x, labels=np.array([0, 1, 2, 3]))
    np.savez(tmp_path / "bad.npz", latents=x, labels=np.array([0, 1, 2, 207]))
    bb = as_backbone(tiny_dit(num_classes=10))
    check_conditioning(bb, latents(tmp_path / "ok.npz"))
    with pytest.raises(UsageError, match="10 classes.*label 207"):
        check_conditioning(bb, latents(tmp_path / "bad.npz"))
