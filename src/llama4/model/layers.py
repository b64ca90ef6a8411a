"""Small building blocks shared by the decoder: RMSNorm, the SwiGLU FFN, rotary embedding.

Shape legend: B batch, T tokens in this forward, H query heads, Dh head dim, D model dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llama4 import kernels
from llama4.config import RopeScaling


def eager_inference() -> bool:
    """Whether llama4's compiled kernels may run: no autograd (they have no backward) and not
    inside torch.compile (Inductor cannot lower them)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """RMS normalisation over the last dim, computed in float32, then times `weight` if given.

    Decode-sized float32 and bfloat16 inference inputs on CPU take llama4's compiled kernel (one
    call; torch's CPU rms_norm runs ~8 ops, ~60 us on one 1024-wide row, and decoding runs ~30
    norms a step). Otherwise float32 takes torch's F.rms_norm; other dtypes normalise in float32,
    cast back, then scale, as the reference does.
    """
    if eager_inference() and kernels.rms_norm_supports(x, weight):
        return kernels.rms_norm(x, eps, weight)
    if x.dtype == torch.float32 and (weight is None or weight.dtype == torch.float32):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    return out if weight is None else out * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.eps, self.weight)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


# Decoding multiplies each weight by a few rows (one per sequence), so it runs at the speed the
# weights stream from memory. On CPU such products take llama4's compiled kernel
# (llama4.kernels.few_rows: float32 and bfloat16 weights), else, for float32, oneDNN's kernel,
# which streams 1.4-1.7x faster than MKL's (what F.linear runs) at one row. On the 2-core
# AVX-512 machine of benchmarks/decode.py, over a decode step's matrices at one row:
# llama4's 27-30 GB/s, oneDNN 20-25, MKL ~17; bfloat16 weights: llama4's 25 GB/s, torch's 14.
# Larger products (prefill, training) keep F.linear.
FEW_ROWS = kernels.MAX_ROWS
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _few_rows_inference(x: torch.Tensor) -> bool:
    """Whether x is a decode-sized inference input on CPU (the compiled kernels' domain)."""
    return x.device.type == "cpu" and x.numel() <= FEW_ROWS * x.shape[-1] and eager_inference()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias; few-row inference products on CPU take a faster kernel."""
    if _few_rows_inference(x):
        if kernels.supports(x, weight):
            return kernels.few_rows(x, weight)
        if _ONEDNN and x.dtype == weight.dtype == torch.float32 and weight.is_contiguous():
            return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


def glu_linear(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """linear(silu(gate) * up, weight) for h = [gate | up]: the second half of a SwiGLU. Few-row
    inference products on CPU form silu(gate) * up inside the product kernel (three ops fewer)."""
    if _few_rows_inference(h) and kernels.supports(h[..., : weight.shape[-1]], weight):
        return kernels.few_rows(h, weight, glu=True)
    gate, up = h.chunk(2, dim=-1)
    return linear(F.silu(gate) * up, weight)


def rope_and_norm(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm_eps: float | None
) -> torch.Tensor:
    """apply_rope(x, cos, sin), then, if norm_eps is given, rms_norm over each head (no weight).
    Small float32 and bfloat16 inference inputs on CPU take one compiled call, in place (x is the
    fresh output of a projection)."""
    if eager_inference() and kernels.rope_supports(x, cos, sin):
        return kernels.rope_(x, cos, sin, norm_eps)
    x = apply_rope(x, cos, sin)
    return x if norm_eps is None else rms_norm(x, norm_eps)


class Linear(nn.Linear):
    """nn.Linear without bias whose few-row CPU products take the faster kernel (`linear`)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The dense FFN and the MoE shared expert."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, hidden_dim)
        self.up_proj = Linear(dim, hidden_dim)
        self.down_proj = Linear(hidden_dim, dim)
        self.fused_gate_up = None  # set by llama4.model.inference.prepare_for_inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fused_gate_up.current() if self.fused_gate_up is not None else None
        if fused is None:  # not prepared, training, compiling, or weights replaced since
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        down = self.down_proj
        if type(down) is not Linear or down._forward_hooks or down._forward_pre_hooks:
            # e.g. LoRA-parametrized, or hooked: call the module
            gate, up = linear(x, fused).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return glu_linear(linear(x, fused), down.weight)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in float32, with llama3-style scaling if given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept; in between
    # the two are blended. With low == high factor (Scout) there is no in-between band.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    if scaling.high_freq_factor != scaling.low_freq_factor:
        smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        scaled = torch.where(medium, blended, scaled)
    return scaled


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency: (B, T) positions -> two (B, T, 1, Dh/2) float32 tensors."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (0,1), (2,3), ... of the last dim: (B, T, H, Dh) -> same.

    The complex-number convention of Meta's reference and of transformers' Llama 4 classes,
    in real arithmetic (which torch.compile generates code for).
    """
    xf = (x if x.dtype == torch.float32 else x.float()).unflatten(-1, (-1, 2))  # (B, T, H, Dh/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return out if out.dtype == x.dtype else out.to(x.dtype)
