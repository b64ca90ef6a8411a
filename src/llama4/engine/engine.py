"""The inference engine: slot-level prefill/decode over the KV cache, and the generation loop.

Shape legend: B rows in a forward, T tokens per row, V vocabulary, D model dim.

Slot operations (what a continuous-batching scheduler builds on):

- ``prefill(slots, prompts)`` appends each prompt to its slot (after what the slot already
  holds) and returns the logits of each prompt's last token. Several slots go in one forward,
  right-padded; long prompts are split into pieces of ``prefill_chunk`` tokens.
- ``decode(slots, tokens)`` appends one token per slot and returns the next-token logits.
- ``free(slot)``; ``reuse_prefix(slot, tokens)`` keeps the longest stored prefix of `tokens`
  that the cache can continue from (a chat turn only prefills the new messages).

Padding and positions: each slot has its own length, so rows carry their own absolute
positions; short rows are padded on the right, and pads are neither attended to by real
tokens nor stored. Decoding rows of different lengths needs no padding at all.

``stream``/``generate`` run a batch of prompts to completion with per-request sampling, stop
conditions and streamed text.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from llama4 import kernels
from llama4.engine.cache import KVCache
from llama4.engine.sampling import SamplerState, SamplingParams, TokenLogprob, logprobs_of, sample
from llama4.engine.step import DecodeStep
from llama4.engine.text import TextStream
from llama4.model.inference import prepare_for_inference
from llama4.model.layers import FEW_ROWS
from llama4.model.transformer import Transformer


@dataclass
class Event:
    """One generated token of sequence `index`, with its text delta (possibly "").

    The last event of a sequence carries ``finish_reason`` ("stop" or "length"); a sequence
    with ``max_tokens == 0`` gets a single event with ``token`` None.
    """

    index: int
    token: int | None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string, if any
    logprob: TokenLogprob | None = None


@dataclass
class Completion:
    """A finished sequence. `tokens` are the new tokens, a stop token included; `text` is cut
    before any stop string (the token completing a stop string is still in `tokens`)."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None


