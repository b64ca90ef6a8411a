"""The engine: cached decoding == full recompute, batched == one by one, slot operations,
KV memory accounting, the public generate/stream API.

Models are tiny, random and float64 (so that argmax ties cannot flip between two exact
computations), with a larger init std than training's so that attention is far from uniform
and a wrong mask or a stale cache entry changes the logits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import llama4
from llama4.config import ModelConfig, MoEConfig, RopeScaling, TextConfig, get_preset
from llama4.engine import Engine, SamplingParams
from llama4.engine.cache import KVCache, kv_cache_bytes, memory_report, naive_kv_cache_bytes
from llama4.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


CHUNK = 8


def tiny(**over) -> ModelConfig:
    text = dict(
        vocab_size=97,
        dim=32,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        dense_hidden_dim=48,
        nope_interval=2,  # layers 1, 3 global
        attention_chunk_size=CHUNK,
        floor_scale=4,  # temperature tuning active from position 3
        attn_scale=0.5,
        rope_scaling=RopeScaling(
            factor=4.0, low_freq_factor=1.0, high_freq_factor=2.0, original_max_position=16
        ),
        max_seq_len=256,
        moe=MoEConfig(num_experts=4, hidden_dim=24, top_k=1),
    )
    text.update(over)
    return ModelConfig(text=TextConfig(**text))


CONFIGS = {
    "moe-top1-qknorm": tiny(),
    "moe-top2-no-qknorm-dense-interleaved": tiny(
        qk_norm=False, moe=MoEConfig(num_experts=4, hidden_dim=24, top_k=2, interleave_step=2)
    ),
    "mha-no-scaling-3-layers": tiny(n_kv_heads=4, rope_scaling=None, n_layers=3, nope_interval=3),
}


def make_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(seed, std=0.3)
    return model.double().eval()


@torch.inference_mode()
def full_recompute_greedy(
    model: Transformer, prompt: list[int], n: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the logits before each, recomputing the whole sequence every step."""
    seq, out, logits = list(prompt), [], []
    for _ in range(n):
        row = model(torch.tensor([seq]))[0, -1]
        logits.append(row)
        tok = int(row.argmax())
        out.append(tok)
        seq.append(tok)
    return out, logits


@torch.inference_mode()
def assert_is_full_recompute_greedy(model: Transformer, prompt: list[int], tokens: list[int], logits=None):
    """`tokens` are what greedy full recompute gives: one forward over prompt + tokens (teacher
    forcing) has, at each step, the logits the cached run saw and their argmax is the next
    token; by induction the step-by-step recompute produces the same sequence."""
    full = model(torch.tensor([prompt + tokens[:-1]]))[0, len(prompt) - 1 :]  # (n, V)
    assert full.argmax(-1).tolist() == tokens
    if logits is not None:
        # RoPE and RMSNorm run in float32 inside the model: float32-level agreement.
        torch.testing.assert_close(torch.stack(logits), full, rtol=1e-4, atol=1e-5)


def cached_greedy(engine: Engine, prompt: list[int], n: int, slot: int = 0):
    tokens, logits = cached_greedy_batch(engine, [prompt], n, [slot])
    return tokens[0], logits[0]


def cached_greedy_batch(engine: Engine, prompts: list[list[int]], n: int, slots: list[int] | None = None):
    """Greedy decoding of several prompts together through the slot operations."""
    slots = slots or list(range(len(prompts)))
    out = [[] for _ in prompts]
    logits = [[] for _ in prompts]
    rows = engine.prefill(slots, prompts)
    for _ in range(n):
        toks = rows.argmax(-1).tolist()
        for i, (row, tok) in enumerate(zip(rows, toks)):
            logits[i].append(row)
            out[i].append(tok)
        rows = engine.decode(slots, toks)
    for s in slots:
        engine.free(s)
    return out, logits


def prompt_of(n: int, seed: int = 1, vocab: int = 97) -> list[int]:
    g = torch.Generator().manual_seed(seed + 1000 * n)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_equals_full_recompute(name):
    model = make_model(CONFIGS[name])
    # Prompts ending just before, at and after chunk boundaries, and spanning several chunks;
    # prefill pieces (prefill_chunk=5) that themselves straddle boundaries.
    # Run as one batch of different lengths (batched == one by one is tested below).
    prompts = [prompt_of(n) for n in (CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 2 * CHUNK + 1, 3)]
    for prefill_chunk in (2048, 5):
        engine = Engine(model, slots=len(prompts), max_len=128, prefill_chunk=prefill_chunk)
        got, got_logits = cached_greedy_batch(engine, prompts, 41)
        for prompt, tokens, logits in zip(prompts, got, got_logits):
            assert_is_full_recompute_greedy(model, prompt, tokens, logits)
    # and once literally, step by step
    prompt = prompt_of(CHUNK + 1)
    assert cached_greedy(engine, prompt, 12)[0] == full_recompute_greedy(model, prompt, 12)[0]


