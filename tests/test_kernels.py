"""llama4's compiled CPU kernels (llama4.kernels) against their slow twins, F.linear and F.rms_norm;
the engine's tokens with them and without; the fallback when they cannot be built."""

from __future__ import annotations

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
from llama4.model.layers import linear, rms_norm
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_tokens_with_and_without_the_kernels(dtype):
    """Greedy decoding through the compiled kernels gives the tokens torch's kernels give
    (prompts of several lengths batched: rows 1-3 at each step; chunk boundaries crossed)."""
    model = small_model(dtype)
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
