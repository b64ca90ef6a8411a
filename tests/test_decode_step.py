"""The one-call decode step (llama4.engine.step, kernels.c llama4_decode_step) against its slow
twin, the model's forward through the same engine cache.

Float32 and bfloat16 models (the step's scope), random with a large init std (attention far from
uniform, so a wrong mask, position or cache entry shows), router biases nonzero (the choice and
the gate then differ). In float32 the two paths differ only by rounding (cos, sin, sigmoid,
log1p from libm instead of torch's vectorised versions): logits agree to 1e-4. In bfloat16 the
step rounds wherever the forward rounds (here the two agree to the bit; the tolerance allows a
rounding that falls the other way on another machine's libm).
"""

from __future__ import annotations

import pytest
import torch
from test_engine import CHUNK, CONFIGS, make_model, prompt_of, tiny
from torch import nn

from llama4 import kernels
from llama4.config import MoEConfig
from llama4.engine import Engine
from llama4.engine.cache import KVCache
from llama4.model.layers import Linear, RMSNorm
from llama4.model.moe import Router

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not kernels.available(), reason="llama4's kernels could not be built here"),
]

STEP_CONFIGS = {
    **CONFIGS,
    # Sizes that are no multiple of a vector: tails in every kernel; three of five experts.
    "odd-sizes-top3": tiny(
        dim=40,
        n_heads=4,
        n_kv_heads=1,
        head_dim=10,
        dense_hidden_dim=20,
        moe=MoEConfig(num_experts=5, hidden_dim=13, top_k=3),
    ),  # fmt: skip
}


def float_model(cfg, seed: int = 0, dtype: torch.dtype = torch.float32):
    model = make_model(cfg, seed).float()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Router):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
            if isinstance(m, RMSNorm):  # not all ones: a step ignoring norm weights must fail
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
    return model.to(dtype)


TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def no_forward(*args, **kwargs):
    raise AssertionError("the decode step ran the model's forward")


@torch.inference_mode()
def run_both(model, prompts, slots, n, *, fast_only_step=True, between=None, max_len=80):
    """Greedy decoding driven by the twin's tokens through a one-call engine and a model-forward
    engine; returns both engines and the largest logit difference."""
    fast = Engine(model, slots=max(slots) + 1, max_len=max_len)
    slow = Engine(model, slots=max(slots) + 1, max_len=max_len, one_call_decode=False)
    assert fast._one_call is not None and slow._one_call is None
    lf, ls = fast.prefill(slots, prompts), slow.prefill(slots, prompts)
    if fast_only_step:
        fast._hidden = no_forward
    worst = 0.0
    for i in range(n):
        if between is not None:
            between(i)
        tokens = ls.argmax(-1).tolist()
        assert lf.argmax(-1).tolist() == tokens, f"step {i}"
        lf, ls = fast.decode(slots, tokens), slow.decode(slots, tokens)
        torch.testing.assert_close(lf, ls, **TOLERANCE[model.output.weight.dtype])
        worst = max(worst, float((lf - ls).abs().max()))
    return fast, slow, worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(STEP_CONFIGS))
