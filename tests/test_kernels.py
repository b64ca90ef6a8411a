"""llama4's compiled CPU kernels (llama4.kernels) against their slow twins (F.linear, F.rms_norm,
F.scaled_dot_product_attention, apply_rope); their thread pool under concurrent callers and
fork; reading ahead (what it reads, and never weights already freed); the engine's tokens with
them and without; the fallback when they cannot be built."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from llama4 import kernels
from llama4.config import ModelConfig, MoEConfig, TextConfig
from llama4.engine import Engine, SamplingParams
from llama4.model.layers import apply_rope, glu_linear, linear, rms_norm, rope_and_norm
from llama4.model.transformer import Transformer


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_kernels_build_on_a_machine_with_a_compiler():
    """Where a C compiler exists (CI has gcc) the kernels must be built and in use: otherwise every
    test below would silently test torch's path."""
    if not any(shutil.which(cc) for cc in (os.environ.get("CC") or "cc", "gcc", "clang")):
        pytest.skip("no C compiler on this machine: the fallback is tested below")
    assert kernels.available()
    assert list(kernels.cache_dir().glob("llama4-kernels-*.so"))


# Without a compiler these have nothing to test (the first test says whether one should exist).
needs_kernels = pytest.mark.skipif(not kernels.available(), reason="llama4's CPU kernels are not built here")


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(1, 1), (5, 100), (67, 133), (300, 64), (64, 1030), (301, 257)])
def test_few_rows_equals_f_linear(threads, dtype, n, k):
    """Every row count up to MAX_ROWS (the kernel takes rows in groups of 8 or 4 and W in blocks
    of 1-3 rows), widths with and without a vector tail, W rows fewer than threads, an odd
    number of W rows split over two threads; rows of x and W further apart than their width."""
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k + 5, generator=g).to(dtype)[:, :k]
    for m in range(1, kernels.MAX_ROWS + 1):
        x = torch.randn(m, k + 3, generator=g).to(dtype)[:, :k]
        y = kernels.few_rows(x, w)
        assert y.dtype == dtype
        # float32: sums in another order; bfloat16: float32 sums rounded to bfloat16 once, as torch does
        assert rel(y, F.linear(x.float(), w.float())) <= (1e-5 if dtype == torch.float32 else 4e-3), m


@needs_kernels
def test_few_rows_copies_what_it_cannot_stride_through():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 150, generator=g)
    x = torch.randn(2, 3, 300, generator=g)[..., ::2]  # columns not contiguous: copied
    assert kernels.supports(x, w)
    y = kernels.few_rows(x, w)
    assert y.shape == (2, 3, 40)
    assert rel(y, F.linear(x, w)) <= 1e-5


@needs_kernels
def test_few_rows_refuses_what_it_does_not_do():
    w = torch.randn(8, 32)
    with pytest.raises(ValueError, match=r"x has 31 features, weight \(8, 32\) expects 32"):
        kernels.few_rows(torch.randn(1, 31), w)
    assert not kernels.supports(torch.randn(kernels.MAX_ROWS + 1, 32), w)  # too many rows
    assert not kernels.supports(torch.randn(1, 32), w.half())
    assert not kernels.supports(torch.randn(1, 32), w.bfloat16())  # F.linear refuses mixed dtypes too
    assert not kernels.supports(torch.randn(1, 0), torch.randn(8, 0))
    assert not kernels.supports(torch.randn(1, 8), w.t())  # columns not contiguous
    with pytest.raises(ValueError, match="unsupported"):
        kernels.few_rows(torch.randn(kernels.MAX_ROWS + 1, 32), w)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(1, 1), (67, 133), (300, 64), (301, 1030)])
def test_few_rows_glu_equals_silu_gate_times_up(threads, dtype, n, k):
    """glu=True: x holds [gate | up] and the product takes silu(gate) * up (a SwiGLU's down
    projection), the same as forming it with torch first."""
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    for m in (1, 2, 3, 9, kernels.MAX_ROWS):
        h = torch.randn(m, 2 * k + 4, generator=g).to(dtype)[:, : 2 * k]  # rows apart by more than 2k
        gate, up = h.float().chunk(2, dim=-1)
        ref = F.linear((F.silu(gate) * up).to(dtype).float(), w.float())
        assert rel(kernels.few_rows(h, w, glu=True), ref) <= (1e-5 if dtype == torch.float32 else 1e-2), m
    with pytest.raises(ValueError, match=r"expects 2 x"):
        kernels.few_rows(torch.randn(1, k).to(dtype), w, glu=True)


