"""`llama4.load` and `llama4.save`: checkpoints in, models out, and back.

The model is built on the meta device (no random init of weights about to be overwritten),
tensors are read memory-mapped from safetensors and assigned in place.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llama4.checkpoint import hf
from llama4.config import ModelConfig
from llama4.model.transformer import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the tensors at fault."""


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    return DTYPES[dtype]


def build(cfg: ModelConfig, *, device: str | torch.device = "meta") -> Transformer:
    """The architecture for `cfg`, with parameters on `device` (uninitialised unless meta)."""
    with torch.device(device):
        return Transformer(cfg)


def load(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
) -> Transformer:
    """Load a Llama 4 checkpoint directory (text-only or multimodal): Hugging Face
    (config.json + safetensors) or Meta's original (params.json + consolidated.NN.pth).

    dtype: cast floating weights to this dtype (default: as stored).
    Raises CheckpointError naming missing, unexpected or mis-shaped tensors.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        from llama4.checkpoint import meta  # here: meta imports this module

        if meta.is_meta_checkpoint(path):
            return meta.load_meta(path, dtype=_resolve_dtype(dtype), device=device)
        raise FileNotFoundError(
            f"{path} has neither config.json (Hugging Face) nor params.json + consolidated.*.pth (Meta)"
        )
    hf_config = json.loads(config_file.read_text())
    cfg = hf.config_from_hf(hf_config)
    multimodal = hf.is_multimodal(hf_config)
    dtype = _resolve_dtype(dtype)

    model = build(cfg)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for hf_key, tensor in hf.iter_hf_tensors(path):
        key = hf.hf_to_ours(hf_key, multimodal)
        if key is not None and key.startswith("vision.") and cfg.vision is None:
            key = None
        if key is None or key not in expected:
            unexpected.append(hf_key)
            continue
        want = expected[key].shape
        if tensor.shape != want:
            raise CheckpointError(
                f"tensor {hf_key!r} (ours: {key!r}) has shape {tuple(tensor.shape)}, "
                f"the config expects {tuple(want)}"
            )
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.to(device)
    if hf.ties_embeddings(hf_config) and "tok_embeddings.weight" in state:
        # transformers uses the embedding as the head. A copy: llama4 keeps the two apart (a
        # fine-tune then trains them separately; `save` writes both, untied).
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    # The balancing bias of the router is ours alone: absent from HF checkpoints means zero.
    optional = {k for k in expected if k.endswith("router.bias")}
    missing = sorted(set(expected) - set(state) - optional)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match its config: missing {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}; unexpected {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}"
        )
    for key in optional - set(state):
        state[key] = torch.zeros(expected[key].shape, dtype=torch.float32, device=device)
    model.load_state_dict(state, assign=True, strict=True)
    model.init_buffers(device)
    return model.eval()


def save(
    model: Transformer,
    path: str | Path,
    *,
    format: str = "hf",
    max_shard_bytes: int = 4 << 30,
    model_parallel: int = 1,
) -> None:
    """Write `model` as a checkpoint that `llama4.load` reads back.

    format "hf": config.json + safetensors (files of at most max_shard_bytes), for `transformers`.
    format "meta": params.json + consolidated.NN.pth, one file per model-parallel rank
    (model_parallel of them), in the layout of Meta's releases, for Meta's reference code.
    """
    if format == "meta":
        from llama4.checkpoint import meta

        meta.save_meta(model, path, model_parallel=model_parallel)
    elif format == "hf":
        if model_parallel != 1:
            raise ValueError(
                "model_parallel applies to format='meta' only (the HF format is not split by rank)"
            )
        hf.save_hf(model.state_dict(), model.config, path, max_shard_bytes=max_shard_bytes)
    else:
        raise ValueError(f"unknown checkpoint format {format!r}; choose 'hf' or 'meta'")
