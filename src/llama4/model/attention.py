"""Grouped-query attention with iRoPE: local (RoPE, chunked) and global (NoPE, full) layers.

Shape legend: B batch, T query tokens in this forward, S key tokens attended to,
H query heads, K key/value heads, Dh head dim, D model dim.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llama4 import kernels
from llama4.config import TextConfig
from llama4.model.layers import Linear, eager_inference, linear, rope_and_norm


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


def attention_masks(positions: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (True = attend) (B, 1, T, T) for a forward without cache at `positions`.

    Returns (global_mask, local_mask). Global: causal. Local: causal and inside the same chunk
    of `chunk` positions (the window resets at each chunk start; not a sliding window).
    """
    qp, kp = positions[:, None, :, None], positions[:, None, None, :]  # (B, 1, T, 1), (B, 1, 1, T)
    causal = kp <= qp
    return causal, causal & (qp // chunk == kp // chunk)


def chunked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """Local attention for a sequence starting at position 0: causal inside each chunk.

    Equivalent to SDPA with the local mask, but computes only the diagonal blocks, with the
    fast causal kernel. q (B, H, T, Dh), k/v (B, K, T, Dh) -> (B, H, T, Dh).
    """
    B, H, T, Dh = q.shape
    if T <= chunk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    n = -(-T // chunk)
    pad = n * chunk - T  # padding at the end: only later (padded) queries could see it

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (B, h, T, Dh) -> (B * n, h, chunk, Dh)
        x = F.pad(x, (0, 0, 0, pad))
        return x.unflatten(2, (n, chunk)).transpose(1, 2).flatten(0, 1)

    out = F.scaled_dot_product_attention(blocks(q), blocks(k), blocks(v), is_causal=True, enable_gqa=True)
    return out.unflatten(0, (B, n)).transpose(1, 2).flatten(2, 3)[:, :, :T]


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention of ONE query per row over S keys: q (B, H, 1, Dh), k/v (B, K, S, Dh) -> (B, H, 1, Dh).

    Same as SDPA (mask broadcastable to (B, H, 1, S), True = attend; None = attend to all S). On
    CPU, SDPA's kernel costs more in set-up than the few thousand multiply-adds of a decode step:
    float32 and bfloat16 inference inputs take llama4's compiled kernel (one call) where it
    applies; else float32 takes two small matrix products (the scores accumulate in the inputs'
    dtype; SDPA's CPU kernel accumulates bf16/fp16 in float32), with the query heads that share a
    key/value head stacked as rows, so GQA needs no copy of k and v; other dtypes take SDPA.
    """
    B, H, _, Dh = q.shape
    if eager_inference() and kernels.decode_attention_supports(q, k, v, mask):
        return kernels.decode_attention(q, k, v, mask, Dh**-0.5)  # the same in one compiled call
    if q.dtype != torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    K, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, K, H // K, Dh)  # heads g*K..: head h uses kv head h // (H // K)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * Dh**-0.5  # (B, K, G, S)
    if mask is not None:
        scores = scores.masked_fill(~mask.expand(B, H, 1, S).reshape(B, K, H // K, S), float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32)
    out = torch.matmul(probs if probs.dtype == v.dtype else probs.to(v.dtype), v)  # (B, K, G, Dh)
    return out.reshape(B, H, 1, Dh)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.is_global = cfg.is_global[layer_id]
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.chunk = cfg.attention_chunk_size
        self.use_qk_norm = cfg.qk_norm and not self.is_global
        self.temperature_tuning = cfg.attn_temperature_tuning and self.is_global
        self.norm_eps, self.floor_scale, self.attn_scale = cfg.norm_eps, cfg.floor_scale, cfg.attn_scale
        self.q_proj = Linear(cfg.dim, cfg.n_heads * cfg.head_dim)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim)
        self.fused_qkv = None  # set by llama4.model.inference.prepare_for_inference

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        positions: torch.Tensor,  # (B, T) absolute positions
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin (B, T, 1, Dh/2)
        mask: torch.Tensor | None,  # without cache: None means positions are 0..T-1
        cache: AttentionCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        qk, v = self._project(x)
        qk = qk.unflatten(-1, (H + K, Dh))  # (B, T, H + K, Dh): queries and keys rotate together
        v = v.unflatten(-1, (K, Dh))
        if not self.is_global:  # the QK norm comes after RoPE, as in the reference
            qk = rope_and_norm(qk, *rope, self.norm_eps if self.use_qk_norm else None)
        q, k = qk.split((H, K), dim=2)
        if self.temperature_tuning:  # global layers only
            # Scalable-softmax-like query scaling; exactly 1 below floor_scale - 1 positions.
            scale = 1.0 + self.attn_scale * torch.log1p(
                torch.floor((positions.float() + 1.0) / self.floor_scale)
            )
            q = (q * scale[:, :, None, None]).to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, Dh)
        if cache is not None:
            k, v, mask = cache.update(self.layer_id, k, v)
        elif mask is None and not self.is_global:
            out = chunked_causal_attention(q, k, v, self.chunk)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        if T == 1 and q.device.type == "cpu":
            out = decode_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=True
            )  # (B, H, T, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys side by side (B, T, (H + K) * Dh), and values (B, T, K * Dh).

        With the fused weight (inference) it is one product whose first columns are q and k;
        otherwise (training) q and k are concatenated, so both take the same RoPE and norm ops.
        """
        fused = self.fused_qkv.current() if self.fused_qkv is not None else None
        if fused is None:
            return torch.cat((self.q_proj(x), self.k_proj(x)), dim=-1), self.v_proj(x)
        qkv = linear(x, fused)
        n_qk = (self.n_heads + self.n_kv_heads) * self.head_dim
        return qkv[..., :n_qk], qkv[..., n_qk:]
