"""``llama4 chat``: an interactive conversation in the terminal, replies streamed as they come.

    llama4 chat [--model PATH] [--system TEXT] [--max-tokens N --temperature T ...]

Commands: ``/reset`` (forget the conversation), ``/system TEXT`` (set the system message and
reset), ``/image PATH`` (attach an image to your next message), ``/quit`` (or end of input).
Ctrl-C stops the reply in progress and keeps what was said so far; at the prompt it clears the
line. The conversation stays in one KV-cache slot: each turn only prefills the new messages.
"""

from __future__ import annotations

import argparse
import sys

from llama4.engine.cli_common import (
    CliError,
    add_model_arguments,
    add_sampling_arguments,
    default_max_len,
    fail,
    image_inputs,
    load,
    positive_int,
    sampling_params,
)

HELP = "commands: /reset, /system TEXT, /image PATH, /quit (Ctrl-C stops a reply, Ctrl-D exits)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--system", help="system message")
    p.add_argument(
        "--max-len",
        type=positive_int,
        help="conversation length in tokens (default: the model's context, at most 8192)",
    )
    add_sampling_arguments(p, max_tokens=512)


class Conversation:
    """Messages, attached images and the engine slot that holds the conversation's tokens."""

    def __init__(self, engine, tokenizer, system: str | None) -> None:
        from llama4.chat import ChatFormat

        self.engine, self.tokenizer = engine, tokenizer
        self.format = ChatFormat(tokenizer)
        self.system = system
        self.pending_images: list[str] = []
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.grids: list[tuple[int, int]] = []
        self.features = []  # (P_i, D) per image, in order
        self.engine.free(0)

    def attach(self, path: str) -> None:
        grids, feats = image_inputs(self.engine.model, [path])
        self.grids += grids
        self.features.append(feats)
        self.pending_images.append(path)

    def prompt(self, user_text: str) -> list[int]:
        if self.pending_images:
            content = [{"type": "image"} for _ in self.pending_images] + [{"type": "text", "text": user_text}]
            self.pending_images = []
        else:
            content = user_text
        self.messages.append({"role": "user", "content": content})
        vision = self.engine.model.config.vision
        return self.format.encode_dialog(
            self.messages, image_grids=self.grids, tokens_per_tile=vision.tokens_per_tile if vision else 144
        )

    def reply(self, prompt: list[int], params, out) -> str:
        """Stream the assistant's answer to `out`; Ctrl-C ends it early. Returns its text."""
        import torch

        feats = torch.cat(self.features) if self.features else None
        if len(prompt) >= self.engine.max_len:
            self.messages.pop()  # the user message that did not fit
            raise CliError(f"the conversation ({len(prompt)} tokens) is full: /reset to start again")
        room = self.engine.max_len - len(prompt)
        if params.max_tokens > room:
            import dataclasses

            params = dataclasses.replace(params, max_tokens=room)
        text = []
        events = self.engine.stream(
            [prompt], params, tokenizer=self.tokenizer, image_features=[feats], slots=[0], keep=True
        )
        try:
            for ev in events:
                text.append(ev.text)
                out.write(ev.text)
                out.flush()
        except KeyboardInterrupt:
            events.close()
            out.write(" [stopped]")
        out.write("\n")
        answer = "".join(text)
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def run(args: argparse.Namespace) -> int:
    try:
        model, tokenizer, path = load(args)
        params = sampling_params(args, tuple(tokenizer.stop_ids))
    except (CliError, ValueError) as e:
        return fail("chat", str(e))
    from llama4.engine.engine import Engine

    max_len = args.max_len or default_max_len(model)
    engine = Engine(model, slots=1, max_len=max_len, compile=args.compile)
    chat = Conversation(engine, tokenizer, args.system)
    interactive = sys.stdin.isatty()
    print(f"llama4 chat: {path} ({HELP})", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            continue
        line = line.strip()
        if not line:
            continue
        try:
            if line in ("/quit", "/exit"):
                break
            if line == "/reset":
                chat.reset()
                print("(conversation reset)", file=sys.stderr)
            elif line.startswith("/system"):
                chat.system = line[len("/system") :].strip() or None
                chat.reset()
                print("(system message set; conversation reset)", file=sys.stderr)
            elif line.startswith("/image"):
                chat.attach(line[len("/image") :].strip())
                print("(image attached to your next message)", file=sys.stderr)
            elif line.startswith("/"):
                print(HELP, file=sys.stderr)
            else:
                chat.reply(chat.prompt(line), params, sys.stdout)
        except CliError as e:
            print(f"llama4 chat: {e}", file=sys.stderr)
    return 0
