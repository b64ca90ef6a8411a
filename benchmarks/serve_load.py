"""Load test of ``llama4 serve``: 1, 4 and 16 concurrent streaming chat clients.

Each client sends streaming chat completions back to back for a fixed time; the script prints,
per concurrency level, the aggregate output tokens/s (completion tokens from ``usage`` over the
wall time), time to first token (p50/p99) and inter-token latency (p50/p99, between streamed
content chunks), and the throughput relative to one client.

    python benchmarks/serve_load.py                         # random small model, own server
    python benchmarks/serve_load.py --model PATH            # a checkpoint
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 [--api-key K]   # a running server

The clients run in this process (asyncio + httpx), so on a small machine they share the CPU
with the server: the figures are a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = [
    "Tell me a story about a lighthouse keeper.",
    "Explain how a transformer language model works.",
    "Write a short poem about the sea.",
    "What are the main causes of inflation?",
    "Describe the water cycle.",
    "Give me three tips for learning a new language.",
    "Summarise the plot of Hamlet.",
    "How do vaccines train the immune system?",
]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def one_request(client: httpx.AsyncClient, url: str, headers: dict, body: dict, stats: dict) -> None:
    start = time.perf_counter()
    last = None
    async with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            stats["errors"] += 1
            await r.aread()
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                stats["tokens"] += chunk["usage"]["completion_tokens"]
                continue
            choices = chunk.get("choices") or []
            if not choices or not choices[0]["delta"].get("content"):
                continue
            now = time.perf_counter()
            if last is None:
                stats["ttft"].append(now - start)
            else:
                stats["itl"].append(now - last)
            last = now
    stats["requests"] += 1


async def run_level(base: str, headers: dict, clients: int, duration: float, settings: dict) -> dict:
    """`clients` workers sending requests back to back for `duration` seconds; `settings`:
    the sampling fields of each request (model, max_tokens, temperature, ignore_eos)."""
    stats = {"tokens": 0, "requests": 0, "errors": 0, "ttft": [], "itl": []}
    url = base + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        deadline = time.perf_counter() + duration

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < deadline:
                body = {
                    **settings,
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "seed": i,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                await one_request(client, url, headers, body, stats)
                i += clients

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        stats["wall"] = time.perf_counter() - start
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a random small model)")
    ap.add_argument("--url", help="benchmark a running server instead of starting one")
    ap.add_argument("--api-key")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (as vLLM's serving benchmark)")
    ap.add_argument(
        "--stop-at-eos",
        dest="ignore_eos",
        action="store_false",
        help="let replies end at the model's end-of-turn (default: every reply is --max-tokens long)",
    )
    ap.add_argument("--preset", default="debug", help="preset of the random model")
    ap.add_argument("--server-args", default="", help="extra arguments for llama4 serve")
    args = ap.parse_args()

    server = None
    tmp = None
    if args.url:
        base = args.url.rstrip("/")
    else:
        from llama4.serve.testing import ServerProcess, make_random_model

        model = args.model
        if model is None:
            tmp = tempfile.TemporaryDirectory()
            model = str(make_random_model(Path(tmp.name) / "random-small", preset=args.preset))
        server_args = ["--model", model, "--max-batch", str(max(args.clients)), *args.server_args.split()]
        server = ServerProcess(server_args)
        base = server.url
        print(f"server: llama4 serve {' '.join(server_args)}  ({server.output[0].strip()})")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        model_id = httpx.get(base + "/v1/models", headers=headers).json()["data"][0]["id"]
        settings = {
            "model": model_id,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "ignore_eos": args.ignore_eos,
        }
        asyncio.run(
            run_level(base, headers, 1, min(3.0, args.duration), {**settings, "max_tokens": 8})
        )  # warm-up
        print(f"{'clients':>7} {'tok/s':>8} {'x1':>6} {'reqs':>5} {'ttft p50':>9} {'ttft p99':>9} "
              f"{'itl p50':>8} {'itl p99':>8} {'errors':>6}")  # fmt: skip
        base_rate = None
        for c in args.clients:
            s = asyncio.run(run_level(base, headers, c, args.duration, settings))
            rate = s["tokens"] / s["wall"]
            base_rate = base_rate or rate
            print(
                f"{c:>7} {rate:>8.1f} {rate / base_rate:>6.2f} {s['requests']:>5} "
                f"{pct(s['ttft'], 0.5) * 1e3:>7.0f}ms {pct(s['ttft'], 0.99) * 1e3:>7.0f}ms "
                f"{pct(s['itl'], 0.5) * 1e3:>6.1f}ms {pct(s['itl'], 0.99) * 1e3:>6.1f}ms {s['errors']:>6}",
                flush=True,
            )
    finally:
        if server is not None:
            server.close()
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
