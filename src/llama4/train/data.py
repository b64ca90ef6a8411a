"""Training data: files -> tokens (cached, memory-mapped) -> packed sequences -> batches.

Pretraining text (files, folders, globs; `.jsonl` files with a "text" field count as one
document per line) is tokenised once, each document as `<|begin_of_text|> ... <|end_of_text|>`,
and the documents are concatenated into one uint32 token file in the cache directory. The
file's name is a hash of the inputs (resolved paths, sizes, mtimes) and of the tokenizer, so a
second run with the same inputs maps the file instead of tokenising again.

Fine-tuning JSONL holds `{"text": ...}` (loss on every token) or `{"messages": [...]}` in
OpenAI chat form (loss only on the assistant turns, from the chat format's training mask);
plain text files may be mixed in (each one document, loss on every token). Their tokens are
cached the same way with a uint8 loss mask beside them.

The token stream is cut into fixed windows of seq_len + 1 tokens (inputs and shifted targets;
consecutive windows share one token). Documents are packed back to back: attention is not
masked at document boundaries (the BOS/EOS tokens mark them). An epoch visits every window
once, in an order drawn from (seed, epoch); `BatchStream.state_dict()` is the exact position.

Shapes: B batch, L seq_len. Targets use -100 where no loss is taken.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

IGNORE = -100  # target id that carries no loss (torch's cross_entropy default ignore_index)
CACHE_VERSION = 2  # bump when the cached layout, the document framing or the text read changes
# (2: files are read as their exact bytes; 1 turned \r\n into \n)
PLAIN_TEXT_SUFFIXES = {".txt", ".md", ".text"}
TEXT_SUFFIXES = PLAIN_TEXT_SUFFIXES | {".jsonl"}


# -- tokenizer ------------------------------------------------------------------------------------


def load_tokenizer(path: str | Path | None):
    """The tokenizer from a file, or Llama 4's own (202048 tokens) when path is None."""
    from llama4.tokenizer import Tokenizer

    return Tokenizer.default() if path is None else Tokenizer.from_file(str(path))


def tokenizer_fingerprint(tokenizer_path: str | Path | None, tokenizer) -> str:
    """Identifies the tokenizer in cache keys: its file's content hash and its vocabulary size."""
    if tokenizer_path is None:
        from llama4.tokenizer import _installed_llama4_model  # the file Tokenizer.default() reads

        tokenizer_path = _installed_llama4_model()
    digest = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest() if tokenizer_path else "default"
    return f"{digest}:{tokenizer.vocab_size}"


# -- files ---------------------------------------------------------------------------------------


def expand_paths(specs: list[str] | tuple[str, ...]) -> list[Path]:
    """Files named by paths, folders (recursively, text-like suffixes) or globs, in sorted order."""
    files: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
        if not found:
            raise FileNotFoundError(f"no data files match {spec!r}")
        files.extend(found)
    seen: set[Path] = set()
    unique = []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(r)
    return unique


def _cache_key(kind: str, files: list[Path], tok_id: str) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{kind}|{tok_id}".encode())
    for f in files:
        st = f.stat()
        h.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- documents -----------------------------------------------------------------------------------


def _text(f: Path) -> str:
    """The file's exact text (read_text would turn \\r\\n into \\n)."""
    return f.read_bytes().decode("utf-8", errors="replace")


def _lines(f: Path) -> list[str]:
    """JSON lines: split at \\n only (str.splitlines also splits at U+2028 and others, which JSON
    strings may hold raw); a \\r before it is whitespace to json.loads."""
    return f.read_bytes().decode("utf-8").split("\n")


def _text_documents(files: list[Path]) -> Iterator[str]:
    for f in files:
        if f.suffix == ".jsonl":
            for line in _lines(f):
                if line.strip():
                    yield json.loads(line)["text"]
        else:
            yield _text(f)