@needs_kernels
def test_glu_activation_is_silu_to_the_last_bits():
    """The kernel's own vectorised exp, checked element by element (an identity weight returns
    silu(gate) * up itself) from far negative to far positive gates, vector tails included."""
    gate = torch.cat(
        [torch.linspace(-100, 100, 20001), torch.tensor([0.0, -0.0, 1e-30, 87.5, -87.5, 89.0, -89.0])]
    )
    g = torch.Generator().manual_seed(0)
    gate = gate[torch.randperm(gate.numel(), generator=g)]
    up = torch.rand(gate.numel(), generator=g) + 0.5
    for n in (gate.numel(), 37):  # 37: mostly the scalar tail
        out = kernels.few_rows(torch.cat([gate[:n], up[:n]])[None], torch.eye(n), glu=True)[0]
        ref = (F.silu(gate[:n].double()) * up[:n].double()).float()
        tiny = ref.abs() < 1e-30  # underflows: compare absolutely
        assert ((out - ref).abs() / ref.abs())[~tiny].max() <= 1e-6
        assert torch.all((out - ref)[tiny].abs() <= 1e-30)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,K,Dh", [(1, 4, 2, 16), (3, 8, 1, 20), (2, 6, 6, 128)])
@pytest.mark.parametrize("S", [1, 7, 300])
def test_decode_attention_equals_sdpa(threads, dtype, B, H, K, Dh, S):
    """One query per row against keys/values read as views of a larger cache (rows of the cache
    and positions beyond S skipped), without a mask, with one per row and with one for all rows.
    bfloat16: computed in float32 and rounded once, so it equals float32 SDPA on the same values
    rounded to bfloat16 (SDPA's own bfloat16 kernel also rounds some intermediates)."""
    g = torch.Generator().manual_seed(B * H * S + Dh)
    cache_k = torch.randn(B + 2, K, S + 5, Dh, generator=g).to(dtype)
    cache_v = torch.randn(B + 2, K, S + 5, Dh, generator=g).to(dtype)
    k, v = cache_k[1 : B + 1, :, :S], cache_v[1 : B + 1, :, :S]
    q = (
        torch.randn(B, 1, H, Dh, generator=g).to(dtype).transpose(1, 2)
    )  # (B, H, 1, Dh) as attention hands it over
    per_row = torch.rand(B, 1, 1, S, generator=g) < 0.6
    per_row[..., -1] = True  # every row attends to its own (last) position
    for mask in (None, per_row, per_row[:1]):
        assert kernels.decode_attention_supports(q, k, v, mask)
        out = kernels.decode_attention(q, k, v, mask, Dh**-0.5)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
        assert out.shape == ref.shape == (B, H, 1, Dh)
        assert out.dtype == dtype
        assert rel(out, ref) <= (1e-5 if dtype == torch.float32 else 4e-3)  # bf16: one rounding
        if dtype == torch.bfloat16:  # float32 sums in another order may cross a rounding boundary
            assert (out == ref.to(dtype)).float().mean() >= 0.97


@needs_kernels
def test_decode_attention_refuses_what_it_does_not_do():
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 5, 16)
    assert not kernels.decode_attention_supports(torch.randn(2, 4, 3, 16), k, k, None)  # 3 queries per row
    assert not kernels.decode_attention_supports(q, k.bfloat16(), k.bfloat16(), None)  # mixed dtypes
    assert not kernels.decode_attention_supports(q.half(), k.half(), k.half(), None)
    assert not kernels.decode_attention_supports(torch.randn(2, 3, 1, 16), k, k, None)  # 3 heads over 2
    assert not kernels.decode_attention_supports(
        q, k, k, torch.ones(2, 4, 1, 5, dtype=torch.bool)
    )  # per head
    assert not kernels.decode_attention_supports(q, k, k, torch.ones(2, 1, 1, 5))  # not boolean
    assert not kernels.decode_attention_supports(q, k[:, :, :0], k[:, :, :0], None)  # nothing to attend to
    with pytest.raises(ValueError, match="unsupported"):
        kernels.decode_attention(q, k, k.transpose(2, 3), None, 0.25)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,heads,Dh", [(1, 1, 10, 128), (8, 1, 3, 16), (2, 5, 4, 8), (1, 7, 2, 64)])