def test_cached_equals_full_recompute_float32():
    model = make_model(CONFIGS["moe-top1-qknorm"]).float()
    engine = Engine(model, slots=1, max_len=64)
    prompt = prompt_of(CHUNK + 3)
    want, _ = cached_greedy(engine, prompt, 20)
    # Teacher-forced comparison is what matters in float32: same logits at every step.
    seq = prompt + want
    with torch.inference_mode():
        full = model(torch.tensor([seq]))[0, len(prompt) - 1 : len(seq) - 1]
        engine.prefill([0], [prompt])
        cached = [engine.prefill([0], [[t]])[0] for t in want[:-1]]
    torch.testing.assert_close(torch.stack(cached), full[1:], rtol=1e-4, atol=1e-4)


def test_temperature_tuning_is_exercised():
    """The check above would pass with tuning off in both paths: make sure it matters."""
    cfg = CONFIGS["moe-top1-qknorm"]
    off = dataclasses.replace(cfg.text, attn_temperature_tuning=False)
    a, b = make_model(cfg), make_model(ModelConfig(text=off))
    tokens = torch.tensor([prompt_of(20)])
    with torch.inference_mode():
        assert not torch.allclose(a(tokens), b(tokens))


@pytest.mark.parametrize("name", ["moe-top1-qknorm", "moe-top2-no-qknorm-dense-interleaved"])
def test_batched_equals_one_by_one(name):
    model = make_model(CONFIGS[name])
    prompts = [prompt_of(n) for n in (3, CHUNK, 2 * CHUNK + 1, CHUNK - 1, 1)]
    stop = 5
    single = [llama4.generate(model, [p], 30, stop_ids=[stop]) for p in prompts]
    batched = llama4.generate(model, prompts, 30, stop_ids=[stop])
    assert batched == [s[0] for s in single]
    # the same through an engine with more slots than prompts and small prefill pieces
    engine = Engine(model, slots=8, max_len=80, prefill_chunk=4)
    assert llama4.generate(engine, prompts, 30, stop_ids=[stop]) == batched
    assert engine.free_slots() == list(range(8))


def test_each_sequence_stops_on_its_own():
    model = make_model(CONFIGS["moe-top1-qknorm"])
    prompts = [prompt_of(n) for n in (4, 9, 13)]
    free_run = llama4.generate(model, prompts, 25)
    stop = free_run[1][6]  # a token the second sequence produces
    engine = Engine(model, slots=3, max_len=64)
    done = engine.generate(prompts, SamplingParams(max_tokens=25, stop_ids=(stop,)))
    for run, c in zip(free_run, done):
        if stop in run:
            cut = run.index(stop) + 1
            assert c.tokens == run[:cut] and c.finish_reason == "stop" and c.stop_reason == stop
        else:
            assert c.tokens == run and c.finish_reason == "length"
    assert done[1].finish_reason == "stop"


def test_interleaved_slot_operations_match_solo_runs():
    """Continuous-batching pattern: prefill one slot while another is mid-decode, decode
    non-consecutive slots together, free and reuse a slot."""
    model = make_model(CONFIGS["moe-top1-qknorm"])
    pa, pb, pc = prompt_of(11), prompt_of(6, seed=2), prompt_of(17, seed=3)
    engine = Engine(model, slots=4, max_len=64)
    want = {k: cached_greedy(engine, p, 20)[0] for k, p in (("a", pa), ("b", pb), ("c", pc))}
    got = {"a": [], "b": [], "c": []}
    la = engine.prefill([0], [pa])
    got["a"].append(int(la[0].argmax()))
    for _ in range(5):
        got["a"].append(int(engine.decode([0], [got["a"][-1]])[0].argmax()))
    lb = engine.prefill([2], [pb])  # admit b into slot 2 while a is mid-sequence
    got["b"].append(int(lb[0].argmax()))
    for _ in range(12):
        rows = engine.decode([2, 0], [got["b"][-1], got["a"][-1]])  # out of order, not consecutive
        got["b"].append(int(rows[0].argmax()))
        got["a"].append(int(rows[1].argmax()))
    engine.free(0)  # retire a early; c reuses its slot
    lc = engine.prefill([0], [pc])
    got["c"].append(int(lc[0].argmax()))
    for _ in range(19):
        rows = engine.decode([0, 2], [got["c"][-1], got["b"][-1]])
        got["c"].append(int(rows[0].argmax()))
        if len(got["b"]) < 20:
            got["b"].append(int(rows[1].argmax()))
    assert got["a"] == want["a"][: len(got["a"])]
    assert got["b"] == want["b"][: len(got["b"])]
    assert got["c"] == want["c"]


