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
    for m in model.modules():
        if isinstance(m, Router):
            m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.to(dtype)


TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def no_forward(*args, **kwargs):
    raise AssertionError("the decode step ran the model's forward")


@torch.inference_mode()
def run_both(model, prompts, slots, n, *, fast_only_step=True, between=None):
    """Greedy decoding driven by the twin's tokens through a one-call engine and a model-forward
    engine; returns both engines and the largest logit difference."""
    fast = Engine(model, slots=max(slots) + 1, max_len=80)
    slow = Engine(model, slots=max(slots) + 1, max_len=80, one_call_decode=False)
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
        got = [(m.last_routing.experts.clone(), m.last_routing.gates.clone()) for m in moes]
        slow.decode(slots, [1] * len(slots))
        for (experts, gates), m in zip(got, moes):
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
    assert not fast._one_call.usable()  # the replaced weight
    fresh = Engine(model, slots=2, max_len=80)
    assert fresh._one_call is not None and fresh._one_call.usable()
    with kernels.disabled():
        assert not fresh._one_call.usable()


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
