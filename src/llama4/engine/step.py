"""A decode step in one call: embedding, every layer and the output head in llama4's C kernels.

Run through the model's forward, a batch-1 step of benchmarks/decode.py's model makes 57 products
that stream the weights (16.4 ms) and spends ~7 ms more between them: Python, module calls and
~200 small torch ops (norms, RoPE, cache writes, routing, residual adds). `DecodeStep` hands the
whole step to ``llama4_decode_step`` (kernels.c), which computes the same thing with the same
kernels and nothing between them.

Scope: CPU; float32 weights and cache, or bfloat16 ones (rounded wherever the forward's ops
round: the two give the same bits in the tests); the model's own modules as
``prepare_for_inference`` left them: no hooks, no parametrizations (LoRA), no weights replaced
since. The plan points at the weights' memory, so every step first checks that it still describes
the model (`DecodeStep.current`: no weight or module replaced or cast, no attribute it reads
changed, the same cache); where not, the engine plans again, or runs the model's forward where it
cannot. The forward is this step's slow twin: tests/test_decode_step.py holds the two to the same
logits, tokens, cache contents and routing.

Where the two may part: exact ties among router logits (degenerate weights) go to the lower
expert id here, while torch.topk leaves their order open; and in bfloat16, the forward itself
rounds differently where it leaves llama4's kernels (its grouped MoE path past 64 token-expert
pairs, torch's RoPE past 65,536 elements).
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
    where the step does not apply); call with the tokens, slots and positions of a decode step.

    What the plan records, so that `current` can tell whether it still describes the model: every
    module on the way to a weight (each still its parent's child), every weight (still its
    module's, at the same address, its storage kept alive so that no other tensor can take that
    address), the fused weights (still valid), the attributes the step reads (eps, flags, top-k),
    and the cache's tensors."""

    def __init__(self, model: Transformer, cache: KVCache) -> None:
        lib = kernels._library()
        if lib is None:
            raise Unsupported("llama4's kernels are unavailable")
        self._lib = lib
        self.cache = cache
        t = model.config.text
        self._same: list[tuple[dict, str, object]] = []  # container[name] is object
        self._ptrs: list[tuple[torch.Tensor, int]] = []  # tensor.data_ptr() == address
        self._values: list[tuple[object, str, object]] = []  # getattr(object, name) == value
        self._fusions: list = []  # each still valid()
        self._modules: list[nn.Module] = [model]  # whose hooks the step would skip
        self._keep: list = []  # the storages the plan points into
        _require(type(model) is Transformer, "not llama4's Transformer")
        # One dtype for the weights and the cache: float32, or bfloat16 (activations rounded as the
        # forward rounds them).
        self.dtype = model.tok_embeddings.weight.dtype
        _require(self.dtype in (torch.float32, torch.bfloat16), f"weights are {self.dtype}")
        _require(cache.gk.dtype == self.dtype and cache.device.type == "cpu", "cache dtype or device")
        _require(t.head_dim % 2 == 0 and t.n_heads % t.n_kv_heads == 0, "head layout")
        self.t, self.vocab = t, t.vocab_size
        self._moes: list[MoE] = []
        blocks = self._child(model, "layers", nn.ModuleList)
        _require(len(blocks) == t.n_layers, f"{len(blocks)} layers, the config says {t.n_layers}")
        layers = (_Layer * t.n_layers)()
        for i in range(t.n_layers):
            block = self._child(blocks, str(i), Block)
            self._attention(layers[i], block, cache, i)
            self._feed_forward(layers[i], block)
        self.n_experts, self.top_k = t.moe.num_experts, t.moe.top_k
        emb = self._child(model, "tok_embeddings", nn.Embedding)
        head = self._child(model, "output", Linear)
        self._plan = _Model(
            t.n_layers, t.dim, t.n_heads, t.n_kv_heads, t.head_dim, t.vocab_size, t.attention_chunk_size,
            self.dtype == torch.bfloat16, t.norm_eps, t.attn_scale, t.floor_scale,
            self._weight(emb, "weight", (t.vocab_size, t.dim)), emb.weight.stride(0),
            self._norm(model, "norm"), self._weight(head, "weight", (t.vocab_size, t.dim)), head.weight.stride(0),
            self._inv_freq(model), layers,
        )  # fmt: skip
        self._layers = layers  # the C plan points at this array: it lives as long as the plan

    @classmethod
    def build(cls, model: Transformer, cache: KVCache) -> DecodeStep | None:
        try:
            return cls(model, cache)
        except Unsupported:
            return None

    # ----- the plan -----------------------------------------------------------------------------

    def _child(self, parent: nn.Module, name: str, cls: type) -> nn.Module:
        """parent's child `name`, exactly of class `cls` (a subclass may compute otherwise), recorded."""
        child = parent._modules.get(name)
        _require(type(child) is cls, f"{type(parent).__name__}.{name} is not a {cls.__name__}")
        self._same.append((parent._modules, name, child))
        self._modules.append(child)
        return child

    def _value(self, obj: object, name: str, want: object = None) -> object:
        """obj.name (equal to `want` if given), recorded."""
        value = getattr(obj, name)
        _require(want is None or value == want, f"{type(obj).__name__}.{name} = {value}, expected {want}")
        self._values.append((obj, name, value))
        return value

    def _hold(self, w: torch.Tensor) -> None:
        self._ptrs.append((w, w.data_ptr()))
        self._keep.append(w.untyped_storage())

    def _weight(
        self, m: nn.Module, name: str, shape: tuple, *, buffer: bool = False, unit_dim: int = -1, dtypes=()
    ) -> int:
        """Address of m's parameter (or buffer) `name`, recorded: of `shape`, the plan's dtype (or
        one of `dtypes`) on CPU, with stride 1 along `unit_dim` (the rows the kernels stream)."""
        container = m._buffers if buffer else m._parameters
        w = container.get(name)
        what = f"{type(m).__name__}.{name}"
        _require(w is not None and tuple(w.shape) == shape, f"{what} is not of shape {shape}")
        ok = w.dtype in (dtypes or (self.dtype,)) and w.device.type == "cpu"
        _require(ok, f"{what} is {w.dtype} on {w.device}")
        _require(w.stride(unit_dim) == 1, f"{what} has strides {w.stride()}")
        self._same.append((container, name, w))
        self._hold(w)
        return w.data_ptr()

    def _inv_freq(self, model: Transformer) -> int:
        """RoPE's frequencies, in float32 as the forward computes the angles (a float32 copy when
        the buffer went to bfloat16 with the model; it is computed, never trained)."""
        half = (self.t.head_dim // 2,)
        self._weight(model, "rope_inv_freq", half, buffer=True, dtypes=(torch.float32, torch.bfloat16))
        freq = model.rope_inv_freq.float().contiguous()
        self._keep.append(freq)
        return freq.data_ptr()

    def _norm(self, parent: nn.Module, name: str) -> int:
        norm = self._child(parent, name, RMSNorm)
        self._value(norm, "eps", self.t.norm_eps)
        return self._weight(norm, "weight", (self.t.dim,))

    def _linear(self, parent: nn.Module, name: str, shape: tuple) -> tuple[int, int]:
        lin = self._child(parent, name, Linear)
        return self._weight(lin, "weight", shape), lin.weight.stride(0)

    def _fused(self, m: nn.Module, attr: str, names: Sequence[str], outs: Sequence[int]) -> tuple[int, int]:
        """The fused weight `attr` of m (prepare_for_inference's; valid), and its Linears `names`
        of `outs` rows each, recorded."""
        for name, n in zip(names, outs):
            self._linear(m, name, (n, self.t.dim))
        fused = self._value(m, attr)
        _require(fused is not None and fused.valid(), f"{type(m).__name__}.{attr} not fused")
        self._fusions.append(fused)
        w = fused.weight
        _require(w.dtype == self.dtype and w.stride(-1) == 1, "fused weight layout")
        _require(tuple(w.shape) == (sum(outs), self.t.dim), "fused weight shape")
        self._hold(w)
        return w.data_ptr(), w.stride(0)

    def _attention(self, L: _Layer, block: Block, cache: KVCache, i: int) -> None:
        t = self.t
        H, K, Dh = t.n_heads, t.n_kv_heads, t.head_dim
        L.attention_norm = self._norm(block, "attention_norm")
        a = self._child(block, "attention", Attention)
        for name, want in (("n_heads", H), ("n_kv_heads", K), ("head_dim", Dh), ("layer_id", i)):
            self._value(a, name, want)
        for name, want in (
            ("norm_eps", t.norm_eps),
            ("attn_scale", t.attn_scale),
            ("floor_scale", t.floor_scale),
        ):
            self._value(a, name, want)
        L.is_global = self._value(a, "is_global", cache.is_global[i])
        L.qk_norm, L.temperature_tuning = self._value(a, "use_qk_norm"), self._value(a, "temperature_tuning")
        L.qkv, L.ld_qkv = self._fused(
            a, "fused_qkv", ("q_proj", "k_proj", "v_proj"), (H * Dh, K * Dh, K * Dh)
        )
        L.o, L.ld_o = self._linear(a, "o_proj", (t.dim, H * Dh))
        j = cache.index[i]
        names = ("gk", "gv") if L.is_global else ("lk", "lv")
        for name in names:
            self._same.append((cache.__dict__, name, getattr(cache, name)))
        k, v = (getattr(cache, name)[j] for name in names)
        _require(k.is_contiguous() and v.is_contiguous(), "cache layout")
        self._hold(k)
        self._hold(v)
        L.k_cache, L.v_cache, L.capacity = k.data_ptr(), v.data_ptr(), k.shape[2]

    def _feed_forward(self, L: _Layer, block: Block) -> None:
        t = self.t
        L.ffn_norm = self._norm(block, "ffn_norm")
        ff = block._modules.get("feed_forward")
        if type(ff) is MoE:
            self._child(block, "feed_forward", MoE)
            self._moes.append(ff)
            E, k, F = self._value(ff, "num_experts", t.moe.num_experts), t.moe.top_k, t.moe.hidden_dim
            L.n_experts, L.top_k = E, self._value(ff, "top_k", k)
            _require(0 < k <= E, "top_k")
            router = self._child(ff, "router", Router)
            self._value(router, "top_k", k)
            L.router, L.ld_router = self._weight(router, "weight", (E, t.dim)), router.weight.stride(0)
            bias_dtypes = (torch.float32, torch.bfloat16)
            L.router_bias = self._weight(router, "bias", (E,), buffer=True, dtypes=bias_dtypes)
            L.router_bias_bf16 = router.bias.dtype == torch.bfloat16
            # Stored output-major (E, D, 2F) and (E, F, D) views: expert e's rows are contiguous.
            experts = self._child(ff, "experts", Experts)
            gu, down = experts.gate_up_proj, experts.down_proj
            L.expert_gate_up = self._weight(experts, "gate_up_proj", (E, t.dim, 2 * F), unit_dim=1)
            L.expert_gate_up_stride, L.expert_ld_gate_up = gu.stride(0), gu.stride(2)
            L.expert_down = self._weight(experts, "down_proj", (E, F, t.dim), unit_dim=1)
            L.expert_down_stride, L.expert_ld_down = down.stride(0), down.stride(2)
            L.expert_hidden = F
            ff = self._child(ff, "shared_expert", FeedForward)
            hidden = F
        else:
            ff = self._child(block, "feed_forward", FeedForward)
            hidden = t.dense_hidden_dim
        L.gate_up, L.ld_gate_up = self._fused(ff, "fused_gate_up", ("gate_proj", "up_proj"), (hidden, hidden))
        L.down, L.ld_down = self._linear(ff, "down_proj", (t.dim, hidden))
        L.hidden = hidden

    # ----- a step -------------------------------------------------------------------------------

    def current(self) -> bool:
        """Whether the plan still describes the model and cache it was made for (see the class)."""
        return (
            all(c.get(n) is o for c, n, o in self._same)
            and all(w.data_ptr() == p for w, p in self._ptrs)
            and all(getattr(o, n) == v for o, n, v in self._values)
            and all(f.valid() for f in self._fusions)
        )

    def usable(self) -> bool:
        """Whether a step of a `current` plan may run now: llama4's kernels on, and no forward hooks
        anywhere (the step would skip them)."""
        return (
            kernels.available()
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
            and not any(m._forward_hooks or m._forward_pre_hooks for m in self._modules)
        )

    def __call__(self, tokens: Sequence[int], slots: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Logits (B, V) float32 for one new token per slot at `positions`. Writes the cache and
        each MoE's ``last_routing``. The caller checks `current` and `usable`, and advances the
        slots' lengths."""
        B = len(tokens)
        cache = self.cache
        if not 0 < B == len(slots) == len(positions) == len(set(slots)):
            raise ValueError(f"{B} tokens for slots {list(slots)} at positions {list(positions)}")
        for tok, slot, pos in zip(tokens, slots, positions):  # the C code indexes with them
            if not (0 <= tok < self.vocab and 0 <= slot < cache.n_slots and 0 <= pos < cache.max_len):
                raise ValueError(
                    f"token {tok} in slot {slot} at position {pos} is outside the model or cache"
                )
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
