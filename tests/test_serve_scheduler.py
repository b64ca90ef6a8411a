"""The continuous-batching scheduler in-process (no HTTP): jobs join the running batch, long
prompts are prefilled in budget-sized pieces between decode steps, finished slots are reused
with their prefix, cancelled jobs free their slot, the queue is bounded, and greedy results
equal the engine's one-request-at-a-time generation. Plus the sampler's final draw."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from llama4.config import get_preset
from llama4.engine import Engine, SamplingParams
from llama4.engine.sampling import SamplerState
from llama4.model.transformer import Transformer
from llama4.serve.scheduler import Job, QueueFull, Scheduler, SchedulerStopped, sample_tokens
from llama4.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model():
    m = Transformer(get_preset("debug"))  # vocab 512, attention chunk 32
    m.init_weights(0, std=0.1)
    return m.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.default()


class Collector:
    """A sink that records (time, event) per job index and lets a test wait on a condition."""

    def __init__(self) -> None:
        self.events: dict[int, list] = {}
        self.log: list[tuple[int, int | None]] = []  # (job index, token) in arrival order
        self.cond = threading.Condition()
        self.errors: list[BaseException] = []

    def sink(self, event) -> None:
        with self.cond:
            if isinstance(event, BaseException):  # e.g. the scheduler stopping at the end of a test
                self.errors.append(event)
                return
            self.events.setdefault(event.index, []).append(event)
            self.log.append((event.index, event.token))
            self.cond.notify_all()

    def wait(self, predicate, timeout: float = 60) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), self.events

    def done(self, index: int) -> bool:
        evs = self.events.get(index, [])
        return bool(evs) and evs[-1].finish_reason is not None

    def tokens(self, index: int) -> list[int]:
        return [e.token for e in self.events[index]]


def job(prompt, collector, index, max_tokens=12, **kw) -> Job:
    return Job(list(prompt), SamplingParams(max_tokens=max_tokens, **kw), collector.sink, index=index)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def run(model, tokenizer):
    schedulers = []

    def make(slots=4, **kw) -> Scheduler:
        s = Scheduler(Engine(model, slots=slots, max_len=256), tokenizer, **kw)
        s.start()
        schedulers.append(s)
        return s

    yield make
    for s in schedulers:
        s.stop()


def alone(model, p, n):
    return Engine(model, slots=1, max_len=256).generate([p], SamplingParams(max_tokens=n))[0].tokens


def test_jobs_join_the_running_batch_and_match_generation_alone(run, model):
    sched, c = run(slots=4), Collector()
    prompts = [prompt(9, 1), prompt(5, 2), prompt(14, 3)]
    sched.submit([job(prompts[0], c, 0, max_tokens=30)])
    c.wait(lambda: len(c.events.get(0, [])) >= 5)
    sched.submit([job(prompts[1], c, 1, max_tokens=10), job(prompts[2], c, 2, max_tokens=10)])
    c.wait(lambda: all(c.done(i) for i in range(3)))
    # The later jobs ran while the first was still decoding, and finished before it.
    first_of_1 = c.log.index((1, c.tokens(1)[0]))
    assert first_of_1 < len(c.log) - 1 and c.log[-1][0] == 0
    assert max(sched.stats.steps, 0) > 0
    for i, (p, n) in enumerate(zip(prompts, (30, 10, 10))):
        assert c.tokens(i) == alone(model, p, n)


def test_long_prefill_is_chunked_between_decode_steps(run):
    sched, c = run(slots=2, prefill_budget=16), Collector()
    sched.submit([job(prompt(4, 5), c, 0, max_tokens=60)])
    c.wait(lambda: len(c.events.get(0, [])) >= 2)
    before = len(c.events[0])
    sched.submit([job(prompt(160, 6), c, 1, max_tokens=2)])  # 10 budget-sized pieces
    c.wait(lambda: 1 in c.events)
    during = len(c.events[0]) - before
    assert during >= 8, f"the running job got {during} tokens during a 160-token prefill in pieces of 16"


def test_finished_slot_keeps_its_prefix_for_the_next_turn(run, model):
    class Hooks:
        cached: list[int] = []

        def on_admit(self, job, cached):
            self.cached.append(cached)

    hooks = Hooks()
    sched, c = run(slots=2, metrics=hooks), Collector()
    first = prompt(40, 7)
    sched.submit([job(first, c, 0, max_tokens=6)])
    c.wait(lambda: c.done(0))
    second = first + c.tokens(0) + prompt(5, 8)  # the next turn of the conversation
    sched.submit([job(second, c, 1, max_tokens=6)])
    c.wait(lambda: c.done(1))
    assert hooks.cached == [0, len(first) + 6 - 1]  # the last generated token was never fed
    assert c.tokens(1) == alone(model, second, 6)
    assert sched.stats.running == 0 and sched.stats.kv_cached_tokens > 0


class Outcomes:
    """The scheduler's metrics hook for finished jobs: how each ended."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []

    def on_finish(self, job: Job, reason: str) -> None:
        self.seen.append((job.index, reason))


