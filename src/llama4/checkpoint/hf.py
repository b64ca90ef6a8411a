"""The Hugging Face checkpoint format: config.json + *.safetensors, both layouts.

- text-only ``Llama4ForCausalLM``: ``model.*`` and ``lm_head.weight``
- ``Llama4ForConditionalGeneration``: ``language_model.model.*``, ``language_model.lm_head.weight``,
  ``vision_model.*``, ``multi_modal_projector.*``

Keys are translated by one declarative table (``TEXT_KEYS`` here, ``VISION_KEYS`` for the vision
tower); config fields by ``config_from_hf`` / ``config_to_hf``. This is the only place that knows
HF's names, including ``no_rope_layers`` (1 = the layer USES RoPE, i.e. is local).
"""

from __future__ import annotations

import functools
import json
import re
import string
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llama4.checkpoint.vision_keys import VISION_KEYS
from llama4.config import VISION_NORM_EPS, ModelConfig, MoEConfig, RopeScaling, TextConfig, VisionConfig

# (HF name, our name) for the text decoder. Placeholders: `{i}` a layer index, `{rest}` any
# suffix, any other `{name}` one dotted component; each appears on both sides, so the table
# reads both ways (load and save).
TEXT_KEYS: list[tuple[str, str]] = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.layers.{i}.self_attn.{rest}", "layers.{i}.attention.{rest}"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    # router, experts.gate_up_proj (E, D, 2F), experts.down_proj (E, F, D), shared_expert.*,
    # and the dense FFN's gate/up/down_proj keep HF's names and layouts.
    ("model.layers.{i}.feed_forward.{rest}", "layers.{i}.feed_forward.{rest}"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
]

MULTIMODAL_TEXT_PREFIX = "language_model."


# What each {placeholder} of a key template matches: a layer index, weight or bias, the rest of a
# key; any other name matches one dotted component.
PLACEHOLDER_PATTERNS = {"i": r"\d+", "p": "weight|bias", "rest": r".+"}


@functools.cache
def template_pattern(template: str) -> re.Pattern[str]:
    """The regex of a key template such as ``layers.{i}.attention.wq.{p}`` (whole key)."""
    pattern = ""
    for literal, name, _, _ in string.Formatter().parse(template):
        pattern += re.escape(literal)
        if name:
            pattern += f"(?P<{name}>{PLACEHOLDER_PATTERNS.get(name, r'[^.]+')})"
    return re.compile(pattern + "$")


def _translate(key: str, table: list[tuple[str, str]], reverse: bool) -> str | None:
    for hf, ours in table:
        src, dst = (ours, hf) if reverse else (hf, ours)
        m = template_pattern(src).match(key)
        if m:
            return dst.format(**m.groupdict())
    return None


@functools.cache
def _tables(multimodal: bool) -> list[tuple[str, str]]:
    if not multimodal:
        return TEXT_KEYS
    text = [(MULTIMODAL_TEXT_PREFIX + hf, ours) for hf, ours in TEXT_KEYS]
    return text + [(hf, "vision." + ours) for hf, ours in VISION_KEYS]


def hf_to_ours(key: str, multimodal: bool) -> str | None:
    return _translate(key, _tables(multimodal), reverse=False)


def ours_to_hf(key: str, multimodal: bool) -> str | None:
    return _translate(key, _tables(multimodal), reverse=True)


# -- config -----------------------------------------------------------------------------------


