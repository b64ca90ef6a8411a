"""`llama4 info PRESET_OR_PATH`: architecture and parameter counts.

Counts come from the real module tree built on the meta device (no memory, no init), so they
are exactly what `llama4.load` would allocate. "Active" is per text token: every parameter
except the routed experts a token does not visit (top_k of num_experts per MoE layer).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from llama4.config import PRESETS, ModelConfig, get_preset


def resolve_config(name_or_path: str) -> ModelConfig:
    """A preset name or a checkpoint directory (Hugging Face config.json)."""
    if name_or_path in PRESETS:
        return get_preset(name_or_path)
    path = Path(name_or_path)
    if (path / "config.json").exists():
        from llama4.checkpoint.hf import config_from_hf

        return config_from_hf(json.loads((path / "config.json").read_text()))
    raise SystemExit(
        f"{name_or_path!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a checkpoint dir"
    )


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    from llama4.checkpoint.io import build

    model = build(cfg, device="meta")
    t = cfg.text
    counts = {"text_total": 0, "text_active": 0, "vision_total": 0, "routed_experts": 0}
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("vision."):
            counts["vision_total"] += n
            continue
        counts["text_total"] += n
        if ".experts." in name:
            counts["routed_experts"] += n
            counts["text_active"] += n * t.moe.top_k // t.moe.num_experts
        else:
            counts["text_active"] += n
    counts["total"] = counts["text_total"] + counts["vision_total"]
    return counts


def describe(cfg: ModelConfig) -> dict[str, Any]:
    t = cfg.text
    arch: dict[str, Any] = {
        "vocab_size": t.vocab_size,
        "dim": t.dim,
        "layers": t.n_layers,
        "heads": t.n_heads,
        "kv_heads": t.n_kv_heads,
        "head_dim": t.head_dim,
        "moe_layers": len(t.moe_layers),
        "dense_layers": t.n_layers - len(t.moe_layers),
        "experts": t.moe.num_experts,
        "shared_experts": 1,
        "top_k": t.moe.top_k,
        "expert_hidden_dim": t.moe.hidden_dim,
        "dense_hidden_dim": t.dense_hidden_dim,
        "global_layers": list(t.global_layers),
        "attention_chunk_size": t.attention_chunk_size,
        "qk_norm": t.qk_norm,
        "rope_theta": t.rope_theta,
        "rope_scaling": None if t.rope_scaling is None else vars(t.rope_scaling),
        "temperature_tuning": t.attn_temperature_tuning,
    }
    if cfg.vision is not None:
        v = cfg.vision
        arch["vision"] = {
            "tile": v.image_size,
            "patch": v.patch_size,
            "dim": v.dim,
            "layers": v.n_layers,
            "heads": v.n_heads,
            "tokens_per_tile": v.tokens_per_tile,
            "max_tiles": v.max_tiles,
        }
    return {"architecture": arch, "parameters": count_parameters(cfg)}


def _human(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="PRESET_OR_PATH", help=f"a preset ({', '.join(PRESETS)}) or a checkpoint dir"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> None:
    info = describe(resolve_config(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
        return
    a, p = info["architecture"], info["parameters"]
    print(f"Llama 4 '{args.model}'")
    print(
        f"  text: {a['layers']} layers, dim {a['dim']}, {a['heads']} heads / {a['kv_heads']} kv heads "
        f"x {a['head_dim']}, vocab {a['vocab_size']}"
    )
    print(
        f"  ffn:  {a['moe_layers']} MoE layers ({a['experts']} routed experts, top-{a['top_k']}, + 1 shared,"
        f" width {a['expert_hidden_dim']}), {a['dense_layers']} dense layers (width {a['dense_hidden_dim']})"
    )
    print(
        f"  attention: global (NoPE, full) layers {a['global_layers']}; local layers RoPE"
        f" (theta {a['rope_theta']:g}{', llama3 scaling' if a['rope_scaling'] else ''})"
        f" chunked by {a['attention_chunk_size']}{', QK-norm' if a['qk_norm'] else ''}"
    )
    if "vision" in a:
        v = a["vision"]
        print(
            f"  vision: {v['layers']} layers, dim {v['dim']}, {v['tile']}px tiles of {v['patch']}px patches"
            f" -> {v['tokens_per_tile']} tokens per tile, up to {v['max_tiles']} tiles"
        )
    print(f"  parameters: text {_human(p['text_total'])} total / {_human(p['text_active'])} active per token")
    print(f"              vision {_human(p['vision_total'])}; all {_human(p['total'])}")
