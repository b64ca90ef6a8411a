"""Typed configuration for every part of Llama 4, and the named presets.

One name per concept, used everywhere in this package:

- a **global** layer is a NoPE layer: no rotary embedding, full causal attention over the whole
  context, attention-temperature tuning. Every other layer is **local**: RoPE, optional QK-norm,
  chunked causal attention (token i sees j <= i only inside the same chunk of
  ``attention_chunk_size`` tokens). Hugging Face calls this ``no_rope_layers`` (where 1 means the
  layer USES RoPE); the translation happens in ``llama4.checkpoint.hf`` and nowhere else.
- an **MoE** layer has a routed-experts FFN plus a shared expert; the others have a dense SwiGLU.

Derived sizes are computed once in ``__post_init__``; presets live in ``PRESETS``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling of RoPE (used by Scout)."""

    factor: float = 16.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position: int = 8192  # context length the unscaled frequencies were trained at


@dataclass
class MoEConfig:
    """The routed-experts FFN of an MoE layer."""

    num_experts: int = 16  # routed experts E (the shared expert is extra)
    top_k: int = 1  # experts chosen per token from the raw router logits
    hidden_dim: int = 8192  # F: SwiGLU width of each routed expert and of the shared expert
    interleave_step: int = 1  # layers step-1, 2*step-1, ... are MoE (1: all, 2: odd layer ids)

    def __post_init__(self) -> None:
        assert 1 <= self.top_k <= self.num_experts, f"top_k={self.top_k} not in [1, {self.num_experts}]"
        assert self.interleave_step >= 1, f"interleave_step={self.interleave_step} must be >= 1"


@dataclass
class TextConfig:
    """The text decoder."""

    vocab_size: int = 202048
    dim: int = 5120  # D: residual stream width
    n_layers: int = 48
    n_heads: int = 40  # query heads
    n_kv_heads: int = 8  # key/value heads (GQA: n_heads % n_kv_heads == 0)
    head_dim: int = 128  # need not equal dim // n_heads
    dense_hidden_dim: int = 16384  # SwiGLU width of the dense (non-MoE) FFN layers
    norm_eps: float = 1e-5  # RMSNorm epsilon (also the QK-norm epsilon)
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    nope_interval: int = 4  # layers with (i + 1) % nope_interval == 0 are global (NoPE)
    # Explicit global-layer ids; None derives them from nope_interval. Checkpoints set this.
    global_layers: tuple[int, ...] | None = None
    # Explicit MoE-layer ids; None derives them from moe.interleave_step. Checkpoints set this.
    moe_layers: tuple[int, ...] | None = None
    attention_chunk_size: int = 8192  # local layers attend within chunks of this many tokens
    qk_norm: bool = True  # weightless RMS norm of q and k on local layers, after RoPE
    attn_temperature_tuning: bool = True  # scale global-layer queries by position (inference)
    floor_scale: int = 8192  # temperature tuning: q *= 1 + attn_scale * log(floor((p+1)/floor_scale) + 1)
    attn_scale: float = 0.1
    max_seq_len: int = 131072  # longest context the engine will allocate for by default
    moe: MoEConfig = field(default_factory=MoEConfig)

    # Derived in __post_init__ (not constructor arguments).
    is_global: tuple[bool, ...] = field(init=False)  # per layer: NoPE + full attention
    is_moe: tuple[bool, ...] = field(init=False)  # per layer: routed experts + shared expert

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        assert self.n_heads % self.n_kv_heads == 0, (
            f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
        )
        n = self.n_layers
        if self.global_layers is None:
            self.global_layers = tuple(i for i in range(n) if (i + 1) % self.nope_interval == 0)
        if self.moe_layers is None:
            step = self.moe.interleave_step
            self.moe_layers = tuple(range(step - 1, n, step))
        self.global_layers = tuple(sorted(self.global_layers))
        self.moe_layers = tuple(sorted(self.moe_layers))
        for name, ids in (("global_layers", self.global_layers), ("moe_layers", self.moe_layers)):
            assert all(0 <= i < n for i in ids), f"{name}={ids} out of range for n_layers={n}"
        self.is_global = tuple(i in self.global_layers for i in range(n))
        self.is_moe = tuple(i in self.moe_layers for i in range(n))


VISION_NORM_EPS = 1e-5  # the vision tower's LayerNorms (torch's default, in both references)


