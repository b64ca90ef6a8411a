"""Meta's original checkpoint format: ``params.json`` + ``consolidated.NN.pth``, one file per
model-parallel rank.

Facts, from Meta's reference (``llama_models/llama4``: ``args.py``, ``model.py``, ``moe.py``,
``ffn.py``, ``vision/``, and ``llama_models/checkpoint.py``, which reshards these files):

- ``params.json`` holds ``ModelArgs`` (some releases nest it under ``"model"``). FFN widths are
  not stored but derived (``dense_hidden_dim``, ``moe_hidden_dim`` below); the head dim is always
  ``dim // n_heads`` (the reference's ``Attention`` ignores ``head_dim``); ``use_scaled_rope`` is
  llama3 scaling with ``low_freq_factor`` 1 and an original context of 8192.
- Tensor names: the reference modules' own names (``layers.{i}.attention.wq.weight``, ...), or
  the fused names of the released files, which the reference's load hooks split and rename
  (``RELEASE_NAMES``, ``wqkv``, ``mlp.fc1_weight``). We read both and write the released form,
  which Meta's resharding code understands.
- Model-parallel shards (fairscale): ``ColumnParallelLinear`` is cut along dim 0 (output
  features), ``RowParallelLinear`` along dim 1 (input features; biases replicated),
  ``VocabParallelEmbedding`` along the vocabulary; routed experts along their hidden dim F;
  norms, the router and the vision embeddings are replicated. A fused ``wqkv`` is fused per
  rank: ``[q_r; k_r; v_r]``; a fused ``fc1_weight`` is ``[w1_r; w3_r]``.
- RoPE: the reference rotates interleaved pairs (complex numbers), as our model does, so q and
  k weights load unpermuted (Llama 2/3 to HF needed a permutation; Llama 4 does not). The
  QK-norm has no weight; the vision tower's 2D RoPE uses the same pairing.
- Experts: ``w1`` (gate) and ``w3`` (up) are (E, D, F) each; ours is one (E, D, 2F), gate
  first. ``w2`` is (E, F, D) like our ``down_proj``. The router is ``router_DE`` (D, E), ours
  (E, D). The router's matmul runs in the model dtype there, float32 here (the same in fp32).
"""

from __future__ import annotations

import codecs
import io
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from llama4.checkpoint.hf import template_pattern
from llama4.checkpoint.io import CheckpointError, build
from llama4.config import ModelConfig, MoEConfig, RopeScaling, TextConfig, VisionConfig
from llama4.model.transformer import Transformer

# Meta's `attention_chunk_size: null` (no chunking: local layers attend causally to everything).
NO_CHUNK = 1 << 40
META_ROPE_CONTEXT = 8192  # `old_context_len` of the reference's apply_scaling

GATE, UP, TRANSPOSE = "gate", "up", "transpose"

