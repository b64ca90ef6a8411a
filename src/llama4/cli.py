"""One entry point: ``llama4 <verb>``.

Each verb lives with the code it drives; this file only maps verbs to ``module:function`` pairs.
The module's ``add_arguments(parser)`` declares the flags and its ``run(args)`` does the work
(return an exit code or None). Only the module of the verb being run is imported, so
``llama4 --help`` and ``llama4 info`` do not pay for importing the server or the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Collection

# On a machine shared with other busy processes, OpenMP threads that spin while waiting make
# 2-thread CPU decoding up to 10x slower; passive waiting costs little when the machine is idle.
# Must be set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# verb -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("llama4.info", "architecture and parameter counts of a preset or checkpoint"),
    "tokenizer": ("llama4.tokenizer_cli", "tokenizer tools: 'train' a byte-level BPE in tiktoken format"),
    "tokenize": ("llama4.tokenizer_cli", "print the token ids of a text file or of an OpenAI-style chat"),
    "train": ("llama4.train.commands.train", "pretrain a model from a preset on text files"),
    "finetune": (
        "llama4.train.commands.finetune",
        "fine-tune a checkpoint on JSONL and text files (full or LoRA)",
    ),
    "distill": ("llama4.train.commands.distill", "train a student on a teacher's soft targets and the data"),
    "merge": ("llama4.train.commands.merge", "merge a LoRA adapter into its base model"),
    "plot": ("llama4.train.commands.plot", "PNG charts of a training run's metrics.jsonl"),
    "eval": ("llama4.eval", "bits per byte of a text file under a model (default: the bundled one)"),
    "serve": ("llama4.serve.cli", "OpenAI-compatible HTTP server and web chat page"),
    "generate": ("llama4.engine.generate_cli", "complete a prompt (text or token ids), streamed or as JSON"),
    "chat": ("llama4.engine.chat_cli", "interactive chat in the terminal (default: the bundled model)"),
}


def build_parser(verbs: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the flags of `verbs` (default: all); only their modules are imported."""
    parser = argparse.ArgumentParser(prog="llama4", description="Llama 4: run, serve and train.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if verbs is None or name in verbs:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser([verb] if verb else []).parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        code = module.run(args)
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
