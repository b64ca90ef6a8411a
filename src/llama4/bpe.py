"""Train a small byte-level BPE and save it in tiktoken format, for ``Tokenizer.from_file``.

Training uses the Hugging Face ``tokenizers`` library with the Llama 4 split pattern as the
pre-tokenizer, so it learns merges inside the same pieces that tiktoken will encode. The saved file
holds one ``base64(token_bytes) rank`` line per token, the rank being the ``tokenizers`` id:

- the 256 single bytes come first (in ``tokenizers``' byte-alphabet order), then one token per
  merge in the order it was learnt, so a lower rank always means an earlier merge;
- tiktoken encodes a piece by repeatedly joining the adjacent pair whose joined bytes have the
  lowest rank, and takes a whole piece that is itself a token directly. With
  ``ignore_merges=True`` (the whole-piece lookup) the ``tokenizers`` model does the same, so both
  give the same ids. They can only differ when a token is reachable through two different pairs
  (``ab + c`` learnt, ``a + bc`` met while encoding): tiktoken joins by the result, ``tokenizers``
  only by the learnt pair. ``compare_encodings`` measures how often that happens (rarely; never
  on the held-out text of the tests).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from llama4.tokenizer import SPLIT_PATTERN, Tokenizer

# Cut training text only after "\n" followed by a character that is neither whitespace nor "/": no
# piece of the split pattern spans such a place (a piece holds "\n" only in a whitespace run or in
# the trailing "[\r\n/]*" of a punctuation run), so cutting there changes no piece.
_SAFE_CUT = re.compile(r"\n(?=[^\s/])")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level ``tokenizers``."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_CHAR_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def read_chunks(paths: Iterable[str | Path], chunk_chars: int = 1 << 20) -> Iterator[str]:
    """The UTF-8 text of ``paths`` in pieces of about ``chunk_chars`` characters, cut only where
    the Llama 4 pre-tokenizer would cut anyway (so training sees the same pieces as encoding)."""
    for path in paths:
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")  # the exact text: read_text turns \r\n into \n
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from e
        start = 0
        while len(text) - start > chunk_chars:
            cut = _SAFE_CUT.search(text, start + chunk_chars)
            if cut is None:
                break
            yield text[start : cut.end()]
            start = cut.end()
        if start < len(text):
            yield text[start:]


def new_hf_tokenizer():  # -> tokenizers.Tokenizer
    """An untrained byte-level BPE ``tokenizers.Tokenizer`` that pre-tokenizes like Llama 4."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE(ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    return hf


def train_hf(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):  # -> tokenizers.Tokenizer
    """Train a byte-level BPE of at most ``vocab_size`` tokens (256 bytes + merges) on ``texts``."""
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size must exceed the 256 single bytes, got {vocab_size}")
    hf = new_hf_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    return hf


def mergeable_ranks(hf) -> dict[bytes, int]:
    """tiktoken ranks (token bytes -> id) of a trained byte-level ``tokenizers.Tokenizer``."""
    vocab: dict[str, int] = hf.get_vocab(with_added_tokens=False)
    ranks = {bytes(_CHAR_TO_BYTE[c] for c in token): rank for token, rank in vocab.items()}
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("the trained vocabulary is not numbered 0..N-1 with distinct byte strings")
    return ranks


def save_tiktoken_bpe(ranks: dict[bytes, int], path: str | Path) -> Path:
    """Write ``ranks`` as a tiktoken BPE file (``base64 rank`` per line, by rank)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="ascii") as f:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
    return path


def train(paths: Sequence[str | Path], vocab_size: int, out: str | Path, min_frequency: int = 2) -> Tokenizer:
    """Train on the text files ``paths``, write the tiktoken file ``out`` and return it loaded
    (with the 2048 Llama 4 special tokens after the BPE ranks).

    The vocabulary stops short of ``vocab_size`` when no pair of tokens occurs ``min_frequency``
    times any more (the returned tokenizer's ``n_base`` says how many); a text that teaches no
    merge at all is an error."""
    if not paths:
        raise ValueError("no training files given")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    hf = train_hf(read_chunks(paths), vocab_size, min_frequency)
    ranks = mergeable_ranks(hf)
    if len(ranks) <= 256:
        raise ValueError(
            f"the text taught no merge (no pair of bytes occurs {min_frequency} times): give more text"
        )
    save_tiktoken_bpe(ranks, out)
    return Tokenizer.from_file(out)


@dataclass
class Comparison:
    """How the ``tokenizers`` model and the tiktoken file encode the same text."""

    pieces: int  # pre-tokenized pieces compared
    differing_pieces: int  # pieces whose ids differ
    hf_tokens: int
    tiktoken_tokens: int

    @property
    def identical(self) -> bool:
        return self.differing_pieces == 0


def compare_encodings(hf, tok: Tokenizer, text: str) -> Comparison:
    """Encode every pre-tokenized piece of ``text`` with both and count the pieces that differ."""
    pieces = [piece for piece, _ in hf.pre_tokenizer.pre_tokenize_str(text)]
    differing = hf_total = tt_total = 0
    for piece in pieces:
        hf_ids = [t.id for t in hf.model.tokenize(piece)]  # the BPE model alone, on one piece
        ours = tok.encode(bytes(_CHAR_TO_BYTE[c] for c in piece).decode("utf-8"))
        hf_total += len(hf_ids)
        tt_total += len(ours)
        differing += hf_ids != ours
    return Comparison(len(pieces), differing, hf_total, tt_total)
