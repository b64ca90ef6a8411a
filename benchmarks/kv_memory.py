"""KV-cache memory of the engine vs a naive cache that keeps every layer's whole history.

Local (chunked-attention) layers never look further back than the chunk in progress, so the
engine gives them one chunk of cache; only the global (NoPE) layers grow with the context.

Prints, for the published presets (bf16 cache, one sequence): KV bytes per token, and memory
at 128k / 1M / 10M tokens. Then confirms the formula by allocating the engine's cache for a
small model with Scout's layer pattern at a long length and measuring the bytes actually held
(tensor storage, and the process's resident memory growth).

    python benchmarks/kv_memory.py [--confirm-tokens 262144]
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from llama4.config import get_preset
from llama4.engine.cache import (
    KVCache,
    kv_bytes_per_token,
    kv_cache_bytes,
    memory_report,
    naive_kv_cache_bytes,
)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--confirm-tokens", type=int, default=262144, help="length of the allocated check")
    args = ap.parse_args()

    for name in ("scout", "maverick", "behemoth"):
        t = get_preset(name).text
        n_global = sum(t.is_global)
        per_layer = kv_bytes_per_token(t)
        print(
            f"\n{name}: {t.n_layers} layers ({n_global} global, {t.n_layers - n_global} local, chunk "
            f"{t.attention_chunk_size}), {t.n_kv_heads} KV heads x {t.head_dim}, bf16"
        )
        print(
            f"  KV bytes per token: {human(per_layer)} per layer; naive {human(per_layer * t.n_layers)}, "
            f"engine {human(per_layer * n_global)} (+ local layers capped at one chunk)"
        )
        print(f"  {'tokens':>12} {'naive':>12} {'engine':>12} {'ratio':>7}")
        for row in memory_report(t):
            print(
                f"  {row.n_tokens:>12,} {human(row.naive_bytes):>12} {human(row.engine_bytes):>12} {row.ratio:>7.3f}"
            )
        if name == "scout":
            ratio = memory_report(t, (131072,))[0].ratio
            print(
                f"  goal at 128k: <= 0.3x of a full cache -> {ratio:.3f}x ({'met' if ratio <= 0.3 else 'NOT met'})"
            )

    # Allocate for real: Scout's layer pattern (48 layers, 12 global, chunk 8192), small heads.
    scout = get_preset("scout").text
    small = dataclasses.replace(scout, n_heads=2, n_kv_heads=1, head_dim=16, dim=32)
    n = args.confirm_tokens
    before = rss()
    cache = KVCache(small, slots=1, max_len=n, dtype=torch.bfloat16)
    grown = rss() - before
    held = sum(x.untyped_storage().nbytes() for x in (cache.gk, cache.gv, cache.lk, cache.lv))
    want = kv_cache_bytes(small, n)
    naive = naive_kv_cache_bytes(small, n)
    print(
        f"\nallocated check: Scout's layer pattern with 1 KV head x 16, {n:,} tokens, bf16:\n"
        f"  formula {human(want)}, tensor storage {human(held)}, resident memory grew {human(grown)}; "
        f"naive would be {human(naive)} ({held / naive:.3f}x)"
    )
    assert held == want == cache.nbytes, (held, want, cache.nbytes)


if __name__ == "__main__":
    main()
