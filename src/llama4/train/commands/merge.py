"""`llama4 merge --model BASE --adapter DIR --out DIR`: fold a LoRA adapter into its base model."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model directory (HF format)")
    p.add_argument("--adapter", required=True, help="adapter directory (adapter.safetensors + adapter.json)")
    p.add_argument("--out", required=True, help="directory for the merged model")


def run(args: argparse.Namespace) -> int:
    import torch

    import llama4
    from llama4.train.lora import load_adapter, merge_lora

    model = llama4.load(args.model, dtype=torch.float32)
    load_adapter(model, args.adapter)
    merge_lora(model)
    llama4.save(model, args.out)
    for src in (Path(args.adapter) / "tokenizer.model", Path(args.model) / "tokenizer.model"):
        if src.exists():
            shutil.copyfile(src, Path(args.out) / "tokenizer.model")
            break
    print(f"merged {args.adapter} into {args.model} -> {args.out}")
    return 0
