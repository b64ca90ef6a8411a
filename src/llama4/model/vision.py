"""The Llama 4 vision tower: image tiles in, embeddings for the ``<|patch|>`` tokens out.

Shape legend:
    N  tiles (every tile of every image, global tiles included)
    S  tile side in pixels (image_size, 336);  p  patch side (14);  G = S // p patches per side (24)
    P = G * G patches per tile (576);  T = P + 1 tokens in the encoder (class token LAST)
    D  encoder width (1408);  H heads (16);  Dh = D // H (88)
    k = 1 / pixel_shuffle_ratio (2);  K = P / k^2 tokens per tile after pixel shuffle (144)
    A  adapter width (adapter_dim, 4096);  E  adapter output (adapter_out_dim, 4096)
    Dt text width (5120)

Per tile (facts from HF ``Llama4VisionModel`` and Meta's ``llama_models/llama4/vision``):

1. Patch embedding: each p x p patch, flattened in (channel, row, col) order, through a linear
   layer without bias (Meta's "unfolded convolution": a stride-p convolution stored as a matrix).
2. The class embedding is appended as the LAST token; a learned positional embedding (T, D) is
   added; LayerNorm.
3. ``n_layers`` pre-norm blocks ``x += attn(ln(x)); x += mlp(ln(x))``: bidirectional attention
   with biases and a 2D rotary embedding of q and k (below), GELU (erf) MLP with biases.
4. LayerNorm; the class token is dropped.
5. Pixel shuffle: each k x k block of neighbouring patches becomes one token of width k^2 * D.
6. Adapter: ``gelu(fc2(gelu(fc1(x))))``, no biases; note the GELU after fc2 as well.
7. Projector: one linear layer (no bias in the released models) to the text width.

2D rotary embedding (the "axial" RoPE also used by Pixtral): q and k are split into Dh/2
interleaved pairs (0,1), (2,3), ...; the first Dh/4 pairs rotate by ``(col + 1) * f_i``, the
last Dh/4 by ``(row + 1) * f_i``, with ``f_i = theta^(-4i / Dh)``, i < Dh/4; the class token is
not rotated.

Parameter layouts are those of the HF checkpoint, so loading needs no tensor transforms
(``llama4.checkpoint.vision_keys``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama4.config import VISION_NORM_EPS, VisionConfig

__all__ = ["VisionTower", "pixel_shuffle", "rope_2d"]


def rope_2d(patches_per_side: int, head_dim: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """cos and sin of the 2D rotary angles: two (T, Dh/2) float32 tensors, class token last."""
    assert head_dim % 4 == 0, f"2D RoPE needs head_dim % 4 == 0, got head_dim={head_dim}"
    g = patches_per_side
    idx = torch.arange(g * g, device=device)
    col, row = idx % g, idx // g  # (P,)
    freqs = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2, device=device).float() / (head_dim // 2))
    angles = torch.cat([(col + 1)[:, None] * freqs, (row + 1)[:, None] * freqs], dim=-1)  # (P, Dh/2)
    angles = torch.cat([angles, angles.new_zeros(1, head_dim // 2)])  # class token: no rotation
    return angles.cos(), angles.sin()


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: (N, T, H, Dh), rotated in float32 over interleaved pairs; cos, sin: (T, Dh/2)
    x2 = x.float().unflatten(-1, (-1, 2))  # (N, T, H, Dh/2, 2)
    a, b = x2[..., 0], x2[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, Dh/2)
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def pixel_shuffle(x: Tensor, ratio: float) -> Tensor:
    """Merge each k x k block of patches into one token (k = 1 / ratio): (N, P, C) -> (N, P/k^2, k^2 C).

    Channel order of a merged token: (row in block, column in block, channel), as HF's
    ``pixel_shuffle`` produces it.
    """
    n, p, c = x.shape
    g = round(p**0.5)
    k = round(1 / ratio)
    assert g * g == p and g % k == 0, f"pixel shuffle needs a square grid divisible by {k}, got {p} patches"
    x = x.view(n, g // k, k, g // k, k, c)  # (N, block row, row in block, block col, col in block, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, (g // k) ** 2, k * k * c)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases and 2D RoPE."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=True)
        self.wk = nn.Linear(dim, dim, bias=True)
        self.wv = nn.Linear(dim, dim, bias=True)
        self.wo = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        n, t, _ = x.shape
        q = self.wq(x).view(n, t, self.n_heads, self.head_dim)  # (N, T, H, Dh)
        k = self.wk(x).view(n, t, self.n_heads, self.head_dim)
        v = self.wv(x).view(n, t, self.n_heads, self.head_dim)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(out.transpose(1, 2).reshape(n, t, -1))  # (N, T, D)


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=VISION_NORM_EPS)
        self.attn = VisionAttention(cfg.dim, cfg.n_heads)
        self.mlp_norm = nn.LayerNorm(cfg.dim, eps=VISION_NORM_EPS)
        self.mlp = VisionMLP(cfg.dim, cfg.mlp_hidden_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class VisionAdapter(nn.Module):
    """Pixel shuffle, then a 2-layer GELU MLP (GELU after both layers)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ratio = cfg.pixel_shuffle_ratio
        k = round(1 / cfg.pixel_shuffle_ratio)
        self.fc1 = nn.Linear(cfg.dim * k * k, cfg.adapter_dim, bias=False)
        self.fc2 = nn.Linear(cfg.adapter_dim, cfg.adapter_out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = pixel_shuffle(x, self.ratio)  # (N, K, k^2 D)
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))  # (N, K, E)