def test_cancel_frees_the_slot_and_queue_is_bounded(run):
    outcomes = Outcomes()
    sched, c = run(slots=1, max_queue=1, metrics=outcomes), Collector()
    a, b = job(prompt(4, 9), c, 0, max_tokens=200), job(prompt(4, 10), c, 1, max_tokens=3)
    sched.submit([a])
    c.wait(lambda: len(c.events.get(0, [])) >= 2)
    sched.submit([b])  # waits: the only slot is taken
    with pytest.raises(QueueFull):
        sched.submit([job(prompt(4, 11), c, 2)])
    assert sched.stats.waiting == 1
    sched.cancel([a])
    c.wait(lambda: c.done(1))  # b got the slot
    assert not c.done(0) and len(c.events[0]) < 200
    deadline = time.monotonic() + 5
    while sched.stats.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sched.stats.running == 0 and sched.stats.kv_tokens == 0 and sched.stats.waiting == 0
    # Cancelled while queued counts as cancelled too.
    d, e = job(prompt(4, 12), c, 3, max_tokens=200), job(prompt(4, 13), c, 4)
    sched.submit([d])
    c.wait(lambda: len(c.events.get(3, [])) >= 1)
    sched.submit([e])
    sched.cancel([e, d])
    deadline = time.monotonic() + 5
    while len(outcomes.seen) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(outcomes.seen) == [(0, "cancelled"), (1, "length"), (3, "cancelled"), (4, "cancelled")]


def test_free_slots_take_a_burst_before_the_queue_counts(run):
    # Jobs that arrive together within one step wait for its end even when slots are free: the
    # free slots take them first, only the rest counts against max_queue (0: no queue at all).
    sched, c = run(slots=3, max_queue=0), Collector()
    sched.submit([job(prompt(4, i), c, i, max_tokens=150) for i in range(2)])
    sched.submit([job(prompt(4, 2), c, 2, max_tokens=150)])  # the third free slot
    with pytest.raises(QueueFull):
        sched.submit([job(prompt(4, 3), c, 3)])
    sched.cancel([Job([1], SamplingParams(), c.sink, index=9)])  # not queued: nothing happens
    c.wait(lambda: all(len(c.events.get(i, [])) >= 1 for i in range(3)))  # all three run


def test_drain_refuses_new_and_queued_work_and_lets_running_jobs_finish(run):
    # A server going down: queued jobs fail at once, running ones run to their end.
    sched, c = run(slots=1), Collector()
    running, queued = job(prompt(4, 20), c, 0, max_tokens=40), job(prompt(4, 21), c, 1)
    sched.submit([running])
    c.wait(lambda: len(c.events.get(0, [])) >= 1)
    sched.submit([queued])
    sched.drain()
    with pytest.raises(SchedulerStopped, match="shutting down"):
        sched.submit([job(prompt(4, 22), c, 2)])
    c.wait(lambda: c.done(0))
    assert len(c.events[0]) == 40 and 1 not in c.events  # the queued job never ran
    assert [str(e) for e in c.errors] == ["the server is shutting down"]


def test_stop_token_ends_the_job(run, model):
    sched, c = run(slots=2), Collector()
    p = prompt(6, 12)
    full = alone(model, p, 12)
    sched.submit([job(p, c, 0, max_tokens=12, stop_ids=(full[3],))])
    c.wait(lambda: c.done(0))
    assert c.tokens(0) == full[: full.index(full[3]) + 1]
    assert c.events[0][-1].finish_reason == "stop" and c.events[0][-1].stop_reason == full[3]


def test_sample_tokens_draws_from_the_distribution():
    V = 6
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0, 0.0, 1.5]])
    expected = torch.softmax(logits[0] / 0.7, -1)
    st = SamplerState(SamplingParams(temperature=0.7, seed=3), [], V)
    counts = torch.zeros(V)
    for _ in range(5000):
        counts[sample_tokens(logits, [st])[0]] += 1
    assert torch.allclose(counts / 5000, expected, atol=0.025), (counts / 5000, expected)
    # Seeded: the same seed, the same draws; top_k=1 is the argmax; greedy rows mix with sampled ones.
    draws = [
        [sample_tokens(logits, [s])[0] for _ in range(20)]
        for s in (SamplerState(SamplingParams(temperature=1.0, seed=5), [], V) for _ in range(2))
    ]
    assert draws[0] == draws[1]
    top1 = SamplerState(SamplingParams(temperature=1.0, top_k=1, seed=1), [], V)
    greedy = SamplerState(SamplingParams(temperature=0.0), [], V)
    assert sample_tokens(logits.repeat(2, 1), [top1, greedy]) == [1, 1]
