"""``llama4.generate`` and ``llama4.stream``: token ids in, new token ids out.

Both take a model (``llama4.load(...)``) or an ``Engine``, and one list of token ids per
prompt. With a model, an engine sized for this call (one cache slot per prompt, room for the
longest prompt plus ``max_new_tokens``) is built and dropped afterwards; pass an ``Engine`` to
keep its cache between calls.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from llama4.engine.engine import Engine, Event
from llama4.engine.sampling import SamplingParams
from llama4.model.transformer import Transformer


def _engine(model: Transformer | Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> Engine:
    if isinstance(model, Engine):
        return model
    longest = max((len(p) for p in prompts), default=1)
    return Engine(model, slots=max(1, len(prompts)), max_len=longest + max(1, max_new_tokens))


def generate(
    model: Transformer | Engine,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 256,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
    stop: str | Sequence[str] = (),
    tokenizer: Any = None,
    image_features: Sequence[torch.Tensor | None] | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (a stop token, if hit, is the last one).

    temperature 0 is greedy. All prompts run as one batch, each stopping on its own. `seed`
    seeds each request's generator (prompt i uses seed + i, so identical prompts differ).
    Stop strings need `tokenizer`. See ``SamplingParams`` for every option and
    ``Engine.generate`` for text, finish reasons and log-probabilities.
    """
    engine = _engine(model, prompts, max_new_tokens)
    params = _per_prompt(
        len(prompts),
        seed,
        max_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        stop_ids=tuple(stop_ids),
        stop=stop,  # SamplingParams takes one string or several
    )
    done = engine.generate(prompts, params, tokenizer=tokenizer, image_features=image_features)
    return [c.tokens for c in done]


def stream(
    model: Transformer | Engine,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 256,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
    stop: str | Sequence[str] = (),
    logprobs: int | None = None,
    tokenizer: Any = None,
    image_features: Sequence[torch.Tensor | None] | None = None,
) -> Iterator[Event]:
    """Like ``generate``, but yields ``Event``s (index, token, text delta, finish_reason,
    stop_reason, logprob) as tokens are produced. Text deltas need `tokenizer`; their
    concatenation per prompt is the final text, cut before any stop string."""
    engine = _engine(model, prompts, max_new_tokens)
    params = _per_prompt(
        len(prompts),
        seed,
        max_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        stop_ids=tuple(stop_ids),
        stop=stop,  # SamplingParams takes one string or several
        logprobs=logprobs,
    )
    return engine.stream(prompts, params, tokenizer=tokenizer, image_features=image_features)


def _per_prompt(n: int, seed: int | None, **kwargs: Any) -> list[SamplingParams]:
    return [SamplingParams(seed=None if seed is None else seed + i, **kwargs) for i in range(n)]
