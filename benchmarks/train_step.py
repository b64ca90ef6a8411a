"""Training speed: tokens/s of a full step (forward, backward, AdamW) of llama4 vs transformers.

Same random checkpoint (written by `llama4.save`, read by `Llama4ForCausalLM.from_pretrained`),
same batch, float32, one process. transformers' Llama4TextMoe runs every expert on every token
(16 experts: 16x the routed-FFN work, forward and backward); llama4 sends each token to its
chosen expert only, with grouped GEMMs. The first step's losses are printed to show that both
compute the same function.

    python benchmarks/train_step.py [--batch 4 --seq 256 --experts 16 --threads 1 --steps 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--expert-dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1, help="1 gives stable figures on a shared machine")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model (after one warm-up step)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import Llama4ForCausalLM

    import llama4
    from llama4.config import ModelConfig, MoEConfig, TextConfig
    from llama4.model.transformer import Transformer
    from llama4.train.trainer import cross_entropy_sum, param_groups

    cfg = ModelConfig(
        text=TextConfig(
            vocab_size=args.vocab,
            dim=args.dim,
            n_layers=args.layers,
            n_heads=args.dim // 32,
            n_kv_heads=max(1, args.dim // 128),
            head_dim=32,
            dense_hidden_dim=2 * args.expert_dim,
            attention_chunk_size=8192,
            max_seq_len=8192,
            moe=MoEConfig(num_experts=args.experts, top_k=1, hidden_dim=args.expert_dim, interleave_step=1),
        )
    )
    ours = Transformer(cfg)
    ours.init_weights(seed=0)
    with tempfile.TemporaryDirectory() as d:
        llama4.save(ours, d)
        ref = Llama4ForCausalLM.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="sdpa")
    ours.train(), ref.train()

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]
    n_tokens = x.numel()

    def step_ours(opt):
        loss = cross_entropy_sum(ours, x, y) / n_tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def step_ref(opt):
        logits = ref(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    # One warm-up step each (allocates the optimizer state), then timed steps interleaved so that
    # noise from other processes on the machine hits both models alike.
    runs = {"llama4": (ours, step_ours), "transformers": (ref, step_ref)}
    opts = {
        name: torch.optim.AdamW(param_groups(m, 0.1), lr=1e-4, betas=(0.9, 0.95))
        for name, (m, _) in runs.items()
    }
    first = {name: step(opts[name]) for name, (_, step) in runs.items()}
    times = {name: [] for name in runs}
    for _ in range(args.steps):
        for name, (_, step) in runs.items():
            t0 = time.perf_counter()
            step(opts[name])
            times[name].append(time.perf_counter() - t0)
    results = {name: (first[name], min(t), sorted(t)[len(t) // 2]) for name, t in times.items()}

    n_params = sum(p.numel() for p in ours.parameters())
    print(
        f"config: {args.layers} layers, dim {args.dim}, {args.experts} experts x {args.expert_dim} (top-1) "
        f"+ shared, vocab {args.vocab}, {n_params / 1e6:.1f}M params, fp32, batch {args.batch}x{args.seq} "
        f"= {n_tokens} tokens/step, {args.threads} threads"
    )
    for name, (first_loss, best, median) in results.items():
        print(
            f"{name:>12}: first-step loss {first_loss:.5f}  step best {best * 1e3:8.1f} ms  median "
            f"{median * 1e3:8.1f} ms  -> {n_tokens / best:9.0f} tokens/s (best)"
        )
    ratio = results["transformers"][1] / results["llama4"][1]
    print(f"speed-up llama4 / transformers: {ratio:.2f}x (goal >= 5x)")


if __name__ == "__main__":
    main()
