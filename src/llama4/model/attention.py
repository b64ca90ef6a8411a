"""Grouped-query attention with iRoPE: local (RoPE, chunked) and global (NoPE, full) layers.

Shape legend: B batch, T query tokens in this forward, S key tokens attended to,
H query heads, K key/value heads, Dh head dim, D model dim.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llama4.config import TextConfig
from llama4.model.layers import apply_rope, rms_norm


class AttentionCache(Protocol):
    """What the attention layers need from a KV cache. The engine owns the cache.

    Before each forward the engine tells the cache which positions the new tokens occupy;
    each layer then hands over its new keys/values and gets back everything to attend to.
    """

    def update(
        self, layer_id: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store k, v (B, K, T, Dh) of this forward for `layer_id`.

        Returns keys and values to attend over (B, K, S, Dh) and a boolean mask broadcastable
        to (B, H, T, S) (True = may attend), or None when plain causal attention with S == T
        is right. The cache knows from the config whether the layer is local (chunked) or
        global.
        """
        ...


def attention_masks(
    positions: torch.Tensor | None, seq_len: int, chunk: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Boolean masks (True = attend) for a forward without cache.

    Returns (global_mask, local_mask). Without explicit positions the global mask is None
    (SDPA's causal path is used) and both are (1, 1, T, T); with positions (B, T) they are
    (B, 1, T, T). Local: causal and in the same chunk of `chunk` positions.
    """
    if positions is None:
        pos = torch.arange(seq_len, device=device)[None]
        global_mask = None
    else:
        pos = positions
    qp, kp = pos[:, None, :, None], pos[:, None, None, :]  # (B, 1, T, 1), (B, 1, 1, T)
    causal = kp <= qp
    local_mask = causal & (qp // chunk == kp // chunk)
    if positions is not None:
        global_mask = causal
    return global_mask, local_mask


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.is_global = cfg.is_global[layer_id]
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.use_qk_norm = cfg.qk_norm and not self.is_global
        self.temperature_tuning = cfg.attn_temperature_tuning and self.is_global
        self.norm_eps, self.floor_scale, self.attn_scale = cfg.norm_eps, cfg.floor_scale, cfg.attn_scale
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        positions: torch.Tensor,  # (B, T) absolute positions
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin (B, T, 1, Dh/2)
        mask: torch.Tensor | None,  # used only without cache
        cache: AttentionCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if not self.is_global:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if self.use_qk_norm:  # after RoPE, as in the reference
                q, k = rms_norm(q, self.norm_eps), rms_norm(k, self.norm_eps)
        elif self.temperature_tuning:
            # Scalable-softmax-like query scaling; exactly 1 below floor_scale - 1 positions.
            scale = 1.0 + self.attn_scale * torch.log1p(
                torch.floor((positions.float() + 1.0) / self.floor_scale)
            )
            q = (q * scale[:, :, None, None]).to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, Dh)
        if cache is not None:
            k, v, mask = cache.update(self.layer_id, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=True
        )  # (B, H, T, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
