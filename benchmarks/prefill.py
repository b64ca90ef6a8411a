"""Prefill (forward) speed: llama4 vs transformers on the same random checkpoint.

transformers runs every expert on every token (zeroing the unchosen ones); llama4 sends each
token only to its chosen expert. Same weights, same tokens, float32, one process.

    python benchmarks/prefill.py [--tokens 2048 --experts 16 --threads 2]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from common import best_times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--expert-dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    import llama4

    cfg = transformers.Llama4TextConfig(
        vocab_size=32000,
        hidden_size=args.dim,
        intermediate_size=args.expert_dim,
        intermediate_size_mlp=2 * args.expert_dim,
        num_hidden_layers=args.layers,
        num_attention_heads=args.dim // 64,
        num_key_value_heads=max(1, args.dim // 256),
        head_dim=64,
        num_local_experts=args.experts,
        num_experts_per_tok=1,
        attention_chunk_size=8192,
    )
    torch.manual_seed(0)
    ref = transformers.Llama4ForCausalLM(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, args.tokens))
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = llama4.load(tmp)

    with torch.inference_mode():
        diff = (ours(tokens) - ref(tokens).logits).abs().max().item()
        print(
            f"prefill {args.tokens} tokens, {args.experts} experts, dim {args.dim}, expert width "
            f"{args.expert_dim}, {args.layers} layers, vocab {cfg.vocab_size}, fp32, {args.threads} threads "
            f"(max |logit diff| {diff:.1e})"
        )
        cases = {
            # What a generator does at prefill: logits of the last position only.
            "last-token logits": (
                lambda: ref(tokens, use_cache=False, logits_to_keep=1),
                lambda: ours.output(ours.hidden(tokens)[:, -1:]),
            ),
            "all logits": (lambda: ref(tokens, use_cache=False), lambda: ours(tokens)),
        }
        for name, (fn_ref, fn_ours) in cases.items():
            fn_ref(), fn_ours()  # warm-up
            t_ref, t_ours = best_times(fn_ref, fn_ours, args.repeats)
            print(
                f"  {name:18s} transformers {t_ref * 1e3:8.1f} ms ({args.tokens / t_ref:6.0f} tok/s)   "
                f"llama4 {t_ours * 1e3:8.1f} ms ({args.tokens / t_ours:6.0f} tok/s)   "
                f"speed-up {t_ref / t_ours:.1f}x"
            )


if __name__ == "__main__":
    main()