def test_one_call_step_equals_the_model(name, dtype):
    model = float_model(STEP_CONFIGS[name], dtype=dtype)
    # Rows of different lengths on shuffled slots; 41 steps cross several chunk boundaries, with
    # rows at different offsets inside their chunks.
    prompts = [prompt_of(n) for n in (CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 2 * CHUNK + 1, 3)]
    slots = [5, 0, 2, 6, 1, 4]
    fast, slow, _ = run_both(model, prompts, slots, 41)
    for a, b in (
        (fast.cache.gk, slow.cache.gk),
        (fast.cache.gv, slow.cache.gv),
        (fast.cache.lk, slow.cache.lk),
    ):
        torch.testing.assert_close(a[:, slots], b[:, slots], **TOLERANCE[dtype])
    assert fast.cache.lengths == slow.cache.lengths and fast.history == slow.history
    # The routing each MoE layer reports (load statistics) is the step's.
    with torch.inference_mode():
        fast.decode(slots, [1] * len(slots))
        moes = [m for m in model.modules() if hasattr(m, "last_routing")]
        got = [
            [t.clone() for t in (m.last_routing.logits, m.last_routing.experts, m.last_routing.gates)]
            for m in moes
        ]
        slow.decode(slots, [1] * len(slots))
        for (logits, experts, gates), m in zip(got, moes):
            torch.testing.assert_close(logits, m.last_routing.logits, **TOLERANCE[dtype])
            assert torch.equal(experts, m.last_routing.experts)
            torch.testing.assert_close(gates, m.last_routing.gates, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_one_call_step_on_two_threads(dtype):
    """Products and attention large enough to split over the kernels' thread pool."""
    torch.set_num_threads(2)  # the fixture restores it
    cfg = tiny(
        dim=256, n_heads=8, n_kv_heads=2, head_dim=32, vocab_size=700, dense_hidden_dim=512,
        moe=MoEConfig(num_experts=4, hidden_dim=384, top_k=2, interleave_step=2),
    )  # fmt: skip
    model = float_model(cfg, dtype=dtype)
    prompts = [prompt_of(n, vocab=700) for n in (5, 12, 30)]
    run_both(model, prompts, [2, 0, 1], 12)


def test_one_call_step_steps_aside():
    """Hooks, replaced weights and disabled kernels take the model's forward; in-place changes
    to the weights reach the step."""
    model = float_model(CONFIGS["moe-top2-no-qknorm-dense-interleaved"])
    calls = []
    prompts = [prompt_of(9), prompt_of(4)]

    def hook(*args):
        calls.append(1)

    def between(i):
        layer = model.layers[1]
        if i == 2:
            handle = layer.feed_forward.register_forward_hook(hook)  # noqa: F841 - removed at 3
            between.handle = handle
        if i == 3:
            between.handle.remove()
        if i == 5:
            layer.attention.o_proj.weight.mul_(1.5)  # in place: the step reads the new values
        if i == 7:
            with torch.no_grad():
                layer.attention.o_proj.weight = nn.Parameter(layer.attention.o_proj.weight * 0.5)

    fast, _, _ = run_both(model, prompts, [0, 1], 10, fast_only_step=False, between=between)
    assert calls == [1, 1]  # the hook ran on the step it was registered for, in both engines
    assert fast._one_call.current() and fast._one_call.usable()  # planned again for the replaced weight
    with kernels.disabled():
        assert not fast._one_call.usable()


def test_one_call_step_scope():
    """Only float32 and bfloat16 CPU models get a plan; the others decode through the model."""
    cfg = CONFIGS["moe-top1-qknorm"]
    assert Engine(make_model(cfg), slots=1, max_len=16)._one_call is None  # float64
    assert Engine(make_model(cfg).half(), slots=1, max_len=16)._one_call is None
    assert Engine(make_model(cfg).bfloat16(), slots=1, max_len=16)._one_call is not None
    assert Engine(make_model(cfg).float(), slots=1, max_len=16, one_call_decode=False)._one_call is None
    assert Engine(make_model(cfg).float(), slots=1, max_len=16)._one_call is not None


@pytest.mark.parametrize("one_call", [True, False])
def test_slots_outside_the_cache_are_refused(one_call):
    """A slot outside the cache is the caller's error, said as such, and changes nothing (the
    one-call step would otherwise write outside the cache for a negative one)."""
    model = float_model(CONFIGS["moe-top1-qknorm"])
    engine = Engine(model, slots=2, max_len=32, one_call_decode=one_call)
    with torch.inference_mode():
        engine.prefill([0, 1], [prompt_of(5), prompt_of(3)])
        before = [t.clone() for t in (engine.cache.gk, engine.cache.lk)]
        for slots in ([-1], [2], [0, -2]):
            with pytest.raises(ValueError, match="slots 0..1"):
                engine.decode(slots, [1] * len(slots))
        with pytest.raises(ValueError, match="slots 0..1"):
            engine.prefill([-1], [[1, 2]])
    assert engine.cache.lengths == [5, 3] and [len(h) for h in engine.history] == [5, 3]
    assert all(torch.equal(a, b) for a, b in zip(before, (engine.cache.gk, engine.cache.lk)))


def _cast_round_trip(model, engine):
    model.norm.double().to(model.output.weight.dtype)  # same Parameter, new memory


def _dense(model):
    return next(layer.feed_forward for layer in model.layers if not hasattr(layer.feed_forward, "router"))


def _replace(parent, name, module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    setattr(parent, name, module.to(next(parent.parameters()).dtype))


CHANGES = {
    "cast round trip": _cast_round_trip,
    "o_proj replaced": lambda m, e: _replace(m.layers[0].attention, "o_proj", Linear(32, 32)),
    "head replaced": lambda m, e: _replace(m, "output", Linear(32, 97)),
    "final norm replaced": lambda m, e: _replace(m, "norm", RMSNorm(32, 1e-5)),
    "dense FFN down replaced": lambda m, e: _replace(_dense(m), "down_proj", Linear(48, 32)),
    "top_k changed": lambda m, e: [setattr(ff, "top_k", 1) or setattr(ff.router, "top_k", 1) for ff in
                                   (layer.feed_forward for layer in m.layers) if hasattr(ff, "router")],
    "eps changed": lambda m, e: setattr(m.norm, "eps", 0.5),
    "weights assigned": lambda m, e: m.load_state_dict(
        {k: v.clone() * 1.01 for k, v in m.state_dict().items()}, assign=True
    ),
    "cache replaced": lambda m, e: setattr(e, "cache", KVCache(m.config.text, slots=2, max_len=80, dtype=e.cache.gk.dtype)),
}  # fmt: skip


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_changed_model_is_planned_again_or_decoded_by_its_forward(change):
    """After any change the plan does not describe, a step either runs a fresh plan or the
    model's forward, never the stale plan: logits stay the forward's."""
    model = float_model(CONFIGS["moe-top2-no-qknorm-dense-interleaved"])
    fast = Engine(model, slots=2, max_len=80)
    slow = Engine(model, slots=2, max_len=80, one_call_decode=False)
    prompts, slots = [prompt_of(9), prompt_of(4)], [0, 1]
    with torch.inference_mode():
        fast.prefill(slots, prompts), slow.prefill(slots, prompts)
        fast.decode(slots, [3, 4]), slow.decode(slots, [3, 4])
    plan = fast._one_call
    assert plan.current()
    with torch.no_grad():
        CHANGES[change](model, fast)
        if change == "cache replaced":  # both engines start again on their new caches
            slow.cache = KVCache(model.config.text, slots=2, max_len=80, dtype=slow.cache.gk.dtype)
            fast.history, slow.history = [[], []], [[], []]
    assert not (plan.cache is fast.cache and plan.current())
    with torch.inference_mode():
        if change == "cache replaced":
            fast.prefill(slots, prompts), slow.prefill(slots, prompts)
        for tokens in ([5, 6], [7, 8]):
            torch.testing.assert_close(
                fast.decode(slots, tokens), slow.decode(slots, tokens), rtol=1e-4, atol=1e-4
            )
    assert fast._one_call is not plan
    if change == "weights assigned":  # no longer fused: the forward from now on
        assert fast._one_call is None


def test_a_model_with_layers_removed_gets_no_plan():
    model = float_model(CONFIGS["moe-top1-qknorm"])
    del model.layers[-1]
    assert Engine(model, slots=1, max_len=16)._one_call is None


@pytest.mark.parametrize("one_call", [True, False])
def test_tokens_and_slots_must_pair_up(one_call):
    model = float_model(CONFIGS["moe-top1-qknorm"])
    engine = Engine(model, slots=2, max_len=32, one_call_decode=one_call)
    with torch.inference_mode():
        engine.prefill([0, 1], [prompt_of(5), prompt_of(3)])
        with pytest.raises(ValueError, match="2 tokens for 1 slots"):
            engine.decode([0], [1, 2])
    assert engine.cache.lengths == [5, 3]


def test_sixteen_rows_in_a_cache_shorter_than_a_chunk():
    """The most rows a step takes, local buffers of max_len < chunk positions."""
    model = float_model(tiny(moe=MoEConfig(num_experts=4, hidden_dim=24, top_k=2)))
    prompts = [prompt_of(1 + i % 4, seed=i) for i in range(16)]
    fast, slow, _ = run_both(model, prompts, list(range(16))[::-1], 2, max_len=6)
    assert fast.cache.lk.shape[3] == 6 < CHUNK
