"""``llama4 serve``: the OpenAI-compatible server and web chat page for one model.

    llama4 serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--max-batch 16] [--api-key KEY]

Binds the loopback address unless ``--host`` says otherwise; ``--api-key`` (or the
``LLAMA4_API_KEY`` environment variable) makes every API call need ``Authorization: Bearer KEY``.
Once listening it prints ``llama4 serve: listening on http://HOST:PORT`` (``--port 0`` picks a
free port and prints it).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

from llama4.engine.cli_common import CliError, default_max_len, non_negative_int, positive_int, to_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; default 8000)")
    p.add_argument(
        "--max-batch", type=positive_int, default=16, help="sequences decoded together (KV cache slots)"
    )
    p.add_argument(
        "--max-len",
        type=positive_int,
        default=None,
        help="tokens per sequence, prompt + completion (default: min(model's max_seq_len, 8192))",
    )
    p.add_argument(
        "--max-queue",
        type=non_negative_int,
        default=64,
        help="requests waiting for a slot (beyond the free slots) before 429s",
    )
    p.add_argument("--prefill-budget", type=int, default=512, help="prompt tokens per scheduler step")
    p.add_argument("--no-prefix-cache", action="store_true", help="do not reuse finished sequences' cache")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LLAMA4_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $LLAMA4_API_KEY; none: open)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="weight dtype (default: float32 on CPU, as stored on GPU)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--served-model-name", help="model id in the API (default: the checkpoint folder's name)")
    p.add_argument("--max-body-mb", type=float, default=32, help="largest request body, MiB")
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (default on CPU: all cores but one, which the HTTP event loop needs)",
    )
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    import socket
    import time

    import torch
    import uvicorn

    from llama4.engine.assets import default_model_path, load_model_and_tokenizer
    from llama4.engine.cache import kv_cache_bytes
    from llama4.engine.engine import Engine
    from llama4.serve.app import create_app
    from llama4.serve.inputs import Limits, ServedModel
    from llama4.serve.scheduler import Scheduler

    def fail(message: str) -> int:
        print(f"llama4 serve: {message}", file=sys.stderr)
        return 2

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        path = args.model if args.model is not None else default_model_path()
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        # On CPU, bfloat16/float16 matmuls are several times slower than float32 (and scale
        # worse with the batch), so CPU serving computes in float32 unless told otherwise.
        dtype = args.dtype or ("float32" if device == "cpu" else None)
        if device == "cpu" and not args.threads:
            # Leave a core to the event loop: with every core in torch's thread pool, the pool's
            # threads and the HTTP thread preempt each other and 16 streams run 3x slower.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, cores - 1))
        model, tokenizer, path = load_model_and_tokenizer(path, dtype=dtype)
        model = to_device(model, device)
    except (FileNotFoundError, ValueError, CliError) as e:
        return fail(str(e))
    cfg = model.config.text
    max_len = args.max_len or default_max_len(model)
    if max_len > cfg.max_seq_len:
        print(
            f"llama4 serve: WARNING: --max-len {max_len} is past the model's context of {cfg.max_seq_len} "
            "tokens: positions beyond it were never trained",
            flush=True,
        )
    engine = Engine(
        model, slots=args.max_batch, max_len=max_len, prefill_chunk=max(2048, args.prefill_budget)
    )
    scheduler = Scheduler(
        engine,
        tokenizer,
        max_queue=args.max_queue,
        prefill_budget=args.prefill_budget,
        prefix_cache=not args.no_prefix_cache,
    )
    served = ServedModel(
        id=args.served_model_name or path.name,
        model=model,
        tokenizer=tokenizer,
        max_len=max_len,
        limits=Limits(max_images=args.max_images),
        created=int(time.time()),
    )
    app = create_app(
        served, scheduler, api_key=args.api_key or None, max_body_bytes=int(args.max_body_mb * (1 << 20))
    )

    try:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(2048)  # connections queue from now on, before uvicorn's loop starts
    except OSError as e:
        return fail(f"cannot listen on {args.host}:{args.port}: {e}")
    port = sock.getsockname()[1]
    per_slot = kv_cache_bytes(cfg, max_len, engine.cache.gk.element_size())
    print(
        f"llama4 serve: model {served.id} ({path}), {args.max_batch} slots x {max_len} tokens, "
        f"KV cache {engine.cache.nbytes / 2**20:.1f} MiB ({per_slot / 2**20:.1f} MiB per full slot), "
        f"{device} {str(model.tok_embeddings.weight.dtype).removeprefix('torch.')}"
        + (f", {torch.get_num_threads()} torch threads" if device == "cpu" else ""),
        flush=True,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(
            f"llama4 serve: WARNING: listening on {args.host} without --api-key: anyone who can reach it can use it"
        )
    print(f"llama4 serve: listening on http://{args.host if ':' not in args.host else f'[{args.host}]'}:{port}",
          flush=True)  # fmt: skip

    grace = 5.0  # seconds uvicorn lets requests finish after SIGTERM / Ctrl-C, then cuts them

    def wind_down() -> None:
        """Queued requests fail at once (a JSON 503), running ones may finish; those still running
        just before the grace period ends stop with a "shutting down" error (a stream's error
        event), not a connection cut mid-response."""
        scheduler.drain()
        time.sleep(grace - 1.0)
        scheduler.stop(timeout=0)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # On another thread: a signal handler must not wait for the scheduler's lock.
            threading.Thread(target=wind_down, daemon=True).start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=grace)
    Server(config).run(sockets=[sock])
    return 0