# (Meta module name, our name, model-parallel split dim or None if replicated, how ours is made)
# `{i}` is a layer index and `{p}` `weight` or `bias`; the same on both sides, so the table reads
# both ways. GATE/UP: the first/second half of our last dim; TRANSPOSE: ours is the transpose.
KEYS: list[tuple[str, str, int | None, str | None]] = [
    ("tok_embeddings.weight", "tok_embeddings.weight", 0, None),
    ("norm.weight", "norm.weight", None, None),
    ("output.weight", "output.weight", 0, None),
    ("layers.{i}.attention_norm.weight", "layers.{i}.attention_norm.weight", None, None),
    ("layers.{i}.ffn_norm.weight", "layers.{i}.ffn_norm.weight", None, None),
    ("layers.{i}.attention.wq.weight", "layers.{i}.attention.q_proj.weight", 0, None),
    ("layers.{i}.attention.wk.weight", "layers.{i}.attention.k_proj.weight", 0, None),
    ("layers.{i}.attention.wv.weight", "layers.{i}.attention.v_proj.weight", 0, None),
    ("layers.{i}.attention.wo.weight", "layers.{i}.attention.o_proj.weight", 1, None),
    # dense FFN layers
    ("layers.{i}.feed_forward.w1.weight", "layers.{i}.feed_forward.gate_proj.weight", 0, None),
    ("layers.{i}.feed_forward.w3.weight", "layers.{i}.feed_forward.up_proj.weight", 0, None),
    ("layers.{i}.feed_forward.w2.weight", "layers.{i}.feed_forward.down_proj.weight", 1, None),
    # MoE layers
    ("layers.{i}.feed_forward.router_DE", "layers.{i}.feed_forward.router.weight", None, TRANSPOSE),
    ("layers.{i}.feed_forward.experts.w1", "layers.{i}.feed_forward.experts.gate_up_proj", 2, GATE),
    ("layers.{i}.feed_forward.experts.w3", "layers.{i}.feed_forward.experts.gate_up_proj", 2, UP),
    ("layers.{i}.feed_forward.experts.w2", "layers.{i}.feed_forward.experts.down_proj", 1, None),
    (
        "layers.{i}.feed_forward.shared_expert.w1.weight",
        "layers.{i}.feed_forward.shared_expert.gate_proj.weight",
        0,
        None,
    ),
    (
        "layers.{i}.feed_forward.shared_expert.w3.weight",
        "layers.{i}.feed_forward.shared_expert.up_proj.weight",
        0,
        None,
    ),
    (
        "layers.{i}.feed_forward.shared_expert.w2.weight",
        "layers.{i}.feed_forward.shared_expert.down_proj.weight",
        1,
        None,
    ),
    # vision tower
    ("vision_embeddings.vision_encoder.conv1._linear.weight", "vision.patch_embed.weight", 0, None),
    ("vision_embeddings.vision_encoder.class_embedding", "vision.cls_embed", None, None),
    ("vision_embeddings.vision_encoder.positional_embedding_vlm", "vision.pos_embed", None, None),
    ("vision_embeddings.vision_encoder.ln_pre.{p}", "vision.norm_pre.{p}", None, None),
    ("vision_embeddings.vision_encoder.ln_post.{p}", "vision.norm_post.{p}", None, None),
    (
        "vision_embeddings.vision_encoder.transformer.resblocks.{i}.ln_1.{p}",
        "vision.layers.{i}.attn_norm.{p}",
        None,
        None,
    ),
    (
        "vision_embeddings.vision_encoder.transformer.resblocks.{i}.ln_2.{p}",
        "vision.layers.{i}.mlp_norm.{p}",
        None,
        None,
    ),
    (
        "vision_embeddings.vision_encoder.transformer.resblocks.{i}.attn.wq.{p}",
        "vision.layers.{i}.attn.wq.{p}",
        0,
        None,
    ),
    (
        "vision_embeddings.vision_encoder.transformer.resblocks.{i}.attn.wk.{p}",
        "vision.layers.{i}.attn.wk.{p}",
        0,
        None,
    ),
    (
        "vision_embeddings.vision_encoder.transformer.resblocks.{i}.attn.wv.{p}",
        "vision.layers.{i}.attn.wv.{p}",
        0,
        None,
    ),
    (
        "vision_embeddings.vision_encoder.transformer.resblocks.{i}.attn.wo.weight",
        "vision.layers.{i}.attn.wo.weight",
        1,
        None,
    ),
    (
        "vision_embeddings.vision_encoder.transformer.resblocks.{i}.attn.wo.bias",
        "vision.layers.{i}.attn.wo.bias",
        None,
        None,
    ),
    (
        "vision_embeddings.vision_encoder.transformer.resblocks.{i}.mlp.c_fc.{p}",
        "vision.layers.{i}.mlp.fc1.{p}",
        0,
        None,
    ),
    (
        "vision_embeddings.vision_encoder.transformer.resblocks.{i}.mlp.c_proj.weight",
        "vision.layers.{i}.mlp.fc2.weight",
        1,
        None,
    ),
    (
        "vision_embeddings.vision_encoder.transformer.resblocks.{i}.mlp.c_proj.bias",
        "vision.layers.{i}.mlp.fc2.bias",
        None,
        None,
    ),
    ("vision_embeddings.vision_adapter.mlp.c_fc.weight", "vision.adapter.fc1.weight", 0, None),
    ("vision_embeddings.vision_adapter.mlp.c_proj.weight", "vision.adapter.fc2.weight", 1, None),
    ("vision_projection.weight", "vision.projector.weight", 0, None),
]