class VisionTower(nn.Module):
    """Vision encoder + pixel-shuffle adapter + projector to the text width.

    ``forward(pixel_values (N, 3, S, S)) -> (N, tokens_per_tile, text_dim)``: tile by tile, the
    tokens of a tile in row-major order of its (merged) patches; these replace the ``<|patch|>``
    embeddings in the same order. Builds on any device, including ``meta``.
    """

    def __init__(self, cfg: VisionConfig, text_dim: int):
        super().__init__()
        k = round(1 / cfg.pixel_shuffle_ratio)
        assert abs(k * cfg.pixel_shuffle_ratio - 1) < 1e-9, (
            f"pixel_shuffle_ratio={cfg.pixel_shuffle_ratio} must be 1/k for an integer k"
        )
        assert cfg.patches_per_side % k == 0, (
            f"patches_per_side={cfg.patches_per_side} is not a multiple of 1/pixel_shuffle_ratio={k}"
        )
        assert cfg.dim % cfg.n_heads == 0, f"dim={cfg.dim} is not a multiple of n_heads={cfg.n_heads}"
        assert (cfg.dim // cfg.n_heads) % 4 == 0, f"head_dim={cfg.dim // cfg.n_heads} must be a multiple of 4"
        assert cfg.vision_output_dim == cfg.adapter_out_dim, (
            f"the projector input vision_output_dim={cfg.vision_output_dim} must equal "
            f"adapter_out_dim={cfg.adapter_out_dim}"
        )
        self.cfg = cfg
        d, p = cfg.dim, cfg.patch_size
        n_tokens = cfg.patches_per_side**2 + 1
        self.patch_embed = nn.Linear(cfg.num_channels * p * p, d, bias=False)
        self.cls_embed = nn.Parameter(torch.empty(d))
        self.pos_embed = nn.Parameter(torch.empty(n_tokens, d))
        self.norm_pre = nn.LayerNorm(d, eps=VISION_NORM_EPS)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_post = nn.LayerNorm(d, eps=VISION_NORM_EPS)
        self.adapter = VisionAdapter(cfg)
        self.projector = nn.Linear(cfg.vision_output_dim, text_dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init of the two bare parameters (the submodules init themselves), as in HF."""
        scale = self.cfg.dim**-0.5
        nn.init.normal_(self.cls_embed, std=scale)
        nn.init.normal_(self.pos_embed, std=scale)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Deterministic init for training from scratch (e.g. after building on meta + to_empty).

        As HF's ``_init_weights``: linear weights N(0, std), biases 0, LayerNorms 1 and 0; the
        class and positional embeddings N(0, dim^-0.5). Draws on CPU from ``generator``.
        """

        def normal(p: Tensor, sigma: float) -> None:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(sigma).to(p.dtype))

        for module in self.modules():
            if isinstance(module, nn.Linear):
                normal(module.weight, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        normal(self.cls_embed, self.cfg.dim**-0.5)
        normal(self.pos_embed, self.cfg.dim**-0.5)

    def embed_patches(self, pixel_values: Tensor) -> Tensor:
        """(N, C, S, S) -> (N, P, D), patches in row-major order."""
        n, c, s, _ = pixel_values.shape
        p, g = self.cfg.patch_size, self.cfg.patches_per_side
        patches = pixel_values.view(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5)  # (N, G, G, C, p, p)
        return self.patch_embed(patches.reshape(n, g * g, c * p * p))

    def encode(self, pixel_values: Tensor) -> Tensor:
        """Encoder + adapter, before the projector: (N, C, S, S) -> (N, K, E).

        The same tensor as HF's ``get_image_features(pixel_values).last_hidden_state``.
        """
        cfg = self.cfg
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must be (N, {', '.join(map(str, expected))}), got {tuple(pixel_values.shape)}"
            )
        x = self.embed_patches(pixel_values.to(self.patch_embed.weight.dtype))  # (N, P, D)
        cls = self.cls_embed.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.pos_embed.to(x.dtype)  # (N, T, D)
        x = self.norm_pre(x)
        cos, sin = rope_2d(cfg.patches_per_side, cfg.dim // cfg.n_heads, cfg.rope_theta, device=x.device)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm_post(x)[:, :-1]  # (N, P, D): drop the class token
        return self.adapter(x)  # (N, K, E)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(N, C, S, S) -> (N, K, Dt): projected features for the ``<|patch|>`` positions."""
        return self.projector(self.encode(pixel_values))
