"""`llama4 plot OUT`: PNG charts (loss, lr, expert load) from OUT/metrics.jsonl."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training output directory (holds metrics.jsonl)")


def run(args: argparse.Namespace) -> int:
    from llama4.train.plot import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0
