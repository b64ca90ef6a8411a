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
