"""Each inference fast path against its slow, obvious twin.

- `layers.linear` (llama4's kernel or oneDNN for few-row products on CPU) == F.linear
  (the compiled kernels themselves: tests/test_kernels.py)
- `attention.decode_attention` (one query per row, two matmuls) == SDPA
- `layers.rms_norm` (torch's fused kernel for float32) == the formula
- `MoE._forward_few` (loop over chosen experts) == grouped dispatch == dense
- `prepare_for_inference` (fused q/k/v and gate/up, transposed experts, huge pages): same
  logits, same state_dict, same Parameter objects; training, LoRA, torch.compile and weights replaced after
  it ran take the separate projections; preparing again re-fuses.
"""

from __future__ import annotations

import dataclasses
import mmap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama4.config import ModelConfig, MoEConfig, TextConfig
from llama4.engine import Engine, SamplingParams
from llama4.model import moe as moe_module
from llama4.model.attention import decode_attention
from llama4.model.inference import prepare_for_inference
from llama4.model.layers import linear, rms_norm
from llama4.model.transformer import Transformer
from llama4.train.lora import apply_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("rows", [(1, 64), (8, 64), (2, 3, 64), (40, 64)])
def test_linear_equals_f_linear(rows):
    w = torch.randn(96, 64)
    x = torch.randn(*rows)
    with torch.inference_mode():
        assert rel(linear(x, w), F.linear(x, w)) <= 1e-6
        assert rel(linear(x, w.t().contiguous().t()), F.linear(x, w)) <= 1e-6  # non-contiguous weight
    assert linear(x, w).requires_grad is False
    wg = w.clone().requires_grad_()
    linear(x, wg).sum().backward()  # with autograd on it is plain F.linear
    assert torch.allclose(wg.grad, x.reshape(-1, 64).sum(0).expand(96, 64), atol=1e-4)


@pytest.mark.parametrize("B,H,K,S", [(1, 8, 2, 40), (3, 4, 4, 17), (2, 6, 1, 5)])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_equals_sdpa(B, H, K, S, masked):
    torch.manual_seed(0)
    q = torch.randn(B, H, 1, 16)
    k, v = torch.randn(B, K, S, 16), torch.randn(B, K, S, 16)
    mask = None
    if masked:  # each row attends to its own prefix of the keys, as rows of different lengths do
        lengths = torch.randint(1, S + 1, (B,))
        mask = (torch.arange(S) < lengths[:, None])[:, None, None]  # (B, 1, 1, S)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert rel(decode_attention(q, k, v, mask), ref) <= 1e-6


def test_rms_norm_equals_the_formula():
    x, w = torch.randn(4, 5, 32), torch.randn(32)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    assert rel(rms_norm(x, 1e-5, w), ref) <= 1e-6
    assert rel(rms_norm(x, 1e-5), ref / w) <= 1e-5
    assert rel(rms_norm(x.bfloat16(), 1e-5, w.bfloat16()).float(), ref) <= 2e-2


