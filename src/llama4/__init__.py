"""llama4: a from-scratch PyTorch implementation of Meta's Llama 4."""

from llama4.config import ModelConfig, MoEConfig, RopeScaling, TextConfig, VisionConfig, get_preset

__all__ = [
    "ModelConfig",
    "MoEConfig",
    "RopeScaling",
    "TextConfig",
    "VisionConfig",
    "get_preset",
]
__version__ = "0.1.0"


def load(path, *, dtype=None, device="cpu"):
    """Load a Llama 4 checkpoint directory (Hugging Face, or Meta's params.json +
    consolidated.*.pth). See `llama4.checkpoint.io.load`."""
    from llama4.checkpoint.io import load as _load

    return _load(path, dtype=dtype, device=device)


def save(model, path, **kwargs) -> None:
    """Save a model as a Hugging Face checkpoint (or Meta's with ``format="meta"``).
    See `llama4.checkpoint.io.save`."""
    from llama4.checkpoint.io import save as _save

    _save(model, path, **kwargs)


def generate(model, prompts, max_new_tokens=256, **kwargs):
    """New token ids per prompt: ``generate(model, [[ids...], ...], 64, temperature=0.7, top_p=0.9,
    seed=0, stop_ids=[...])``. `model` is a loaded model or an ``llama4.engine.Engine``.
    See `llama4.engine.api.generate` for every option."""
    from llama4.engine.api import generate as _generate

    return _generate(model, prompts, max_new_tokens, **kwargs)


def stream(model, prompts, max_new_tokens=256, **kwargs):
    """Like `generate`, yielding `llama4.engine.Event`s (index, token, text delta, finish_reason)
    as tokens are produced. See `llama4.engine.api.stream`."""
    from llama4.engine.api import stream as _stream

    return _stream(model, prompts, max_new_tokens, **kwargs)
