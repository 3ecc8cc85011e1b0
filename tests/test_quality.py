"""Quality metrics and the digits judge (slimdiff.eval.quality, slimdiff.eval.judge)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import scipy.linalg
import torch

from slimdiff.data.datasets import digits
from slimdiff.errors import UsageError
from slimdiff.eval.judge import judge_info, load_judge, train_judge
from slimdiff.eval.quality import (
    class_accuracy,
    clip_score,
    fd,
    fd_floor,
    frechet_distance,
    frechet_distance_gaussian,
    inception_fid,
    judge_features,
    psnr,
    ssim,
    ssim_window,
)


@pytest.fixture(scope="module")
def judge():
    return load_judge()


@pytest.fixture(scope="module")
def test_split():
    return digits("test").tensors


def random_rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def samples_with_exact_moments(mu: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n samples whose empirical mean and unbiased covariance are exactly ``mu`` and ``cov``."""
    z = np.random.default_rng(seed).normal(size=(n, len(mu)))
    z -= z.mean(0)
    white = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return white @ np.linalg.cholesky(cov).T + mu


# --------------------------------------------------------------------------- Frechet distance
def test_frechet_distance_matches_closed_form_for_commuting_covariances():
    d = 16
    rng = np.random.default_rng(0)
    q = random_rotation(d, 1)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    cov1, cov2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance_gaussian(mu1, cov1, mu2, cov2) == pytest.approx(closed, rel=1e-9)
    # 1-D: (mu1 - mu2)^2 + (sigma1 - sigma2)^2
    assert frechet_distance_gaussian([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1, rel=1e-12)


def test_frechet_distance_matches_sqrtm_reference_for_general_covariances():
    d = 12
    rng = np.random.default_rng(2)
    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    cov1, cov2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * scipy.linalg.sqrtm(cov1 @ cov2).real)
    assert frechet_distance_gaussian(mu1, cov1, mu2, cov2) == pytest.approx(ref, rel=1e-8)


def test_frechet_distance_of_samples_equals_closed_form_of_their_moments():
    d = 8
    rng = np.random.default_rng(3)
    q = random_rotation(d, 4)
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    x = samples_with_exact_moments(mu1, q @ np.diag(a) @ q.T, 300, 5)
    y = samples_with_exact_moments(mu2, q @ np.diag(b) @ q.T, 200, 6)
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(x, torch.from_numpy(y).float()) == pytest.approx(closed, rel=1e-5)


def test_frechet_distance_of_a_set_with_itself_is_zero_even_when_rank_deficient():
    x = torch.randn(30, 64, generator=torch.Generator().manual_seed(0))  # fewer samples than dims
    assert 0 <= frechet_distance(x, x) < 1e-6
    y = torch.randn(30, 64, generator=torch.Generator().manual_seed(1))
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-9)
    assert frechet_distance(x, y) > 1


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(UsageError, match="feature sizes"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(UsageError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(UsageError, match="NaN"):
        frechet_distance(np.full((5, 3), np.nan), np.zeros((5, 3)))


# --------------------------------------------------------------------------- judge
def test_shipped_judge_reaches_its_recorded_test_accuracy(judge, test_split):
    x, y = test_split
    acc = class_accuracy(x, y, judge)
    assert acc >= 0.97
    info = judge_info()
    assert acc == pytest.approx(info["test_accuracy"], abs=1e-9)
    assert info["command"] == "python scripts/train_judge.py" and {"seed", "epochs"} <= set(info)
    assert judge_features(x[:5], judge).shape == (5, judge.num_features) == (5, 64)


def test_class_accuracy_drops_to_chance_with_wrong_labels(judge, test_split):
    x, y = test_split
    wrong = (y + 1 + torch.randint(0, 9, y.shape, generator=torch.Generator().manual_seed(0))) % 10
    assert class_accuracy(x, wrong, judge) < 0.05
    with pytest.raises(UsageError, match="one label per image"):
        class_accuracy(x, y[:-1], judge)


def test_train_judge_is_deterministic_and_saves_loadable_files(tmp_path, test_split):
    a, acc_a = train_judge(seed=1, epochs=1, out=tmp_path)
    b, acc_b = train_judge(seed=1, epochs=1)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert acc_a == acc_b
    loaded = load_judge(tmp_path)
    x, _ = test_split
    with torch.no_grad():
        assert torch.equal(loaded(x[:20]), a.eval()(x[:20]))
    assert json.loads((tmp_path / "judge.json").read_text())["epochs"] == 1
    with pytest.raises(UsageError, match="train_judge.py"):
        load_judge(tmp_path / "missing")


def test_fd_is_near_zero_for_identical_sets_and_large_for_noise(judge, test_split):
    x, _ = test_split
    assert 0 <= fd(x, x, judge) < 1e-6
    floor = fd_floor(judge, seeds=3)
    assert all(math.isfinite(floor[k]) and floor[k] > 0 for k in ("fd_train_test", "subsample_mean", "subsample_std"))
    assert floor["subsample_size"] == floor["n_test"] == len(x) and len(floor["subsample_fds"]) == 3
    noise = torch.rand(len(x), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert fd(noise, x, judge) > 10 * floor["subsample_mean"]
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    assert fd(blurred, x, judge) > 10 * floor["subsample_mean"]


# --------------------------------------------------------------------------- SSIM / PSNR
def test_ssim_window_fits_image_size():
    assert ssim_window(8, 8) == 3
    assert ssim_window(16, 16) == 7
    assert ssim_window(64, 32) == 11
    with pytest.raises(UsageError):
        ssim_window(2, 2)


def test_ssim_is_one_for_identical_images_and_falls_with_noise(test_split):
    x, _ = test_split
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    values = [ssim(x, (x + s * noise).clamp(-1, 1)) for s in (0.05, 0.2, 0.8)]
    assert 1 > values[0] > values[1] > values[2]
    assert ssim(x, (x + 0.2 * noise).clamp(-1, 1)) == pytest.approx(ssim((x + 0.2 * noise).clamp(-1, 1), x), abs=1e-6)
    with pytest.raises(UsageError, match="same shape"):
        ssim(x[:3], x[:4])


def test_psnr_known_values():
    a = torch.zeros(4, 1, 8, 8)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 0.1) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-6)  # 0.1 in float32
    b = a.clone()
    b[0] += 0.1  # one image off: per-image PSNRs average to inf only if all are identical
    assert psnr(a[1:], b[1:]) == math.inf
    from torchmetrics.functional.image import peak_signal_noise_ratio

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 1, 8, 8, generator=g) * 2 - 1, torch.rand(1, 1, 8, 8, generator=g) * 2 - 1
    assert psnr(x, y) == pytest.approx(peak_signal_noise_ratio(y, x, data_range=2.0).item(), rel=1e-5)


