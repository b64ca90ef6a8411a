"""Sparse expert dispatch against its dense twin (every expert on every token)."""

from __future__ import annotations

import pytest
import torch

from llama4.config import MoEConfig, TextConfig
from llama4.model.moe import MoE


def make_moe(num_experts=8, top_k=1, dim=32, hidden=48, seed=0) -> MoE:
    cfg = TextConfig(
        dim=dim, n_layers=1, moe=MoEConfig(num_experts=num_experts, top_k=top_k, hidden_dim=hidden)
    )
    torch.manual_seed(seed)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return moe


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_equals_dense(top_k):
    moe = make_moe(top_k=top_k)
    x = torch.randn(3, 17, 32)
    with torch.no_grad():
        assert rel(moe(x), moe.forward_dense(x)) <= 1e-6


@pytest.mark.parametrize("dim, hidden", [(17, 48), (36, 33), (66, 34)])
def test_widths_grouped_gemm_cannot_take(dim, hidden):
    # torch._grouped_mm needs 16-byte row strides; other widths take the expert loop.
    moe = make_moe(top_k=2, dim=dim, hidden=hidden)
    x = torch.randn(2, 40, dim)  # 160 token-expert pairs: past the few-token path
    with torch.no_grad():
        assert rel(moe(x), moe.forward_dense(x)) <= 1e-6


def test_uneven_routing_with_empty_experts():
    moe = make_moe(num_experts=8)
    with torch.no_grad():
        # Steer every token to experts 2 and 5 only: six experts get no token at all.
        moe.router.weight.zero_()
        moe.router.weight[2] = 1.0
        moe.router.weight[5] = -1.0
        x = torch.randn(40, 32)
        out = moe(x)
        counts = torch.bincount(moe.last_routing.experts.flatten(), minlength=8)
        assert (counts == 0).sum() == 6 and counts.sum() == 40
        assert rel(out, moe.forward_dense(x)) <= 1e-6


def test_grouped_gemm_equals_expert_loop():
    moe = make_moe(num_experts=6, top_k=2)
    x = torch.randn(50, 32)
    counts = torch.tensor([0, 20, 30, 0, 45, 5])
    with torch.no_grad():
        assert (
            rel(
                moe.experts.forward_grouped(x.repeat(2, 1), counts),
                moe.experts.forward_loop(x.repeat(2, 1), counts),
            )
            <= 1e-6
        )


def test_gate_multiplies_expert_input_not_output():
    # SwiGLU is not linear: gating the output instead of the input is a different model.
    moe = make_moe(num_experts=2)
    x = torch.randn(10, 32)
    with torch.no_grad():
        out = moe(x)
        r = moe.last_routing
        shared = moe.shared_expert(x)
        e = r.experts[:, 0]
        gate_after = (
            torch.stack(
                [
                    moe.experts.forward_loop(x[i : i + 1], torch.bincount(e[i : i + 1], minlength=2))[0]
                    for i in range(10)
                ]
            )
            * r.gates
        )
        assert rel(out, shared + gate_after) > 1e-3


def test_balancing_bias_steers_choice_not_gate():
    moe = make_moe(num_experts=4)
    x = torch.randn(30, 32)
    with torch.no_grad():
        moe(x)
        before = moe.last_routing
        moe.router.bias[3] = 100.0  # every token now picks expert 3
        moe(x)
        after = moe.last_routing
    assert (after.experts == 3).all()
    assert torch.allclose(after.gates[:, 0], torch.sigmoid(before.logits[:, 3]))


def test_router_stays_float32_under_autocast():
    # The trainer's bf16 steps run under autocast, which would cast the router's product back
    # to bf16: its logits and gates must be those of float32.
    moe = make_moe(num_experts=6, top_k=2)
    x = torch.randn(100, 32)
    with torch.no_grad():
        plain = moe.router(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = moe.router(x)
    assert mixed.logits.dtype == mixed.gates.dtype == torch.float32
    assert torch.equal(mixed.logits, plain.logits) and torch.equal(mixed.experts, plain.experts)