# (released name, Meta module name): the renames of the reference's load hooks, applied per rank.
# The routed experts are stored flattened: (E*D, F) for w1/w3 and (E*F, D) for w2.
RELEASE_NAMES: list[tuple[str, str]] = [
    ("layers.{i}.attention.wqkv.layer_norm_weight", "layers.{i}.attention_norm.weight"),
    ("layers.{i}.feed_forward.norm.weight", "layers.{i}.ffn_norm.weight"),  # MoE layers
    ("layers.{i}.feed_forward.mlp.layer_norm_weight", "layers.{i}.ffn_norm.weight"),  # dense layers
    ("layers.{i}.feed_forward.mlp.fc2_weight", "layers.{i}.feed_forward.w2.weight"),
    ("layers.{i}.feed_forward.w_in_shared_FD.weight", "layers.{i}.feed_forward.shared_expert.w1.weight"),
    ("layers.{i}.feed_forward.w_swiglu_FD.weight", "layers.{i}.feed_forward.shared_expert.w3.weight"),
    ("layers.{i}.feed_forward.w_out_shared_DF.weight", "layers.{i}.feed_forward.shared_expert.w2.weight"),
    ("layers.{i}.feed_forward.experts.moe_w_in_eD_F", "layers.{i}.feed_forward.experts.w1"),
    ("layers.{i}.feed_forward.experts.moe_w_swiglu_eD_F", "layers.{i}.feed_forward.experts.w3"),
    ("layers.{i}.feed_forward.experts.moe_w_out_eF_D", "layers.{i}.feed_forward.experts.w2"),
]
FUSED_QKV = "layers.{i}.attention.wqkv.weight"  # [wq_r; wk_r; wv_r] on rank r
FUSED_FC1 = "layers.{i}.feed_forward.mlp.fc1_weight"  # [w1_r; w3_r] on rank r (dense layers)

# Not weights: the rotary table, TransformerEngine state, routing statistics of training.
IGNORED = re.compile(
    r"(rope\.freqs|freq_cis|.*\._extra_state|.*\.(global_gate_stats_3E|running_gate_stats_3E|expert_activation_DE))"
)


# -- key templates ----------------------------------------------------------------------------


def _translate(key: str, table: list[tuple[str, str]], reverse: bool = False) -> list[str]:
    out = []
    for a, b in table:
        src, dst = (b, a) if reverse else (a, b)
        m = template_pattern(src).fullmatch(key)
        if m:
            out.append(dst.format(**m.groupdict()))
    return out


def meta_rows(our_key: str) -> list[tuple[str, int | None, str | None]]:
    """(Meta module name, split dim, part) of every Meta tensor that makes our tensor `our_key`."""
    out = []
    for meta, ours, split, part in KEYS:
        m = template_pattern(ours).fullmatch(our_key)
        if m:
            out.append((meta.format(**m.groupdict()), split, part))
    return out


# -- params.json ------------------------------------------------------------------------------