# --------------------------------------------------------------------------- optional extras
def test_inception_fid_fails_fast_with_instructions_when_unavailable(tmp_path, monkeypatch, test_split):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no Inception weights here
    monkeypatch.delenv("SLIMDIFF_INCEPTION_WEIGHTS", raising=False)
    x, _ = test_split
    start = time.perf_counter()
    expected = "Inception weights" if importlib.util.find_spec("torch_fidelity") else r"pip install slimdiff\[fid\]"
    with pytest.raises(UsageError, match=expected):
        inception_fid(x[:4], x[4:8])
    assert time.perf_counter() - start < 5


def test_clip_score_fails_fast_without_local_weights(test_split):
    x, _ = test_split
    start = time.perf_counter()
    with pytest.raises(UsageError, match="huggingface-cli download"):
        clip_score(x[:2], ["zero", "one"], model="slimdiff-tests/no-such-clip-model")
    assert time.perf_counter() - start < 10
    with pytest.raises(UsageError, match="one prompt per image"):
        clip_score(x[:2], ["zero"])


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def test_clip_score_runs_offline_on_a_local_tiny_clip(tmp_path, test_split):
    """A random tiny CLIP saved locally: batched scores equal one-image-at-a-time CLIP cosines."""
    transformers = pytest.importorskip("transformers")
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))
    image_proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    ))
    out = tmp_path / "clip"
    model.save_pretrained(out)
    transformers.CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(out)

    x, _ = test_split
    prompts = ["a zero", "a one", "a two", "a three"]
    score = clip_score(x[:4], prompts, model=str(out), batch_size=3)
    assert 0 <= score <= 100
    clip = transformers.CLIPModel.from_pretrained(out).eval()
    proc = transformers.CLIPProcessor.from_pretrained(out)
    rgb = ((x[:4].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).repeat(1, 3, 1, 1)
    ref = []
    with torch.no_grad():
        for im, p in zip(rgb, prompts):
            img = clip.visual_projection(clip.vision_model(**proc(images=[im.permute(1, 2, 0).numpy()], return_tensors="pt")).pooler_output)
            txt = clip.text_projection(clip.text_model(**proc(text=[p], return_tensors="pt")).pooler_output)
            ref.append(max(100 * torch.nn.functional.cosine_similarity(img, txt).item(), 0.0))
    assert score == pytest.approx(sum(ref) / len(ref), abs=1e-4), ref
    assert sum(r > 0 for r in ref) >= 2, ref  # not a degenerate all-clamped case
