"""Our DiT: a paper-faithful Diffusion Transformer (Peebles & Xie, 2023).

One readable file, names as in the paper and key-for-key with the official
facebookresearch/DiT state dict (``x_embedder.proj``, ``t_embedder.mlp.{0,2}``,
``y_embedder.embedding_table``, ``blocks.{i}.attn.qkv|proj``, ``blocks.{i}.mlp.fc1|fc2``,
``blocks.{i}.adaLN_modulation.1``, ``final_layer.*``, ``pos_embed``), so the official
``DiT-XL-2-256.pt`` loads with :func:`slimdiff.models.dit.load_official`.

Differences from the official code, all opt-in or structural only:

* ``pos_embed`` is a persistent *buffer* (fixed sin-cos), not a frozen parameter;
  the state-dict key is the same.
* Blocks may be narrower than the residual width: each block's attention reads its
  head count from ``attn.num_heads`` and its head width from ``qkv``'s shape, and the MLP
  width from ``fc1``. Width pruning therefore yields a plain, smaller DiT.
* ``freq_shift`` (default 0 = official) reproduces diffusers' timestep embedding, which
  divides the frequency exponent by ``half - 1`` instead of ``half``; models converted
  from diffusers set it to 1 so the conversion is exact.
* ``forward_with_cfg`` guides all ``C`` epsilon channels by default (the standard approach,
  diffusers' convention); ``guidance_channels=3`` is the official default (first 3 channels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimdiff.errors import UsageError


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: ``x * (1 + scale) + shift`` broadcast over tokens.

    One fused pass (``addcmul``) over the ``(N, T, D)`` activations instead of two: these
    elementwise passes keep their full width in a width-pruned model, so every pass saved
    here raises the share of the (pruned) matmuls in the run time.
    """
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero's gated residual ``x + gate * y`` (``gate`` broadcast over tokens), one fused pass."""
    return torch.addcmul(x, gate.unsqueeze(1), y)


