"""`llama4 train`: pretrain on text files, folders or globs.

A fresh model of a preset (`--preset`), or, with `--model PATH`, more pretraining of a checkpoint:
its weights with a fresh optimizer, schedule (warmup, cosine) and data order (`--seed`).
"""

from __future__ import annotations

import argparse
import json

from llama4.train.commands import build_or_exit
from llama4.train.config import add_common_arguments, make_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="named preset for a fresh model (e.g. debug)")
    p.add_argument("--model", help="checkpoint directory to continue pretraining (instead of --preset)")
    add_common_arguments(p)


def run(args: argparse.Namespace) -> int:
    from llama4.train.trainer import Trainer

    cfg = make_config(args)
    if not cfg.data or not (cfg.preset or cfg.model):
        raise SystemExit(
            "llama4 train needs --data and --preset (a fresh model) or --model (a checkpoint to continue), "
            "on the command line or in --config"
        )
    if cfg.preset and cfg.model:
        raise SystemExit("llama4 train: give --preset (a fresh model) or --model (a checkpoint), not both")
    print(json.dumps(build_or_exit("train", lambda: Trainer(cfg)).fit()))
    return 0
