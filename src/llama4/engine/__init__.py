"""Inference: the KV cache (``cache``), sampling (``sampling``), the engine with slot-level
prefill/decode and the generation loop (``engine``), the public ``generate``/``stream``
(``api``), and the ``generate``/``chat`` command-line verbs.

Names are imported lazily so that ``llama4 --help`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Engine": "llama4.engine.engine",
    "Event": "llama4.engine.engine",
    "Completion": "llama4.engine.engine",
    "KVCache": "llama4.engine.cache",
    "memory_report": "llama4.engine.cache",
    "SamplingParams": "llama4.engine.sampling",
    "TokenLogprob": "llama4.engine.sampling",
    "generate": "llama4.engine.api",
    "stream": "llama4.engine.api",
    "default_model_path": "llama4.engine.assets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llama4.engine' has no attribute {name!r}")