def dense_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU width of a dense layer, as ``TransformerBlock`` in the reference computes it."""
    hidden = int(2 * int(4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def moe_hidden_dim(
    dim: int,
    ffn_exp: float,
    ffn_dim_multiplier: float,
    multiple_of: int,
    capacity_factor: float,
    auto_scale_F: bool,  # noqa: N803 (Meta's name)
) -> int:
    """Width F of each routed expert and of the shared expert, as ``MoE.__init__`` computes it."""
    hidden = int(2 * int(ffn_exp * dim) / 3)
    hidden = int(ffn_dim_multiplier * hidden)
    if auto_scale_F:  # keep the active parameters of a dense layer: routed + shared expert
        hidden = int(hidden / (capacity_factor + 1))
    return hidden + (-hidden % multiple_of)


def read_params(path: Path) -> dict[str, Any]:
    params = json.loads((path / "params.json").read_text())
    return params.get("model", params)


def config_from_params(p: dict[str, Any], vocab_size: int | None = None) -> ModelConfig:
    """Our config for Meta's ``ModelArgs`` (defaults as in the reference's ``args.py``).

    vocab_size: used when params.json has none (or -1, the reference's "ask the tokenizer").
    """
    for name in ("dim", "n_layers", "n_heads"):
        if p.get(name, -1) in (-1, None):
            raise CheckpointError(f"params.json lacks {name!r}")
    if (p.get("quantization_args") or {}).get("scheme"):
        raise CheckpointError(
            f"quantized Meta checkpoints ({p['quantization_args']['scheme']}) are not supported; "
            "use the bf16 release"
        )
    dim, n_layers, n_heads = p["dim"], p["n_layers"], p["n_heads"]
    if dim % n_heads:
        raise CheckpointError(f"params.json: dim={dim} is not a multiple of n_heads={n_heads}")
    vocab = p.get("vocab_size", -1)
    if vocab in (-1, None):
        if vocab_size is None:
            raise CheckpointError("params.json has no vocab_size and none was found in the weights")
        vocab = vocab_size
    multiple_of = p.get("multiple_of", 256)
    ffn_dim_multiplier = p.get("ffn_dim_multiplier")
    rope_scaling = None
    if p.get("use_scaled_rope", False):
        rope_scaling = RopeScaling(
            factor=float(p.get("rope_scaling_factor") or 16),  # the reference's defaults (Scout)
            low_freq_factor=1.0,
            high_freq_factor=float(p.get("rope_high_freq_factor") or 1),
            original_max_position=META_ROPE_CONTEXT,
        )
    interval = p.get("nope_layer_interval")
    global_layers = tuple(i for i in range(n_layers) if interval and (i + 1) % interval == 0)

    moe_args = p.get("moe_args")
    if moe_args:
        if p.get("ffn_exp") is None or ffn_dim_multiplier is None:
            raise CheckpointError("params.json has moe_args but no ffn_exp / ffn_dim_multiplier")
        step = moe_args.get("interleave_moe_layer_step", 1)
        moe = MoEConfig(
            num_experts=moe_args["num_experts"],
            top_k=moe_args.get("top_k", 1),
            hidden_dim=moe_hidden_dim(
                dim,
                p["ffn_exp"],
                ffn_dim_multiplier,
                multiple_of,
                moe_args.get("capacity_factor", 1.0),
                moe_args.get("auto_scale_F", True),
            ),
            interleave_step=step,
        )
        moe_layers = tuple(range(step - 1, n_layers, step))
    else:  # a dense model: no MoE layers (the MoE config is unused)
        moe, moe_layers = MoEConfig(), ()

    text = TextConfig(
        vocab_size=vocab,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=p.get("n_kv_heads") or n_heads,
        head_dim=dim // n_heads,  # the reference's Attention ignores params' head_dim
        dense_hidden_dim=dense_hidden_dim(dim, multiple_of, ffn_dim_multiplier),
        norm_eps=p.get("norm_eps", 1e-5),
        rope_theta=float(p.get("rope_theta", 500000.0)),
        rope_scaling=rope_scaling,
        nope_interval=interval or n_layers + 1,  # no interval: no global layer
        global_layers=global_layers,
        moe_layers=moe_layers,
        attention_chunk_size=p.get("attention_chunk_size") or NO_CHUNK,
        qk_norm=p.get("use_qk_norm", False),
        attn_temperature_tuning=p.get("attn_temperature_tuning", False),
        floor_scale=p.get("floor_scale", 8192),
        attn_scale=p.get("attn_scale", 0.1),
        moe=moe,
    )
    vision = p.get("vision_args")
    return ModelConfig(text=text, vision=_vision_from_params(vision) if vision else None)


def _vision_from_params(v: dict[str, Any]) -> VisionConfig:
    image, patch = v["image_size"], v["patch_size"]
    if image["height"] != image["width"] or patch["height"] != patch["width"]:
        raise CheckpointError(f"only square tiles and patches are supported, got {image} and {patch}")
    return VisionConfig(
        image_size=image["height"],
        patch_size=patch["height"],
        num_channels=3,
        dim=v["dim"],
        n_layers=v["n_layers"],
        n_heads=v["n_heads"],
        mlp_hidden_dim=int(v["mlp_ratio"] * v["dim"]),
        rope_theta=10000.0,  # VisionEncoder.get_rope_freqs
        pixel_shuffle_ratio=v["pixel_shuffle_ratio"],
        adapter_dim=v["output_dim"],  # PixelShuffleMLP: fc1 and fc2 both output `output_dim`
        adapter_out_dim=v["output_dim"],
        vision_output_dim=v["output_dim"],
    )


def params_from_config(cfg: ModelConfig) -> dict[str, Any]:
    """Meta's ``ModelArgs`` for our config; ValueError for what params.json cannot express."""
    t = cfg.text

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"cannot write this config as Meta params.json: {what}")

    need(
        t.head_dim * t.n_heads == t.dim,
        f"head_dim={t.head_dim} must be dim // n_heads = {t.dim // t.n_heads}",
    )
    interval = None
    if t.global_layers:
        interval = t.nope_interval
        derived = tuple(i for i in range(t.n_layers) if (i + 1) % interval == 0)
        need(t.global_layers == derived, f"global_layers={t.global_layers} are not every {interval}th layer")
    p: dict[str, Any] = {
        "dim": t.dim,
        "n_layers": t.n_layers,
        "n_heads": t.n_heads,
        "n_kv_heads": t.n_kv_heads,
        "vocab_size": t.vocab_size,
        "norm_eps": t.norm_eps,
        "rope_theta": t.rope_theta,
        "use_scaled_rope": t.rope_scaling is not None,
        "nope_layer_interval": interval,
        "attention_chunk_size": None if t.attention_chunk_size >= NO_CHUNK else t.attention_chunk_size,
        "use_qk_norm": t.qk_norm,
        "attn_temperature_tuning": t.attn_temperature_tuning,
        "floor_scale": t.floor_scale,
        "attn_scale": t.attn_scale,
    }
    if t.rope_scaling is not None:
        s = t.rope_scaling
        need(
            s.low_freq_factor == 1 and s.original_max_position == META_ROPE_CONTEXT,
            f"Meta's scaled RoPE fixes low_freq_factor=1 and original context {META_ROPE_CONTEXT}, got {s}",
        )
        p["rope_scaling_factor"] = s.factor
        p["rope_high_freq_factor"] = s.high_freq_factor
    moe_hidden = None
    if t.moe_layers:
        step = t.moe.interleave_step
        need(
            t.moe_layers == tuple(range(step - 1, t.n_layers, step)),
            f"moe_layers={t.moe_layers} are not every {step}th layer",
        )
        moe_hidden = t.moe.hidden_dim
    ffn = _ffn_args(t.dim, t.dense_hidden_dim, moe_hidden)
    if ffn is None and len(t.moe_layers) == t.n_layers:  # no dense layer: its width may differ
        ffn = _ffn_args(t.dim, None, moe_hidden)
    need(
        ffn is not None,
        f"no FFN arguments give dense width {t.dense_hidden_dim} and expert width {moe_hidden}",
    )
    p.update({k: v for k, v in ffn.items() if k not in ("capacity_factor", "auto_scale_F")})
    if t.moe_layers:
        p["moe_args"] = {
            "num_experts": t.moe.num_experts,
            "capacity_factor": ffn["capacity_factor"],
            "auto_scale_F": ffn["auto_scale_F"],
            "top_k": t.moe.top_k,
            "interleave_moe_layer_step": t.moe.interleave_step,
        }
    if cfg.vision is not None:
        v = cfg.vision
        need(
            v.adapter_dim == v.adapter_out_dim == v.vision_output_dim,
            "the adapter and projector widths must all equal Meta's output_dim",
        )
        need(
            (v.num_channels, v.rope_theta) == (3, 10000.0),
            "Meta's vision tower has 3 channels and RoPE theta 10000",
        )
        mlp_ratio = v.mlp_hidden_dim / v.dim
        if int(mlp_ratio * v.dim) != v.mlp_hidden_dim:
            mlp_ratio = (v.mlp_hidden_dim + 0.5) / v.dim
        size = lambda n: {"height": n, "width": n}
        p["vision_args"] = {
            "image_size": size(v.image_size),
            "patch_size": size(v.patch_size),
            "dim": v.dim,
            "n_layers": v.n_layers,
            "n_heads": v.n_heads,
            "mlp_ratio": mlp_ratio,
            "output_dim": v.adapter_out_dim,
            "pixel_shuffle_ratio": v.pixel_shuffle_ratio,
        }
    return p