def _sft_examples(files: list[Path], tokenizer) -> Iterator[tuple[list[int], list[int]]]:
    """(ids, loss mask) per JSONL record (chat records are masked to the assistant turns), and
    per plain text file (.txt, .md, .text: one document, loss on every token like a {"text"}
    record). Any other file is read as JSON lines."""

    def whole(text: str) -> tuple[list[int], list[int]]:
        ids = tokenizer.encode(text, bos=True, eos=True)
        return ids, [1] * len(ids)

    chat = None
    for f in files:
        if f.suffix in PLAIN_TEXT_SUFFIXES:
            yield whole(_text(f))
            continue
        for n, line in enumerate(_lines(f), 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "messages" in rec:
                if chat is None:
                    from llama4.chat import ChatFormat

                    chat = ChatFormat(tokenizer)
                ids, mask = chat.encode_dialog_for_training(rec["messages"])
                ids, mask = list(ids), [int(bool(m)) for m in mask]
                if not ids or ids[0] != tokenizer.bos_id:
                    ids, mask = [tokenizer.bos_id, *ids], [0, *mask]
            elif "text" in rec:
                ids, mask = whole(rec["text"])
            else:
                raise ValueError(f"{f}:{n}: a record needs 'messages' or 'text', got keys {sorted(rec)}")
            yield ids, mask


# -- token store ---------------------------------------------------------------------------------


@dataclass
class TokenStore:
    """A token stream (memory-mapped uint32) with an optional loss mask (uint8) beside it."""

    tokens: np.ndarray  # (N,) uint32
    mask: np.ndarray | None  # (N,) uint8: 1 where the token is a target worth a loss
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.tokens)


def build_store(
    files: list[Path],
    tokenizer,
    tok_id: str,
    cache_dir: str | Path,
    *,
    sft: bool = False,
    log=print,
) -> TokenStore:
    """Tokenise `files` into the cache (unless already there) and map the result."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key("sft" if sft else "text", files, tok_id)
    tok_file, mask_file, meta_file = (cache_dir / f"{key}.{ext}" for ext in ("tokens", "mask", "json"))
    if not meta_file.exists():  # the meta file is written last: its presence means complete
        log(f"tokenising {len(files)} file(s) into {tok_file}")
        tmp_tok = tok_file.with_name(f"{tok_file.name}.tmp{os.getpid()}")
        tmp_mask = mask_file.with_name(f"{mask_file.name}.tmp{os.getpid()}")
        n_tokens, docs = 0, 0
        # Streamed to disk document by document: the corpus never has to fit in memory as ids.
        with open(tmp_tok, "wb") as ft, open(tmp_mask, "wb") if sft else contextlib.nullcontext() as fm:
            examples = (
                _sft_examples(files, tokenizer)
                if sft
                else ((tokenizer.encode(text, bos=True, eos=True), None) for text in _text_documents(files))
            )
            for ids, mask in examples:
                np.asarray(ids, dtype=np.uint32).tofile(ft)
                if sft:
                    np.asarray(mask, dtype=np.uint8).tofile(fm)
                n_tokens += len(ids)
                docs += 1
            for f in (ft, fm) if sft else (ft,):
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp_tok, tok_file)
        if sft:
            os.replace(tmp_mask, mask_file)
        meta = {
            "version": CACHE_VERSION,
            "kind": "sft" if sft else "text",
            "files": [str(f) for f in files],
            "tokenizer": tok_id,
            "documents": docs,
            "tokens": n_tokens,
        }
        _write_atomic(meta_file, json.dumps(meta, indent=1).encode())
    meta = json.loads(meta_file.read_text())
    n = meta["tokens"]
    tokens = np.memmap(tok_file, dtype=np.uint32, mode="r", shape=(n,)) if n else np.zeros(0, np.uint32)
    mask = None
    if sft and n:
        mask = np.memmap(mask_file, dtype=np.uint8, mode="r", shape=(n,))
    return TokenStore(tokens, mask, meta)


# -- sequences and batches ------------------------------------------------------------------------


class PackedSequences:
    """Windows [i*L, i*L + L + 1) of a token store, for i in [start, stop)."""

    def __init__(
        self,
        store: TokenStore,
        seq_len: int,
        start: int = 0,
        stop: int | None = None,
        ignore_id: int | None = None,
    ) -> None:
        total = max(0, (len(store) - 1) // seq_len)
        self.store, self.seq_len = store, seq_len
        self.start, self.stop = start, total if stop is None else stop
        self.ignore_id = ignore_id  # a target id never worth a loss (BOS: follows EOS for certain)
        assert 0 <= self.start <= self.stop <= total, f"window range [{start}, {stop}) of {total}"

    def __len__(self) -> int:
        return self.stop - self.start

    def split(self, fraction: float) -> tuple[PackedSequences, PackedSequences]:
        """(train, val): the last `fraction` of windows held out (at least one if fraction > 0)."""
        n_val = min(len(self) - 1, max(1, round(len(self) * fraction))) if fraction > 0 else 0
        cut = self.stop - n_val
        return (
            PackedSequences(self.store, self.seq_len, self.start, cut, self.ignore_id),
            PackedSequences(self.store, self.seq_len, cut, self.stop, self.ignore_id),
        )

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs, targets (B, L) int64 for window indices relative to `start`."""
        L = self.seq_len
        rows = np.stack(
            [self.store.tokens[(self.start + i) * L : (self.start + i) * L + L + 1] for i in indices]
        )
        rows = torch.from_numpy(rows.astype(np.int64))
        inputs, targets = rows[:, :-1], rows[:, 1:].clone()
        if self.store.mask is not None:
            m = np.stack(
                [self.store.mask[(self.start + i) * L + 1 : (self.start + i) * L + L + 1] for i in indices]
            )
            targets[torch.from_numpy(m) == 0] = IGNORE
        if self.ignore_id is not None:
            targets[targets == self.ignore_id] = IGNORE
        return inputs, targets