def _rope_from_hf(tc: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes `rope_parameters`; Meta's released configs (4.51) write
    # `rope_theta` + `rope_scaling`.
    params = tc.get("rope_parameters") or {}
    scaling = tc.get("rope_scaling") or params
    theta = params.get("rope_theta", tc.get("rope_theta", 500000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"unsupported RoPE scaling type {kind!r} (Llama 4 uses 'llama3' or none)")
    return theta, RopeScaling(
        factor=scaling["factor"],
        low_freq_factor=scaling["low_freq_factor"],
        high_freq_factor=scaling["high_freq_factor"],
        original_max_position=scaling["original_max_position_embeddings"],
    )


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"unsupported Hugging Face config: {what}")


def text_config_from_hf(tc: dict[str, Any]) -> TextConfig:
    _require(
        tc.get("hidden_act", "silu") == "silu",
        f"hidden_act={tc.get('hidden_act')!r} (Llama 4's feed-forwards are SwiGLU: 'silu')",
    )
    _require(not tc.get("attention_bias", False), "attention_bias=true (Llama 4's attention has no biases)")
    n_layers = tc["num_hidden_layers"]
    theta, scaling = _rope_from_hf(tc)
    interval = tc.get("no_rope_layer_interval", 4)
    uses_rope = tc.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
    if len(uses_rope) < n_layers:
        raise ValueError(f"no_rope_layers has {len(uses_rope)} entries for {n_layers} layers")
    step = tc.get("interleave_moe_layer_step", 1)
    moe_layers = tc.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, n_layers, step))
    n_heads = tc["num_attention_heads"]
    return TextConfig(
        vocab_size=tc["vocab_size"],
        dim=tc["hidden_size"],
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=tc.get("num_key_value_heads") or n_heads,
        head_dim=tc.get("head_dim") or tc["hidden_size"] // n_heads,
        dense_hidden_dim=tc["intermediate_size_mlp"],
        norm_eps=tc.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
        nope_interval=interval,
        global_layers=tuple(i for i in range(n_layers) if not uses_rope[i]),
        moe_layers=tuple(moe_layers),
        attention_chunk_size=tc.get("attention_chunk_size") or 8192,
        qk_norm=tc.get("use_qk_norm", True),
        # Meta's released configs say 4 (transformers 4.51 read it as a flag): a bool here.
        attn_temperature_tuning=bool(tc.get("attn_temperature_tuning", True)),
        floor_scale=tc.get("floor_scale", 8192),
        attn_scale=tc.get("attn_scale", 0.1),
        max_seq_len=tc.get("max_position_embeddings", 131072),
        moe=MoEConfig(
            num_experts=tc.get("num_local_experts", 16),
            top_k=tc.get("num_experts_per_tok", 1),
            hidden_dim=tc["intermediate_size"],
            interleave_step=step,
        ),
    )


def vision_config_from_hf(vc: dict[str, Any]) -> VisionConfig:
    """What transformers' Llama4VisionModel computes for `vc`. It builds its LayerNorms with the
    default eps (1e-5), the projector without a bias and its MLPs with GELU whatever `norm_eps`,
    `multi_modal_projector_bias` and `hidden_act` say, as Meta's reference does; so does llama4's
    tower (it has no such settings)."""
    rope = vc.get("rope_parameters") or {}
    return VisionConfig(
        image_size=vc["image_size"],
        patch_size=vc["patch_size"],
        num_channels=vc.get("num_channels", 3),
        dim=vc["hidden_size"],
        n_layers=vc["num_hidden_layers"],
        n_heads=vc["num_attention_heads"],
        mlp_hidden_dim=vc["intermediate_size"],
        rope_theta=rope.get("rope_theta", vc.get("rope_theta", 10000.0)),
        pixel_shuffle_ratio=vc.get("pixel_shuffle_ratio", 0.5),
        adapter_dim=vc["projector_input_dim"],
        adapter_out_dim=vc["projector_output_dim"],
        vision_output_dim=vc["vision_output_dim"],
    )


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    quant = d.get("quantization_config") or (d.get("text_config") or {}).get("quantization_config")
    _require(
        not quant,
        f"quantized weights ({(quant or {}).get('quant_method', 'unknown method')}): llama4 loads bf16/fp32/fp16 "
        "checkpoints; use the BF16 release",
    )
    if "text_config" in d:  # Llama4ForConditionalGeneration
        vision = d.get("vision_config")
        return ModelConfig(
            text=text_config_from_hf(d["text_config"]),
            vision=vision_config_from_hf(vision) if vision else None,
            image_token_id=d.get("image_token_index", 200092),
        )
    return ModelConfig(text=text_config_from_hf(d))


