"""Continuous batching: one thread owns the engine and steps every sequence in flight.

Each request choice is a ``Job`` (a prompt, its ``SamplingParams``, optional images, and a sink
that receives ``llama4.engine.Event``s). Jobs wait in a bounded FIFO queue; ``submit`` refuses
with ``QueueFull`` past ``max_queue`` waiting jobs beyond the free slots (jobs arriving within
one step wait for its end, even for a free slot), and the HTTP layer turns that into a 429.

One step of the scheduler thread:

1. **Reap**: cancelled jobs (their client went away) give their slot back, cache cleared.
2. **Admit**: while a cache slot is free, the next waiting job takes one. With the prefix
   cache on, a finished job leaves its tokens in its slot and a new job picks the free slot
   that already holds the longest prefix of its prompt (a chat turn then only prefills the new
   messages); the engine's ``reuse_prefix`` cuts the slot back to that prefix.
3. **Prefill** (chunked): jobs still reading their prompt share a budget of
   ``prefill_budget`` tokens per step, oldest first, in one forward; a long prompt takes
   several steps, so running decodes wait at most one budget-sized forward per token.
   Image features are computed by the vision tower when a job's prefill starts.
4. **Decode**: every job that has a token to feed (including the ones whose prefill just
   ended) advances by one token in one forward; tokens are sampled per job with the engine's
   sampler, detokenized with its ``TextStream`` (stop strings), and handed to the sinks.
   Finished jobs leave the batch at once; their slot is free for the next step's admissions.

Sampling is the engine's (``sample_tokens`` below only replaces its final draw, see there).

All engine and cache calls happen on the scheduler thread. Other threads only touch the
waiting queue and the count of open slots (under a lock), set ``Job.cancelled``, and read
``stats`` (an immutable snapshot replaced after every step). Metrics hooks may be called from
any of these threads.

Engine operations used: ``prefill(slots, pieces, features)`` (appends to a slot after what it
holds, so chunked prefill is repeated calls), ``decode(slots, tokens)``, ``free(slot)``,
``reuse_prefix(slot, tokens)`` and ``history``; sampling: ``SamplerState``, ``sample``,
``apply_penalties``, ``filter_logits``, ``logprobs_of``; text: ``TextStream``. No engine file
was changed for this.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from llama4.engine.engine import Engine, Event
from llama4.engine.sampling import (
    SamplerState,
    SamplingParams,
    apply_penalties,
    filter_logits,
    logprobs_of,
    sample,
)
from llama4.engine.text import TextStream

log = logging.getLogger("llama4.serve")

Sink = Callable[[Event | BaseException], None]


class SchedulerStopped(Exception):
    """The scheduler thread is not running (not started, stopped, or died)."""


class QueueFull(Exception):
    """The waiting queue is at its limit; try again after ``retry_after`` seconds."""

    def __init__(self, waiting: int, limit: int, retry_after: int = 1) -> None:
        super().__init__(f"the server is busy: {waiting} requests are waiting (limit {limit}); retry later")
        self.retry_after = retry_after


@dataclass
class Job:
    """One sequence to generate. ``images``: pixel tiles (n_tiles, 3, S, S) of each image of
    the prompt in order; ``image_keys``: a digest of each (so the prefix cache never reuses
    the features of a different image behind identical placeholder tokens)."""

    prompt: list[int]
    params: SamplingParams
    sink: Sink
    index: int = 0  # the choice index reported in events
    images: Sequence[torch.Tensor] = ()
    image_keys: Sequence[str] = ()
    cancelled: bool = False  # set by any thread; the scheduler retires the job at its next step

    # Scheduler-thread state.
    slot: int = -1
    done: int = 0  # prompt tokens in the cache
    n_out: int = 0
    next_token: int | None = None  # sampled, not yet fed
    features: torch.Tensor | None = None  # image features of the prompt's patches from `done` on
    feat_done: int = 0
    sampler: SamplerState | None = None
    text: TextStream | None = None
    submitted: float = field(default_factory=time.monotonic)
    keys: list[int] = field(default_factory=list)  # prompt ids, images marked by their digest

    @property
    def prefilling(self) -> bool:
        return self.done < len(self.prompt)


@dataclass(frozen=True)
class Stats:
    """What the scheduler looked like after its last step (read by /metrics and /health)."""

    running: int = 0  # jobs holding a slot
    waiting: int = 0
    batch_size: int = 0  # rows in the last decode forward
    kv_tokens: int = 0  # tokens in the cache for running jobs
    kv_cached_tokens: int = 0  # tokens kept in free slots for prefix reuse
    slots: int = 0
    max_len: int = 0
    steps: int = 0


def sample_tokens(logits: torch.Tensor, states: Sequence[SamplerState]) -> list[int]:
    """``llama4.engine.sampling.sample`` (same penalties, temperature/top-k/top-p/min-p filter,
    per-request seeded generator), except for the final draw, done by inverse CDF (cumulative
    sum in float64, one uniform from the request's generator, binary search).

    Greedy rows take the argmax with numpy on CPU (see ``_argmax``).

    Why: ``torch.multinomial`` costs ~10 ms per row on a 202k vocabulary on CPU, so a batch of
    16 sampled rows spent far longer drawing than the decode forward took. The draw here costs
    about a softmax and has the same distribution; seeded requests stay reproducible (with
    different tokens than ``sample`` would give for the same seed). Row by row on purpose: one
    row's buffers stay in cache, a (16, 202k) batch does not and was 4x slower here. To be
    folded into the engine's ``sample`` by its owner; until then this is the only place the
    server samples.
    """
    if all(s.params.greedy and not s.params.penalised for s in states):
        return _argmax(logits).tolist() if logits.is_cpu else sample(logits, states)
    out = []
    for row, st in zip(logits, states):
        x = apply_penalties(row, st) if st.params.penalised else row
        if st.params.greedy:
            out.append(int(_argmax(x) if x.is_cpu else x.argmax()))
            continue
        cdf = torch.softmax(filter_logits(x, st.params), dim=-1).double().cumsum(-1)
        u = torch.rand(1, generator=st.generator, dtype=torch.float64, device=cdf.device) * cdf[-1]
        out.append(min(int(torch.searchsorted(cdf, u, right=True)), cdf.numel() - 1))
    return out


def _argmax(x: torch.Tensor) -> np.ndarray:
    """argmax over the last dimension of a CPU tensor: numpy's is ~10x faster than torch's
    (1 ms vs 11 ms for 16 x 202k logits on one core); same result, first index on ties."""
    return np.argmax(x.numpy(), axis=-1)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two lists (binary search on C-speed slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Scheduler:
    """Owns `engine` on a background thread; see the module doc.

    tokenizer: for text deltas and stop strings. max_queue: waiting jobs at most, beyond the
    free slots.
    prefill_budget: prompt tokens per step. metrics: an object with optional hooks
    (``on_admit(job, cached)``, ``on_token(job, first)``, ``on_finish(job, reason)``, ``on_step(batch)``).
    dispatch: called with the (sink, event) pairs of each forward, once (the server hands them
    to its event loop in one go); by default each sink is called in turn.
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        *,
        max_queue: int = 64,
        prefill_budget: int = 512,
        prefix_cache: bool = True,
        metrics: Any = None,
        dispatch: Callable[[list[tuple[Sink, Event | BaseException]]], None] | None = None,
    ) -> None:
        assert prefill_budget >= 1, f"prefill_budget={prefill_budget} must be >= 1"
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.prefill_budget = prefill_budget
        self.prefix_cache = prefix_cache
        self.metrics = metrics
        self.dispatch = dispatch
        self._outbox: list[tuple[Sink, Event | BaseException]] = []
        model = engine.model
        self.image_token_id = model.config.image_token_id
        self.image_start_id = getattr(tokenizer, "special_tokens", {}).get("<|image_start|>")
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: dict[int, Job] = {}  # slot -> job, in admission order
        self._free: list[int] = list(range(engine.slots))  # least recently used first
        self._open = engine.slots  # free slots no admitted job has claimed yet (under _cond)
        self._slot_keys: list[list[int]] = [[] for _ in range(engine.slots)]
        self._stop = False
        self._draining = False  # no new work: see `drain`
        self._thread: threading.Thread | None = None
        self._steps = 0
        self._last_batch = 0
        self.stats = Stats(slots=engine.slots, max_len=engine.max_len)

    # ----- any thread -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llama4-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread after its current step: running and waiting jobs get a
        ``SchedulerStopped`` (their requests a 503 or a stream's error event). Waits up to
        `timeout` seconds for the thread (0: not at all)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self) -> None:
        """Take no more work (a server going down): new jobs are refused and waiting ones get a
        ``SchedulerStopped`` at the next step; running jobs go on until they end or `stop`."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue all `jobs` or none (raises ``QueueFull``)."""
        for job in jobs:
            job.keys = self._keys(job)
        with self._cond:
            if self._draining:
                raise SchedulerStopped("the server is shutting down")
            if self._stop or not self.alive:
                raise SchedulerStopped("the generation scheduler is not running")
            # Jobs arriving within one step wait for its end even when slots are free: those
            # that free slots will take at the next step do not count as queued.
            if len(self._waiting) + len(jobs) > self.max_queue + self._open:
                raise QueueFull(len(self._waiting), self.max_queue)
            self._waiting.extend(jobs)
            self.stats = replace(self.stats, waiting=len(self._waiting))
            self._cond.notify_all()

    def cancel(self, jobs: Sequence[Job]) -> None:
        """Stop `jobs`: a waiting job leaves the queue now, a running one at the next step."""
        with self._cond:
            for job in jobs:
                job.cancelled = True
                try:
                    self._waiting.remove(job)
                except ValueError:
                    continue
                self._hook("on_finish", job, "cancelled")  # (running jobs: at the next step)
            self.stats = replace(self.stats, waiting=len(self._waiting))
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _keys(self, job: Job) -> list[int]:
        """The prompt with each ``<|image_start|>`` replaced by a negative id made from the
        image's digest: equal keys mean equal cache content."""
        keys = list(job.prompt)
        if job.image_keys and self.image_start_id is not None:
            digests = iter(job.image_keys)
            for i, t in enumerate(keys):
                if t == self.image_start_id:
                    keys[i] = -1 - int(next(digests, "0")[:15] or "0", 16)
        return keys

    # ----- scheduler thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stop:
                    break
            try:
                self._step()
            except Exception as e:  # a bug or a resource failure: fail what is in flight, keep serving
                log.exception("scheduler step failed; failing %d running requests", len(self._running))
                for job in list(self._running.values()):
                    self._release(job, keep=False)
                    self._emit(job, e)
            try:
                self._flush()
                self._publish()
            except Exception:  # never let the thread die: requests would wait forever
                log.exception("scheduler bookkeeping failed")
                self._outbox = []
        for job in list(self._running.values()) + list(self._waiting):
            self._emit(job, SchedulerStopped("the server is shutting down"))
        self._flush()

    def _step(self) -> None:
        for job in [j for j in self._running.values() if j.cancelled]:
            self._release(job, keep=False)
            self._hook("on_finish", job, "cancelled")
        self._admit()
        prefilling = [j for j in self._running.values() if j.prefilling]
        if prefilling:
            self._prefill(prefilling)
        decoding = [j for j in self._running.values() if j.next_token is not None]
        self._last_batch = len(decoding)
        if decoding:
            self._decode(decoding)
        self._steps += 1
        self._hook("on_step", len(decoding))

    def _publish(self) -> None:
        history = self.engine.history
        running = set(self._running)
        self.stats = Stats(
            running=len(self._running),
            waiting=len(self._waiting),
            batch_size=self._last_batch,
            kv_tokens=sum(len(history[s]) for s in running),
            kv_cached_tokens=sum(len(history[s]) for s in range(self.engine.slots) if s not in running),
            slots=self.engine.slots,
            max_len=self.engine.max_len,
            steps=self._steps,
        )

    def _admit(self) -> None:
        admitted = []
        with self._cond:
            if self._draining:
                refused, self._waiting = list(self._waiting), collections.deque()
                for job in refused:
                    self._emit(job, SchedulerStopped("the server is shutting down"))
            while self._waiting and len(admitted) < len(self._free):
                job = self._waiting.popleft()
                if not job.cancelled:
                    admitted.append(job)
                else:
                    self._hook("on_finish", job, "cancelled")
            self._open -= len(admitted)
        for job in admitted:
            self._place(job)

    def _place(self, job: Job) -> None:
        engine = self.engine
        kept = 0
        if self.prefix_cache:
            # The free slot holding the longest prefix of this prompt; else the least recently used.
            best, best_len = self._free[0], -1
            for s in self._free:
                held = self._slot_keys[s] + engine.history[s][len(self._slot_keys[s]) :]
                n = _common_prefix(held, job.keys)
                if n > best_len:
                    best, best_len = s, n
            slot = best
            limit = min(best_len, len(job.prompt) - 1)
            kept = engine.reuse_prefix(slot, job.prompt[: limit + 1])
        else:
            slot = self._free[0]
            engine.free(slot)
        self._free.remove(slot)
        self._slot_keys[slot] = job.keys
        job.slot, job.done = slot, kept
        job.sampler = SamplerState(job.params, job.prompt, engine.vocab_size, device=engine.device)
        job.text = TextStream(self.tokenizer, job.params.stop)
        self._running[slot] = job
        self._hook("on_admit", job, kept)

    def _release(self, job: Job, *, keep: bool) -> None:
        """Take `job` out of the batch. keep: leave its tokens in the slot for prefix reuse."""
        if self._running.get(job.slot) is not job:
            return
        del self._running[job.slot]
        if not (keep and self.prefix_cache):
            self.engine.free(job.slot)
            self._slot_keys[job.slot] = []
        with self._cond:
            self._free.append(job.slot)  # most recently used last
            self._open += 1
        job.features = None

    @torch.inference_mode()
    def _image_features(self, job: Job) -> torch.Tensor | None:
        """Features (P, D) of the prompt's `<|patch|>` tokens from ``job.done`` on."""
        if not job.images:
            return None
        model = self.engine.model
        skip = job.prompt[: job.done].count(self.image_token_id)
        parts, seen = [], 0
        for pixels in job.images:
            feats = None
            n = pixels.shape[0] * model.config.vision.tokens_per_tile
            if seen + n > skip:  # not entirely in the reused prefix
                feats = model.image_features(pixels.to(self.engine.device))
                feats = feats.reshape(-1, feats.shape[-1])[max(0, skip - seen) :]
                parts.append(feats)
            seen += n
        return torch.cat(parts) if parts else None

    def _prefill(self, jobs: list[Job]) -> None:
        budget = self.prefill_budget
        batch: list[tuple[Job, list[int], torch.Tensor | None]] = []
        for job in jobs:
            if budget <= 0:
                break
            n = min(len(job.prompt) - job.done, budget)
            budget -= n
            piece = job.prompt[job.done : job.done + n]
            if job.images and job.features is None and job.feat_done == 0:
                job.features = self._image_features(job)
            feats = None
            k = piece.count(self.image_token_id) if job.features is not None else 0
            if k:
                feats = job.features[job.feat_done : job.feat_done + k]
            batch.append((job, piece, feats))
        any_feats = any(f is not None for _, _, f in batch)
        try:
            logits = self.engine.prefill(
                [j.slot for j, _, _ in batch],
                [p for _, p, _ in batch],
                [f for _, _, f in batch] if any_feats else None,
            )
        except Exception as e:
            log.exception("prefill failed for %d requests", len(batch))
            for job, _, _ in batch:
                self._release(job, keep=False)
                self._emit(job, e)
            return
        ready, rows = [], []
        for row, (job, piece, feats) in enumerate(batch):
            job.done += len(piece)
            if feats is not None:
                job.feat_done += feats.shape[0]
            if not job.prefilling:
                job.features = None
                ready.append(job)
                rows.append(row)
        if ready:
            first = logits[rows]
            self._accept(ready, first, sample_tokens(first, [j.sampler for j in ready]))

    def _decode(self, jobs: list[Job]) -> None:
        logits = self.engine.decode([j.slot for j in jobs], [j.next_token for j in jobs])
        self._accept(jobs, logits, sample_tokens(logits, [j.sampler for j in jobs]))

    def _accept(self, jobs: list[Job], logits: torch.Tensor, tokens: list[int]) -> None:
        """Record one sampled token per job, emit events, retire the finished jobs."""
        history = self.engine.history
        for row, (job, tok) in enumerate(zip(jobs, tokens)):
            p = job.params
            job.sampler.record(tok)
            job.n_out += 1
            lp = logprobs_of(logits[row], tok, p.logprobs) if p.logprobs is not None else None
            finish = stop_reason = None
            text = ""
            if tok in p.stop_ids:
                finish, stop_reason = "stop", tok
            else:
                text = job.text.add(tok)
                if job.text.stopped_by is not None:
                    finish, stop_reason = "stop", job.text.stopped_by
            if finish is None and (
                job.n_out >= p.max_tokens or len(history[job.slot]) >= self.engine.max_len
            ):
                finish = "length"
            if finish is not None:
                text += job.text.finish()
                job.next_token = None
                self._release(job, keep=True)
            else:
                job.next_token = tok
            self._hook("on_token", job, job.n_out == 1)
            if finish is not None:
                self._hook("on_finish", job, finish)
            self._emit(job, Event(job.index, tok, text, finish, stop_reason, lp))
        self._flush()

    def _emit(self, job: Job, item: Event | BaseException) -> None:
        self._outbox.append((job.sink, item))

    def _flush(self) -> None:
        if not self._outbox:
            return
        out, self._outbox = self._outbox, []
        if self.dispatch is not None:
            self.dispatch(out)
        else:
            for sink, item in out:
                sink(item)

    def _hook(self, name: str, *args: Any) -> None:
        fn = getattr(self.metrics, name, None)
        if fn is not None:
            fn(*args)