_DEFAULT_PARAMS = SamplingParams()
HEAD_BLOCK = 512  # rows of the output head per GEMM on CPU (see Engine._logits)


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Logits for sampling: at least float32."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class Engine:
    """Generation with a slot-based KV cache owned here. One engine serves one model.

    slots: sequences that can be in flight at once (cache rows). max_len: longest sequence
    (prompt + output) per slot; default the config's ``max_seq_len``. The cache takes the
    model's dtype unless `cache_dtype` says otherwise. `compile`: run the model through
    ``torch.compile`` (meant for GPUs; the first calls are slow). `one_call_decode`: on CPU with
    float32 or bfloat16 weights, run each decode step in one call of llama4's C kernels
    (``llama4.engine.step``) where it applies, else the model's forward.
    """

    def __init__(
        self,
        model: Transformer,
        *,
        slots: int = 1,
        max_len: int | None = None,
        cache_dtype: torch.dtype | None = None,
        prefill_chunk: int = 2048,
        compile: bool = False,
        one_call_decode: bool = True,
    ) -> None:
        # Fused projections and, on CPU, a matvec-friendly memory order: same values, faster steps.
        self.model = prepare_for_inference(model.eval())
        cfg = model.config.text
        weight = model.tok_embeddings.weight
        self.device = weight.device
        self.vocab_size = cfg.vocab_size
        self.max_len = max_len or cfg.max_seq_len
        if cache_dtype is not None and cache_dtype != weight.dtype:
            raise ValueError(
                f"cache_dtype={cache_dtype} must match the model's weights ({weight.dtype}): "
                "attention reads the cache in the dtype it computes in"
            )
        self.cache = KVCache(
            cfg, slots=slots, max_len=self.max_len, dtype=cache_dtype or weight.dtype, device=self.device
        )
        self.prefill_chunk = prefill_chunk
        self.history: list[list[int]] = [[] for _ in range(slots)]  # tokens stored per slot
        self._hidden = self._compiled_hidden if compile else model.hidden
        self._compiled = torch.compile(model.hidden, dynamic=True) if compile else None
        one_call = one_call_decode and not compile and self.device.type == "cpu"
        self._one_call = DecodeStep.build(self.model, self.cache) if one_call else None

    @property
    def slots(self) -> int:
        return self.cache.n_slots

    def free_slots(self) -> list[int]:
        return [s for s in range(self.slots) if not self.history[s]]

    # ----- slot operations ------------------------------------------------------------------------

    def free(self, slot: int) -> None:
        self.cache.free(slot)
        self.history[slot] = []
        if not any(self.history):  # idle: the kernels need hold none of the weights to read ahead
            kernels.forget_read_ahead()

    def reuse_prefix(self, slot: int, tokens: Sequence[int]) -> int:
        """Keep the longest prefix of `tokens` the slot already holds (at least one token of
        `tokens` is left to prefill, for its logits); return how many tokens are kept."""
        held = self.history[slot]
        n = 0
        limit = min(len(held), len(tokens) - 1)
        while n < limit and held[n] == tokens[n]:
            n += 1
        while n and not self.cache.can_truncate(slot, n):
            n = (n - 1) // self.cache.chunk * self.cache.chunk  # back to a chunk start
        self.cache.truncate(slot, n)
        del held[n:]
        return n

    @torch.inference_mode()
    def prefill(
        self,
        slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
        image_features: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Append prompts[b] to slots[b]; return the logits (B, V) (at least float32) of each last token.

        image_features[b]: the projected features (P_b, D) of the `<|patch|>` tokens of
        prompts[b], in order (see ``Transformer.image_features``), or None.
        """
        B = len(slots)
        assert B == len(prompts), f"{B} slots but {len(prompts)} prompts"
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        for p in prompts:
            self._check_ids(p)
        feats = [None if f is None else f.reshape(-1, f.shape[-1]) for f in (image_features or [None] * B)]
        image_id = self.model.config.image_token_id
        done = [0] * B  # tokens of each prompt prefilled so far
        feat_done = [0] * B
        out: list[torch.Tensor | None] = [None] * B
        while True:
            rows = [b for b in range(B) if done[b] < len(prompts[b])]
            if not rows:
                break
            pieces = [list(prompts[b][done[b] : done[b] + self.prefill_chunk]) for b in rows]
            T = max(len(p) for p in pieces)
            tokens = torch.zeros(len(rows), T, dtype=torch.long)
            for r, p in enumerate(pieces):
                tokens[r, : len(p)] = torch.tensor(p)
            piece_feats = None
            if any(feats[b] is not None for b in rows):
                parts = []  # features in the row-major order of the piece's <|patch|> tokens
                for b, p in zip(rows, pieces):
                    n = sum(1 for t in p if t == image_id)
                    if n:
                        parts.append(feats[b][feat_done[b] : feat_done[b] + n])
                        feat_done[b] += n
                piece_feats = torch.cat(parts) if parts else None
            tokens = tokens.to(self.device)
            positions = self.cache.begin([slots[b] for b in rows], [len(p) for p in pieces], T)
            with self._rollback_on_error(slots):
                h = self._hidden(tokens, positions=positions, cache=self.cache, image_features=piece_feats)
            ends = [
                (r, b, len(p))
                for r, (b, p) in enumerate(zip(rows, pieces))
                if done[b] + len(p) == len(prompts[b])
            ]
            if ends:
                last = h[[r for r, _, _ in ends], [n - 1 for _, _, n in ends]]  # (n_end, D)
                logits = self._logits(last)
                for i, (_, b, _) in enumerate(ends):
                    out[b] = logits[i]
            for b, p in zip(rows, pieces):
                done[b] += len(p)
                self.history[slots[b]].extend(p)
        return torch.stack(out)

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """Append one token to each slot; return the next-token logits (B, V) (at least float32)."""
        if len(tokens) != len(slots):
            raise ValueError(f"{len(tokens)} tokens for {len(slots)} slots")
        self._check_ids(tokens)
        step = self._one_call
        if step is not None and not (step.cache is self.cache and step.current()):
            # The model (or cache) changed since the plan was made: plan again (None: the model's
            # forward from now on, e.g. for weights that are no longer fused).
            step = self._one_call = DecodeStep.build(self.model, self.cache)
        if step is not None and len(slots) <= FEW_ROWS and step.usable():
            positions = self.cache.advance(slots)
            with self._rollback_on_error(slots):
                logits = step(tokens, slots, positions)
        else:
            positions = self.cache.begin(slots, [1] * len(slots), 1)
            x = torch.tensor(list(tokens), dtype=torch.long, device=self.device)[:, None]
            with self._rollback_on_error(slots):
                logits = self._logits(self._hidden(x, positions=positions, cache=self.cache)[:, 0])
        for s, t in zip(slots, tokens):
            self.history[s].append(t)
        return logits

    def _check_ids(self, ids: Sequence[int]) -> None:
        """Token ids outside the vocabulary are the caller's error, said as such (the embedding
        would raise an opaque IndexError, or a device-side assert on GPU). `ids`: any sequence
        of integers (a list, a 1-D tensor or array)."""
        values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if values and not (0 <= min(values) and max(values) < self.vocab_size):
            bad = next(i for i in values if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output head on hidden states (B, D) -> logits (B, V), at least float32.

        Up to FEW_ROWS rows, `layers.linear`'s few-row kernel. On CPU with more rows (or without
        that kernel, not float32) the (V, D) head is applied in blocks of HEAD_BLOCK rows: MKL's
        small-batch GEMM on a large matrix runs at a fraction of memory bandwidth, on blocks it is
        1.5-2x faster. Same values either way.
        """
        w = self.model.output.weight
        few = h.shape[0] <= FEW_ROWS and (h.dtype == torch.float32 or kernels.supports(h, w))
        if h.device.type != "cpu" or few or h.shape[0] == 1 or w.shape[0] <= 2 * HEAD_BLOCK:
            return _upcast(self.model.output(h))
        out = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
        for i in range(0, w.shape[0], HEAD_BLOCK):
            out[:, i : i + HEAD_BLOCK] = F.linear(h, w[i : i + HEAD_BLOCK])
        return _upcast(out)

    def _compiled_hidden(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The compiled forward; if compiling fails, warn once and stay eager. The step is rerun
        eagerly: any cache entries a partial run wrote are rewritten with the same values."""
        try:
            return self._compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure
            warnings.warn(
                f"torch.compile failed, running eagerly: {str(e).splitlines()[0][:300]}", stacklevel=2
            )
            self._hidden = self.model.hidden
            return self.model.hidden(*args, **kwargs)

    @contextlib.contextmanager
    def _rollback_on_error(self, slots: Sequence[int]) -> Iterator[None]:
        """A forward that fails (or is interrupted by Ctrl-C) leaves the slots as they were."""
        try:
            yield
        except BaseException:
            for s in slots:
                self.cache.lengths[s] = len(self.history[s])
            raise

    # ----- generation -----------------------------------------------------------------------------

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = _DEFAULT_PARAMS,
        *,
        tokenizer: Any = None,
        image_features: Sequence[torch.Tensor | None] | None = None,
        slots: Sequence[int] | None = None,
        keep: bool = False,
    ) -> Iterator[Event]:
        """Generate for all prompts at once, yielding an Event per new token as it comes.

        params: one SamplingParams for all, or one per prompt. tokenizer: needed for text
        deltas and stop strings (``decode`` and, preferably, ``incremental_decoder``).
        slots: cache rows to use (default: the first free ones). keep: leave the sequences in
        their slots afterwards (a chat continues from them via ``reuse_prefix``); by default
        the slots are freed. The slot's earlier content is reused when it is a prefix.
        """
        B = len(prompts)
        plist = list(params) if isinstance(params, Sequence) else [params] * B
        if len(plist) != B:
            raise ValueError(f"{len(plist)} SamplingParams for {B} prompts")
        if any(p.stop for p in plist) and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if slots is None:
            free = self.free_slots()
            if len(free) < B:
                raise ValueError(f"{B} prompts but only {len(free)} free slots of {self.slots}")
            slots = free[:B]
        slots = list(slots)
        for p in prompts:
            if len(p) >= self.max_len:
                raise ValueError(f"prompt of {len(p)} tokens does not fit max_len={self.max_len}")
            self._check_ids(p)  # before the sampler states index their penalty tables with it
        try:
            yield from self._run(prompts, plist, tokenizer, image_features, slots)
        finally:
            if not keep:
                for s in slots:
                    self.free(s)

    def _run(self, prompts, plist, tokenizer, image_features, slots) -> Iterator[Event]:
        B = len(prompts)
        states = [SamplerState(p, prompt, self.vocab_size, self.device) for p, prompt in zip(plist, prompts)]
        texts = [TextStream(tokenizer, p.stop) if tokenizer is not None else None for p in plist]
        n_out = [0] * B

        live = []
        for i, p in enumerate(plist):
            if p.max_tokens == 0:
                yield Event(i, None, "", "length")
            else:
                live.append(i)
        if not live:
            return
        # Prefill only what the slots do not already hold.
        kept = [self.reuse_prefix(slots[i], prompts[i]) for i in live]
        feats = None
        if image_features is not None:
            image_id = self.model.config.image_token_id
            feats = []
            for i, k in zip(live, kept):
                f = image_features[i]
                skip = sum(1 for t in prompts[i][:k] if t == image_id)
                feats.append(None if f is None else f.reshape(-1, f.shape[-1])[skip:])
        logits = self.prefill([slots[i] for i in live], [prompts[i][k:] for i, k in zip(live, kept)], feats)

        while live:
            tokens = sample(logits, [states[i] for i in live])
            still, next_tokens = [], []
            for row, (i, tok) in enumerate(zip(live, tokens)):
                p, st, ts = plist[i], states[i], texts[i]
                st.record(tok)
                n_out[i] += 1
                lp = logprobs_of(logits[row], tok, p.logprobs) if p.logprobs is not None else None
                finish = stop_reason = None
                text = ""
                if tok in p.stop_ids:
                    finish, stop_reason = "stop", tok
                elif ts is not None:
                    text = ts.add(tok)
                    if ts.stopped_by is not None:
                        finish, stop_reason = "stop", ts.stopped_by
                if finish is None and (
                    n_out[i] >= p.max_tokens or len(self.history[slots[i]]) >= self.max_len
                ):
                    finish = "length"
                if finish is not None and ts is not None:
                    text += ts.finish()
                yield Event(i, tok, text, finish, stop_reason, lp)
                if finish is None:
                    still.append(i)
                    next_tokens.append(tok)
            live = still
            if live:
                logits = self.decode([slots[i] for i in live], next_tokens)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = _DEFAULT_PARAMS,
        **kwargs: Any,
    ) -> list[Completion]:
        """Run ``stream`` to the end and collect one Completion per prompt."""
        out = [Completion() for _ in prompts]
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        for c, p in zip(out, plist):
            if p.logprobs is not None:
                c.logprobs = []
        for ev in self.stream(prompts, params, **kwargs):
            c = out[ev.index]
            if ev.token is not None:
                c.tokens.append(ev.token)
            c.text += ev.text
            if ev.logprob is not None:
                c.logprobs.append(ev.logprob)
            if ev.finish_reason is not None:
                c.finish_reason, c.stop_reason = ev.finish_reason, ev.stop_reason
        return out