def text_config_to_hf(t: TextConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.rope_scaling is not None:
        s = t.rope_scaling
        rope = {
            "rope_type": "llama3",
            "rope_theta": t.rope_theta,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position,
        }
    return {
        "model_type": "llama4_text",
        "vocab_size": t.vocab_size,
        "hidden_size": t.dim,
        "intermediate_size": t.moe.hidden_dim,
        "intermediate_size_mlp": t.dense_hidden_dim,
        "num_hidden_layers": t.n_layers,
        "num_attention_heads": t.n_heads,
        "num_key_value_heads": t.n_kv_heads,
        "head_dim": t.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": t.norm_eps,
        "rope_parameters": rope,
        "no_rope_layer_interval": t.nope_interval,
        "no_rope_layers": [0 if g else 1 for g in t.is_global],  # HF: 1 = uses RoPE
        "layer_types": ["full_attention" if g else "chunked_attention" for g in t.is_global],
        "moe_layers": list(t.moe_layers),
        "interleave_moe_layer_step": t.moe.interleave_step,
        "num_local_experts": t.moe.num_experts,
        "num_experts_per_tok": t.moe.top_k,
        "attention_chunk_size": t.attention_chunk_size,
        "use_qk_norm": t.qk_norm,
        "attn_temperature_tuning": t.attn_temperature_tuning,
        "floor_scale": t.floor_scale,
        "attn_scale": t.attn_scale,
        "max_position_embeddings": t.max_seq_len,
        "attention_bias": False,
        "tie_word_embeddings": False,
    }


def vision_config_to_hf(v: VisionConfig) -> dict[str, Any]:
    k = round(1 / v.pixel_shuffle_ratio)
    if v.mlp_hidden_dim != v.dim * k * k:
        warnings.warn(
            f"transformers sizes the vision adapter's input as intermediate_size ({v.mlp_hidden_dim}, the "
            f"encoder MLP width), but this tower's adapter takes dim x {k * k} = {v.dim * k * k}: llama4.load "
            "reads this checkpoint, transformers' Llama4ForConditionalGeneration cannot",
            stacklevel=6,  # the caller of llama4.save
        )
    return {
        "model_type": "llama4_vision_model",
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.num_channels,
        "hidden_size": v.dim,
        "num_hidden_layers": v.n_layers,
        "num_attention_heads": v.n_heads,
        "intermediate_size": v.mlp_hidden_dim,
        "hidden_act": "gelu",
        "norm_eps": VISION_NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": v.rope_theta},
        "pixel_shuffle_ratio": v.pixel_shuffle_ratio,
        "projector_input_dim": v.adapter_dim,
        "projector_output_dim": v.adapter_out_dim,
        "vision_output_dim": v.vision_output_dim,
        "multi_modal_projector_bias": False,
        "vision_feature_select_strategy": "default",
    }


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    text = text_config_to_hf(cfg.text)
    if cfg.vision is None:
        return {"architectures": ["Llama4ForCausalLM"], **text}
    return {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": text,
        "vision_config": vision_config_to_hf(cfg.vision),
        "image_token_index": cfg.image_token_id,
        "boi_token_index": 200080,
        "eoi_token_index": 200081,
        "tie_word_embeddings": False,
    }


# -- tensors ----------------------------------------------------------------------------------


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def iter_hf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor) pairs from every safetensors file of a checkpoint, memory-mapped."""
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def is_multimodal(hf_config: dict[str, Any]) -> bool:
    return "text_config" in hf_config


def ties_embeddings(hf_config: dict[str, Any]) -> bool:
    """Whether transformers makes the output head the token embedding (and saves no lm_head):
    the text config's flag, top level for Llama4ForCausalLM, `text_config` for the multimodal
    model (whose language model is a Llama4ForCausalLM of that config)."""
    text = hf_config["text_config"] if is_multimodal(hf_config) else hf_config
    return bool(text.get("tie_word_embeddings", False))


def save_hf(
    state_dict: dict[str, torch.Tensor],
    cfg: ModelConfig,
    path: str | Path,
    max_shard_bytes: int = 4 << 30,
) -> None:
    """Write config.json and safetensors (sharded with an index past max_shard_bytes)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    multimodal = cfg.vision is not None
    out: dict[str, torch.Tensor] = {}
    warned = False
    for key, tensor in state_dict.items():
        if key.endswith("router.bias"):
            if not tensor.any():
                continue  # an unused balancing bias; transformers has no such tensor
            if not warned:
                warnings.warn(
                    "saving a non-zero router balancing bias as `router.bias`: llama4.load uses it, "
                    "but transformers ignores it and will route some tokens differently",
                    stacklevel=2,
                )
                warned = True
        hf_key = ours_to_hf(key, multimodal)
        if hf_key is None:
            raise KeyError(f"no Hugging Face name for parameter {key!r}")
        out[hf_key] = tensor.detach().contiguous().cpu()
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(out):
        nbytes = out[key].numel() * out[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = out[key]
        size += nbytes
    for old in path.glob("model*.safetensors"):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "model.safetensors.index.json").unlink(missing_ok=True)
        return
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in out.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