def make_moe(top_k: int) -> moe_module.MoE:
    cfg = TextConfig(dim=32, n_layers=1, moe=MoEConfig(num_experts=6, top_k=top_k, hidden_dim=40))
    torch.manual_seed(top_k)
    m = moe_module.MoE(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return m


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("n", [1, 5, 30])
def test_few_token_moe_equals_grouped_and_dense(top_k, n, monkeypatch):
    m = make_moe(top_k)
    x = torch.randn(n, 32)
    with torch.inference_mode():
        few = m(x)
        assert n * top_k <= moe_module.FEW_TOKENS  # the loop path ran
        dense = m.forward_dense(x)
        monkeypatch.setattr(moe_module, "FEW_TOKENS", 0)
        grouped = m(x)
    assert rel(few, dense) <= 1e-6 and rel(grouped, dense) <= 1e-6
    prepare_for_inference(m)  # experts stored transposed: same values, both paths
    with torch.inference_mode():
        assert rel(m(x), dense) <= 1e-6
        monkeypatch.setattr(moe_module, "FEW_TOKENS", 64)
        assert rel(m(x), dense) <= 1e-6


def small_model(seed: int = 0, **overrides) -> Transformer:
    t = TextConfig(
        vocab_size=300,
        dim=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        dense_hidden_dim=96,
        attention_chunk_size=8,
        floor_scale=4,
        max_seq_len=128,
        moe=MoEConfig(num_experts=4, top_k=1, hidden_dim=48, interleave_step=2),
    )
    t = dataclasses.replace(t, **overrides)
    model = Transformer(ModelConfig(text=t))
    model.init_weights(seed=seed)
    return model.eval()


def test_prepare_keeps_values_and_state_dict():
    model = small_model()
    tokens = torch.randint(0, 300, (2, 30))
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        before = model(tokens)
    prepare_for_inference(model)
    prepare_for_inference(model)  # idempotent
    assert model.layers[0].attention.fused_qkv.valid()
    sd = model.state_dict()
    assert sd.keys() == before_sd.keys()
    assert all(torch.equal(sd[k], before_sd[k]) for k in sd)
    with torch.inference_mode():
        assert rel(model(tokens), before) <= 1e-5  # prefill: grouped experts, fused products
        # Cached decoding after prepare == recompute without cache.
        engine = Engine(model, slots=1, max_len=64)
        new = engine.generate([tokens[0, :11].tolist()], SamplingParams(max_tokens=12))[0].tokens
        seq = tokens[0, :11].tolist()
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert new == seq[11:]
    # In-place updates reach the fused weight (the projections are views of it).
    with torch.no_grad():
        model.layers[0].attention.k_proj.weight.mul_(2)
    fused = model.layers[0].attention.fused_qkv
    n_q = fused.sizes[0]
    assert torch.equal(fused.weight[n_q : n_q + fused.sizes[1]], model.layers[0].attention.k_proj.weight)


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no madvise(MADV_HUGEPAGE) on this system")
def test_prepare_moves_weights_to_huge_pages(monkeypatch):
    """Storages of a huge page and more move to huge-page memory (here a page is 4 KiB, so the
    small model's weights count): same Parameter objects and values, storages shared before are
    shared after, the fused views still valid, the same logits; a second prepare moves nothing;
    training updates the moved weights in place."""
    from llama4.model import inference

    monkeypatch.setattr(inference, "HUGE_PAGES", True)
    monkeypatch.setattr(inference, "HUGE_PAGE", 4096)
    model = small_model(seed=5)
    model.output.weight = nn.Parameter(model.tok_embeddings.weight.data)  # tied by storage
    params = dict(model.named_parameters())
    values = {k: v.clone() for k, v in params.items()}
    tokens = torch.randint(0, 300, (2, 20))
    with torch.inference_mode():
        before = model(tokens)
    prepare_for_inference(model)
    moved = 0
    for name, p in model.named_parameters():
        assert p is params[name] and torch.equal(p, values[name]), name
        st = p.untyped_storage()
        if st.nbytes() >= 4096:
            assert st in inference._on_huge_pages and st.data_ptr() % 4096 == 0, name
            moved += 1
    assert moved >= 10
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert model.layers[0].attention.fused_qkv.valid()
    where = {name: p.data_ptr() for name, p in model.named_parameters()}
    prepare_for_inference(model)
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == where
    with torch.inference_mode():
        assert rel(model(tokens), before) <= 1e-5  # fused products sum in another order
    with torch.no_grad():
        model.tok_embeddings.weight.add_(1.0)
    assert torch.equal(model.output.weight, values["output.weight"] + 1.0)


def _vm_flags(address: int) -> list[str]:
    """The kernel's flags for the mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no madvise(MADV_HUGEPAGE) on this system")
def test_huge_empty_starts_on_a_huge_page(monkeypatch):
    from llama4.model import inference

    monkeypatch.setattr(inference, "HUGE_PAGES", True)
    t = inference.huge_empty((3, 1024, 1024), torch.float32)  # 12 MiB
    assert t.shape == (3, 1024, 1024) and t.is_contiguous()
    assert t.data_ptr() % inference.HUGE_PAGE == 0
    # The mapping asks for huge pages (whether the kernel finds free ones is up to it).
    assert "hg" in _vm_flags(t.data_ptr()), "MADV_HUGEPAGE not set on the mapping"
    assert t.untyped_storage().nbytes() == 12 << 20  # no slack in the storage (saved as is)
    t.fill_(2.0)
    assert t.sum().item() == 2.0 * t.numel()
    small = inference.huge_empty((10,), torch.float32)  # below a page: plain memory
    assert small.untyped_storage() not in inference._on_huge_pages
    monkeypatch.setattr(inference, "HUGE_PAGES", False)  # not offered: plain memory
    assert (
        inference.huge_empty((3, 1024, 1024), torch.float32).untyped_storage() not in inference._on_huge_pages
    )


def test_engines_built_on_several_threads_prepare_the_model_once(monkeypatch):
    # Each Engine prepares its model, which moves weights; three threads starting on one fresh
    # model must take turns (at once, one read storage another had freed: corrupted weights).
    import threading
    import time

    from llama4.model import inference

    inside, most = [0], [0]
    prepare = inference._prepare

    def slow_prepare(model):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.05)  # long enough for the other threads to arrive
        try:
            return prepare(model)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(inference, "_prepare", slow_prepare)
    model = small_model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    threads = [threading.Thread(target=prepare_for_inference, args=(model,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_prepare_steps_aside_for_lora_and_replaced_weights():
    model = small_model(seed=1)
    tokens = torch.randint(0, 300, (1, 20))
    prepare_for_inference(model)
    apply_lora(model, rank=2, alpha=4.0, targets=["q_proj", "gate_proj"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # LoRA B starts at zero: make the adapters matter
                p.normal_(std=0.5)
    ref = small_model(seed=1)
    apply_lora(ref, rank=2, alpha=4.0, targets=["q_proj", "gate_proj"])
    ref.load_state_dict(model.state_dict())
    with torch.inference_mode():
        assert model.layers[0].attention.fused_qkv.current() is None
        assert rel(model(tokens), ref(tokens)) <= 1e-5
        assert rel(model(tokens), small_model(seed=1)(tokens)) > 1e-3  # the adapters did change it
    m2 = small_model(seed=2)
    prepare_for_inference(m2)
    m2 = m2.double()  # replaces every parameter: the fused copies are stale and must not be used
    with torch.inference_mode():
        assert m2.layers[0].attention.fused_qkv.current() is None
        ref64 = m2(tokens)
        assert ref64.dtype == torch.float64
        prepare_for_inference(m2)  # fuses again, in float64
        assert m2.layers[0].attention.fused_qkv.current().dtype == torch.float64
        assert rel(m2(tokens), ref64) <= 1e-12


def test_training_after_prepare_updates_the_same_parameters():
    model = small_model(seed=3)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prepare_for_inference(model)  # e.g. an Engine was made for this model, then training goes on
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    model.train()
    tokens = torch.randint(0, 300, (2, 16))
    loss = model(tokens).logsumexp(-1).mean()
    loss.backward()
    attn, ffn = model.layers[1].attention, model.layers[1].feed_forward.shared_expert
    for p in (attn.q_proj.weight, attn.v_proj.weight, ffn.gate_proj.weight, ffn.up_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    before = attn.fused_qkv.weight.clone()
    opt.step()  # the optimizer's parameters are the model's: the fused matrix follows
    assert not torch.equal(attn.fused_qkv.weight, before)
    assert torch.equal(attn.fused_qkv.weight[: attn.fused_qkv.sizes[0]], attn.q_proj.weight)


def test_prepared_model_traces_without_graph_breaks():
    """torch.compile sees the plain projections and no host reads: one graph for the forward.

    (Dense: fp32 MoE layers cannot be traced on CPU, where torch's grouped GEMM is bf16-only
    under compile; the engine then runs eagerly, with a warning.)"""
    model = prepare_for_inference(small_model(seed=4, moe_layers=()))
    tokens = torch.randint(0, 300, (1, 12))
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model.hidden)(tokens)
    assert explanation.graph_break_count == 0, explanation.break_reasons