class BatchStream:
    """Endless batches in a shuffled order drawn from (seed, epoch); resumable exactly."""

    def __init__(self, seqs: PackedSequences, batch_size: int, seed: int) -> None:
        if len(seqs) == 0:
            raise ValueError(
                f"the data holds fewer than seq_len + 1 = {seqs.seq_len + 1} tokens: nothing to train on"
            )
        self.seqs, self.batch_size, self.seed = seqs, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.seqs))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        picked = []
        while len(picked) < self.batch_size:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(picked), len(self._order) - self.cursor)
            picked.extend(self._order[self.cursor : self.cursor + take])
            self.cursor += take
        return self.seqs.get(np.asarray(picked))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "windows": len(self.seqs)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["windows"] != len(self.seqs) or state["seed"] != self.seed:
            raise ValueError(
                f"data position {state} does not fit this data ({len(self.seqs)} windows, seed {self.seed})"
            )
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)


def validation_batches(seqs: PackedSequences, batch_size: int, max_batches: int):
    """The first `max_batches` batches of `seqs` in order: the same every evaluation."""
    n = min(len(seqs), batch_size * max_batches)
    return [seqs.get(np.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


@dataclass
class Data:
    train: BatchStream
    val: list[tuple[torch.Tensor, torch.Tensor]]  # fixed validation batches
    train_tokens: int
    val_tokens: int


def build_data(cfg, tokenizer, tok_id: str, *, sft: bool = False, log=print) -> Data:
    """Training stream and validation batches for a TrainConfig."""
    ignore_id = None if sft else tokenizer.bos_id
    store = build_store(expand_paths(cfg.data), tokenizer, tok_id, cfg.cache_dir, sft=sft, log=log)
    seqs = PackedSequences(store, cfg.seq_len, ignore_id=ignore_id)
    if cfg.val_data:
        val_store = build_store(
            expand_paths(cfg.val_data), tokenizer, tok_id, cfg.cache_dir, sft=sft, log=log
        )
        train, val = seqs, PackedSequences(val_store, cfg.seq_len, ignore_id=ignore_id)
    else:
        train, val = seqs.split(cfg.val_fraction)
    val_batches = validation_batches(val, cfg.batch_size, cfg.eval_batches) if len(val) else []
    return Data(
        train=BatchStream(train, cfg.batch_size, cfg.seed),
        val=val_batches,
        train_tokens=len(train) * cfg.seq_len,
        val_tokens=len(val) * cfg.seq_len,
    )
