"""`llama4 train`: pretrain a fresh model of a preset on text files, folders or globs."""

from __future__ import annotations

import argparse
import json

from llama4.train.config import add_common_arguments, make_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="named preset for a fresh model (e.g. debug)")
    add_common_arguments(p)


def run(args: argparse.Namespace) -> int:
    from llama4.train.trainer import Trainer

    cfg = make_config(args)
    if not cfg.data or not cfg.preset:
        raise SystemExit("llama4 train needs --preset and --data (on the command line or in --config)")
    print(json.dumps(Trainer(cfg).fit()))
    return 0