@pytest.mark.parametrize("norm", [False, True])
def test_rope_equals_apply_rope(dtype, B, T, heads, Dh, norm):
    """In place on the query/key columns of a fused projection's output (rows wider than the
    heads), as attention calls it; with and without the QK norm after it (torch's ops, kernels
    off, are the reference: for bfloat16 they round after the rotation and after the norm)."""
    g = torch.Generator().manual_seed(B * T * Dh)
    qkv = torch.randn(B, T, (heads + 3) * Dh, generator=g).to(dtype)
    x = qkv[..., : heads * Dh].unflatten(-1, (heads, Dh))
    angles = torch.randn(B, T, 1, Dh // 2, generator=g) * 50
    cos, sin = angles.cos(), angles.sin()
    with kernels.disabled():
        ref = rope_and_norm(x.clone(), cos, sin, 1e-5 if norm else None)
    rest = qkv[..., heads * Dh :].clone()
    assert kernels.rope_supports(x, cos, sin)
    out = kernels.rope_(x, cos, sin, 1e-5 if norm else None)
    assert out.data_ptr() == x.data_ptr()  # in place
    if dtype == torch.float32:
        assert rel(x, ref) <= 1e-5
    else:  # float32 sums in another order: at most one bfloat16 step apart, mostly equal
        assert rel(x, ref) <= 8e-3
        assert (x == ref).float().mean() >= 0.97
    assert torch.equal(qkv[..., heads * Dh :], rest)  # the value columns untouched


@needs_kernels
def test_pool_serves_concurrent_callers_and_more_threads_than_cores():
    """Products from several Python threads at once (ctypes lets go of the GIL, so they meet in
    the pool), each over more threads than this machine may have cores, all correct."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(700 + 10 * i, 300, generator=g) for i in range(6)]
    xs = [torch.randn(1 + i % 4, 300, generator=g) for i in range(6)]
    refs = [F.linear(x, w) for x, w in zip(xs, ws)]
    before = torch.get_num_threads()
    torch.set_num_threads(max(4, os.cpu_count() or 1))
    try:

        def run(i: int) -> float:
            return max(rel(kernels.few_rows(xs[i % 6], ws[i % 6]), refs[i % 6]) for _ in range(30))

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            errors = list(pool.map(run, range(12)))
    finally:
        torch.set_num_threads(before)
    assert max(errors) <= 1e-5


@needs_kernels
def test_pool_works_in_a_forked_child():
    """A child forked while another thread is inside a product has none of the pool's threads and
    may inherit its locks mid-job: it must neither hang nor compute wrong products."""
    script = textwrap.dedent(
        """
        import os, signal, threading, torch, torch.nn.functional as F
        from llama4 import kernels
        torch.set_num_threads(2)
        x, w = torch.randn(2, 256), torch.randn(4000, 256)
        ref = F.linear(x, w)  # here: torch's OpenMP threads do not survive a fork either
        assert torch.allclose(kernels.few_rows(x, w), ref, atol=1e-4)  # the pool runs
        stop = threading.Event()
        def busy():
            while not stop.is_set():
                kernels.few_rows(x, w)
        thread = threading.Thread(target=busy)
        thread.start()
        for _ in range(10):  # forks landing at different moments of the busy thread's products
            pid = os.fork()
            if pid == 0:
                signal.alarm(20)  # a hung child dies instead of outliving the test
                ok = all(torch.allclose(kernels.few_rows(x, w), ref, atol=1e-4) for _ in range(20))
                os._exit(0 if ok else 3)
            _, status = os.waitpid(pid, 0)
            print("child", os.waitstatus_to_exitcode(status))
        stop.set()
        thread.join()  # before the interpreter exits (torch aborts under a running op)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["child", "0"] * 10


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1024), (3, 5, 77), (8, 128)])
def test_bf16_rms_norm_equals_the_reference_formula(shape):
    """bfloat16: normalised in float32, rounded, then times the bfloat16 weight (rounded again),
    as llama4.model.layers.rms_norm does with the kernels off."""
    x = (torch.randn(*shape) * 3).bfloat16()
    w = torch.randn(shape[-1]).bfloat16()
    for weight in (w, None):
        out = kernels.rms_norm(x, 1e-5, weight)
        with kernels.disabled():
            ref = rms_norm(x, 1e-5, weight)
        assert out.dtype == ref.dtype == torch.bfloat16
        assert rel(out, ref) <= 8e-3
        assert (out == ref).float().mean() >= 0.97
    assert not kernels.rms_norm_supports(x, w.float())  # mixed: the reference promotes to float32


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1024), (3, 5, 77), (8, 128), (2, 1)])
def test_rms_norm_equals_f_rms_norm(shape):
    x = torch.randn(*shape) * 3
    w = torch.randn(shape[-1])
    assert rel(kernels.rms_norm(x, 1e-5, w), F.rms_norm(x, (shape[-1],), w, 1e-5)) <= 1e-6
    assert rel(kernels.rms_norm(x, 1e-6), F.rms_norm(x, (shape[-1],), None, 1e-6)) <= 1e-6
    view = torch.randn(4, 2 * shape[-1])[:, : shape[-1]]  # rows apart by twice their width
    assert rel(kernels.rms_norm(view, 1e-5, w), F.rms_norm(view, (shape[-1],), w, 1e-5)) <= 1e-6
    with pytest.raises(ValueError, match="weight has"):
        kernels.rms_norm(x, 1e-5, torch.randn(shape[-1] + 1))


