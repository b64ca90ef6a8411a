"""The tokenizer against Meta's reference (pip ``llama-models``): same ids, exact round trips."""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path

import pytest

from llama4.tokenizer import (
    MAX_ENCODE_CHARS,
    MAX_RUN_CHARS,
    IncrementalDecoder,
    Tokenizer,
    load_tiktoken_bpe,
    special_token_names,
    split_for_encoding,
)

reference_tokenizer = pytest.importorskip("llama_models.llama4.tokenizer")

DATA = Path(__file__).parent / "data"
SHARED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"

MULTILINGUAL = [
    "日本語のテキストを正しくトークン化できますか？東京都渋谷区。",
    "Grüße aus München! Die Straße ist für Fußgänger gesperrt. ÄÖÜ äöü ß",
    "Ça va ? L'élève a dû s'asseoir près de la fenêtre, n'est-ce pas ? « Oui ! »",
    "Emoji: 🙂👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️‍🔥 🧑🏿‍🚀",
    "中文分词测试：我们今天去北京大学。한국어 문장도 있습니다. Русский текст, ёжик.",
    "العربية: مرحبا بالعالم. हिन्दी: नमस्ते दुनिया। ไทย: สวัสดีชาวโลก",
    'def f(x: int) -> int:\n\treturn x**2  # square\n\nprint(f(12345678), {"a": [1, 2.5e-3]})\n',
    "SELECT * FROM users WHERE id = 42;\r\n-- comment\r\n",
    "I'll've they're WE'RE you'd it's, 1234567890 3.14159 1,000,000",
]
WHITESPACE = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\r\n",
    "\t\t x",
    "a  b   c",
    "trailing   ",
    "   leading",
    "x \n \n y",
    "\u00a0non-breaking\u00a0space",
    "ideographic\u3000space",
    "line\u2028separator",
    " \t\n\r\x0b\x0c",
    "a\u200bzero-width",
]
SPECIAL_LOOKING = [
    "<|eot|>",
    "<|begin_of_text|>Hello<|end_of_text|>",
    "text <|header_start|>user<|header_end|> more",
    "<|image|><|patch|><|reserved_special_token_5|>",
    "<|not_a_token|> <| eot |>",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def ref():
    return reference_tokenizer.Tokenizer.get_instance()


def ref_encode(ref, text: str, **kw) -> list[int]:
    return ref.encode(text, bos=kw.pop("bos", False), eos=kw.pop("eos", False), **kw)


# ----- vocabulary --------------------------------------------------------------------------------


def test_special_tokens_match_reference(tok, ref):
    assert tok.special_tokens == ref.special_tokens
    assert tok.n_base == 200_000
    assert tok.n_words == tok.vocab_size == ref.n_words == 202_048
    assert list(tok.special_tokens) == special_token_names()


@pytest.mark.parametrize(
    "name, token_id",
    [
        ("<|begin_of_text|>", 200000),
        ("<|end_of_text|>", 200001),
        ("<|header_start|>", 200005),
        ("<|header_end|>", 200006),
        ("<|eom|>", 200007),
        ("<|eot|>", 200008),
        ("<|python_start|>", 200016),
        ("<|python_end|>", 200017),
        ("<|finetune_right_pad|>", 200018),
        ("<|image_start|>", 200080),
        ("<|image_end|>", 200081),
        ("<|tile_x_separator|>", 200084),
        ("<|tile_y_separator|>", 200085),
        ("<|image|>", 200090),
        ("<|patch|>", 200092),
        ("<|reasoning_thinking_start|>", 201142),
        ("<|reasoning_thinking_end|>", 201143),
        ("<|reserved_special_token_903|>", 202047),
    ],
)
def test_special_token_ids(tok, name, token_id):
    assert tok.special(name) == token_id
    assert tok.special(name[2:-2]) == token_id  # bare name
    assert tok.is_special(token_id)
    assert tok.decode([token_id]) == name


def test_named_ids(tok, ref):
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.eom_id, tok.pad_id) == (
        ref.bos_id,
        ref.eos_id,
        ref.eot_id,
        ref.eom_id,
        ref.pad_id,
    )
    assert list(tok.stop_ids) == ref.stop_tokens
    assert not tok.is_special(1000)
    with pytest.raises(KeyError, match="unknown special token"):
        tok.special("no_such_token")


# ----- encoding is identical to the reference ----------------------------------------------------


