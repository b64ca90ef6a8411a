"""Decode speed: llama4's engine vs transformers' ``generate``, against the memory roofline.

One random MoE checkpoint (written by ``llama4.save``, read by both), float32, greedy, batch 1
and batch 8 (equal-length prompts, so transformers needs no padding). Decode tokens/s =
batch / the median time of one decode step (each new token after the first; prefill excluded),
steps timed from llama4's event stream and from a hook on transformers' output head.

Roofline: at small batch, decoding streams the weights from memory once per step. The bytes a
step must read (attention, router, shared expert, the experts the step's tokens chose, the
output head, one embedding row per token, the KV cache) divided by this machine's bandwidth
(the best of a 256 MiB fp32 matvec through MKL, through oneDNN and through llama4's kernel,
and a plain 1 GiB sum: the machine's bandwidth, not one kernel's; where the system offers huge
pages, which llama4 puts decoding weights on, the oneDNN and llama4 matvecs and the sum also run
on huge pages) is the fastest a step can be; "roofline" is that time / the measured step time.
The issue's own definition divides by the measured matvec bandwidth (the best of the matvecs,
without the sum, which is usually faster): that figure is printed too, as "matvec roofline".
This machine's bandwidth moves from minute to minute (the best of the whole run may come from a
quiet moment the steps never saw), so the bandwidth is also measured right before and after
each timed run, and each run's median step is held against that same moment's bandwidth (the
better of the two): the "same moment" fractions, the median over the runs.
transformers runs every expert on every token (its Llama4TextExperts is a dense bmm), so it
reads all E experts per layer.

llama4 runs three ways, alternating run by run (`measure_ours`): as the engine runs by default
(on CPU with float32 weights, each decode step is one call of llama4's C kernels:
llama4.engine.step), through the model's forward with llama4's kernels (the one-call step's slow
twin; it prints the MB per step its reader thread read ahead between products), and through the
model's forward on torch's kernels alone.

Then llama4 alone again with bfloat16 weights (skip with --no-bf16): tokens/s against its
float32 figure, and the fraction of its own (half-size) roofline.

    python benchmarks/decode.py [--dim 1024 --layers 8 --experts 16 --expert-dim 2048 --vocab 32000
                                 --threads 2 --new-tokens 32 --prompt 32 --batches 1,8 --repeats 3]

The machine may be shared: step times are medians over --repeats runs, the bandwidth is the
best of several measurements, and the load average is printed. OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE unless set): with the default
active spinning, a second busy process on a 2-core machine makes every parallel op wait for a
descheduled thread, and decoding gets up to 10x slower.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def matvec_bandwidth(
    dtype: torch.dtype = torch.float32, n: int = 8192, reps: int = 15
) -> tuple[float, float]:
    """(GB/s, ms) of y = W x for an n x n matrix (256 MiB in fp32: far beyond the caches)
    through torch's default kernel (MKL for fp32 on x86)."""
    W = torch.randn(n, n).to(dtype)
    x = torch.randn(1, n).to(dtype)
    best = _best(lambda: F.linear(x, W), reps)
    return W.numel() * W.element_size() / best / 1e9, best * 1e3


class Bandwidth:
    """GB/s of reading memory, several ways (`measure`): a 256 MiB fp32 matvec through MKL, through
    oneDNN and through llama4's kernel (the "*_matvec" entries), and a 1 GiB sum; where the system
    offers huge pages (llama4 puts decoding weights there), oneDNN's and llama4's matvec and the
    sum again on huge pages ("*_huge": the bandwidth the engine's weights can get, so the roofline
    holds the engine to it). The buffers are kept, so that it can measure again between runs."""

    def __init__(self) -> None:
        from llama4.model.inference import HUGE_PAGES, huge_empty

        self.W, self.x, self.big = torch.randn(8192, 8192), torch.randn(1, 8192), torch.randn(2**28)
        self.huge = None
        if HUGE_PAGES:
            W, big = self.W, self.big
            self.huge = huge_empty(W.shape, W.dtype).copy_(W), huge_empty(big.shape, big.dtype).copy_(big)

    def measure(self, reps: int = 10) -> dict[str, float]:
        out = {"mkl_matvec": self.W.numel() * 4 / _best(lambda: F.linear(self.x, self.W), reps) / 1e9}
        _read_ways(out, "", self.W, self.x, self.big, reps)
        if self.huge is not None:
            _read_ways(out, "_huge", self.huge[0], self.x, self.huge[1], reps)
        return out