@needs_kernels
def test_layers_take_the_kernels_only_for_decode_sized_inference(monkeypatch):
    calls = []
    few_rows, norm = kernels.few_rows, kernels.rms_norm
    monkeypatch.setattr(
        kernels, "few_rows", lambda x, w: calls.append(("linear", *x.shape)) or few_rows(x, w)
    )
    monkeypatch.setattr(kernels, "rms_norm", lambda x, *a: calls.append(("norm", *x.shape)) or norm(x, *a))
    w = torch.randn(24, 32)
    with torch.inference_mode():
        linear(torch.randn(2, 32), w)
        linear(torch.randn(kernels.MAX_ROWS + 1, 32), w)  # prefill-sized: F.linear
        x = torch.randn(2, 16)
        assert rel(rms_norm(x, 1e-5, torch.ones(16)), F.rms_norm(x, (16,), None, 1e-5)) <= 1e-6
        rms_norm(torch.randn(kernels.NORM_MAX_NUMEL + 1), 1e-5)  # too large: torch's
        with kernels.disabled():
            assert not kernels.available()
            linear(torch.randn(1, 32), w)
            rms_norm(x, 1e-5)
    assert kernels.available()
    linear(torch.randn(1, 32), w.requires_grad_())  # autograd on: F.linear
    rms_norm(x, 1e-5)
    assert calls == [("linear", 2, 32), ("norm", 2, 16)]


@needs_kernels
def test_glu_and_rope_layers_take_the_kernels_only_for_small_inference_inputs(monkeypatch):
    calls = []
    few_rows, rope = kernels.few_rows, kernels.rope_
    monkeypatch.setattr(
        kernels, "few_rows", lambda x, w, glu=False: calls.append(("linear", glu)) or few_rows(x, w, glu)
    )
    monkeypatch.setattr(kernels, "rope_", lambda x, *a: calls.append(("rope", *x.shape)) or rope(x, *a))
    w, h = torch.randn(24, 32), torch.randn(2, 64)
    gate, up = h.chunk(2, dim=-1)
    x, angles = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 1, 4)
    with torch.inference_mode():
        assert rel(glu_linear(h, w), F.linear(F.silu(gate) * up, w)) <= 1e-5
        assert (
            rel(
                rope_and_norm(x.clone(), angles.cos(), angles.sin(), None),
                apply_rope(x, angles.cos(), angles.sin()),
            )
            <= 1e-5
        )
        glu_linear(torch.randn(kernels.MAX_ROWS + 1, 64), w)  # prefill-sized: torch
    glu_linear(h, w.requires_grad_())  # autograd on: torch
    rope_and_norm(x, angles.cos(), angles.sin(), 1e-5)
    assert calls == [("linear", True), ("rope", 1, 1, 4, 8)]


def small_model(dtype: torch.dtype) -> Transformer:
    cfg = ModelConfig(
        text=TextConfig(
            vocab_size=300, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16,
            dense_hidden_dim=96, attention_chunk_size=8, max_seq_len=256,
            moe=MoEConfig(num_experts=4, top_k=1, hidden_dim=48, interleave_step=2),
        )
    )  # fmt: skip
    model = Transformer(cfg)
    model.init_weights(seed=3)
    return model.to(dtype).eval()


