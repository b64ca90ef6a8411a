"""A decode step in one call: embedding, every layer and the output head in llama4's C kernels.

Run through the model's forward, a batch-1 step of benchmarks/decode.py's model makes 57 products
that stream the weights (16.4 ms) and spends ~7 ms more between them: Python, module calls and
~200 small torch ops (norms, RoPE, cache writes, routing, residual adds). `DecodeStep` hands the
whole step to ``llama4_decode_step`` (kernels.c), which computes the same thing with the same
kernels and nothing between them.

Scope: CPU, float32 weights and cache, the model's own modules as ``prepare_for_inference`` left
them: no hooks, no parametrizations (LoRA), no weights replaced since. The plan points at the
weights' memory, so every step first checks that each weight is still the module's, at the same
address (``usable``); anything else takes the model's forward, which is this step's slow twin:
tests/test_decode_step.py holds the two to the same logits, tokens and routing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch import nn

from llama4 import kernels
from llama4.engine.cache import KVCache
from llama4.model.attention import Attention
from llama4.model.layers import FeedForward, Linear, RMSNorm
from llama4.model.moe import Experts, MoE, Router, Routing
from llama4.model.transformer import Block, Transformer

_ptr, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _Layer(ctypes.Structure):  # kernels.c step_layer
    _fields_ = [
        ("attention_norm", _ptr), ("qkv", _ptr), ("ld_qkv", _i64), ("o", _ptr), ("ld_o", _i64),
        ("k_cache", _ptr), ("v_cache", _ptr), ("capacity", _i64),
        ("is_global", _i64), ("qk_norm", _i64), ("temperature_tuning", _i64),
        ("ffn_norm", _ptr), ("gate_up", _ptr), ("ld_gate_up", _i64), ("down", _ptr), ("ld_down", _i64),
        ("hidden", _i64), ("n_experts", _i64), ("top_k", _i64),
        ("router", _ptr), ("ld_router", _i64), ("router_bias", _ptr), ("router_bias_bf16", _i64),
        ("expert_gate_up", _ptr), ("expert_gate_up_stride", _i64), ("expert_ld_gate_up", _i64),
        ("expert_down", _ptr), ("expert_down_stride", _i64), ("expert_ld_down", _i64), ("expert_hidden", _i64),
    ]  # fmt: skip


class _Model(ctypes.Structure):  # kernels.c step_model
    _fields_ = [
        ("n_layers", _i64), ("dim", _i64), ("n_heads", _i64), ("n_kv_heads", _i64), ("head_dim", _i64),
        ("vocab", _i64), ("chunk", _i64), ("bf16", _i64), ("norm_eps", _f32), ("attn_scale", _f32), ("floor_scale", _f32),
        ("embedding", _ptr), ("ld_embedding", _i64), ("norm", _ptr), ("head", _ptr), ("ld_head", _i64),
        ("inv_freq", _ptr), ("layers", ctypes.POINTER(_Layer)),
    ]  # fmt: skip


class Unsupported(Exception):
    """The model or cache is outside the one-call step's scope (the message says how)."""


