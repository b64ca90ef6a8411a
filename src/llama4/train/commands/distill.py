"""`llama4 distill`: train a student on a teacher's soft targets and the data's hard targets.

The loss and its dynamic weighting are described in `llama4.train.distill`.
"""

from __future__ import annotations

import argparse
import json

from llama4.train.config import PRESET_NAMES, add_common_arguments, make_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", help="teacher checkpoint directory (HF format)")
    p.add_argument("--student", help="student: a preset name (fresh model) or a checkpoint directory")
    add_common_arguments(p)
    p.add_argument("--temperature", type=float, help="softening of the KL term (1.0)")
    p.add_argument("--weighting", choices=["hard", "fixed", "dynamic"], help="soft/hard weighting (dynamic)")
    p.add_argument(
        "--soft-weight", type=float, help="fixed: weight of the soft term (0.5); dynamic: its maximum (1.0)"
    )
    p.add_argument("--sft", action="store_true", help="the data is fine-tuning JSONL (loss masks)")


def run(args: argparse.Namespace) -> int:
    from llama4.train.distill import distill

    student = {}
    if args.student is not None:
        student = (
            {"preset": args.student, "model": None}
            if args.student in PRESET_NAMES
            else {"model": args.student}
        )
    cfg = make_config(args, **student)
    if not cfg.teacher or not cfg.data or not (cfg.preset or cfg.model):
        raise SystemExit(
            "llama4 distill needs --teacher, --student and --data (on the command line or in --config)"
        )
    print(json.dumps(distill(cfg, sft=args.sft)))
    return 0