@needs_kernels
def test_engine_tokens_with_and_without_the_kernels():
    """float32: greedy decoding through the compiled kernels gives the tokens torch's kernels
    give (prompts of several lengths batched: rows 1-3 at each step; chunk boundaries crossed)."""
    model = small_model(torch.float32)
    prompts = [[5, 9, 13], [7] * 11, [1, 2, 3, 4, 5, 6, 7]]
    params = SamplingParams(max_tokens=24)
    engine = Engine(model, slots=3, max_len=64)

    def tokens() -> list[list[int]]:
        alone = [engine.generate([p], params)[0] for p in prompts]
        return [c.tokens for c in alone + engine.generate(prompts, params)]

    with_kernels = tokens()
    with kernels.disabled():
        without = tokens()
    assert all(len(t) == 24 for t in with_kernels)
    assert with_kernels == without


@needs_kernels
def test_engine_bf16_logits_with_and_without_the_kernels(monkeypatch):
    """bfloat16: the kernels and torch's ops round in different places (sums in another order,
    one rounding instead of several), so a near-tie may make free-running greedy tokens part;
    along one token sequence (teacher forcing), every step's logits agree to bfloat16 precision.
    The engine must really take the bfloat16 kernels (counted) in the model's forward (the
    one-call step, tests/test_decode_step.py, calls them from C)."""
    model = small_model(torch.bfloat16)
    prompts = [[5, 9, 13], [7] * 11, [1, 2, 3, 4, 5, 6, 7]]
    engine = Engine(model, slots=3, max_len=64, one_call_decode=False)
    tokens = [c.tokens for c in engine.generate(prompts, SamplingParams(max_tokens=24))]
    calls = {"decode_attention": 0, "rope_": 0, "rms_norm": 0}
    for name in calls:
        fn = getattr(kernels, name)
        monkeypatch.setattr(
            kernels,
            name,
            lambda *a, fn=fn, name=name, **k: calls.__setitem__(name, calls[name] + 1) or fn(*a, **k),
        )

    def logits() -> torch.Tensor:
        with torch.inference_mode():
            steps = [engine.prefill([0, 1, 2], prompts)]
            steps += [engine.decode([0, 1, 2], [t[i] for t in tokens]) for i in range(23)]
        for slot in range(3):
            engine.free(slot)
        return torch.stack(steps).float()

    with_kernels = logits()
    assert all(n > 0 for n in calls.values()), calls
    with kernels.disabled():
        without = logits()
    for step, (a, b) in enumerate(zip(with_kernels, without)):
        assert rel(a, b) <= 0.02, step  # measured <= 0.008: one bfloat16 step at the largest logit