def test_prefix_reuse_continues_a_conversation():
    model = make_model(CONFIGS["moe-top1-qknorm"])
    engine = Engine(model, slots=1, max_len=96)
    first = prompt_of(10)
    out1 = engine.generate([first], SamplingParams(max_tokens=7), slots=[0], keep=True)[0].tokens
    second = first + out1 + prompt_of(5, seed=9)
    assert engine.reuse_prefix(0, second) == len(first) + len(out1) - 1  # last token never fed
    engine.free(0)
    engine.generate([first], SamplingParams(max_tokens=7), slots=[0], keep=True)
    got = engine.generate([second], SamplingParams(max_tokens=12), slots=[0], keep=True)[0].tokens
    assert_is_full_recompute_greedy(model, second, got)
    # A prompt diverging in an earlier chunk falls back to the last chunk start it can keep.
    third = second[: CHUNK + 2] + [(second[CHUNK + 2] + 1) % 97] + second[CHUNK + 3 :]
    kept = engine.reuse_prefix(0, third)
    assert kept == CHUNK or kept == CHUNK + 2
    row = engine.prefill([0], [third[kept:]])[0]
    with torch.inference_mode():
        torch.testing.assert_close(row, model(torch.tensor([third]))[0, -1], rtol=1e-4, atol=1e-5)


def test_local_buffers_hold_one_chunk_and_report_memory():
    cfg = CONFIGS["moe-top1-qknorm"].text
    cache = KVCache(cfg, slots=2, max_len=100, dtype=torch.float32)
    n_global = sum(cfg.is_global)
    per_layer_token = 2 * cfg.n_kv_heads * cfg.head_dim * 4
    assert cache.nbytes == 2 * per_layer_token * (n_global * 100 + (cfg.n_layers - n_global) * CHUNK)
    assert cache.nbytes == 2 * kv_cache_bytes(cfg, 100, dtype_bytes=4)
    scout = llama4.get_preset("scout").text
    row = memory_report(scout)[0]
    assert row.n_tokens == 131072 and row.ratio <= 0.3
    assert row.naive_bytes == naive_kv_cache_bytes(scout, 131072) == 48 * 131072 * 4096
    assert kv_cache_bytes(scout, 10_485_760) == 12 * 10_485_760 * 4096 + 36 * 8192 * 4096


def test_max_len_and_max_tokens_give_length():
    model = make_model(CONFIGS["moe-top1-qknorm"])
    engine = Engine(model, slots=1, max_len=12)
    c = engine.generate([prompt_of(8)], SamplingParams(max_tokens=50))[0]
    assert c.finish_reason == "length" and len(c.tokens) == 12 - 8 + 1  # the last one is never fed
    c = engine.generate([prompt_of(3)], SamplingParams(max_tokens=4))[0]
    assert c.finish_reason == "length" and len(c.tokens) == 4
    c = engine.generate([prompt_of(3)], SamplingParams(max_tokens=0))[0]
    assert c.finish_reason == "length" and c.tokens == []
    with pytest.raises(ValueError, match="max_len"):
        engine.generate([prompt_of(12)], SamplingParams(max_tokens=1))


def test_image_features_reach_the_prefill():
    """Patch-token features are consumed in order, also when the prompt is split in pieces."""
    cfg = CONFIGS["moe-top1-qknorm"]
    cfg = ModelConfig(text=cfg.text, image_token_id=7)
    model = make_model(cfg)
    prompt = [1, 2, 7, 7, 7, 3, 7, 7, 4, 5, 6, 8]
    feats = torch.randn(5, cfg.text.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(torch.tensor([prompt]), image_features=feats)[0, -1]
        assert not torch.allclose(want, model(torch.tensor([prompt]))[0, -1], rtol=1e-3, atol=1e-3)
    for piece in (2048, 4):
        engine = Engine(model, slots=2, max_len=32, prefill_chunk=piece)
        got = engine.prefill([1, 0], [prompt, [9, 9]], [feats, None])[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_blocked_output_head_matches_the_model():
    model = make_model(tiny(vocab_size=1500))
    engine = Engine(model, slots=1, max_len=8)
    h = torch.randn(3, 32, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(engine._logits(h), model.output(h))
        torch.testing.assert_close(engine._logits(h[:1]), model.output(h[:1]))


def test_cache_dtype_must_match_the_weights():
    model = Transformer(get_preset("debug"))
    with pytest.raises(ValueError, match="cache_dtype"):
        Engine(model, cache_dtype=torch.bfloat16)