# --------------------------------------------------------------------------- embedders
class PatchEmbed(nn.Module):
    """Image -> token sequence with a strided conv (timm's PatchEmbed layout: ``proj``)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal frequencies followed by a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000, freq_shift: int = 0) -> torch.Tensor:
        """Sinusoidal embedding ``[cos(t f), sin(t f)]`` with ``f_i = max_period^(-i / (half - shift))``."""
        half = dim // 2
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(exponent / (half - freq_shift))
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. Row ``num_classes`` is the null class used for CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class, at random (training) or where ``force_drop_ids == 1``."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# --------------------------------------------------------------------------- block
class Attention(nn.Module):
    """Multi-head self-attention (timm layout: ``qkv``, ``proj``).

    The head width is ``qkv.out_features // (3 * num_heads)``, so a width-pruned block
    (fewer heads or narrower heads) is the same class with smaller weights.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None):
        super().__init__()
        head_dim = head_dim or dim // num_heads
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=True)
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        # unbind (timm's form), not qkv[0..2]: torch-pruning maps fused-qkv channels through it
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (timm layout: ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)."""
        return self.adaLN_modulation(c).chunk(6, dim=1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        x = gated_residual(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        return gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------- model
@dataclass
class DiTConfig:
    """Everything needed to rebuild a :class:`DiT` (stored in ``slimdiff.json``)."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    freq_shift: int = 0


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    ``forward(x, t, y)`` takes latents/images ``(N, C, H, W)``, timesteps ``(N,)`` and class
    labels ``(N,)`` (``num_classes`` is the null label) and returns ``(N, out_channels, H, W)``
    where ``out_channels = 2 C`` with a learned sigma (epsilon first, then variance values).
    """

    def __init__(self, **kwargs):
        super().__init__()
        cfg = DiTConfig(**kwargs)
        self.config = cfg
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.in_channels * 2 if cfg.learn_sigma else cfg.in_channels
        self.patch_size = cfg.patch_size
        self.num_heads = cfg.num_heads
        self.x_embedder = PatchEmbed(cfg.input_size, cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size, freq_shift=cfg.freq_shift)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob)
        pos = get_2d_sincos_pos_embed(cfg.hidden_size, self.x_embedder.grid_size)
        self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0), persistent=True)
        self.blocks = nn.ModuleList(
            [DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)]
        )
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The paper's initialisation: xavier linears, zeroed adaLN and output layers."""

        def _basic_init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``x`` (with positions) and the conditioning vector ``c = t_emb + y_emb``."""
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        return tokens, c

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tokens, c = self.embed(x, t, y)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guidance_channels: int | None = None) -> torch.Tensor:
        """Classifier-free guidance in one batch ``[cond; uncond]`` (the first half of ``x`` is used
        for both halves; ``y`` holds the labels, then the null labels).

        ``guidance_channels`` = None (default) guides the first ``C`` (epsilon) channels: the
        standard approach, the line the official code leaves commented out
        (facebookresearch/DiT ``models.py`` 261) and diffusers' ``DiTPipeline``. 3 is the
        official default (``models.py`` 262, "for exact reproducibility reasons"): channels 0-2
        guided, everything from channel 3 on (the last epsilon channel and the learned-sigma
        values) left as each half's own prediction; the official ``sample.py`` then keeps the
        conditional half.
        """
        k = self.in_channels if guidance_channels is None else guidance_channels
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.out_channels:
            raise UsageError(f"guidance_channels must be None or an integer in 1..{self.out_channels} "
                             f"(3 = the official DiT's), got {guidance_channels!r}")
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, rest = out[:, :k], out[:, k:]
        cond_eps, uncond_eps = eps.chunk(2)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


# --------------------------------------------------------------------------- positions
def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) fixed 2-D sin-cos position table (MAE/DiT convention)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# --------------------------------------------------------------------------- registry
_SIZES = {
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    # Small sizes for CPU work (not in the paper).
    "T": dict(depth=12, hidden_size=128, num_heads=4),
    "M": dict(depth=6, hidden_size=64, num_heads=4),
}
_PATCHES = {"XL": (2, 4, 8), "L": (2, 4, 8), "B": (2, 4, 8), "S": (2, 4, 8), "T": (1, 2, 4), "M": (1, 2, 4)}


def _constructor(size: str, patch: int) -> Callable[..., DiT]:
    def build(**kwargs) -> DiT:
        return DiT(patch_size=patch, **_SIZES[size], **kwargs)

    build.__name__ = f"DiT_{size}_{patch}"
    build.__doc__ = f"DiT-{size}/{patch}: {_SIZES[size]}, patch {patch}."
    return build


DiT_models: dict[str, Callable[..., DiT]] = {
    f"DiT-{size}/{p}": _constructor(size, p) for size, patches in _PATCHES.items() for p in patches
}
"""Name -> constructor taking ``input_size``, ``in_channels``, ``num_classes``, ``learn_sigma``."""


def official_config(state: Mapping[str, torch.Tensor], source: str = "the checkpoint", **overrides) -> dict:
    """The :class:`DiTConfig` fields of an official-layout state dict, read from its tensor shapes
    (an official ``.pt`` holds weights only); ``overrides`` (DiTConfig fields) win over what is read.

    Width, depth, patch, channels, MLP ratio and classes (the label table's rows less the null
    row) are in the shapes, the input size in ``pos_embed``'s length, ``learn_sigma`` in the
    output channels. The head count is not: it is the size table's for that width (DiT-S/B/L/XL,
    and our T/M), else ``num_heads`` must be given.
    """
    unknown = sorted(set(overrides) - set(DiTConfig.__dataclass_fields__))
    if unknown:
        raise UsageError(f"unknown DiT option(s) {', '.join(unknown)}; the options are DiTConfig fields: "
                         f"{', '.join(DiTConfig.__dataclass_fields__)}")

    def shape(key: str) -> tuple[int, ...]:
        if not isinstance(state.get(key), torch.Tensor):
            raise UsageError(f"{source} is not an official DiT state dict (no tensor {key!r}); pass an official "
                             "facebookresearch DiT-*.pt or a slimdiff directory")
        return tuple(state[key].shape)

    hidden, in_channels, patch, _ = shape("x_embedder.proj.weight")
    tokens = shape("pos_embed")[-2]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise UsageError(f"{source}: pos_embed has {tokens} positions, not a square token grid; pass input_size=N")
    out_channels = shape("final_layer.linear.weight")[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise UsageError(f"{source}: {out_channels} output channels for {in_channels} input channels (neither equal "
                         "nor twice, a learned sigma); not a DiT this loader understands")
    null_row = int(overrides.get("class_dropout_prob", DiTConfig.class_dropout_prob) > 0)  # CFG's null class
    config = dict(
        input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
        depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
        mlp_ratio=shape("blocks.0.mlp.fc1.weight")[0] / hidden,
        num_classes=shape("y_embedder.embedding_table.weight")[0] - null_row,
        learn_sigma=out_channels == 2 * in_channels,
    )
    heads = {size["num_heads"] for size in _SIZES.values() if size["hidden_size"] == hidden}
    if len(heads) == 1:
        config["num_heads"] = heads.pop()
    elif "num_heads" not in overrides:
        widths = ", ".join(f"{name} {size['hidden_size']}" for name, size in _SIZES.items())
        raise UsageError(f"{source}: cannot tell the head count of a DiT of width {hidden} (the sizes' widths: "
                         f"{widths}); pass num_heads=N (CLI: --dit-config num_heads=N)")
    return {**config, **overrides}


def load_official(path: str, **overrides) -> DiT:
    """Load an official facebookresearch/DiT checkpoint (``DiT-XL-2-256.pt``, ``DiT-XL-2-512.pt``,
    or any size) safely.

    Uses ``torch.load(weights_only=True)``: no code in the file is executed. The config is read
    from the weights (:func:`official_config`); ``overrides`` are :class:`DiTConfig` fields that
    replace what is read (``num_heads`` for a width outside the size table).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "ema" in state:
        state = state["ema"]
    if not isinstance(state, dict):
        raise UsageError(f"{path} holds a {type(state).__name__}, not a state dict; pass an official DiT-*.pt")
    model = DiT(**official_config(state, str(path), **overrides))
    model.load_state_dict(state)
    return model
