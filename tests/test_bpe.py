"""Training a byte-level BPE: the tiktoken file encodes exactly like the ``tokenizers`` model."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from llama4 import bpe
from llama4.tokenizer import Tokenizer, load_tiktoken_bpe

pytest.importorskip("tokenizers")

DATA = Path(__file__).parent / "data"
TRAIN = DATA / "excerpt.txt"
HELD_OUT = DATA / "heldout.txt"  # never trained on
VOCAB = 600
MULTILINGUAL = "Grüße aus München! 日本語のテキスト。 Ça va? 🙂👍🏽 def f(x):\n\treturn x**2  \n\n\n   end"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe") / "small.model"
    tok = bpe.train([TRAIN], VOCAB, out)
    hf = bpe.train_hf(bpe.read_chunks([TRAIN]), VOCAB)  # the same training, kept as a tokenizers object
    return tok, hf, out


def test_file_format_and_specials(trained):
    tok, _, out = trained
    lines = out.read_text(encoding="ascii").splitlines()
    assert len(lines) == tok.n_base == VOCAB
    ranks = [int(line.split()[1]) for line in lines]
    assert ranks == list(range(VOCAB))
    singles = {base64.b64decode(line.split()[0]) for line in lines[:256]}
    assert singles == {bytes([b]) for b in range(256)}  # the byte alphabet comes first
    assert tok.bos_id == VOCAB and tok.eot_id == VOCAB + 8 and tok.special("patch") == VOCAB + 92
    assert tok.n_words == VOCAB + 2048


def test_training_is_deterministic(trained):
    _, hf, out = trained
    assert bpe.mergeable_ranks(hf) == load_tiktoken_bpe(out)


@pytest.mark.parametrize("source", ["held-out", "multilingual", "training"])
def test_tokenizers_and_tiktoken_give_the_same_ids(trained, source):
    tok, hf, _ = trained
    text = {
        "held-out": HELD_OUT.read_text(encoding="utf-8"),
        "multilingual": MULTILINGUAL,
        "training": TRAIN.read_text(encoding="utf-8"),
    }[source]
    ids = tok.encode(text)
    assert hf.encode(text).ids == ids
    assert tok.decode(ids) == text == hf.decode(ids)
    comparison = bpe.compare_encodings(hf, tok, text)
    assert comparison.identical and comparison.hf_tokens == comparison.tiktoken_tokens == len(ids)


def test_bpe_compresses_held_out_text(trained):
    tok, _, _ = trained
    text = HELD_OUT.read_text(encoding="utf-8")
    assert len(tok.encode(text)) < 0.6 * len(text.encode())


def test_read_chunks_cuts_only_between_pieces(tmp_path):
    text = TRAIN.read_text(encoding="utf-8") + "\n/path\n" + MULTILINGUAL + "\n\n  \nword"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    chunks = list(bpe.read_chunks([tmp_path / "t.txt"], chunk_chars=200))
    assert len(chunks) > 10 and "".join(chunks) == text
    split = bpe.new_hf_tokenizer().pre_tokenizer.pre_tokenize_str
    assert [p for chunk in chunks for p, _ in split(chunk)] == [p for p, _ in split(text)]


def test_train_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        bpe.train([TRAIN], 100, tmp_path / "x.model")
    with pytest.raises(ValueError, match="no training files"):
        bpe.train([], 1000, tmp_path / "x.model")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        bpe.train([tmp_path / "latin1.txt"], 300, tmp_path / "x.model")
    for text in ("", "  \n", "hello world\n"):  # nothing to learn: no pair occurs twice
        (tmp_path / "small.txt").write_text(text)
        with pytest.raises(ValueError, match="taught no merge"):
            bpe.train([tmp_path / "small.txt"], 1000, tmp_path / "x.model")
    with pytest.raises(ValueError, match="min_frequency must be >= 1"):
        bpe.train([TRAIN], 1000, tmp_path / "x.model", min_frequency=-1)


def test_cli_train_then_tokenize(tmp_path, capsys):
    from llama4.cli import main

    out = tmp_path / "cli.model"
    assert main(["tokenizer", "train", "--text", str(TRAIN), "--vocab-size", "400", "--out", str(out)]) == 0
    assert "400 BPE tokens" in capsys.readouterr().err
    assert main(["tokenize", "--tokenizer", str(out), "--text-file", str(HELD_OUT)]) == 0
    ids = json.loads(capsys.readouterr().out)
    tok = Tokenizer.from_file(out)
    assert ids == tok.encode(HELD_OUT.read_text(encoding="utf-8"))
    # A vocabulary the text cannot fill stops short, and says so.
    (tmp_path / "short.txt").write_text("the cat sat on the mat; the cat sat on the hat.\n")
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--text",
                str(tmp_path / "short.txt"),
                "--vocab-size",
                "5000",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    said = capsys.readouterr().err
    assert "(not 5000: no more pairs occur at least 2 times in this text)" in said
    with pytest.raises(SystemExit):  # argparse: a usage error
        main(
            [
                "tokenizer",
                "train",
                "--text",
                str(TRAIN),
                "--vocab-size",
                "400",
                "--out",
                str(out),
                "--min-frequency",
                "-1",
            ]
        )
    assert "--min-frequency: must be >= 1" in capsys.readouterr().err
    missing = str(tmp_path / "missing.txt")
    assert main(["tokenizer", "train", "--text", missing, "--vocab-size", "400", "--out", str(out)]) == 2