class DecodeStep:
    """The plan of one model and cache for ``llama4_decode_step``. Build with ``build`` (None
    where the step does not apply); call with the tokens, slots and positions of a decode step."""

    def __init__(self, model: Transformer, cache: KVCache) -> None:
        lib = kernels._library()
        if lib is None:
            raise Unsupported("llama4's kernels are unavailable")
        self._lib = lib
        t = model.config.text
        self._tensors: list[tuple[dict, str, torch.Tensor, int]] = []  # (container, name, tensor, address)
        self._objects: list[tuple[dict, str, object]] = []  # (container, name, object)
        self._modules: list[nn.Module] = []  # whose hooks would be skipped
        self._keep: list[torch.Tensor] = []  # what the plan points into
        _require(type(model) is Transformer, "not llama4's Transformer")
        # One dtype for the weights and the cache: float32, or bfloat16 (activations rounded as the
        # forward rounds them).
        self.dtype = model.tok_embeddings.weight.dtype
        _require(self.dtype in (torch.float32, torch.bfloat16), f"weights are {self.dtype}")
        _require(cache.gk.dtype == self.dtype and cache.device.type == "cpu", "cache dtype or device")
        _require(t.head_dim % 2 == 0 and t.n_heads % t.n_kv_heads == 0, "head layout")
        self.vocab = t.vocab_size
        self._moes: list[MoE] = []
        layers = (_Layer * t.n_layers)()
        for i, block in enumerate(model.layers):
            _require(type(block) is Block, f"layer {i} is not a Block")
            self._module(block)
            self._attention(layers[i], block, cache, t)
            self._feed_forward(layers[i], block, t)
        self.n_experts, self.top_k = t.moe.num_experts, t.moe.top_k
        emb, norm, head = model.tok_embeddings, model.norm, model.output
        _require(type(emb) is nn.Embedding and type(head) is Linear, "embedding or head replaced")
        self._modules += [model, emb, head]
        self._plan = _Model(
            t.n_layers, t.dim, t.n_heads, t.n_kv_heads, t.head_dim, t.vocab_size, t.attention_chunk_size,
            self.dtype == torch.bfloat16, t.norm_eps, t.attn_scale, t.floor_scale,
            self._weight(emb, "weight"), emb.weight.stride(0), self._norm(norm, t.norm_eps),
            self._weight(head, "weight"), head.weight.stride(0), self._inv_freq(model), layers,
        )  # fmt: skip
        self._layers = layers

    @classmethod
    def build(cls, model: Transformer, cache: KVCache) -> DecodeStep | None:
        try:
            return cls(model, cache)
        except Unsupported:
            return None

    # ----- the plan -----------------------------------------------------------------------------

    def _module(self, m: nn.Module) -> None:
        self._modules.append(m)

    def _weight(
        self, m: nn.Module, name: str, *, buffer: bool = False, unit_dim: int = -1, dtypes: tuple = ()
    ) -> int:
        """Address of m's parameter (or buffer) `name`, recorded for `usable`: the plan's dtype (or
        one of `dtypes`) on CPU, with stride 1 along `unit_dim` (the rows the kernels stream)."""
        container = m._buffers if buffer else m._parameters
        w = container.get(name)
        _require(w is not None, f"{type(m).__name__}.{name} is missing")
        ok = w.dtype in (dtypes or (self.dtype,)) and w.device.type == "cpu"
        _require(ok, f"{type(m).__name__}.{name} is {w.dtype} on {w.device}")
        _require(w.stride(unit_dim) == 1, f"{type(m).__name__}.{name} has strides {w.stride()}")
        self._tensors.append((container, name, w, w.data_ptr()))
        self._keep.append(w)
        return w.data_ptr()

    def _inv_freq(self, model: Transformer) -> int:
        """RoPE's frequencies, in float32 as the forward computes the angles (a float32 copy when
        the buffer went to bfloat16 with the model; it is computed, never trained)."""
        self._weight(model, "rope_inv_freq", buffer=True, dtypes=(torch.float32, torch.bfloat16))
        freq = model.rope_inv_freq.float().contiguous()
        self._keep.append(freq)
        return freq.data_ptr()

    def _norm(self, norm: nn.Module, eps: float) -> int:
        _require(type(norm) is RMSNorm and norm.eps == eps, "a norm replaced or with another eps")
        self._module(norm)
        return self._weight(norm, "weight")

    def _fused(self, m: nn.Module, attr: str, linears: Sequence[nn.Module]) -> torch.Tensor:
        """The fused weight `attr` of m (prepare_for_inference's), valid, its Linears recorded."""
        fused = getattr(m, attr)
        _require(fused is not None and fused.valid(), f"{type(m).__name__}.{attr} not fused")
        self._objects.append((m.__dict__, attr, fused))
        for lin in linears:
            self._module(lin)
            self._weight(lin, "weight")
        w = fused.weight
        _require(w.dtype == self.dtype and w.stride(-1) == 1, "fused weight layout")
        self._keep.append(w)
        return w

    def _attention(self, L: _Layer, block: Block, cache: KVCache, t) -> None:
        a = block.attention
        _require(type(a) is Attention, "attention replaced")
        self._module(a)
        L.attention_norm = self._norm(block.attention_norm, t.norm_eps)
        qkv = self._fused(a, "fused_qkv", [a.q_proj, a.k_proj, a.v_proj])
        L.qkv, L.ld_qkv = qkv.data_ptr(), qkv.stride(0)
        _require(type(a.o_proj) is Linear, "o_proj replaced")
        self._module(a.o_proj)
        L.o, L.ld_o = self._weight(a.o_proj, "weight"), a.o_proj.weight.stride(0)
        i = cache.index[a.layer_id]
        k, v = (cache.gk[i], cache.gv[i]) if a.is_global else (cache.lk[i], cache.lv[i])
        _require(k.is_contiguous() and v.is_contiguous(), "cache layout")
        self._keep += [k, v]
        L.k_cache, L.v_cache, L.capacity = k.data_ptr(), v.data_ptr(), k.shape[2]
        L.is_global, L.qk_norm, L.temperature_tuning = a.is_global, a.use_qk_norm, a.temperature_tuning
        _require(a.norm_eps == t.norm_eps, "QK norm eps")

    def _feed_forward(self, L: _Layer, block: Block, t) -> None:
        L.ffn_norm = self._norm(block.ffn_norm, t.norm_eps)
        ff = block.feed_forward
        if type(ff) is MoE:
            self._module(ff)
            self._moes.append(ff)
            router, experts = ff.router, ff.experts
            _require(type(router) is Router and type(experts) is Experts, "router or experts replaced")
            self._modules += [router, experts]
            L.n_experts, L.top_k = ff.num_experts, ff.top_k
            _require(0 < ff.top_k <= ff.num_experts, "top_k")
            L.router, L.ld_router = self._weight(router, "weight"), router.weight.stride(0)
            bias_dtypes = (torch.float32, torch.bfloat16)
            L.router_bias = self._weight(router, "bias", buffer=True, dtypes=bias_dtypes)
            L.router_bias_bf16 = router.bias.dtype == torch.bfloat16
            _require((ff.num_experts, ff.top_k) == (t.moe.num_experts, t.moe.top_k), "MoE sizes")
            # Stored output-major (E, D, 2F) and (E, F, D) views: expert e's rows are contiguous.
            gu, down = experts.gate_up_proj, experts.down_proj
            L.expert_gate_up = self._weight(experts, "gate_up_proj", unit_dim=1)
            L.expert_gate_up_stride, L.expert_ld_gate_up = gu.stride(0), gu.stride(2)
            L.expert_down = self._weight(experts, "down_proj", unit_dim=1)
            L.expert_down_stride, L.expert_ld_down = down.stride(0), down.stride(2)
            L.expert_hidden = down.shape[1]
            ff = ff.shared_expert
        _require(type(ff) is FeedForward, "feed-forward replaced")
        self._module(ff)
        gate_up = self._fused(ff, "fused_gate_up", [ff.gate_proj, ff.up_proj])
        L.gate_up, L.ld_gate_up = gate_up.data_ptr(), gate_up.stride(0)
        _require(type(ff.down_proj) is Linear, "down_proj replaced")
        self._module(ff.down_proj)
        L.down, L.ld_down = self._weight(ff.down_proj, "weight"), ff.down_proj.weight.stride(0)
        L.hidden = ff.down_proj.weight.shape[1]

    # ----- a step -------------------------------------------------------------------------------

    def usable(self) -> bool:
        """Whether the plan still describes the model: kernels on, every weight still the module's
        at the same address, the fused weights current, and no forward hooks anywhere."""
        return (
            kernels.available()
            and all(c.get(n) is w and w.data_ptr() == p for c, n, w, p in self._tensors)
            and all(c.get(n) is o and o.valid() for c, n, o in self._objects)
            and not any(m._forward_hooks or m._forward_pre_hooks for m in self._modules)
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
        )

    def __call__(self, tokens: Sequence[int], slots: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Logits (B, V) float32 for one new token per slot at `positions` (the engine checked the
        ids, the slots' room and `usable`). Writes the cache and each MoE's ``last_routing``."""
        B = len(tokens)
        row = ctypes.c_int64 * B
        logits = torch.empty(B, self.vocab)
        n_moe = len(self._moes)
        router_logits = torch.empty(n_moe, B, self.n_experts)
        experts = torch.empty(n_moe, B, self.top_k, dtype=torch.long)
        gates = torch.empty(n_moe, B, self.top_k)
        status = self._lib.llama4_decode_step(
            ctypes.byref(self._plan), row(*tokens), row(*slots), row(*positions), B,
            logits.data_ptr(), router_logits.data_ptr(), experts.data_ptr(), gates.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise MemoryError(f"decode step: no memory for the working buffers of {B} rows")
        for moe, r, e, g in zip(self._moes, router_logits, experts, gates):
            moe.last_routing = Routing(r, e, g)
        return logits


def _require(ok: bool, why: str) -> None:
    if not ok:
        raise Unsupported(why)