@pytest.mark.parametrize("text", MULTILINGUAL + WHITESPACE + SPECIAL_LOOKING)
def test_encode_matches_reference(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref_encode(ref, text)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", SPECIAL_LOOKING)
def test_special_looking_text_is_plain_unless_allowed(tok, ref, text):
    plain = tok.encode(text)
    assert not any(tok.is_special(i) for i in plain)
    allowed = tok.encode(text, allow_special=True)
    assert allowed == ref_encode(ref, text, allowed_special="all")
    only_eot = tok.encode(text, allow_special={"<|eot|>"})
    assert only_eot == ref_encode(ref, text, allowed_special={"<|eot|>"})
    assert tok.decode(allowed) == tok.decode(only_eot) == text


def test_eot_text_becomes_the_eot_token_only_when_allowed(tok):
    assert tok.encode("<|eot|>", allow_special=True) == [tok.eot_id]
    assert tok.eot_id not in tok.encode("<|eot|>")


def test_bos_eos(tok, ref):
    ids = tok.encode("Hello world", bos=True, eos=True)
    assert ids == ref_encode(ref, "Hello world", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id


def test_encode_rejects_non_text(tok):
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_real_text_excerpt(tok, ref):
    text = (DATA / "excerpt.txt").read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert ids == ref_encode(ref, text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 3  # real compression, not byte fallback


@pytest.mark.skipif(not SHARED_TEXT.is_dir(), reason="shared data not available")
@pytest.mark.parametrize("name", ["austen_persuasion.txt", "jargon.txt"])
def test_shared_corpus_megabyte(tok, ref, name):
    path = SHARED_TEXT / name
    if not path.is_file():
        pytest.skip(f"{path} missing")
    text = path.read_text(encoding="utf-8")[:1_000_000]  # crosses two 400k windows
    assert tok.encode(text) == ref_encode(ref, text)


# ----- long inputs: the reference's cuts, reproduced ---------------------------------------------


def reference_pieces(ref, text: str) -> list[str]:
    return [
        piece
        for start in range(0, len(text), MAX_ENCODE_CHARS)
        for piece in ref._split_whitespaces_or_nonwhitespaces(
            text[start : start + MAX_ENCODE_CHARS], MAX_RUN_CHARS
        )
    ]


def test_split_points_match_reference(ref):
    rng = random.Random(1234)
    lengths = [1, 7, 12_499, 12_500, 12_501, 24_999, 25_000, 25_001, 50_000, 50_001, 75_002]
    cases = ["a" * 25_000, "a" * 25_001, " " * 60_000 + "x" * 50_001 + " b", ("x" * 24_999 + " ") * 20]
    for _ in range(25):
        chars = ["x", "é", "\n", " ", "\t", "\u2028", "漢", "🙂"]
        cases.append("".join(rng.choice(chars) * rng.choice(lengths) for _ in range(rng.randint(1, 10))))
    for text in cases:
        ours = list(split_for_encoding(text))
        assert "".join(ours) == text
        assert ours == [p for p in reference_pieces(ref, text) if p], len(text)


def test_300k_characters_mixed(tok, ref):
    base = (DATA / "excerpt.txt").read_text(encoding="utf-8") + "".join(MULTILINGUAL)
    text = (base * (300_000 // len(base) + 1))[:300_000] + base * 20  # > 400k: two windows
    assert len(text) > MAX_ENCODE_CHARS
    ids = tok.encode(text)
    assert ids == ref_encode(ref, text)
    assert tok.decode(ids) == text


@pytest.mark.parametrize(
    "text",
    [
        "a" * 300_000,
        "".join(random.Random(0).choice("abcdefghijklmnopqrstuvwxyz0123456789.,;-_") for _ in range(300_000)),
        "漢字🙂" * 100_000,
        " " * 120_000 + "end",
        "x" * 30_000 + "\n" * 30_000 + "y" * 30_000,
    ],
    ids=["one-letter", "random-no-space", "cjk-emoji", "spaces", "runs"],
)
def test_long_runs_without_whitespace(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref_encode(ref, text)
    assert tok.decode(ids) == text


# ----- round trips and streaming -----------------------------------------------------------------


def test_round_trip_random_unicode(tok):
    rng = random.Random(7)
    alphabet = [chr(c) for c in range(0x20, 0x250)] + list("日本語中文한국어🙂👍🏽\n\t \u200d\u3000")
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        assert tok.decode(tok.encode(text)) == text


def test_incremental_decoder_never_emits_broken_characters(tok):
    text = "".join(MULTILINGUAL)
    ids = tok.encode(text)
    # The test is only meaningful if some character really is split across tokens.
    split_tokens = [i for i in ids if not _is_valid_utf8(tok.token_bytes(i))]
    assert split_tokens, "expected some tokens that are partial UTF-8 sequences"
    decoder = tok.incremental_decoder()
    pieces = [decoder.add(i) for i in ids]
    pieces.append(decoder.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    # Each piece is whole characters of the text, in order.
    assert [c for p in pieces for c in p] == list(text)


def test_incremental_decoder_equals_decode_on_arbitrary_ids(tok):
    rng = random.Random(3)
    # Single-byte tokens, including lone continuation bytes and truncated sequences.
    byte_ids = [tok.model.encode_single_token(bytes([b])) for b in range(256)]
    for _ in range(30):
        ids = [rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(tok.n_base) for _ in range(40)]
        decoder = IncrementalDecoder(tok)
        streamed = "".join(decoder.add(i) for i in ids) + decoder.flush()
        assert streamed == tok.decode(ids)


def test_incremental_decoder_holds_back_partial_character(tok):
    emoji = "🙂".encode()  # 4 bytes
    ids = [tok.model.encode_single_token(emoji[i : i + 1]) for i in range(4)]
    decoder = tok.incremental_decoder()
    assert [decoder.add(i) for i in ids] == ["", "", "", "🙂"]
    assert decoder.add(tok.eot_id) == "<|eot|>"
    decoder.add(ids[0])
    assert decoder.flush() == "\ufffd"  # stream ended inside a character


def _is_valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ----- files -------------------------------------------------------------------------------------


def write_tiny_bpe(path: Path) -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"he", b"ll", b"hell", b"hello", b" w", b" wo"):
        ranks[token] = len(ranks)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


def test_from_file_appends_specials_after_ranks(tmp_path):
    ranks = write_tiny_bpe(tmp_path / "tiny.model")
    tok = Tokenizer.from_file(tmp_path / "tiny.model")
    n = len(ranks)
    assert tok.n_base == n and tok.n_words == n + 2048
    assert tok.bos_id == n and tok.eot_id == n + 8 and tok.special("patch") == n + 92
    assert tok.encode("hello world") == [
        ranks[b"hello"],
        ranks[b" wo"],
        ranks[b"r"],
        ranks[b"l"],
        ranks[b"d"],
    ]
    assert tok.decode(tok.encode("hello world", bos=True)) == "<|begin_of_text|>hello world"


def test_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("aGk= 5\n")
    with pytest.raises(ValueError, match="ranks"):
        load_tiktoken_bpe(bad)
    bad.write_text("not base64 at all\n")
    with pytest.raises(ValueError, match="expected"):
        load_tiktoken_bpe(bad)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path / "missing.model")


def test_find_prefers_checkpoint_file(tmp_path, tok):
    ranks = write_tiny_bpe(tmp_path / "tokenizer.model")
    assert Tokenizer.find(tmp_path).n_base == len(ranks)
    hf_layout = tmp_path / "hf"
    (hf_layout / "original").mkdir(parents=True)
    shutil.copy(tmp_path / "tokenizer.model", hf_layout / "original" / "tokenizer.model")
    assert Tokenizer.find(hf_layout).n_base == len(ranks)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert Tokenizer.find(empty) is tok  # falls back to the (cached) Llama 4 tokenizer
    assert Tokenizer.find() is tok
    with pytest.raises(FileNotFoundError):
        Tokenizer.find(tmp_path / "nope")


# ----- CLI ---------------------------------------------------------------------------------------


def test_cli_tokenize_text_and_chat(tmp_path, capsys, tok):
    from llama4.cli import main

    (tmp_path / "t.txt").write_text("Hello <|eot|> world", encoding="utf-8")
    assert main(["tokenize", "--text-file", str(tmp_path / "t.txt"), "--bos"]) == 0
    assert json.loads(capsys.readouterr().out) == tok.encode("Hello <|eot|> world", bos=True)
    crlf = "SELECT 1;\r\n-- c\r\nx\ry"  # the file's exact text: no newline translation
    (tmp_path / "crlf.txt").write_bytes(crlf.encode())
    assert main(["tokenize", "--text-file", str(tmp_path / "crlf.txt")]) == 0
    assert json.loads(capsys.readouterr().out) == tok.encode(crlf)

    chat = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}, "Hi"]}]
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    assert main(["tokenize", "--chat", str(tmp_path / "chat.json"), "--image-grid", "1x2"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids[:3] == [tok.bos_id, tok.special("header_start"), *tok.encode("user")]
    assert ids.count(tok.special("patch")) == 3 * 144
    assert ids[-1] == tok.encode("\n\n")[-1]  # ends with the assistant header

    assert main(["tokenize", "--chat", str(tmp_path / "chat.json")]) == 2  # no grid for the image
    assert "image" in capsys.readouterr().err
