"""``llama4 generate``: complete one prompt, streaming the text (or one JSON object with --json).

    llama4 generate [--model PATH] (--prompt TEXT | --prompt-tokens 1,2,3) [--chat] [--image PATH]
                    [--max-tokens N --temperature T --top-p P --top-k K --seed S --dtype D] [--json]

``--prompt`` is encoded as plain text after ``<|begin_of_text|>``; with ``--chat`` (implied by
``--image``) it becomes a user message in the Llama 4 chat format, answered by the assistant.
``--prompt-tokens`` are used as given. Generation stops at the tokenizer's stop tokens
(``<|eot|>``, ``<|eom|>``, ``<|end_of_text|>``), at a ``--stop`` string, or after --max-tokens.
``--json`` prints ``{"prompt_tokens", "tokens", "text", "finish_reason", "timing"}``.
"""

from __future__ import annotations

import argparse
import json
import sys

from llama4.engine.cli_common import (
    CliError,
    add_model_arguments,
    add_sampling_arguments,
    fail,
    image_inputs,
    load,
    sampling_params,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-tokens", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--chat", action="store_true", help="wrap --prompt as a user message (chat format)")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--image", action="append", default=[], help="image file for the chat prompt (repeatable)")
    add_sampling_arguments(p, max_tokens=128)
    p.add_argument("--json", action="store_true", help="print one JSON object: token ids, text and timing")


def _prompt(args: argparse.Namespace, model, tokenizer) -> tuple[list[int], object]:
    if args.prompt_tokens is not None:
        if args.image:
            raise CliError("--image needs --prompt (the chat layout places the image tokens)")
        try:
            ids = [int(t) for t in args.prompt_tokens.replace(" ", "").split(",") if t]
        except ValueError:
            raise CliError(
                f"--prompt-tokens must be comma-separated integers, got {args.prompt_tokens!r}"
            ) from None
        vocab = model.config.text.vocab_size
        if not ids or any(not 0 <= t < vocab for t in ids):
            raise CliError(f"--prompt-tokens must be 1+ ids in [0, {vocab}), got {ids}")
        return ids, None
    if not (args.chat or args.image or args.system):
        return tokenizer.encode(args.prompt, bos=True), None
    from llama4.chat import ChatFormat

    grids, feats = image_inputs(model, args.image) if args.image else ([], None)
    content = [{"type": "image"} for _ in args.image] + [{"type": "text", "text": args.prompt}]
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": content if args.image else args.prompt})
    vision = model.config.vision
    ids = ChatFormat(tokenizer).encode_dialog(
        messages, image_grids=grids, tokens_per_tile=vision.tokens_per_tile if vision else 144
    )
    return ids, feats


def run(args: argparse.Namespace) -> int:
    import time

    t0 = time.perf_counter()
    try:
        model, tokenizer, _ = load(args)
        prompt, feats = _prompt(args, model, tokenizer)
        params = sampling_params(args, tuple(tokenizer.stop_ids))
    except (CliError, ValueError) as e:
        return fail("generate", str(e))
    from llama4.engine.engine import Engine

    # The cache holds exactly the prompt and the answer.
    engine = Engine(model, slots=1, max_len=len(prompt) + max(1, args.max_tokens), compile=args.compile)
    t_loaded = time.perf_counter()

    tokens: list[int] = []
    text, finish, first = [], None, None
    for ev in engine.stream([prompt], params, tokenizer=tokenizer, image_features=[feats]):
        if first is None:
            first = time.perf_counter()
        if ev.token is not None:
            tokens.append(ev.token)
        text.append(ev.text)
        if not args.json and ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        finish = ev.finish_reason or finish
    t_end = time.perf_counter()
    first = first or t_end
    decode_s = t_end - first
    if args.json:
        out = {
            "prompt_tokens": len(prompt),
            "tokens": tokens,
            "text": "".join(text),
            "finish_reason": finish,
            "timing": {
                "load_s": round(t_loaded - t0, 4),
                "time_to_first_token_s": round(first - t_loaded, 4),
                "decode_s": round(decode_s, 4),
                "decode_tokens_per_s": round((len(tokens) - 1) / decode_s, 2)
                if len(tokens) > 1 and decode_s
                else None,
                "total_s": round(t_end - t0, 4),
            },
        }
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        rate = f", {(len(tokens) - 1) / decode_s:.1f} tokens/s" if len(tokens) > 1 and decode_s else ""
        print(f"[{len(tokens)} tokens, {finish}{rate}]", file=sys.stderr)
    return 0
