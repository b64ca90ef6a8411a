"""The Llama 4 decoder: embeddings, pre-norm blocks (attention + MoE or dense FFN), head.

Shape legend: B batch, T tokens, D model dim, V vocab.

The model is single-device and stateless between calls: the engine owns the KV cache and
passes it in with the positions; parallelism is applied from outside by module name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llama4.config import ModelConfig, TextConfig
from llama4.model.attention import Attention, AttentionCache, attention_masks
from llama4.model.layers import FeedForward, Linear, RMSNorm, rope_cos_sin, rope_frequencies
from llama4.model.moe import MoE, Router


class Block(nn.Module):
    def __init__(self, cfg: TextConfig, layer_id: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward: MoE | FeedForward = (
            MoE(cfg) if cfg.is_moe[layer_id] else FeedForward(cfg.dim, cfg.dense_hidden_dim)
        )

    def forward(self, x, positions, rope, mask, cache=None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), positions, rope, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama 4: `model(tokens)` -> logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        t = cfg.text
        self.tok_embeddings = nn.Embedding(t.vocab_size, t.dim)
        self.layers = nn.ModuleList(Block(t, i) for i in range(t.n_layers))
        self.norm = RMSNorm(t.dim, t.norm_eps)
        self.output = Linear(t.dim, t.vocab_size)
        self.vision: nn.Module | None = None
        if cfg.vision is not None:
            from llama4.model.vision import VisionTower

            self.vision = VisionTower(cfg.vision, t.dim)
        self.register_buffer(
            "rope_inv_freq", rope_frequencies(t.head_dim, t.rope_theta, t.rope_scaling), persistent=False
        )

    def embed(self, tokens: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D), with `<|patch|>` positions replaced by image features.

        image_features: (P, D) projected features (or (tiles, per_tile, D)), one row per
        `<|patch|>` token in the batch, in order.
        """
        h = self.tok_embeddings(tokens)
        if image_features is not None:
            is_patch = tokens == self.config.image_token_id
            features = image_features.reshape(-1, h.shape[-1]).to(h.dtype)
            n_patch = int(is_patch.sum())
            if n_patch != features.shape[0]:
                raise ValueError(
                    f"image_features has {features.shape[0]} rows but tokens hold {n_patch} "
                    f"<|patch|> tokens (id {self.config.image_token_id})"
                )
            h = h.masked_scatter(is_patch[..., None], features)
        return h

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected vision features (tiles, tokens_per_tile, D) for (tiles, 3, S, S) pixels."""
        if self.vision is None:
            raise ValueError("this model has no vision tower (config.vision is None)")
        return self.vision(pixel_values.to(self.tok_embeddings.weight.dtype))

    def hidden(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, D)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, time), got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        t = self.config.text
        x = self.embed(tokens, image_features)
        pos = positions if positions is not None else torch.arange(T, device=tokens.device)[None].expand(B, T)
        if pos.shape != (B, T):
            raise ValueError(f"positions must have the shape of tokens {(B, T)}, got {tuple(pos.shape)}")
        rope = rope_cos_sin(pos, self.rope_inv_freq)
        global_mask = local_mask = None
        if cache is None and positions is not None:
            global_mask, local_mask = attention_masks(positions, t.attention_chunk_size)
        for layer in self.layers:
            mask = global_mask if layer.attention.is_global else local_mask
            x = layer(x, pos, rope, mask, cache)
        return self.norm(x)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for tokens (B, T).

        positions: absolute positions (B, T); default 0..T-1. Needed with a cache.
        pixel_values: image tiles (tiles, 3, S, S) whose features replace the `<|patch|>`
        embeddings; or pass precomputed `image_features` (see `image_features()`).
        """
        if pixel_values is not None:
            image_features = self.image_features(pixel_values)
        h = self.hidden(tokens, positions=positions, cache=cache, image_features=image_features)
        return self.output(h)

    def init_buffers(self, device: str | torch.device = "cpu") -> None:
        """Compute the non-persistent buffers (after building on the meta device)."""
        t = self.config.text
        self.rope_inv_freq = rope_frequencies(t.head_dim, t.rope_theta, t.rope_scaling).to(device)
        if self.vision is not None and hasattr(self.vision, "init_buffers"):
            self.vision.init_buffers(device)

    # -- initialisation (training from scratch) -------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None, std: float = 0.02) -> None:
        """Random init for training from scratch; output projections scaled by depth."""
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        out_std = std / math.sqrt(2 * self.config.text.n_layers)
        for name, p in self.named_parameters():
            if name.startswith("vision."):
                continue
            if p.dim() == 1:  # norm weights
                p.fill_(1.0)
                continue
            s = out_std if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")) else std
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(s).to(p.dtype))
        for m in self.modules():
            if isinstance(m, Router):
                m.bias.zero_()  # the balancing bias starts neutral
        if self.vision is not None and hasattr(self.vision, "init_weights"):
            self.vision.init_weights(gen)
