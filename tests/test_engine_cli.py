"""``llama4 generate`` and ``llama4 chat`` on a tiny random multimodal checkpoint.

The checkpoint carries its own byte-level tokenizer.model (256 byte tokens + the 2048 Llama 4
special tokens), so the model's vocabulary is 2304 and everything stays small.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama4
from llama4.bpe import save_tiktoken_bpe
from llama4.checkpoint.io import build
from llama4.config import get_preset
from llama4.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("engine-cli") / "tiny"
    save_tiktoken_bpe({bytes([b]): b for b in range(256)}, path / "tokenizer.model")
    tok = Tokenizer.from_file(path / "tokenizer.model")
    cfg = get_preset("debug-vision")
    cfg.text = dataclasses.replace(cfg.text, vocab_size=tok.n_words)
    cfg.image_token_id = tok.special("<|patch|>")
    model = build(cfg, device="cpu")
    model.init_buffers("cpu")
    model.init_weights(0, std=0.2)
    llama4.save(model, path)
    from PIL import Image

    Image.new("RGB", (90, 60), (200, 30, 30)).save(path.parent / "red.png")
    return path


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``llama4 ARGS`` in this process (fast); returns (exit code, stdout, stderr)."""
    from llama4.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_in_a_subprocess_matches_the_library(checkpoint, capsys):
    args = [
        "generate",
        "--model",
        str(checkpoint),
        "--prompt",
        "héllo",
        "--max-tokens",
        "9",
        "--temperature",
        "0",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "llama4.cli", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    tok = Tokenizer.find(checkpoint)
    prompt = tok.encode("héllo", bos=True)
    assert out["prompt_tokens"] == len(prompt)
    model = llama4.load(checkpoint)
    assert out["tokens"] == llama4.generate(model, [prompt], 9, stop_ids=tok.stop_ids)[0]
    assert out["finish_reason"] in ("stop", "length")
    assert set(out["timing"]) >= {"load_s", "time_to_first_token_s", "decode_s", "total_s"}
    # without --json the same text is streamed to stdout
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 0 and stdout == out["text"] + "\n" and "tokens" in stderr
    if out["finish_reason"] == "length":
        assert out["text"] == tok.decode(out["tokens"])


def test_generate_prompt_tokens_and_sampling_flags(checkpoint, capsys):
    args = ["generate", "--model", str(checkpoint), "--prompt-tokens", "1,2,3", "--max-tokens", "6", "--json"]
    runs = [json.loads(run_cli(capsys, *args, "--seed", s)[1])["tokens"] for s in ("1", "1", "2")]
    assert runs[0] == runs[1] != runs[2]
    greedy = json.loads(run_cli(capsys, *args, "--temperature", "0")[1])["tokens"]
    assert json.loads(run_cli(capsys, *args, "--top-k", "1", "--seed", "4")[1])["tokens"] == greedy


def test_generate_with_an_image_in_the_chat_layout(checkpoint, capsys):
    image = checkpoint.parent / "red.png"
    code, stdout, stderr = run_cli(
        capsys, "generate", "--model", str(checkpoint), "--prompt", "what colour?", "--image", str(image),
        "--max-tokens", "5", "--temperature", "0", "--json",
    )  # fmt: skip
    assert code == 0, stderr
    out = json.loads(stdout)
    # the image's <|patch|> tokens are in the prompt: one tile of 4 tokens for debug-vision
    assert out["prompt_tokens"] > 4 and len(out["tokens"]) >= 1
    code, _, stderr = run_cli(
        capsys, "generate", "--model", str(checkpoint), "--prompt", "x", "--image", "/no.png"
    )
    assert code == 2 and "cannot read image" in stderr


def test_generate_errors_are_clear(checkpoint, capsys, monkeypatch, tmp_path):
    code, _, stderr = run_cli(capsys, "generate", "--model", str(checkpoint), "--prompt-tokens", "1,x")
    assert code == 2 and "comma-separated" in stderr
    for flags, says in [
        (["--device", "bogus"], "cannot use --device 'bogus'"),
        (["--threads", "0"], "--threads: must be >= 1"),
        (["--temperature", "nan"], "temperature=nan must be a finite number"),
    ]:
        code, _, stderr = run_cli(capsys, "generate", "--model", str(checkpoint), "--prompt", "hi", *flags)
        assert code == 2 and says in stderr and "Traceback" not in stderr, flags
    from llama4.engine import assets

    monkeypatch.setattr(assets, "BUNDLED", tmp_path / "nano")
    with pytest.raises(FileNotFoundError, match="--model"):
        assets.default_model_path()
    code, _, stderr = run_cli(capsys, "generate", "--prompt", "hi")
    assert code == 2 and "no default model" in stderr and "--model" in stderr


def test_chat_commands_over_stdin(checkpoint, capsys, monkeypatch):
    image = checkpoint.parent / "red.png"
    script = (
        f"hello\n/system be brief\nhi\n/image {image}\nwhat is this?\n/reset\n/unknown\nbye\n/quit\nnever\n"
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code, stdout, stderr = run_cli(
        capsys, "chat", "--model", str(checkpoint), "--max-tokens", "6", "--seed", "0"
    )
    assert code == 0, stderr
    assert stdout.count("\n") >= 4  # four replies (random text may hold newlines too)
    assert "conversation reset" in stderr and "image attached" in stderr and "/reset" in stderr
    monkeypatch.setattr(sys, "stdin", io.StringIO("/image /nonexistent.png\nhi\n"))
    code, stdout, stderr = run_cli(capsys, "chat", "--model", str(checkpoint), "--max-tokens", "6")
    assert code == 0 and "cannot read image" in stderr and stdout.count("\n") >= 1


class InterruptAfter(io.StringIO):
    """An output that raises KeyboardInterrupt (as Ctrl-C would) at its n-th write."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def write(self, s: str) -> int:
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt
        return super().write(s)


def test_chat_keeps_the_conversation_in_the_cache_and_survives_ctrl_c(checkpoint):
    from llama4.engine import Engine, SamplingParams
    from llama4.engine.chat_cli import Conversation

    model = llama4.load(checkpoint)
    tok = Tokenizer.find(checkpoint)
    engine = Engine(model, slots=1, max_len=512)
    chat = Conversation(engine, tok, system="be brief")
    params = SamplingParams(max_tokens=8, stop_ids=tok.stop_ids)
    chat.reply(chat.prompt("first question"), params, io.StringIO())
    held = len(engine.history[0])
    prompt = chat.prompt("second question")
    out = InterruptAfter(3)  # Ctrl-C during the second reply
    chat.reply(prompt, params, out)
    assert out.getvalue().endswith(" [stopped]\n")
    assert chat.messages[-1]["role"] == "assistant"
    assert len(engine.history[0]) == engine.cache.lengths[0]
    # the third turn reuses the cached conversation and is what a fresh engine computes
    prompt = chat.prompt("third question")
    kept = engine.reuse_prefix(0, prompt)
    assert kept >= held
    got = engine.generate([prompt], params, slots=[0], keep=True)[0].tokens
    assert got == llama4.generate(model, [prompt], 8, stop_ids=tok.stop_ids)[0]


@pytest.mark.parametrize("where", ["forward", "one-call step"])
def test_ctrl_c_inside_a_forward_rolls_the_slot_back(checkpoint, where):
    from llama4.engine import Engine

    model = llama4.load(checkpoint)
    engine = Engine(model, slots=1, max_len=64)
    engine.prefill([0], [[1, 2, 3, 4]])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    step = engine._one_call
    if where == "forward":
        engine._one_call, original, engine._hidden = None, engine._hidden, interrupted
    else:
        assert step is not None and step.current() and step.usable()
        fake = {"cache": engine.cache, "current": lambda self: True, "usable": lambda self: True}
        engine._one_call = type("Interrupted", (), {**fake, "__call__": interrupted})()
    with pytest.raises(KeyboardInterrupt):
        engine.decode([0], [5])
    engine._one_call = step
    if where == "forward":
        engine._hidden = original
    assert engine.cache.lengths[0] == len(engine.history[0]) == 4
    with torch.inference_mode():
        want = model(torch.tensor([[1, 2, 3, 4, 5]]))[0, -1]
    torch.testing.assert_close(engine.decode([0], [5])[0], want, rtol=1e-4, atol=1e-4)
