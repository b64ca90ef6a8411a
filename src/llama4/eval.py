"""`llama4 eval`: bits per byte of a text under a model, tokenizer-independent.

    llama4 eval --text ../shared/data/text/austen_persuasion.txt          # the bundled model
    llama4 eval --model runs/nano/pretrain/model --text FILE --json

The text is encoded as ``<|begin_of_text|>`` + its tokens; every text token is scored (the BOS
only gives the first one its context; no end-of-text token is scored). The figures:

- ``loss``: mean negative log-likelihood per text token, in nats;
- ``bits_per_byte``: total NLL in bits / UTF-8 bytes of the text. Comparable across tokenizers
  (a model with a coarser tokenizer pays for its longer tokens), unlike ``loss``.

Long texts are scored with a sliding window of ``context`` tokens (default: the model's
``max_seq_len``) advanced by ``stride`` tokens (default: context // 2). The first window scores
all its tokens; every later window scores only its last ``stride`` tokens, so each scored token
sees at least ``context - stride`` tokens of context (half a window by default) and no token is
scored twice. Windows are run in batches under ``torch.no_grad`` in float32.

Shape legend: W windows in a batch, L context tokens, V vocab.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llama4.engine.cli_common import positive_int


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) per window over ids[0:n_tokens], ids[0] being BOS.

    Window k starts at k * stride, feeds ids[start:end-1] (at most `context` tokens) and
    predicts ids[start+1:end]; it scores the targets at positions >= first_scored, i.e. those no
    earlier window scored. Every position 1..n_tokens-1 is scored exactly once, and a token scored
    by a later window has at least context - stride + 1 tokens before it in its window.
    """
    assert 0 < stride <= context, f"stride={stride} must be in (0, context={context}]"
    out = []
    start, last_scored = 0, 0
    while last_scored < n_tokens - 1:
        last = min(start + context, n_tokens - 1)  # last target position of this window
        out.append((start, last + 1, last_scored + 1))
        last_scored = last
        start += stride
    return out


@torch.no_grad()
def token_nll(model: Any, ids: list[int], context: int, stride: int, batch_size: int = 8) -> torch.Tensor:
    """NLL in nats of ids[1:] (ids[0] is BOS), each predicted with a sliding window: (N-1,) float64."""
    n = len(ids)
    tokens = torch.tensor(ids, dtype=torch.long)
    nll = torch.full((n,), float("nan"), dtype=torch.float64)
    plan = windows(n, context, stride)
    device = next(model.parameters()).device
    for b in range(0, len(plan), batch_size):
        group = plan[b : b + batch_size]
        width = max(end - start for start, end, _ in group) - 1
        inputs = torch.zeros(len(group), width, dtype=torch.long)  # (W, L), right-padded
        for row, (start, end, _) in enumerate(group):
            inputs[row, : end - start - 1] = tokens[start : end - 1]
        logits = model(inputs.to(device)).float()  # (W, L, V)
        logp = F.log_softmax(logits, dim=-1)
        for row, (start, end, first) in enumerate(group):
            targets = tokens[first:end].to(device)
            rows = logp[row, first - start - 1 : end - start - 1]  # predictions for ids[first:end]
            nll[first:end] = -rows.gather(-1, targets[:, None])[:, 0].double().cpu()
    assert not torch.isnan(nll[1:]).any(), "sliding windows left a token unscored"
    return nll[1:]


def evaluate_text(
    model: Any,
    tokenizer: Any,
    text: str,
    *,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> dict[str, float | int]:
    """{"bits_per_byte", "loss", "tokens", "bytes", "context", "stride"} of `text` under `model`."""
    context = context or model.config.text.max_seq_len
    stride = stride or max(1, context // 2)
    ids = tokenizer.encode(text, bos=True, eos=False)
    if ids[0] != tokenizer.bos_id:
        ids = [tokenizer.bos_id, *ids]
    n_bytes = len(text.encode("utf-8"))
    if len(ids) < 2 or n_bytes == 0:
        raise ValueError("the text is empty: nothing to score")
    was_training = model.training
    model.eval()
    try:
        nll = token_nll(model, ids, context, stride, batch_size)
    finally:
        model.train(was_training)
    total = float(nll.sum())
    return {
        "bits_per_byte": total / math.log(2) / n_bytes,
        "loss": total / len(nll),
        "tokens": len(nll),
        "bytes": n_bytes,
        "context": context,
        "stride": stride,
    }


# -- CLI ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="checkpoint directory (default: the bundled nano model)")
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text file to score")
    p.add_argument("--context", type=int, help="window length in tokens (default: the model's max_seq_len)")
    p.add_argument("--stride", type=int, help="tokens a window advances by (default: context // 2)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (8)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help='print {"bits_per_byte", "loss", "tokens", "bytes"}')


def run(args: argparse.Namespace) -> int:
    from llama4.engine.assets import load_model_and_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, path = load_model_and_tokenizer(args.model, dtype="float32")
    text = args.text.read_bytes().decode("utf-8")  # not read_text: that turns \r\n into \n
    r = evaluate_text(
        model, tokenizer, text, context=args.context, stride=args.stride, batch_size=args.batch_size
    )
    if args.json:
        print(json.dumps({k: r[k] for k in ("bits_per_byte", "loss", "tokens", "bytes")}))
    else:
        print(f"model          {path}")
        print(f"text           {args.text} ({r['bytes']} bytes, {r['tokens']} tokens)")
        print(f"window         {r['context']} tokens, stride {r['stride']}")
        print(f"loss           {r['loss']:.4f} nats/token")
        print(f"bits per byte  {r['bits_per_byte']:.4f}")
    return 0
