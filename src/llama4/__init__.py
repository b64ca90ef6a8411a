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
    """Load a Llama 4 checkpoint directory (Hugging Face format). See `llama4.checkpoint.io.load`."""
    from llama4.checkpoint.io import load as _load

    return _load(path, dtype=dtype, device=device)


def save(model, path, **kwargs) -> None:
    """Save a model as a Hugging Face checkpoint. See `llama4.checkpoint.io.save`."""
    from llama4.checkpoint.io import save as _save

    _save(model, path, **kwargs)
