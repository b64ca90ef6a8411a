"""Training throughput (tokens/s) of candidate nano sizes: plain forward + backward + AdamW.

    python scripts/nano/bench_sizes.py --threads 1 --steps 6

Prints one JSON line per candidate: total / active parameters and tokens per second.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from llama4.checkpoint.io import build
from llama4.config import ModelConfig, MoEConfig, TextConfig

VOCAB = 8192 + 2048  # BPE ranks + Llama 4's 2048 special tokens


def text_config(dim, layers, heads, kv, experts, hidden, dense=False, seq=256, chunk=64) -> TextConfig:
    return TextConfig(
        vocab_size=VOCAB,
        dim=dim,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv,
        head_dim=dim // heads,
        dense_hidden_dim=2 * hidden,
        attention_chunk_size=chunk,
        floor_scale=8192,
        max_seq_len=seq * 4,
        moe=MoEConfig(num_experts=experts, hidden_dim=hidden),
        moe_layers=() if dense else None,
    )


CANDIDATES = {
    "d128-l4-e4": text_config(128, 4, 4, 2, 4, 256),
    "d128-l8-e4": text_config(128, 8, 4, 2, 4, 256),
    "d128-l8-e4-dense": text_config(128, 8, 4, 2, 4, 256, dense=True),
    "d192-l6-e4": text_config(192, 6, 6, 2, 4, 384),
    "d192-l8-e4": text_config(192, 8, 6, 2, 4, 384),
    "d256-l8-e4": text_config(256, 8, 8, 4, 4, 512),
    "d256-l8-e4-dense": text_config(256, 8, 8, 4, 4, 512, dense=True),
    "d320-l8-e4": text_config(320, 8, 8, 4, 4, 640),
    "d384-l8-e4": text_config(384, 8, 8, 4, 4, 768),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name, t in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        model = build(ModelConfig(text=t), device="meta")
        model.to_empty(device="cpu")
        model.init_buffers("cpu")
        model.init_weights(0)
        total = sum(p.numel() for p in model.parameters())
        per_expert = sum(
            p[0].numel() for n, p in model.named_parameters() if "experts." in n and "shared" not in n
        )
        n_moe = sum(t.is_moe)
        active = total - n_moe * (t.moe.num_experts - 1) * per_expert // max(n_moe, 1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, VOCAB, (args.batch, args.seq + 1))
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        step = sorted(times[1:])[len(times[1:]) // 2]
        print(
            json.dumps(
                {
                    "name": name,
                    "total_params": total,
                    "active_params": active,
                    "non_embedding_active": active - 2 * VOCAB * t.dim,
                    "s_per_step": round(step, 3),
                    "tokens_per_s": round(args.batch * args.seq / step),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
