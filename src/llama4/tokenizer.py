"""The Llama 4 tokenizer: tiktoken BPE + 2048 special tokens, token-identical to Meta's.

Facts taken from Meta's reference (``llama_models.llama4.tokenizer``):

- the text is pre-split with an o200k-style regex (``SPLIT_PATTERN``), then byte-level BPE;
- the BPE file (``tokenizer.model``) is in tiktoken format: one ``base64(token_bytes) rank`` per
  line, 200000 ranks for Llama 4;
- 2048 special tokens follow the BPE ranks in a fixed order (``special_token_names``):
  ``<|begin_of_text|>`` = 200000, ``<|eot|>`` = 200008, ``<|patch|>`` = 200092, ...;
- long inputs are cut before encoding (tiktoken is slow, or panics, on huge pieces): into windows
  of 400k characters, and inside each window wherever a run of whitespace or of non-whitespace
  exceeds 25k characters. The cuts change the tokens at the cut, so we cut at exactly the same
  places as the reference (``split_for_encoding``), only faster (a regex instead of a Python loop).
"""

from __future__ import annotations

import base64
import codecs
import functools
import importlib.util
import re
from collections.abc import Iterable, Iterator, Sequence, Set
from pathlib import Path

import tiktoken

# o200k-style split pattern used by Llama 4 (identical to Meta's ``O200K_PATTERN``).
SPLIT_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

NUM_SPECIAL_TOKENS = 2048
MAX_ENCODE_CHARS = 400_000  # window size of the reference's first cut
MAX_RUN_CHARS = 25_000  # longest run of (non-)whitespace the reference passes to tiktoken in one piece

# A maximal run of more than MAX_RUN_CHARS whitespace or non-whitespace characters. The look-behinds
# anchor each attempt at the start of a run, so the scan stays linear. Python's ``\s`` (and
# ``str.split()``) is exactly ``str.isspace`` (all use Py_UNICODE_ISSPACE), which the reference tests.
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{MAX_RUN_CHARS + 1},}}|(?<!\s)\s{{{MAX_RUN_CHARS + 1},}}")
# Any run longer than MAX_RUN_CHARS covers at least one whole block [k*B, (k+1)*B) of this size.
_BLOCK = MAX_RUN_CHARS // 2


def _may_have_long_run(window: str) -> bool:
    """Cheap test (well under 1 ns/char) that is True whenever ``window`` has a run longer than
    ``MAX_RUN_CHARS``: some aligned block is all whitespace or has no whitespace at all. The exact
    regex costs ~85 ns/char, more than tiktoken itself, so it only runs when this says so."""
    for start in range(0, len(window) - _BLOCK + 1, _BLOCK):
        block = window[start : start + _BLOCK]
        # split(None, 1) stops at the first whitespace, so this is fast on ordinary text.
        if block.isspace() or len(block.split(None, 1)[0]) == _BLOCK:
            return True
    return False


def _reserved(prefix: str, start: int, stop: int) -> list[str]:
    return [f"<|{prefix}reserved_special_token_{i}|>" for i in range(start, stop)]


