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

3. Huge pages (CPU, Linux). Weights of 2 MiB and more move to memory the kernel backs with
   2 MiB pages (transparent huge pages, asked for with madvise: the default setting of most
   distributions gives them only to memory that asks). Streaming the weights then takes one TLB
   entry per 2 MiB instead of per 4 KiB, and under a hypervisor each TLB miss walks two page
   tables. Measured on the 2-core machine of benchmarks/decode.py (A/B in one process): a
   256 MiB matvec 12-15% faster in some runs, no faster in others; decode steps 2-6% faster.
   Where the kernel offers no huge pages (other systems, THP set to `never`) weights stay where
   they are.

Autograd and torch.compile always take the separate projections (see `Fused.current`).
"""

from __future__ import annotations

import math
import mmap
import threading
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

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


HUGE_PAGE = 2 << 20
_on_huge_pages: weakref.WeakSet = weakref.WeakSet()  # storages `huge_empty` made


def _huge_pages_offered() -> bool:
    """Whether this system gives huge pages to memory that asks (Linux THP `always` or `madvise`)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


HUGE_PAGES = _huge_pages_offered()


def huge_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor that starts on a 2 MiB boundary of memory marked for huge pages
    (a private anonymous mapping with MADV_HUGEPAGE; the storage keeps the mapping alive).
    torch.empty where huge pages are not offered, or below one page."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not HUGE_PAGES or nbytes < HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)
    start = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
    t = torch.frombuffer(mm, dtype=dtype, count=math.prod(shape), offset=-start % HUGE_PAGE)
    _on_huge_pages.add(t.untyped_storage())
    return t.view(shape)


def _empty_for(like: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """An uninitialised tensor of `like`'s dtype and device: on huge pages on CPU."""
    if like.device.type == "cpu":
        return huge_empty(shape, like.dtype)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


@torch.no_grad()
def move_to_huge_pages(tensors: Iterable[torch.Tensor]) -> None:
    """Move the CPU storages of `tensors` (2 MiB and more, not there yet) onto huge pages, in
    place: each tensor keeps its identity, values, shape and strides, and tensors that shared a
    storage still share one."""
    if not HUGE_PAGES:
        return
    by_storage: dict[int, list[torch.Tensor]] = {}
    for t in tensors:
        st = t.untyped_storage()
        if t.device.type == "cpu" and st.nbytes() >= HUGE_PAGE and st not in _on_huge_pages:
            by_storage.setdefault(st.data_ptr(), []).append(t)
    for ts in by_storage.values():
        old = ts[0].untyped_storage()
        new = huge_empty((old.nbytes(),), torch.uint8).untyped_storage()
        new.copy_(old)
        for t in ts:
            t.data = torch.empty(0, dtype=t.dtype).set_(new, t.storage_offset(), t.shape, t.stride())


@torch.no_grad()
def fuse(linears: Sequence[nn.Linear]) -> Fused:
    """One (sum of outs, in) matrix for Linears of the same input; their weights become views of
    it (the same Parameter objects: optimizers and hooks holding them are unaffected)."""
    first = linears[0].weight
    w = torch.cat(
        [lin.weight for lin in linears],
        out=_empty_for(first, (sum(lin.weight.shape[0] for lin in linears), first.shape[1])),
    )
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
    experts, n_in, n_out = p.shape
    w = _empty_for(p, (experts, n_out, n_in))
    w.copy_(p.data.transpose(1, 2))
    p.data = w.transpose(1, 2)


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
    if cpu:
        move_to_huge_pages([*model.parameters(), *model.buffers()])
    return model
