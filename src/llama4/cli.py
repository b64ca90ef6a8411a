"""One entry point: ``llama4 <verb>``.

Each verb lives with the code it drives; this file only maps verbs to ``module:function`` pairs.
The module's ``add_arguments(parser)`` declares the flags and its ``run(args)`` does the work
(return an exit code or None). Modules are imported only when their verb runs, so
``llama4 info`` does not pay for importing the server.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("llama4.info", "architecture and parameter counts of a preset or checkpoint"),
    "tokenizer": ("llama4.tokenizer_cli", "tokenizer tools: 'train' a byte-level BPE in tiktoken format"),
    "tokenize": ("llama4.tokenizer_cli", "print the token ids of a text file or of an OpenAI-style chat"),
    "train": ("llama4.train.commands.train", "pretrain a model from a preset on text files"),
    "finetune": ("llama4.train.commands.finetune", "fine-tune a checkpoint on JSONL (full or LoRA)"),
    "distill": ("llama4.train.commands.distill", "train a student on a teacher's soft targets and the data"),
    "merge": ("llama4.train.commands.merge", "merge a LoRA adapter into its base model"),
    "plot": ("llama4.train.commands.plot", "PNG charts of a training run's metrics.jsonl"),
    "eval": ("llama4.eval", "bits per byte of a text file under a model (default: the bundled one)"),
    "serve": ("llama4.serve.cli", "OpenAI-compatible HTTP server and web chat page"),
    "generate": ("llama4.engine.generate_cli", "complete a prompt (text or token ids), streamed or as JSON"),
    "chat": ("llama4.engine.chat_cli", "interactive chat in the terminal (default: the bundled model)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama4", description="Llama 4: run, serve and train.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # Declaring flags needs the module; keep those modules light at import time.
        importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        code = module.run(args)
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
