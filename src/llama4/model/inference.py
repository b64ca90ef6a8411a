"""Weights laid out for fast decoding: fused projections, experts stored for the matvec kernel.

``prepare_for_inference(model)`` (the engine calls it) changes where weights sit in memory,
never their values. Every parameter keeps its identity, name, shape and values, so state_dict,
saving, loading, optimizers and training see the same model.

1. Fused projections (any device). The q, k and v projections of each attention layer become
   one matrix, and so do the gate and up projections of each SwiGLU (dense FFN and shared
   expert): one product instead of three (two) per layer, and the matrix is streamed in one
   go. The separate parameters become views into the fused matrix (no extra memory), so in-place
   updates (optimizer steps, ``load_state_dict``) reach both. A module whose weight was replaced
   since (``.to()``, LoRA parametrizations, ``assign=True``) no longer matches its fused matrix
   and takes the unfused path; the next ``prepare_for_inference`` fuses it again.

2. Expert memory order (CPU). The routed experts are (E, D, 2F) and (E, F, D) in checkpoints,
   i.e. input-major per expert. The few-row kernels of ``layers.linear`` (llama4.kernels, oneDNN)
   want each expert's matrix output-major with contiguous rows, so on CPU the experts are stored as (E, 2F, D)
   and (E, D, F) and the parameters become transposed views with the checkpoint's shapes.
   This copies the experts once when an Engine starts on CPU (a memory-mapped checkpoint is
   read into RAM then).

Autograd and torch.compile always take the separate projections (see `Fused.current`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import nn

from llama4.model.attention import Attention
from llama4.model.layers import FeedForward, Linear
from llama4.model.moe import Experts


class Fused:
    """A fused (sum of outs, in) weight and the Linears whose weights are views into it."""

    def __init__(self, weight: torch.Tensor, linears: Sequence[nn.Linear]) -> None:
        self.weight = weight
        self.linears = list(linears)
        self.sizes = [lin.weight.shape[0] for lin in linears]
        self._ptrs = [lin.weight.data_ptr() for lin in linears]

    def valid(self) -> bool:
        """Whether the Linears still are views into `weight` (not replaced, not parametrized)."""
        return all(
            type(lin) is Linear and lin.weight.data_ptr() == ptr for lin, ptr in zip(self.linears, self._ptrs)
        )

    def current(self) -> torch.Tensor | None:
        """The fused weight for an inference forward, else None (take the separate Linears).

        Training (autograd on) and torch.compile take the separate Linears: gradients belong to
        their parameters, and the pointer check below would break the compiled graph.
        """
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or not self.valid():
            return None
        return self.weight


@torch.no_grad()
def fuse(linears: Sequence[nn.Linear]) -> Fused:
    """One (sum of outs, in) matrix for Linears of the same input; their weights become views of
    it (the same Parameter objects: optimizers and hooks holding them are unaffected)."""
    w = torch.cat([lin.weight for lin in linears])
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = w[start : start + n]
        start += n
    return Fused(w, linears)


def _refuse(fused: Fused | None, linears: list[nn.Linear]) -> Fused | None:
    """`fused` if still valid, else a fresh fusion of `linears` (dropping a stale copy), or None
    when one of them is not a plain Linear (e.g. LoRA-parametrized)."""
    if fused is not None and fused.valid():
        return fused
    return fuse(linears) if all(type(lin) is Linear for lin in linears) else None


def _store_output_major(p: nn.Parameter) -> None:
    """(E, I, O) parameter stored as (E, O, I) in place: same object, values and shape."""
    p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)


_PREPARING = threading.Lock()  # one preparation at a time (engines built on several threads)


@torch.no_grad()
def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Fuse projections and, on CPU, store experts output-major. Idempotent; returns the model.

    Values are unchanged (tests compare logits before and after). The first call moves weights;
    calls on a prepared model change nothing. Calls on several threads take turns; a forward
    running on another thread during the first call is the caller's to avoid.
    """
    with _PREPARING:
        return _prepare(model)


def _prepare(model: nn.Module) -> nn.Module:
    cpu = next(model.parameters()).device.type == "cpu"
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_qkv = _refuse(module.fused_qkv, [module.q_proj, module.k_proj, module.v_proj])
        elif isinstance(module, FeedForward):
            module.fused_gate_up = _refuse(module.fused_gate_up, [module.gate_proj, module.up_proj])
        elif isinstance(module, Experts) and type(module) is Experts and cpu:
            for p in (module.gate_up_proj, module.down_proj):
                if p.stride(-1) == 1:  # still input-major
                    _store_output_major(p)
    return model
