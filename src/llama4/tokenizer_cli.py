"""``llama4 tokenizer train`` and ``llama4 tokenize``: train a BPE, turn text or a chat into ids.

One module serves both verbs; ``add_arguments`` tells them apart by the verb at the end of the
parser's ``prog`` (``"llama4 tokenize"`` vs ``"llama4 tokenizer"``), because ``llama4.cli`` hands
each verb's module only its parser. Heavy imports happen inside ``run``.

Examples::

    llama4 tokenizer train --text a.txt b.txt --vocab-size 8000 --out tok.model
    llama4 tokenize --text-file notes.txt --bos
    llama4 tokenize --model ckpt/ --chat dialog.json --image-grid 2x2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llama4.engine.cli_common import positive_int

TRAIN_VERB = "tokenizer"
TOKENIZE_VERB = "tokenize"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the flags of whichever of the two verbs ``parser`` belongs to."""
    verb = parser.prog.rsplit(" ", 1)[-1]
    if verb == TOKENIZE_VERB:
        _add_tokenize_arguments(parser)
    elif verb == TRAIN_VERB:
        actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        train = actions.add_parser("train", help="train a byte-level BPE and write it in tiktoken format")
        train.add_argument(
            "--text", nargs="+", required=True, type=Path, metavar="FILE", help="UTF-8 text files"
        )
        train.add_argument(
            "--vocab-size",
            type=int,
            required=True,
            help="BPE tokens (>= 257), specials excluded; at most this many: merging stops when no pair "
            "occurs --min-frequency times",
        )
        train.add_argument(
            "--min-frequency", type=positive_int, default=2, help="least count of a pair to merge"
        )
        train.add_argument("--out", type=Path, required=True, help="tiktoken BPE file to write")
    else:
        raise ValueError(f"{__name__} serves the verbs {TRAIN_VERB!r} and {TOKENIZE_VERB!r}, not {verb!r}")
    parser.set_defaults(_tokenizer_verb=verb)


def _add_tokenize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the Llama 4 tokenizer)")
    parser.add_argument("--tokenizer", type=Path, help="a tiktoken BPE file (overrides --model)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text-file", type=Path, help="UTF-8 text file to encode")
    source.add_argument(
        "--chat", type=Path, help="JSON file: an OpenAI-style messages array (or {messages, tools})"
    )
    parser.add_argument("--bos", action="store_true", help="prepend <|begin_of_text|> (text only)")
    parser.add_argument(
        "--image-grid",
        action="append",
        default=[],
        metavar="RxC",
        help="tile grid of each image of the chat, in order (repeat the flag per image)",
    )
    parser.add_argument("--no-generation-prompt", action="store_true", help="chat: omit the assistant header")


def _parse_grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--image-grid expects ROWSxCOLS such as 2x3, got {text!r}") from None
    return rows, cols


def run(args: argparse.Namespace) -> int:
    try:
        return _train(args) if args._tokenizer_verb == TRAIN_VERB else _tokenize(args)
    except (OSError, ValueError, KeyError) as e:  # bad files, bad JSON, bad dialogs: say so, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from llama4 import bpe

    missing = [str(p) for p in args.text if not p.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    tok = bpe.train(args.text, args.vocab_size, args.out, min_frequency=args.min_frequency)
    short = (
        f" (not {args.vocab_size}: no more pairs occur at least {args.min_frequency} times in this text)"
        if tok.n_base < args.vocab_size
        else ""
    )
    print(
        f"wrote {args.out}: {tok.n_base} BPE tokens{short} + 2048 special = {tok.n_words} ids",
        file=sys.stderr,
    )
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from llama4.tokenizer import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer) if args.tokenizer else Tokenizer.find(args.model)
    if args.text_file is not None:
        ids = tok.encode(args.text_file.read_bytes().decode("utf-8"), bos=args.bos)  # bytes: keep \r\n as is
    else:
        from llama4.chat import ChatFormat

        data = json.loads(args.chat.read_text(encoding="utf-8"))
        messages, tools = (data, None) if isinstance(data, list) else (data["messages"], data.get("tools"))
        ids = ChatFormat(tok).encode_dialog(
            messages,
            image_grids=[_parse_grid(g) for g in args.image_grid],
            tools=tools,
            add_generation_prompt=not args.no_generation_prompt,
        )
    print(json.dumps(ids))
    return 0
