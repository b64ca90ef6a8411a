"""Choosing the next token: sampling parameters, per-request state, logit processing.

Shape legend: B rows (sequences) in a step, V vocabulary.

The order of processing (as in vLLM and transformers):

1. penalties on the raw logits: repetition (CTRL-style, over prompt and generated tokens:
   a seen token's positive logit is divided by the penalty, a negative one multiplied), then
   frequency and presence (OpenAI-style, over generated tokens: ``logit -= frequency * count
   + presence * (count > 0)``);
2. greedy (``temperature == 0``): argmax of the penalised logits; otherwise
3. temperature, then top-k, then top-p (smallest set of tokens whose probability reaches p),
   then min-p (drop tokens below ``min_p * max probability``), then a draw from the
   request's own ``torch.Generator`` (seeded: the same seed gives the same tokens).

Log-probabilities describe the model's distribution: ``log_softmax`` of the raw logits, before
penalties, temperature and truncation (vLLM's default "raw logprobs").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily
# The real-valued fields of SamplingParams (each must be finite).
FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
)


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens and when it stops."""

    max_tokens: int = 256  # new tokens at most (finish reason "length")
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens; 0: off
    top_p: float = 1.0  # nucleus: keep the smallest set with probability >= top_p; 1: off
    min_p: float = 0.0  # drop tokens with probability < min_p * max probability; 0: off
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output; 1: off
    frequency_penalty: float = 0.0  # subtract frequency * count(token in output)
    presence_penalty: float = 0.0  # subtract presence * (token in output)
    seed: int | None = None  # per-request generator seed; None: drawn from torch's global RNG
    stop_ids: tuple[int, ...] = ()  # stop after generating one of these (kept in the tokens)
    stop: tuple[str, ...] = ()  # stop strings: the text is cut before the first occurrence
    logprobs: int | None = None  # None: no log-probs; n >= 0: chosen token's plus the top n

    def __post_init__(self) -> None:
        # Accept lists for the tuple fields (frozen: go through object.__setattr__).
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        for name in FLOAT_FIELDS:
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)} must be a finite number")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs={self.logprobs} must be None or >= 0")

    @property
    def greedy(self) -> bool:
        # Below 1e-5, logits / temperature overflows to inf/nan; the limit is greedy anyway.
        return self.temperature < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass
class TokenLogprob:
    """Log-probability of a chosen token and the `n` most likely alternatives (best first)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class SamplerState:
    """Per-request state: the generator and the token statistics the penalties need."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int], vocab_size: int, device="cpu") -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()).item())
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)
        self.counts: torch.Tensor | None = None  # (V,) occurrences in the output
        self.seen: torch.Tensor | None = None  # (V,) in the prompt or output
        if params.penalised:
            self.counts = torch.zeros(vocab_size, device=device)
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if prompt:
                self.seen[torch.tensor(list(prompt), device=device)] = True

    def record(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1
            self.seen[token] = True


def apply_penalties(logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
    """Penalised copy of one row of logits (V,) (see the module doc for the formulas)."""
    p = state.params
    x = logits
    if p.repetition_penalty != 1.0:
        penalised = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
        x = torch.where(state.seen, penalised, x)
    if p.frequency_penalty or p.presence_penalty:
        x = x - p.frequency_penalty * state.counts - p.presence_penalty * (state.counts > 0).to(x.dtype)
    return x


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on one row (V,): excluded tokens get -inf."""
    x = logits / params.temperature
    V = x.shape[-1]
    if 0 < params.top_k < V:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        # Drop the tokens whose probability, with all the worse ones', is at most 1 - top_p (the
        # better ones then hold at least top_p). Summed from the worst up, as transformers does:
        # the small tail probabilities are not lost in a float32 sum near 1, and ties at the
        # boundary fall the way they fall there.
        sorted_x, order = torch.sort(x, descending=False)
        tail = torch.softmax(sorted_x, dim=-1).cumsum(-1)
        drop_sorted = tail <= 1.0 - params.top_p
        drop_sorted[-1] = False  # the best token is always kept
        x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(x, dim=-1)
        x = x.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return x


def sample(logits: torch.Tensor, states: Sequence[SamplerState]) -> list[int]:
    """One token per row of logits (B, V) float32."""
    if all(s.params.greedy and not s.params.penalised for s in states):
        return logits.argmax(-1).tolist()
    out = []
    for row, st in zip(logits, states):
        x = apply_penalties(row, st) if st.params.penalised else row
        if st.params.greedy:
            out.append(int(x.argmax()))
            continue
        probs = torch.softmax(filter_logits(x, st.params), dim=-1)
        out.append(int(torch.multinomial(probs, 1, generator=st.generator)))
    return out


def logprobs_of(logits: torch.Tensor, token: int, n: int) -> TokenLogprob:
    """Log-probability of `token` and the top `n` tokens under log_softmax(logits (V,))."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top: list[tuple[int, float]] = []
    if n:
        values, ids = torch.topk(lp, min(n, lp.shape[-1]))
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(lp[token]), top)
