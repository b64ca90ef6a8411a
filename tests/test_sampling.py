"""Sampling options, stop strings, streaming text and log-probabilities.

Each option has a test that fails if the option were ignored.
"""

from __future__ import annotations

import math

import pytest
import torch

import llama4
from llama4.config import ModelConfig, MoEConfig, TextConfig
from llama4.engine import Engine, SamplingParams
from llama4.engine.sampling import FLOAT_FIELDS, SamplerState, apply_penalties, filter_logits, sample
from llama4.engine.text import TextStream
from llama4.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


VOCAB = 64


def make_model(vocab: int = VOCAB, seed: int = 0, std: float = 0.3) -> Transformer:
    cfg = ModelConfig(
        text=TextConfig(
            vocab_size=vocab,
            dim=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            head_dim=8,
            nope_interval=2,
            attention_chunk_size=8,
            floor_scale=4,
            max_seq_len=128,
            moe=MoEConfig(num_experts=4, hidden_dim=24),
        )
    )
    model = Transformer(cfg)
    model.init_weights(seed, std=std)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return make_model()


PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18]]


class CharTokenizer:
    """Token i decodes to two letters, so stop strings can start in the middle of a token."""

    def decode(self, ids):
        return "".join(chr(97 + i % 26) + chr(65 + i // 26) for i in ids)


# ----- unit level: the logit filters -------------------------------------------------------------


def test_top_k_keeps_exactly_k():
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    out = filter_logits(x, SamplingParams(temperature=1.0, top_k=5))
    kept = torch.isfinite(out).nonzero().flatten()
    assert set(kept.tolist()) == set(x.topk(5).indices.tolist())


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    x = probs.log()
    for p, want in ((0.5, 1), (0.51, 2), (0.8, 2), (0.81, 3), (0.96, 4)):
        out = filter_logits(x[torch.tensor([2, 0, 3, 1])], SamplingParams(temperature=1.0, top_p=p))
        kept = torch.isfinite(out).sum().item()
        assert kept == want, (p, kept)


def test_filters_keep_what_transformers_keeps():
    # The same survivors as transformers' processors, on random rows (top-p close to 1, where a
    # float32 sum near 1 loses the tail) and on rows of tied logits (ties at the boundary).
    tf = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    rows = torch.cat(
        [3 * torch.randn(400, 50, generator=g), torch.randint(-3, 3, (400, 50), generator=g).float()]
    )
    for top_p in (1e-6, 0.3, 0.6, 0.9, 0.99999, 0.999999):
        ours = torch.stack([filter_logits(r, SamplingParams(temperature=1.0, top_p=top_p)) for r in rows])
        ref = tf.TopPLogitsWarper(top_p)(None, rows.clone())
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref)), top_p
    for top_k in (1, 7, 50, 80):
        ours = torch.stack([filter_logits(r, SamplingParams(temperature=1.0, top_k=top_k)) for r in rows])
        assert torch.equal(
            torch.isfinite(ours), torch.isfinite(tf.TopKLogitsWarper(top_k)(None, rows.clone()))
        )


def test_min_p_drops_tokens_below_fraction_of_max():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    out = filter_logits(probs.log(), SamplingParams(temperature=1.0, min_p=0.4))
    assert torch.isfinite(out).tolist() == [True, True, True, False]  # 0.1 < 0.4 * 0.4 <= 0.2


def test_temperature_scales_the_distribution():
    x = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for t in (0.5, 2.0):
        got = torch.softmax(filter_logits(x, SamplingParams(temperature=t)), -1)
        torch.testing.assert_close(got, torch.softmax(x / t, -1))
    # and the draws follow it
    st = SamplerState(SamplingParams(temperature=2.0, seed=0), [], 4)
    draws = torch.tensor(sample(x.expand(4000, 4), [st] * 4000))
    freq = torch.bincount(draws, minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.softmax(x / 2.0, -1), atol=0.03, rtol=0)  # ~4 sigma


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    x = torch.tensor([2.0, -2.0, 1.0, -1.0])
    st = SamplerState(SamplingParams(repetition_penalty=2.0), prompt=[0], vocab_size=4)
    st.record(1)
    assert apply_penalties(x, st).tolist() == [1.0, -4.0, 1.0, -1.0]