@dataclass
class VisionConfig:
    """The vision encoder, pixel shuffle, adapter and projector of early fusion."""

    image_size: int = 336  # tile side in pixels
    patch_size: int = 14
    num_channels: int = 3
    dim: int = 1408
    n_layers: int = 34
    n_heads: int = 16
    mlp_hidden_dim: int = 5632  # GELU MLP width in each encoder layer
    rope_theta: float = 10000.0  # 2D rotary embedding of the patches
    pixel_shuffle_ratio: float = 0.5  # 0.5 merges 2x2 patches into one token
    adapter_dim: int = 4096  # hidden width of the 2-layer adapter MLP ("projector_input_dim")
    adapter_out_dim: int = 4096  # output of the adapter ("projector_output_dim")
    vision_output_dim: int = 4096  # input width of the projector (= adapter_out_dim)
    max_tiles: int = 16  # image preprocessing: most tiles per image (plus the global tile)

    # Derived.
    patches_per_side: int = field(init=False)
    tokens_per_tile: int = field(init=False)  # after pixel shuffle: 144 for 336/14 and ratio 0.5

    # Its LayerNorms use eps VISION_NORM_EPS and the projector has no bias, in both references (no
    # fields for them). Configs written before these fields were dropped may hold them, at those
    # values only: `from_dict` takes such a dict.
    _LEGACY = {"norm_eps": VISION_NORM_EPS, "projector_bias": False}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        d = dict(d)
        for key, value in cls._LEGACY.items():
            if key in d and (got := d.pop(key)) != value:
                raise ValueError(f"vision {key} must be {value} (the reference tower's), got {got}")
        return cls(**d)

    def __post_init__(self) -> None:
        assert self.image_size % self.patch_size == 0, (
            f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
        )
        self.patches_per_side = self.image_size // self.patch_size
        # Pixel shuffle merges k x k patches, k = 1 / ratio (computed in integers: ratio**2
        # times the patch count can fall just short of a whole number, e.g. for ratio 1/7).
        k = round(1 / self.pixel_shuffle_ratio)
        self.tokens_per_tile = (self.patches_per_side // k) ** 2


@dataclass
class ModelConfig:
    """A whole Llama 4: text decoder plus (optionally) the vision tower."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig | None = None
    image_token_id: int = 200092  # <|patch|>: its embeddings are replaced by image features

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        if isinstance(self.vision, dict):
            self.vision = VisionConfig.from_dict(self.vision)

    # -- serialisation (our own format; checkpoints use llama4.checkpoint) --------------------
    def to_dict(self) -> dict[str, Any]:
        def strip(obj: Any) -> Any:
            if dataclasses.is_dataclass(obj):
                return {f.name: strip(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
            if isinstance(obj, tuple):
                return list(obj)
            return obj

        return strip(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        text = dict(d["text"])
        for key in ("global_layers", "moe_layers"):
            if text.get(key) is not None:
                text[key] = tuple(text[key])
        return cls(
            text=TextConfig(**text),
            vision=VisionConfig.from_dict(d["vision"]) if d.get("vision") else None,
            image_token_id=d.get("image_token_id", 200092),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

_SCOUT_VISION = VisionConfig()

PRESETS: dict[str, ModelConfig] = {}


def _preset(name: str, cfg: ModelConfig) -> None:
    PRESETS[name] = cfg


# Scout: 16 experts on every layer, QK-norm, llama3 RoPE scaling. 17B active / 109B total.
_preset(
    "scout",
    ModelConfig(
        text=TextConfig(
            rope_scaling=RopeScaling(),
            max_seq_len=10_485_760,
            moe=MoEConfig(num_experts=16, interleave_step=1),
        ),
        vision=_SCOUT_VISION,
    ),
)

# Maverick: 128 experts on every 2nd layer (odd ids), dense otherwise, no QK-norm, no scaling.
_preset(
    "maverick",
    ModelConfig(
        text=TextConfig(
            qk_norm=False,
            max_seq_len=1_048_576,
            moe=MoEConfig(num_experts=128, interleave_step=2),
        ),
        vision=VisionConfig(),
    ),
)

# Behemoth: Meta has published 16 experts, 288B active / ~2T total, nothing else. Our estimate:
# the same block design scaled up (every layer MoE, top-1 + shared expert). With D=16384,
# 128 query / 8 KV heads of 128 and expert width 24576 on 96 layers the sizes come out at
# ~293B active / ~2.03T total (`llama4 info behemoth`).
_preset(
    "behemoth",
    ModelConfig(
        text=TextConfig(
            dim=16384,
            n_layers=96,
            n_heads=128,
            n_kv_heads=8,
            head_dim=128,
            dense_hidden_dim=65536,
            rope_scaling=RopeScaling(),
            moe=MoEConfig(num_experts=16, hidden_dim=24576, interleave_step=1),
        ),
        vision=VisionConfig(),
    ),
)

# Tiny presets for tests and experiments: every feature on, sizes that run in milliseconds.
_preset(
    "debug",
    ModelConfig(
        text=TextConfig(
            vocab_size=512,
            dim=64,
            n_layers=4,
            n_heads=4,
            n_kv_heads=2,
            head_dim=16,
            dense_hidden_dim=128,
            rope_scaling=RopeScaling(
                factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=64
            ),
            attention_chunk_size=32,
            floor_scale=16,
            max_seq_len=512,
            moe=MoEConfig(num_experts=4, hidden_dim=64, interleave_step=1),
        ),
        vision=None,
    ),
)

_preset(
    "debug-vision",
    ModelConfig(
        text=dataclasses.replace(PRESETS["debug"].text, vocab_size=202048),
        vision=VisionConfig(
            image_size=56,
            patch_size=14,
            dim=32,
            n_layers=2,
            n_heads=4,
            mlp_hidden_dim=128,  # = dim / ratio^2: transformers sizes the adapter input from it
            adapter_dim=64,
            adapter_out_dim=64,
            vision_output_dim=64,
            max_tiles=4,
        ),
    ),
)


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset (safe to modify)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return ModelConfig.from_dict(PRESETS[name].to_dict())