def test_without_a_compiler_torch_kernels_run_and_a_warning_says_why(tmp_path):
    script = textwrap.dedent(
        """
        import warnings, torch, torch.nn.functional as F
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from llama4 import kernels
            from llama4.model.layers import linear
            x, w = torch.randn(2, 32), torch.randn(24, 32)
            with torch.inference_mode():
                assert torch.allclose(linear(x, w), F.linear(x, w), atol=1e-5)
        print(kernels.available(), [str(c.message) for c in caught])
        """
    )
    env = dict(
        os.environ, CC=str(tmp_path / "no-such-cc"), PATH=str(tmp_path), LLAMA4_KERNEL_CACHE=str(tmp_path)
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False"), out.stdout
    assert "no C compiler found" in out.stdout
    env = dict(os.environ, LLAMA4_KERNELS="0", LLAMA4_KERNEL_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False []"  # turned off on purpose: no warning


# ----- reading ahead -------------------------------------------------------------------------------


def _poll(fn, until, seconds=5.0):
    """fn() once `until(fn())` holds or the time is up (the read-ahead runs on a worker thread)."""
    import time

    end = time.monotonic() + seconds
    value = fn()
    while not until(value) and time.monotonic() < end:
        time.sleep(0.005)
        value = fn()
    return value


@needs_kernels
@pytest.mark.parametrize("threads", [2], indirect=True)
def test_read_ahead_reads_what_followed_last_time_up_to_the_limit(threads, monkeypatch):
    """After the products A, B, C, the next A names B then C; the reader thread reads them into the
    cache (the library counts the bytes) up to the limit, and the storages stay held until
    forgotten."""
    mib = 1 << 20
    monkeypatch.setattr(kernels, "_read_ahead", kernels.ReadAhead(limit=6 * mib))
    try:
        _read_ahead_of_a_b_c(mib)
    finally:  # whatever happened, the library names none of this test's weights afterwards
        kernels.forget_read_ahead()


def _read_ahead_of_a_b_c(mib: int) -> None:
    import gc
    import time
    import weakref

    x = torch.randn(1, 1024)
    a, b, c = (torch.randn(1024, 1024) for _ in range(3))  # 4 MiB each
    for w in (a, b, c):
        kernels.few_rows(x, w)
    time.sleep(0.05)  # the read-ahead after B and C (none: nothing followed them yet) is over
    before = kernels.read_ahead_total()
    assert torch.allclose(kernels.few_rows(x, a), F.linear(x, a), rtol=1e-4, atol=1e-4)
    held = kernels._read_ahead.held[max(kernels._read_ahead.held)]  # the latest regions' storages
    assert [s.data_ptr() for s in held] == [b.data_ptr(), c.data_ptr()]
    read = _poll(lambda: kernels.read_ahead_total() - before, lambda n: n >= 6 * mib, seconds=30)
    time.sleep(0.05)
    assert kernels.read_ahead_total() - before == read == 6 * mib  # all of B, the first 2 MiB of C
    storage = weakref.ref(c.untyped_storage())
    del held, c, w
    gc.collect()
    assert storage() is not None  # held: the library may still read it
    kernels.forget_read_ahead()  # the reader is done with it (the product was 50 ms ago)
    gc.collect()
    assert storage() is None


def test_read_ahead_keeps_what_the_reader_may_be_inside():
    """Once the library reads a new epoch's regions, the storages of older epochs stay held exactly
    while the library says its reader is inside them (it is never waited for)."""

    class Library:  # the one call ReadAhead._release makes
        reading = 0

        def llama4_ahead_reading(self):
            return self.reading

    lib, ra = Library(), kernels.ReadAhead(limit=1 << 20)
    a, b, c = (torch.zeros(4).untyped_storage() for _ in range(3))
    ra.held = {5: [a], 6: [b]}  # (held from before each call that named them)
    lib.reading = 5  # inside epoch 5 when epoch 6 began: both held
    ra._release(lib, 6)
    assert ra.held == {5: [a], 6: [b]}
    ra.held[7] = [c]
    lib.reading = 0  # done: 5 and 6 let go once 7 began
    ra._release(lib, 7)
    assert ra.held == {7: [c]}
    ra.held[8] = []
    lib.reading = 7
    ra._release(lib, 8)  # forget(): nothing new to hold
    assert ra.held == {7: [c], 8: []}
    lib.reading = 0
    ra._release(lib, 9)
    assert ra.held == {}


@needs_kernels
def test_read_ahead_never_reads_freed_weights():
    """Weights in memory that is unmapped when freed, dropped right after the product that named
    them: if the kernels read them afterwards, the process dies of SIGSEGV."""
    script = textwrap.dedent(
        """
        import mmap, torch
        from llama4 import kernels
        torch.set_num_threads(2)
        def weight():  # 8 MiB of its own mapping: freeing the storage unmaps it
            buf = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            return torch.frombuffer(buf, dtype=torch.float32).view(2048, 1024).fill_(0.5)
        x = torch.randn(1, 1024)
        before = kernels.read_ahead_total()
        for i in range(300):
            ws = [weight() for _ in range(4)]
            # The fourth product names the second and third weights (16 MiB to read ahead).
            # Even rounds: dropped at once (they must stay held); odd: a fifth product replaces
            # them first (they must stay held while the reader may be inside them).
            for n, w in enumerate(ws[:3] + ws[:1] + ws[3:] * (i % 2)):
                kernels.few_rows(x, w)
                if n == 3:  # (a stale guess from the last round would name fewer)
                    named = kernels._read_ahead.held[max(kernels._read_ahead.held)]
                    assert [s.data_ptr() for s in named] == [ws[1].data_ptr(), ws[2].data_ptr()], i
            del ws, w, named  # unmapped at once, unless held
            if i % 5 == 0:
                kernels.forget_read_ahead()
        print("read ahead", kernels.read_ahead_total() - before > 0)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["read", "ahead", "True"]