def test_frequency_and_presence_penalties_count_output_tokens():
    x = torch.zeros(4)
    st = SamplerState(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), prompt=[3], vocab_size=4)
    for t in (0, 0, 1):
        st.record(t)
    # token 0: 2 * 0.5 + 0.25; token 1: 0.5 + 0.25; prompt token 3 not penalised
    assert apply_penalties(x, st).tolist() == [-1.25, -0.75, 0.0, 0.0]


def test_sampling_params_validate():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert SamplingParams(stop="x").stop == ("x",)
    for name in FLOAT_FIELDS:
        with pytest.raises(ValueError, match=f"{name}=nan must be a finite number"):
            SamplingParams(**{name: float("nan")})


def test_token_ids_outside_the_vocabulary_are_a_clear_error(model):
    for bad in (VOCAB, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
            llama4.generate(model, [[1, bad]], 2)
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):  # penalty tables
            llama4.generate(model, [[1, bad]], 2, repetition_penalty=1.2, temperature=1.0)
    # prompts as tensors or arrays are sequences of ids too
    assert llama4.generate(model, [torch.tensor([1, 2])], 2) == llama4.generate(model, [[1, 2]], 2)
    engine = Engine(model, slots=1, max_len=16)
    engine.prefill([0], [[1, 2]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.decode([0], [VOCAB + 5])
    assert engine.decode([0], [3]).shape == (1, VOCAB)  # the slot is still usable


# ----- end to end through the engine -------------------------------------------------------------


def test_top_k_1_equals_greedy(model):
    greedy = llama4.generate(model, PROMPTS, 20)
    assert llama4.generate(model, PROMPTS, 20, temperature=1.5, top_k=1, seed=3) == greedy


def test_tiny_top_p_and_full_min_p_equal_greedy(model):
    greedy = llama4.generate(model, PROMPTS, 20)
    assert llama4.generate(model, PROMPTS, 20, temperature=1.5, top_p=1e-6, seed=3) == greedy
    assert llama4.generate(model, PROMPTS, 20, temperature=1.5, min_p=1.0, seed=3) == greedy


def test_seeded_sampling_is_reproducible_and_seeds_differ(model):
    a = llama4.generate(model, PROMPTS, 20, temperature=1.0, seed=1)
    assert llama4.generate(model, PROMPTS, 20, temperature=1.0, seed=1) == a
    assert llama4.generate(model, PROMPTS, 20, temperature=1.0, seed=2) != a
    assert a != llama4.generate(model, PROMPTS, 20)  # not greedy
    # a request's draws do not depend on its batch neighbours
    assert llama4.generate(model, PROMPTS[:1], 20, temperature=1.0, seed=1) == a[:1]


def test_penalties_change_greedy_output(model):
    plain = llama4.generate(model, PROMPTS, 30)
    penalised = llama4.generate(model, PROMPTS, 30, presence_penalty=100.0)
    assert plain != penalised
    for out in penalised:  # a huge presence penalty forbids any repeat within the vocabulary
        assert len(set(out)) == len(out)
    assert llama4.generate(model, PROMPTS, 30, repetition_penalty=100.0) != plain
    freq = llama4.generate(model, PROMPTS, 30, frequency_penalty=100.0)
    for out in freq:
        assert len(set(out)) == len(out)


def test_stop_string_spanning_tokens_is_cut(model):
    tok = CharTokenizer()
    full = Engine(model, slots=1, max_len=64).generate(
        [PROMPTS[0]], SamplingParams(max_tokens=20), tokenizer=tok
    )
    text, tokens = full[0].text, full[0].tokens
    assert text == tok.decode(tokens)
    # a stop string starting in the middle of token 5 and ending inside token 7
    stop = text[11:15]
    start = text.find(stop)
    c = Engine(model, slots=1, max_len=64).generate(
        [PROMPTS[0]], SamplingParams(max_tokens=20, stop=("zz-never", stop)), tokenizer=tok
    )[0]
    assert c.text == text[:start]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    end = start + len(stop)  # the token completing the stop string is the last one kept
    assert c.tokens == tokens[: (end + 1) // 2]
    # streamed deltas agree and never show text after the cut
    events = list(llama4.stream(model, [PROMPTS[0]], 20, stop=[stop], tokenizer=tok))
    assert "".join(e.text for e in events) == text[:start]
    assert events[-1].finish_reason == "stop"
    # one stop string may be passed bare (not taken as a sequence of one-character stops)
    bare = list(llama4.stream(model, [PROMPTS[0]], 20, stop=stop, tokenizer=tok))
    assert [(e.token, e.text) for e in bare] == [(e.token, e.text) for e in events]
    assert bare[-1].stop_reason == stop
    assert llama4.generate(model, [PROMPTS[0]], 20, stop=stop, tokenizer=tok) == [c.tokens]


def test_text_stream_holds_back_a_possible_stop_prefix():
    tok = CharTokenizer()
    ts = TextStream(tok, stop=("aBcB",))  # decodes of ids 26 ("aB") then 28 ("cB")
    assert ts.add(0) == "aA"
    assert ts.add(26) == ""  # "aB" might start the stop string
    assert ts.add(28) == "" and ts.stopped_by == "aBcB"
    ts = TextStream(tok, stop=("aBcB",))
    ts.add(26)
    assert ts.add(1) == "aBbA"  # not the stop string after all: released
    assert ts.finish() == ""


def test_streaming_deltas_concatenate_to_the_full_text():
    from llama4.tokenizer import Tokenizer

    tok = Tokenizer.default()
    model = make_model(vocab=tok.n_words, std=0.02)
    prompts = [tok.encode("Hello, world"), tok.encode("日本語のテキスト")]
    events = list(llama4.stream(model, prompts, 24, temperature=1.0, seed=0, tokenizer=tok))
    for i in range(len(prompts)):
        mine = [e for e in events if e.index == i]
        tokens = [e.token for e in mine]
        assert len(tokens) == 24 and mine[-1].finish_reason == "length"
        assert all(e.finish_reason is None for e in mine[:-1])
        assert "".join(e.text for e in mine) == tok.decode(tokens)


def test_logprobs_are_log_softmax_sorted_and_normalised(model):
    engine = Engine(model, slots=1, max_len=64)
    c = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=6, temperature=1.0, seed=0, logprobs=5))[0]
    assert len(c.logprobs) == 6
    with torch.inference_mode():
        full = model(torch.tensor([PROMPTS[2] + c.tokens[:-1]]))[0, len(PROMPTS[2]) - 1 :]
    want = torch.log_softmax(full.float(), -1)
    for step, lp in enumerate(c.logprobs):
        assert lp.token == c.tokens[step]
        assert math.isclose(lp.logprob, float(want[step, lp.token]), abs_tol=1e-4)
        ids = [t for t, _ in lp.top]
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True) and len(ids) == 5
        assert ids == want[step].topk(5).indices.tolist()
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-6
    # top-n over the whole vocabulary is a normalised distribution
    c = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=1, logprobs=VOCAB))[0]
    assert math.isclose(sum(math.exp(v) for _, v in c.logprobs[0].top), 1.0, rel_tol=1e-5)
    assert c.logprobs[0].top[0][0] == c.tokens[0]  # greedy picked the most likely


def test_per_request_params_in_one_batch(model):
    greedy = llama4.generate(model, PROMPTS, 12)
    engine = Engine(model, slots=3, max_len=64)
    mixed = engine.generate(
        PROMPTS,
        [
            SamplingParams(max_tokens=12),
            SamplingParams(max_tokens=12, temperature=1.0, seed=5),
            SamplingParams(max_tokens=4),
        ],
    )
    assert mixed[0].tokens == greedy[0]
    assert mixed[2].tokens == greedy[2][:4] and mixed[2].finish_reason == "length"
    alone = Engine(model, slots=1, max_len=64).generate(
        [PROMPTS[1]], SamplingParams(max_tokens=12, temperature=1.0, seed=5)
    )
    assert mixed[1].tokens == alone[0].tokens


def test_tiny_temperature_is_greedy_not_nan():
    # logits / 1e-40 overflows to inf; below 1e-5 the sampler takes the greedy limit.
    assert SamplingParams(max_tokens=1, temperature=1e-40).greedy
    assert not SamplingParams(max_tokens=1, temperature=1e-3).greedy