def _ffn_args(dim: int, dense: int | None, moe: int | None) -> dict[str, Any] | None:
    """ffn_exp, ffn_dim_multiplier, multiple_of, capacity_factor, auto_scale_F giving both widths
    (None: no layer has that kind of feed-forward, any width will do)."""

    def fits(a: dict[str, Any]) -> bool:
        if dense is not None and dense_hidden_dim(dim, a["multiple_of"], a["ffn_dim_multiplier"]) != dense:
            return False
        return moe is None or moe_hidden_dim(dim, **a) == moe

    # Meta's released models: ffn_exp 4, multiplier 1.2, F halved (capacity factor 1).
    for multiple_of in (2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        a = dict(
            ffn_exp=4.0,
            ffn_dim_multiplier=1.2,
            multiple_of=multiple_of,
            capacity_factor=1.0,
            auto_scale_F=True,
        )
        if fits(a):
            return a
    # Otherwise a multiplier that gives the dense width exactly, and an ffn_exp for the experts:
    # int(multiplier * int(2 * int(ffn_exp * dim) / 3)) must come out at 2F or 2F + 1.
    base = int(2 * int(4 * dim) / 3)
    mult = 1.2 if dense is None else (dense + 0.5) / base
    if moe is None:  # dense layers only: the released ffn_exp, the multiplier does the rest
        a = dict(ffn_exp=4.0, ffn_dim_multiplier=mult, multiple_of=1, capacity_factor=1.0, auto_scale_F=True)
        return a if fits(a) else None
    candidates = []
    guess = int(2 * moe / mult)
    for h in range(max(guess - 2, 1), guess + 4):
        n = -(-3 * h // 2)  # the smallest n with int(2 * n / 3) == h
        candidates.append(dict(ffn_exp=(n + 0.5) / dim, capacity_factor=1.0))
    # A large multiplier can step over both 2F and 2F + 1; then the capacity factor (it only sizes
    # the experts: F = int(X / (capacity_factor + 1))) divides X = int(mult * base) down to F.
    x = int(mult * base)
    candidates.append(dict(ffn_exp=4.0, capacity_factor=x / (moe + 0.5) - 1))
    for c in candidates:
        a = dict(ffn_dim_multiplier=mult, multiple_of=1, auto_scale_F=True, **c)
        if fits(a):
            return a
    return None


# -- tensors ----------------------------------------------------------------------------------


def consolidated_files(path: Path) -> list[Path]:
    """consolidated.00.pth, consolidated.01.pth, ... in rank order (or a lone consolidated.pth)."""
    files = {}
    for f in path.glob("consolidated.*.pth"):
        rank = f.name.split(".")[1]
        if rank.isdigit():
            files[int(rank)] = f
    if not files and (path / "consolidated.pth").is_file():
        return [path / "consolidated.pth"]
    if sorted(files) != list(range(len(files))):
        raise CheckpointError(
            f"{path}: model-parallel shards {sorted(files)} are not numbered 0..{len(files) - 1}"
        )
    return [files[r] for r in range(len(files))]


def is_meta_checkpoint(path: Path) -> bool:
    shards = any(path.glob("consolidated.*.pth")) or (path / "consolidated.pth").is_file()
    return (path / "params.json").is_file() and shards


def read_shard(file: Path) -> dict[str, torch.Tensor]:
    """One rank's tensors, memory-mapped, never unpickling anything but tensors.

    Released files hold TransformerEngine `_extra_state` entries pickled as io.BytesIO (built
    with codecs.encode): allowed for this load only, then dropped.
    """
    with torch.serialization.safe_globals([io.BytesIO, codecs.encode]):
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{file.name} holds a {type(state).__name__}, not a dict of tensors")
    out = {}
    for key, value in state.items():
        if IGNORED.fullmatch(key):
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{file.name}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = value
    return out


def _unfuse(
    state: dict[str, torch.Tensor], cfg: ModelConfig, n_ranks: int, file: str
) -> dict[str, tuple[torch.Tensor, str]]:
    """One rank's tensors under Meta's module names: {module name: (tensor, name in the file)}."""
    t = cfg.text
    out: dict[str, tuple[torch.Tensor, str]] = {}

    def put(name: str, tensor: torch.Tensor, source: str) -> None:
        if name in out:
            raise CheckpointError(f"{file}: {source!r} and {out[name][1]!r} are the same tensor {name!r}")
        out[name] = (tensor, source)

    def bad(key: str, tensor: torch.Tensor, expected: str) -> CheckpointError:
        return CheckpointError(
            f"tensor {key!r} in {file} has shape {tuple(tensor.shape)}, the config expects {expected}"
        )

    for key, tensor in state.items():
        if m := template_pattern(FUSED_QKV).fullmatch(key):
            q, kv = t.n_heads * t.head_dim // n_ranks, t.n_kv_heads * t.head_dim // n_ranks
            if tensor.dim() != 2 or tensor.shape[0] != q + 2 * kv:
                raise bad(key, tensor, f"({q + 2 * kv}, {t.dim}) = [q; k; v] rows of this rank")
            prefix = f"layers.{m['i']}.attention."
            for name, part in zip(("wq", "wk", "wv"), tensor.split([q, kv, kv])):
                put(prefix + name + ".weight", part, key)
        elif m := template_pattern(FUSED_FC1).fullmatch(key):
            if tensor.dim() != 2 or tensor.shape[0] % 2:
                raise bad(key, tensor, "(2 * F / ranks, dim) = [w1; w3]")
            w1, w3 = tensor.chunk(2, dim=0)
            put(f"layers.{m['i']}.feed_forward.w1.weight", w1, key)
            put(f"layers.{m['i']}.feed_forward.w3.weight", w3, key)
        elif names := _translate(key, RELEASE_NAMES):
            name = names[0]
            if ".experts.w" in name:  # flattened (E*D, F) / (E*F, D), or already 3D
                e, d = t.moe.num_experts, t.dim
                if tensor.numel() % (e * d):
                    raise bad(key, tensor, f"{e} experts x dim {d} x F")
                tensor = tensor.reshape(e, -1, d) if name.endswith("w2") else tensor.reshape(e, d, -1)
            put(name, tensor, key)
        else:
            put(key, tensor, key)
    return out


def _fuse(state: dict[str, torch.Tensor], cfg: ModelConfig, n_ranks: int) -> dict[str, torch.Tensor]:
    """One rank's tensors under the released names (the inverse of `_unfuse`).

    wq, wk and wv stay apart when head_dim is not a multiple of the rank count: the reference
    splits a rank's fused wqkv rows by the total head count, n_heads + 2 * n_kv_heads."""
    t = cfg.text
    fuse_qkv = t.head_dim % n_ranks == 0
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if fuse_qkv and (m := re.fullmatch(r"layers\.(\d+)\.attention\.w([qkv])\.weight", key)):
            if m[2] == "q":
                i = m[1]
                parts = [state[f"layers.{i}.attention.w{x}.weight"] for x in "qkv"]
                out[FUSED_QKV.format(i=i)] = torch.cat(parts)
        elif m := re.fullmatch(r"layers\.(\d+)\.feed_forward\.w([13])\.weight", key):
            if m[2] == "1":
                i = m[1]
                parts = [state[f"layers.{i}.feed_forward.w{x}.weight"] for x in "13"]
                out[FUSED_FC1.format(i=i)] = torch.cat(parts)
        elif m := re.fullmatch(r"layers\.(\d+)\.ffn_norm\.weight", key):
            i = int(m[1])
            norm = "feed_forward.norm.weight" if t.is_moe[i] else "feed_forward.mlp.layer_norm_weight"
            out[f"layers.{i}.{norm}"] = tensor
        elif names := _translate(key, RELEASE_NAMES, reverse=True):
            out[names[0]] = tensor.flatten(0, 1) if ".experts." in key else tensor
        else:
            out[key] = tensor
    return out


def _meta_shape(ours: torch.Size, part: str | None) -> tuple[int, ...]:
    if part == TRANSPOSE:
        return tuple(reversed(ours))
    if part in (GATE, UP):
        return (*ours[:-1], ours[-1] // 2)
    return tuple(ours)


def _merge(tensors: list[torch.Tensor], split: int | None, source: str, files: list[Path]) -> torch.Tensor:
    """The full tensor from its model-parallel pieces (rank order)."""
    first = tensors[0]
    for file, x in zip(files[1:], tensors[1:]):
        same = x.shape == first.shape if split is None else x.dim() == first.dim()
        if same and split is not None:
            same = all(a == b for d, (a, b) in enumerate(zip(x.shape, first.shape)) if d != split)
        if not same:
            raise CheckpointError(
                f"tensor {source!r} has shape {tuple(x.shape)} in {file.name} but "
                f"{tuple(first.shape)} in {files[0].name}"
            )
    if split is None or len(tensors) == 1:
        return first
    return torch.cat(tensors, dim=split)


def convert_shards(
    shards: list[dict[str, torch.Tensor]],
    cfg: ModelConfig,
    expected: dict[str, torch.Tensor],
    files: list[Path],
) -> dict[str, torch.Tensor]:
    """Our state dict from the ranks' tensors (in rank order), checked against `expected`."""
    t, n = cfg.text, len(shards)
    for what, count in (("n_heads", t.n_heads), ("n_kv_heads", t.n_kv_heads)):
        if count % n:
            raise CheckpointError(
                f"{n} model-parallel shards do not divide {what}={count} (the reference cannot run them either)"
            )
    local = [_unfuse(s, cfg, n, f.name) for s, f in zip(shards, files)]
    wanted: dict[str, tuple[str, int | None, str | None]] = {}  # Meta name -> (ours, split, part)
    for key in expected:
        if key.endswith("router.bias"):  # our balancing bias: Meta has none (zero)
            continue
        rows = meta_rows(key)
        if not rows:
            raise KeyError(f"no Meta name for our parameter {key!r}")
        for meta, split, part in rows:
            wanted[meta] = (key, split, part)
    have = local[0]
    missing = sorted(set(wanted) - set(have))
    unexpected = sorted(have[k][1] for k in set(have) - set(wanted))
    if missing or unexpected:
        raise CheckpointError(
            f"Meta checkpoint {files[0].parent} does not match its params.json: missing {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}; unexpected {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}"
        )
    for file, other in zip(files[1:], local[1:]):
        if set(other) != set(have):
            diff = sorted(set(other) ^ set(have))
            raise CheckpointError(f"{file.name} and {files[0].name} hold different tensors: {diff[:20]}")

    halves: dict[str, dict[str, torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    for meta, (ours, split, part) in wanted.items():
        source = have[meta][1]
        full = _merge([shard[meta][0] for shard in local], split, source, files)
        want = _meta_shape(expected[ours].shape, part)
        if tuple(full.shape) != want:
            merged = f" (merged from {n} shards)" if n > 1 and split is not None else ""
            raise CheckpointError(
                f"tensor {source!r} (Meta: {meta!r}, ours: {ours!r}) has shape {tuple(full.shape)}{merged}, "
                f"the config expects {want}"
            )
        if part == TRANSPOSE:
            state[ours] = full.t().contiguous()
        elif part in (GATE, UP):
            halves.setdefault(ours, {})[part] = full
        else:
            state[ours] = full
    for ours, parts in halves.items():
        state[ours] = torch.cat([parts[GATE], parts[UP]], dim=-1)
    return state


def load_meta(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """Load a Meta checkpoint folder (params.json + consolidated.NN.pth). See `llama4.load`."""
    path = Path(path)
    params = read_params(path)
    files = consolidated_files(path)
    shards = [read_shard(f) for f in files]
    vocab = None
    if "tok_embeddings.weight" in shards[0]:
        vocab = sum(s["tok_embeddings.weight"].shape[0] for s in shards if "tok_embeddings.weight" in s)
    cfg = config_from_params(params, vocab_size=vocab)
    model = build(cfg)
    expected = model.state_dict()
    state = convert_shards(shards, cfg, expected, files)
    for key, tensor in state.items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.to(device)
    for key in expected:
        if key.endswith("router.bias"):
            state[key] = torch.zeros(expected[key].shape, dtype=torch.float32, device=device)
    model.load_state_dict(state, assign=True, strict=True)
    model.init_buffers(device)
    return model.eval()


def _own(t: torch.Tensor) -> torch.Tensor:
    # torch.save writes a view's whole storage: copy views of larger tensors (shards, halves).
    t = t.detach().contiguous().cpu()
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def save_meta(model: Transformer, path: str | Path, *, model_parallel: int = 1) -> None:
    """Write params.json and consolidated.00.pth ... (one per rank) in the released layout.

    model_parallel: how many ranks to split for, as fairscale cuts the weights; Meta's reference
    loads the folder at that model-parallel size (and reshards it for another).
    """
    cfg, t = model.config, model.config.text
    n = model_parallel
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"model_parallel={n!r} must be a whole number >= 1")
    params = params_from_config(cfg)
    heads = [("n_heads", t.n_heads), ("n_kv_heads", t.n_kv_heads)]
    if cfg.vision is not None:
        heads.append(("the vision tower's n_heads", cfg.vision.n_heads))
    for what, count in heads:
        if count % n:  # each rank holds whole heads
            raise ValueError(f"model_parallel={n} does not divide {what}={count}")
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    warned = False
    for key, tensor in model.state_dict().items():
        if key.endswith("router.bias"):
            if tensor.any() and not warned:
                warnings.warn(
                    "Meta's format has no router balancing bias: it is dropped, and routing will differ",
                    stacklevel=2,
                )
                warned = True
            continue
        rows = meta_rows(key)
        if not rows:
            raise KeyError(f"no Meta name for our parameter {key!r}")
        for meta, split, part in rows:
            x = tensor
            if part == TRANSPOSE:
                x = x.t()
            elif part in (GATE, UP):
                x = x.chunk(2, dim=-1)[0 if part == GATE else 1]
            pieces = [x] * n if split is None else list(x.chunk(n, dim=split))
            if split is not None and any(p.shape[split] * n != x.shape[split] for p in pieces):
                raise ValueError(
                    f"model_parallel={n} does not divide dim {split} of {meta!r} {tuple(x.shape)}"
                )
            for rank, piece in zip(ranks, pieces):
                rank[meta] = piece
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("consolidated*.pth"):
        old.unlink()
    (path / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    for r, rank in enumerate(ranks):
        torch.save({k: _own(v) for k, v in _fuse(rank, cfg, n).items()}, path / f"consolidated.{r:02d}.pth")