def special_token_names() -> list[str]:
    """The 2048 special tokens in Meta's order; token ``i`` of this list has id ``n_base + i``."""
    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    text_post_train = [
        "<|header_start|>",
        "<|header_end|>",
        "<|eom|>",
        "<|eot|>",
        "<|step|>",
        *_reserved("text_post_train_", 0, 6),
        "<|python_start|>",
        "<|python_end|>",
        "<|finetune_right_pad|>",
        *_reserved("text_post_train_", 8, 69),
    ]
    vision = [
        "<|image_start|>",
        "<|image_end|>",
        *_reserved("vision_", 0, 2),
        "<|tile_x_separator|>",
        "<|tile_y_separator|>",
        *_reserved("vision_", 2, 6),
        "<|image|>",
        *_reserved("vision_", 6, 7),
        "<|patch|>",
        *_reserved("vision_", 7, 1048),
    ]
    reasoning = [*_reserved("reasoning_", 0, 8), "<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    named = basic + text_post_train + vision + reasoning
    names = named + _reserved("", 0, NUM_SPECIAL_TOKENS - len(named))
    assert len(names) == len(set(names)) == NUM_SPECIAL_TOKENS, (len(names), len(set(names)))
    return names


def split_for_encoding(text: str) -> Iterator[str]:
    """Cut ``text`` where Meta's reference cuts it before handing it to tiktoken.

    Windows of ``MAX_ENCODE_CHARS`` characters; inside a window, a run of more than
    ``MAX_RUN_CHARS`` whitespace (or non-whitespace) characters is cut every ``MAX_RUN_CHARS``
    characters from the start of the run. Joining the pieces gives back ``text``.
    """
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        window = text[start : start + MAX_ENCODE_CHARS]
        if not _may_have_long_run(window):  # the common case: nothing to cut
            yield window
            continue
        cut = 0
        for run in _LONG_RUN.finditer(window):
            for pos in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield window[cut:pos]
                cut = pos
        yield window[cut:]


def load_tiktoken_bpe(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken-format BPE file: ``base64(token) rank`` per line, blank lines ignored.

    The ranks must be exactly ``0..N-1`` (the special tokens are numbered from ``N``).
    """
    path = Path(path)
    ranks: dict[bytes, int] = {}
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'base64_token rank', got {line[:80]!r}")
            try:
                ranks[base64.b64decode(fields[0], validate=True)] = int(fields[1])
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: bad token or rank in {line[:80]!r}: {e}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} with each token once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: byte-level BPE needs all 256 single bytes; missing {missing[:8]}...")
    return ranks


def _installed_llama4_model() -> Path | None:
    """``llama_models/llama4/tokenizer.model`` of the installed pip ``llama-models``, if any."""
    spec = importlib.util.find_spec("llama_models")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "llama4" / "tokenizer.model"
        if candidate.is_file():
            return candidate
    return None


class Tokenizer:
    """Byte-level BPE (tiktoken) with the Llama 4 split pattern and special tokens.

    Build it with ``Tokenizer.default()`` (Meta's Llama 4 vocabulary), ``Tokenizer.find(dir)``
    (the file of a checkpoint directory, else the default) or ``Tokenizer.from_file(path)`` (any
    tiktoken-format BPE, e.g. one trained by ``llama4.bpe``).
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], name: str = "llama4") -> None:
        self.n_base = len(mergeable_ranks)
        names = special_token_names()
        self.special_tokens: dict[str, int] = {tok: self.n_base + i for i, tok in enumerate(names)}
        self._special_ids: frozenset[int] = frozenset(self.special_tokens.values())
        self.model = tiktoken.Encoding(
            name=name,
            pat_str=SPLIT_PATTERN,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot|>"]
        self.eom_id = self.special_tokens["<|eom|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad|>"]
        # Generation stops at any of these (same order as the reference's ``stop_tokens``).
        self.stop_ids: tuple[int, ...] = (self.eos_id, self.eom_id, self.eot_id)

    # ----- construction -------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a tiktoken-format BPE file; the 2048 special tokens are appended after its ranks."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(load_tiktoken_bpe(path), name=path.name)

    @classmethod
    def default(cls) -> Tokenizer:
        """Meta's Llama 4 tokenizer, from the installed ``llama-models`` package (cached)."""
        return _default_tokenizer()

    @classmethod
    def find(cls, model_dir: str | Path | None = None) -> Tokenizer:
        """The tokenizer of a checkpoint: ``tokenizer.model`` in ``model_dir`` (or in its
        ``original/`` folder, where Hugging Face repositories keep Meta's file), else the default
        Llama 4 tokenizer from ``llama-models``."""
        if model_dir is not None:
            model_dir = Path(model_dir)
            if not model_dir.is_dir():
                raise FileNotFoundError(f"model directory not found: {model_dir}")
            for candidate in (model_dir / "tokenizer.model", model_dir / "original" / "tokenizer.model"):
                if candidate.is_file():
                    return cls.from_file(candidate)
        return cls.default()

    # ----- vocabulary ---------------------------------------------------------------------------

    @property
    def n_words(self) -> int:
        """Vocabulary size: BPE ranks + 2048 special tokens (202048 for Llama 4)."""
        return self.n_base + NUM_SPECIAL_TOKENS

    @property
    def vocab_size(self) -> int:
        """Same as ``n_words``."""
        return self.n_words

    def special(self, name: str) -> int:
        """Id of a special token, by its full text (``"<|eot|>"``) or bare name (``"eot"``)."""
        key = name if name.startswith("<|") else f"<|{name}|>"
        try:
            return self.special_tokens[key]
        except KeyError:
            raise KeyError(f"unknown special token {name!r}") from None

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is one of the 2048 special tokens."""
        return token_id in self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (the text of a special token, UTF-8 encoded)."""
        if not 0 <= token_id < self.n_words:
            raise ValueError(f"token id {token_id} out of range [0, {self.n_words})")
        return self.model.decode_single_token_bytes(token_id)

    # ----- encoding / decoding ------------------------------------------------------------------

    def encode(
        self,
        text: str,
        *,
        bos: bool = False,
        eos: bool = False,
        allow_special: bool | Set[str] = False,
    ) -> list[int]:
        """Token ids of ``text``.

        Text that looks like a special token (``"<|eot|>"``) is encoded as plain text unless
        ``allow_special`` is True (all special tokens) or a set of the special tokens to honour.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if allow_special is True:
            allowed: Set[str] | str = "all"
        elif allow_special is False:
            allowed = frozenset()
        else:
            allowed = allow_special
        ids = [self.bos_id] if bos else []
        for piece in split_for_encoding(text):
            if allowed:
                ids.extend(self.model.encode(piece, allowed_special=allowed, disallowed_special=()))
            else:
                ids.extend(self.model.encode_ordinary(piece))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens appear as their text, invalid UTF-8 as U+FFFD."""
        return self.model.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes of ``ids`` (no UTF-8 decoding)."""
        return self.model.decode_bytes(list(ids))

    def incremental_decoder(self) -> IncrementalDecoder:
        """A fresh streaming decoder for this tokenizer."""
        return IncrementalDecoder(self)

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.model.name!r}, n_base={self.n_base}, n_words={self.n_words})"


class IncrementalDecoder:
    """Streaming detokenizer: feed ids one at a time, get back only complete UTF-8 text.

    A character whose bytes span several tokens (common for CJK and emoji) is held back until its
    last byte arrives, so a stream never prints a broken character. The concatenation of all
    ``add`` results and the final ``flush`` equals ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Feed one token; return the text that is now complete (possibly ``""``)."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def add_many(self, ids: Sequence[int]) -> str:
        """Feed several tokens at once."""
        return self._utf8.decode(self._tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        """End of stream: return what is left (U+FFFD for an incomplete trailing character)."""
        return self._utf8.decode(b"", final=True)

    def reset(self) -> None:
        """Forget any held-back bytes."""
        self._utf8.reset()


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> Tokenizer:
    path = _installed_llama4_model()
    if path is None:
        raise FileNotFoundError(
            "Llama 4 tokenizer.model not found: install pip 'llama-models' (it ships "
            "llama_models/llama4/tokenizer.model) or pass a checkpoint directory that has one"
        )
    return Tokenizer.from_file(path)
