"""`llama4 eval`: bits per byte equals a direct computation; the sliding windows score each token once."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llama4
from llama4.checkpoint.io import build
from llama4.cli import main
from llama4.config import get_preset
from llama4.eval import evaluate_text, windows
from llama4.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. \u201cMy dear Mr. Bennet,\u201d said his lady to him one day."
)


def tiny_model(vocab: int, max_seq_len: int = 512) -> torch.nn.Module:
    cfg = get_preset("debug")
    d = cfg.to_dict()
    d["text"]["vocab_size"] = vocab
    d["text"]["max_seq_len"] = max_seq_len
    model = build(type(cfg).from_dict(d), device="meta")
    model.to_empty(device="cpu")
    model.init_buffers("cpu")
    model.init_weights(0)
    with torch.no_grad():  # larger weights than the init: a model far from uniform
        model.output.weight.mul_(20)
    return model.eval()


@pytest.fixture
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(DATA / "tokenizer_512.model")


def direct_bits(model, tok, text: str) -> tuple[float, int]:
    ids = torch.tensor([[tok.bos_id, *tok.encode(text)]])
    with torch.no_grad():
        logits = model(ids[:, :-1]).float()
    nll = F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
    return nll / math.log(2), ids.shape[1] - 1


def test_cli_bits_per_byte_equals_direct_computation(tmp_path, tokenizer, capsys):
    model = tiny_model(tokenizer.n_words)
    llama4.save(model, tmp_path / "m")
    shutil.copyfile(DATA / "tokenizer_512.model", tmp_path / "m" / "tokenizer.model")
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    assert main(["eval", "--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    bits, n_tokens = direct_bits(llama4.load(tmp_path / "m"), tokenizer, TEXT)
    n_bytes = len(TEXT.encode("utf-8"))
    assert set(got) == {"bits_per_byte", "loss", "tokens", "bytes"}
    assert got["tokens"] == n_tokens and got["bytes"] == n_bytes
    assert got["bits_per_byte"] == pytest.approx(bits / n_bytes, rel=1e-5)
    assert got["loss"] == pytest.approx(bits * math.log(2) / n_tokens, rel=1e-5)
    # The file's exact bytes are scored: \r\n line ends stay as they are.
    crlf = TEXT.replace("\n", "\r\n") + "\r\n"
    (tmp_path / "crlf.txt").write_bytes(crlf.encode())
    assert main(["eval", "--model", str(tmp_path / "m"), "--text", str(tmp_path / "crlf.txt"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (
        got["bytes"] == len(crlf.encode())
        and got["tokens"] == direct_bits(llama4.load(tmp_path / "m"), tokenizer, crlf)[1]
    )


def test_uniform_logits_give_log2_vocab_per_token(tokenizer):
    model = tiny_model(tokenizer.n_words, max_seq_len=16)  # several sliding windows
    with torch.no_grad():
        model.output.weight.zero_()  # every logit 0: uniform over the vocabulary
    r = evaluate_text(model, tokenizer, TEXT * 3)
    vocab = model.config.text.vocab_size
    assert r["loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert r["bits_per_byte"] == pytest.approx(math.log2(vocab) * r["tokens"] / r["bytes"], rel=1e-6)


def test_sliding_windows_score_each_token_once_with_context():
    for n, context, stride in [(2, 8, 4), (10, 4, 2), (9, 4, 4), (100, 16, 5), (17, 16, 8)]:
        scored = []
        for start, end, first in windows(n, context, stride):
            assert end - 1 - start <= context  # inputs fit the window
            assert first == 1 or first - start >= context - stride + 1  # enough context
            scored += range(first, end)
        assert scored == list(range(1, n))


def test_sliding_window_equals_windowed_direct_computation(tokenizer):
    """With a short context the score of each token is its NLL under its own window."""
    model = tiny_model(tokenizer.n_words, max_seq_len=12)
    text = TEXT * 2
    r = evaluate_text(model, tokenizer, text, context=12, stride=5)
    ids = [tokenizer.bos_id, *tokenizer.encode(text)]
    total = 0.0
    with torch.no_grad():
        for start, end, first in windows(len(ids), 12, 5):
            x = torch.tensor([ids[start : end - 1]])
            logp = F.log_softmax(model(x).float()[0], -1)
            for pos in range(first, end):
                total -= logp[pos - start - 1, ids[pos]].item()
    assert r["bits_per_byte"] == pytest.approx(total / math.log(2) / len(text.encode()), rel=1e-5)
