"""A few Prometheus metrics, written in the text exposition format (no client library needed).

Counters and histograms are updated from two threads (the HTTP event loop and the scheduler),
so every update takes the registry's lock; gauges are read at scrape time from callables.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

Labels = tuple[tuple[str, str], ...]


def _fmt_labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) and not x.is_integer() else str(int(x))


class Counter:
    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self.values[key] = self.values.get(key, 0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0)


class Histogram:
    def __init__(self, lock: threading.Lock, buckets: Sequence[float]) -> None:
        self._lock = lock
        self.buckets = sorted(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1


class Registry:
    """Metrics by name, each with a help line; ``render()`` gives the /metrics body."""

    def __init__(self, prefix: str = "llama4_") -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._metrics: list[tuple[str, str, str, object]] = []  # name, type, help, metric

    def counter(self, name: str, help: str) -> Counter:
        c = Counter(self._lock)
        self._metrics.append((self.prefix + name, "counter", help, c))
        return c

    def histogram(self, name: str, help: str, buckets: Sequence[float]) -> Histogram:
        h = Histogram(self._lock, buckets)
        self._metrics.append((self.prefix + name, "histogram", help, h))
        return h

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self._metrics.append((self.prefix + name, "gauge", help, read))

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, kind, help, m in self._metrics:
                lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
                if isinstance(m, Counter):
                    if not m.values:
                        lines.append(f"{name} 0")
                    for labels, v in sorted(m.values.items()):
                        lines.append(f"{name}{_fmt_labels(labels)} {_num(v)}")
                elif isinstance(m, Histogram):
                    cum = 0
                    for le, n in zip([*m.buckets, float("inf")], m.counts):
                        cum += n
                        bound = "+Inf" if le == float("inf") else repr(float(le))
                        lines.append(f'{name}_bucket{{le="{bound}"}} {cum}')
                    lines += [f"{name}_sum {m.sum!r}", f"{name}_count {m.count}"]
                else:
                    lines.append(f"{name} {_num(m())}")
        return "\n".join(lines) + "\n"
