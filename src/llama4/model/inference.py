"""Weights laid out for fast decoding: fused projections, experts stored for the matvec kernel.

``prepare_for_inference(model)`` (the engine calls it) changes where weights sit in memory,
never their values. Every parameter keeps its name, shape and values, so state_dict, saving,
loading and training see the same model.

1. Fused projections (any device). The q, k and v projections of each attention layer become
   one matrix, and so do the gate and up projections of each SwiGLU (dense FFN and shared
   expert): one product instead of three (two) per layer, and the matrix is streamed in one
   go. The separate parameters become views into the fused matrix (no extra memory), so in-place
   updates (optimizer steps, ``load_state_dict``) reach both. A module whose weight was replaced
   since (``.to()``, LoRA parametrizations, ``assign=True``) no longer matches its fused matrix
   and quietly takes the unfused path.

2. Expert memory order (CPU). The routed experts are (E, D, 2F) and (E, F, D) in checkpoints,
   i.e. input-major per expert. The few-row kernel of ``layers.linear`` (oneDNN) wants each
   expert's matrix output-major and contiguous, so on CPU the experts are stored as (E, 2F, D)
   and (E, D, F) and the parameters become transposed views with the checkpoint's shapes.
"""

from __future__ import annotations

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

    def current(self) -> torch.Tensor | None:
        """The fused weight, or None when a Linear was replaced or parametrized since fusing."""
        for lin, ptr in zip(self.linears, self._ptrs):
            if type(lin) is not Linear or lin.weight.data_ptr() != ptr:
                return None
        return self.weight


@torch.no_grad()
def fuse(linears: Sequence[nn.Linear]) -> Fused:
    """One (sum of outs, in) matrix for Linears of the same input; their weights become views of it."""
    w = torch.cat([lin.weight for lin in linears])
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(w[start : start + n], requires_grad=lin.weight.requires_grad)
        start += n
    return Fused(w, linears)


def _output_major(p: nn.Parameter) -> nn.Parameter:
    """(E, I, O) parameter stored as (E, O, I): same values and shape, transposed memory."""
    return nn.Parameter(p.transpose(1, 2).contiguous().transpose(1, 2), requires_grad=p.requires_grad)


@torch.no_grad()
def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Fuse projections and, on CPU, store experts output-major. Idempotent; returns the model.

    Values are unchanged (tests compare logits before and after).
    """
    cpu = next(model.parameters()).device.type == "cpu"
    for module in model.modules():
        if isinstance(module, Attention) and module.fused_qkv is None:
            linears = [module.q_proj, module.k_proj, module.v_proj]
            if all(type(lin) is Linear for lin in linears):
                module.fused_qkv = fuse(linears)
        elif isinstance(module, FeedForward) and module.fused_gate_up is None:
            linears = [module.gate_proj, module.up_proj]
            if all(type(lin) is Linear for lin in linears):
                module.fused_gate_up = fuse(linears)
        elif isinstance(module, Experts) and type(module) is Experts and cpu:
            for name in ("gate_up_proj", "down_proj"):
                p = getattr(module, name)
                if p.stride(-1) == 1:  # still input-major
                    setattr(module, name, _output_major(p))
    return model