def _read_ways(out: dict[str, float], pages: str, W, x, big, reps: int) -> None:
    from llama4 import kernels

    out[f"sum_1gib{pages}"] = big.numel() * 4 / _best(lambda: big.sum(), reps) / 1e9
    if torch.backends.mkldnn.is_available():
        onednn = lambda: torch.ops.mkldnn._linear_pointwise(x, W, None, "none", [], "")  # noqa: E731
        out[f"onednn{pages}_matvec"] = W.numel() * 4 / _best(onednn, reps) / 1e9
    if kernels.available():
        out[f"llama4{pages}_matvec"] = W.numel() * 4 / _best(lambda: kernels.few_rows(x, W), reps) / 1e9


def best_bandwidths(ways: dict[str, float], before: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float]:
    """(the machine's bandwidth: the best of all ways, the best matvec), each at least `before`'s."""
    matvec = max(v for k, v in ways.items() if k.endswith("_matvec"))
    return max(before[0], *ways.values()), max(before[1], matvec)


def _best(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def config(args):
    from llama4.config import ModelConfig, MoEConfig, TextConfig

    return ModelConfig(
        text=TextConfig(
            vocab_size=args.vocab,
            dim=args.dim,
            n_layers=args.layers,
            n_heads=args.dim // 128,
            n_kv_heads=max(1, args.dim // 512),
            head_dim=128,
            dense_hidden_dim=2 * args.expert_dim,
            attention_chunk_size=8192,
            max_seq_len=8192,
            moe=MoEConfig(num_experts=args.experts, top_k=1, hidden_dim=args.expert_dim, interleave_step=1),
        )
    )


def checkpoint(args) -> Path:
    """The random checkpoint for these sizes (kept in the temp dir between runs)."""
    import llama4
    from llama4.model.transformer import Transformer

    cfg = config(args)
    key = hashlib.sha1(cfg.to_json().encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"llama4-bench-decode-{key}"
    if not (path / "config.json").is_file():
        model = Transformer(cfg)
        model.init_weights(seed=0)
        tmp = path.with_suffix(".partial")
        llama4.save(model, tmp)
        tmp.rename(path)
    return path


def step_bytes(model, engine_routing: list[int], batch: int, kv_tokens: int) -> dict[str, float]:
    """Bytes one decode step reads, for our engine and for a dense-experts implementation.

    engine_routing: distinct experts chosen per MoE layer in this step (summed over layers).
    """
    t = model.config.text
    size = lambda p: p.numel() * p.element_size()  # noqa: E731
    common = (
        size(model.norm.weight)
        + size(model.output.weight)
        + batch * t.dim * model.tok_embeddings.weight.element_size()
    )
    expert_bytes = 0
    for layer in model.layers:
        common += sum(size(p) for p in layer.attention.parameters())
        common += size(layer.attention_norm.weight) + size(layer.ffn_norm.weight)
        ff = layer.feed_forward
        if hasattr(ff, "experts"):
            common += size(ff.router.weight) + sum(size(p) for p in ff.shared_expert.parameters())
            expert_bytes = size(ff.experts.gate_up_proj[0]) + size(ff.experts.down_proj[0])
        else:
            common += sum(size(p) for p in ff.parameters())
    kv = 2 * t.n_kv_heads * t.head_dim * 4 * kv_tokens * t.n_layers * batch  # fp32 cache, upper bound
    n_moe = sum(t.is_moe)
    return {
        "ours": common + sum(engine_routing) * expert_bytes + kv,
        "dense_experts": common + n_moe * t.moe.num_experts * expert_bytes + kv,
    }


def count_routing(model, engine, prompts, n_new) -> list[list[int]]:
    """Distinct experts per MoE layer at each decode step of a greedy run (untimed)."""
    from llama4.model.moe import MoE

    moes = [m for m in model.modules() if isinstance(m, MoE)]
    slots = list(range(len(prompts)))
    logits = engine.prefill(slots, prompts)
    steps = []
    for _ in range(n_new - 1):
        logits = engine.decode(slots, logits.argmax(-1).tolist())
        steps.append([int(m.last_routing.experts.unique().numel()) for m in moes])
    for s in slots:
        engine.free(s)
    return steps


def time_ours(engine, prompts, n_new, repeats) -> tuple[list[float], list[list[int]]]:
    """Seconds of each decode step (every new token after the first) over all repeats, and
    the tokens. A step ends when the events of all its rows have been yielded."""
    from llama4.engine import SamplingParams

    steps, tokens = [], None
    params = SamplingParams(max_tokens=n_new)
    for _ in range(repeats):
        out = [[] for _ in prompts]
        marks = []
        for ev in engine.stream(prompts, params):
            out[ev.index].append(ev.token)
            if ev.index == len(prompts) - 1:
                marks.append(time.perf_counter())
        steps += [b - a for a, b in zip(marks, marks[1:])]
        tokens = out
    return steps, tokens


def time_hf(hf, prompts, n_new, repeats) -> tuple[list[float], list[list[int]]]:
    """Same for transformers' generate, timed through its streamer callback."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def put(self, value) -> None:  # the prompt first, then each step's new tokens
            self.marks.append(time.perf_counter())

        def end(self) -> None:
            pass

    ids = torch.tensor(prompts)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    steps, tokens = [], None
    for _ in range(repeats):
        clock = Clock()
        out = _hf_generate(hf, ids, n_new, clock, kw)
        marks = clock.marks[1:]  # drop the prompt
        steps += [b - a for a, b in zip(marks, marks[1:])]
        tokens = out[:, ids.shape[1] :].tolist()
    return steps, tokens


def _hf_generate(hf, ids, n_new, clock, kw):
    if ids.shape[0] == 1:
        return hf.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, streamer=clock, **kw)
    # generate() refuses a streamer for batches > 1: time each step with a forward hook on
    # the output head instead (called once per step, prefill included).
    handle = hf.lm_head.register_forward_hook(lambda *_: clock.put(None))
    try:
        return hf.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **kw)
    finally:
        handle.remove()


@dataclass
class Ours:
    """llama4's figures for one batch (`measure_ours`)."""

    step_s: float  # median decode step of the engine as it runs by default
    forward_step_s: float | None  # the same through the model's forward (None: that is the default)
    torch_step_s: float | None  # the model's forward on torch's kernels alone (None: no compiled kernels)
    tokens: list[list[int]]
    routing: list[list[int]]  # distinct experts per MoE layer, per step
    per_step: list[dict]  # `step_bytes` of each step
    ahead_per_token: float  # bytes read ahead between products, per token, in the forward arm
    # Each repeat's median step (default arm) and the bandwidths (all ways, matvecs) measured
    # right before and after it (the better of the two): the step against the same moment's memory.
    moments: list[tuple[float, float, float]]


def measure_ours(model, prompts, n, repeats, probe: Bandwidth | None = None) -> Ours:
    """llama4 on `prompts`, three ways: the engine as it runs by default (on CPU with float32
    weights each decode step is one call of llama4's C kernels, llama4.engine.step), the same
    engine through the model's forward with llama4's kernels (`one_call_decode=False`: the step's
    slow twin; there an idle-priority thread reads the next products' weights into the cache
    between products, llama4.kernels.ReadAhead), and that forward on torch's kernels alone. The
    ways alternate run by run, so a busier or quieter moment of a shared machine affects all alike.
    With a `probe`, the bandwidth is measured before and after each repeat (`Ours.moments`)."""
    from llama4 import kernels
    from llama4.engine import Engine

    batch, kv_tokens = len(prompts), len(prompts[0]) + n // 2
    engine = Engine(model, slots=batch, max_len=len(prompts[0]) + n + 1)
    forward = Engine(model, slots=batch, max_len=len(prompts[0]) + n + 1, one_call_decode=False)
    one_call = engine._one_call is not None
    routing = count_routing(model, engine, prompts, n)
    compare = kernels.available()
    steps, forward_steps, torch_steps, ahead, moments = [], [], [], 0, []
    with torch.inference_mode():
        for _ in range(repeats):
            before = best_bandwidths(probe.measure(3)) if probe is not None else None
            s, tokens = time_ours(engine, prompts, n, 1)
            steps += s
            if probe is not None:
                moments.append((statistics.median(s), *best_bandwidths(probe.measure(3), before)))
            if one_call:
                before = kernels.read_ahead_total()
                forward_steps += time_ours(forward, prompts, n, 1)[0]
                ahead += kernels.read_ahead_total() - before
            if compare:
                with kernels.disabled():
                    torch_steps += time_ours(forward, prompts, n, 1)[0]
    return Ours(
        statistics.median(steps),
        statistics.median(forward_steps) if one_call else None,
        statistics.median(torch_steps) if compare else None,
        tokens,
        routing,
        [step_bytes(model, r, batch, kv_tokens) for r in routing],
        ahead / (repeats * n),
        moments,
    )


def time_bf16(path, all_prompts, n, repeats, bw, fp32_rows) -> dict[int, dict[str, float]]:
    """llama4 again with bfloat16 weights (`--dtype bfloat16`): tokens/s against float32's, and
    its roofline (half the weight bytes). llama4's compiled kernel widens bf16 weights to float32
    in registers (a shift); torch's own bf16 product is fast only on CPUs with AVX512-BF16 or AMX
    (on an AVX2-only machine it was slower than fp32)."""
    import llama4

    model = llama4.load(path, dtype="bfloat16")
    rows = {}
    for batch, prompts in all_prompts.items():
        ours = measure_ours(model, prompts, n, repeats)
        step_s, per_step = ours.step_s, ours.per_step
        nbytes = statistics.mean(b["ours"] for b in per_step)
        rows[batch] = r = {
            "tokens_per_s": batch / step_s,
            "over_fp32": batch / step_s / fp32_rows[batch]["ours_tokens_per_s"],
            "bytes_per_step_mb": nbytes / 1e6,
            "roofline_fraction": nbytes / (bw * 1e9) / step_s,
        }
        print(
            f"\nbatch {batch}, bf16 weights: llama4 {r['tokens_per_s']:.1f} tokens/s = {r['over_fp32']:.2f}x fp32; "
            f"reads {r['bytes_per_step_mb']:.0f} MB/step -> {r['roofline_fraction'] * 100:.0f}% of roofline"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--expert-dim", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--no-bf16", action="store_true", help="skip llama4 with bfloat16 weights")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import llama4
    from llama4 import kernels

    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"{args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
          f"llama4's compiled CPU kernels: {'yes' if kernels.available() else 'NO (torch kernels)'}")  # fmt: skip
    probe = Bandwidth()
    ways = probe.measure()
    bw, bw_mv = best_bandwidths(ways)
    print("memory bandwidth: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in ways.items())
          + f" -> roofline uses {bw:.1f} GB/s, matvec roofline {bw_mv:.1f} GB/s")  # fmt: skip
    bw_ms = 8192 * 8192 * 4 / ways["mkl_matvec"] / 1e6
    bw16, bw16_ms = matvec_bandwidth(torch.bfloat16)
    print(f"torch matvec 8192x8192: fp32 {bw_ms:.1f} ms, bf16 {bw16_ms:.1f} ms = {bw16:.1f} GB/s "
          f"({bw_ms / bw16_ms:.2f}x the fp32 speed)")  # fmt: skip

    path = checkpoint(args)
    model = llama4.load(path, dtype="float32")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: dim {args.dim}, {args.layers} layers, {args.experts} experts x {args.expert_dim}, "
          f"vocab {args.vocab}: {n_params / 1e6:.0f}M params ({n_params * 4 / 2**30:.2f} GiB fp32)")  # fmt: skip
    hf = None
    if not args.no_hf:
        from transformers import Llama4ForCausalLM

        hf = Llama4ForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()

    results = {"bandwidth_gbps": bw, "bf16_over_fp32_matvec_speed": bw_ms / bw16_ms, "batches": {}}
    g = torch.Generator().manual_seed(0)
    n = args.new_tokens
    all_prompts = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = torch.randint(0, args.vocab, (batch, args.prompt), generator=g).tolist()
        all_prompts[batch] = prompts
        ours = measure_ours(model, prompts, n, args.repeats, probe)
        step_s, per_step = ours.step_s, ours.per_step
        for _, moment_bw, moment_mv in ours.moments:  # the best bandwidths seen so far
            bw, bw_mv = max(bw, moment_bw), max(bw_mv, moment_mv)
        ours_bytes = statistics.mean(b["ours"] for b in per_step)
        dense_bytes = per_step[0]["dense_experts"]
        roof_s = ours_bytes / (bw * 1e9)
        row = {
            "ours_tokens_per_s": batch / step_s,
            "ours_step_ms": step_s * 1e3,
            "bytes_per_step_ours_mb": ours_bytes / 1e6,
            "roofline_step_ms": roof_s * 1e3,
            "roofline_fraction": roof_s / step_s,
            "matvec_roofline_fraction": ours_bytes / (bw_mv * 1e9) / step_s,
            "distinct_experts_per_layer": statistics.mean(sum(r) / len(r) for r in ours.routing),
            # each run's median step against the bandwidth measured right around it; median of runs
            "same_moment_roofline_fraction": statistics.median(
                ours_bytes / (b * 1e9) / t for t, b, _ in ours.moments
            ),
            "same_moment_matvec_roofline_fraction": statistics.median(
                ours_bytes / (m * 1e9) / t for t, _, m in ours.moments
            ),
        }
        print(
            f"\nbatch {batch}: llama4 {row['ours_tokens_per_s']:.1f} tokens/s ({step_s * 1e3:.1f} ms/step); "
            f"reads {ours_bytes / 1e6:.0f} MB/step ({row['distinct_experts_per_layer']:.1f} experts/layer) "
            f"-> roofline {roof_s * 1e3:.1f} ms/step = {row['roofline_fraction'] * 100:.0f}% of roofline "
            f"({row['matvec_roofline_fraction'] * 100:.0f}% of the matvec roofline); against the bandwidth "
            f"measured right around each run: {row['same_moment_roofline_fraction'] * 100:.0f}% "
            f"({row['same_moment_matvec_roofline_fraction'] * 100:.0f}% matvec), median of {len(ours.moments)} runs"
        )
        if ours.forward_step_s is not None:  # the one-call step's slow twin
            row["forward_tokens_per_s"] = batch / ours.forward_step_s
            row["one_call_speedup"] = ours.forward_step_s / step_s
            row["read_ahead_mb_per_step"] = ours.ahead_per_token / 1e6
            print(
                f"  llama4 through the model's forward: {batch / ours.forward_step_s:.1f} tokens/s "
                f"({ours.ahead_per_token / 1e6:.0f} MB/step read ahead between products) -> the one-call "
                f"step is {row['one_call_speedup']:.2f}x faster"
            )
        if ours.torch_step_s is not None:  # the model's forward on torch's kernels (oneDNN, F.rms_norm)
            row["ours_torch_kernels_tokens_per_s"] = batch / ours.torch_step_s
            row["compiled_kernels_speedup"] = ours.torch_step_s / step_s
            print(
                f"  llama4 through the model's forward on torch's kernels alone: {batch / ours.torch_step_s:.1f} "
                f"tokens/s -> llama4's kernels are {row['compiled_kernels_speedup']:.2f}x faster"
            )
        if hf is not None:
            with torch.inference_mode():
                hf_steps, hf_tokens = time_hf(hf, prompts, n, args.repeats)
            hf_step_s = statistics.median(hf_steps)
            row["hf_tokens_per_s"] = batch / hf_step_s
            row["speedup_vs_hf"] = hf_step_s / step_s
            row["hf_roofline_fraction"] = dense_bytes / (bw * 1e9) / hf_step_s
            same = sum(a == b for a, b in zip(ours.tokens, hf_tokens))
            row["same_tokens_as_hf"] = f"{same}/{batch}"
            print(
                f"  transformers {row['hf_tokens_per_s']:.1f} tokens/s ({hf_step_s * 1e3:.1f} ms/step, "
                f"reads {dense_bytes / 1e6:.0f} MB/step: {row['hf_roofline_fraction'] * 100:.0f}% of its roofline); "
                f"llama4 / transformers = {row['speedup_vs_hf']:.2f}x; same greedy tokens: {same}/{batch}"
            )
        results["batches"][batch] = row
    b = results["batches"]
    if 1 in b and 8 in b:
        scale = b[8]["ours_tokens_per_s"] / b[1]["ours_tokens_per_s"]
        # Even at full bandwidth a step of 8 reads more than a step of 1 (the tokens choose
        # different experts): tokens/s can grow at most 8 x bytes(1) / bytes(8).
        ceiling = 8 * b[1]["bytes_per_step_ours_mb"] / b[8]["bytes_per_step_ours_mb"]
        results["batch8_over_batch1"] = scale
        results["batch8_over_batch1_bandwidth_ceiling"] = ceiling
        print(f"\nbatch 8 / batch 1 tokens/s: llama4 {scale:.2f}x", end="")
        if "hf_tokens_per_s" in b[1]:
            print(f", transformers {b[8]['hf_tokens_per_s'] / b[1]['hf_tokens_per_s']:.2f}x", end="")
        print(
            f"; bandwidth ceiling for llama4 {ceiling:.2f}x (8 x bytes per batch-1 step / bytes per batch-8 step)"
        )
    if not args.no_bf16:
        results["bf16"] = time_bf16(path, all_prompts, n, args.repeats, bw, results["batches"])
    results["bandwidth_gbps"], results["matvec_bandwidth_gbps"] = bw, bw_mv
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
