"""`llama4 finetune`: full or LoRA fine-tuning of a checkpoint on JSONL.

Records are `{"text": ...}` (loss on every token) or `{"messages": [...]}` in OpenAI chat form
(loss only on assistant turns: the chat format's training mask). Everything else is the
pretraining trainer; with `--lora-rank R` the base weights are frozen and OUT/adapter/ holds
the adapter (merge it with `llama4 merge`, or pass `--save-merged`).
"""

from __future__ import annotations

import argparse
import json

from llama4.train.commands import build_or_exit
from llama4.train.config import add_common_arguments, make_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory to fine-tune (HF format)")
    add_common_arguments(p)
    p.add_argument("--lora-rank", type=int, help="LoRA rank; 0 or absent: full fine-tuning")
    p.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (16)")
    p.add_argument("--lora-targets", nargs="+", help="weights to adapt (q_proj ... gate_up_proj down_proj)")
    p.add_argument("--save-merged", action=argparse.BooleanOptionalAction, help="LoRA: also write OUT/model")


def run(args: argparse.Namespace) -> int:
    from llama4.train.trainer import Trainer

    cfg = make_config(args)
    if not cfg.model or not cfg.data:
        raise SystemExit("llama4 finetune needs --model and --data (on the command line or in --config)")
    record = build_or_exit("finetune", lambda: Trainer(cfg, sft=True)).fit()
    print(json.dumps(record))
    return 0
