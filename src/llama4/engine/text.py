"""Streaming text of one sequence: incremental detokenization and stop strings.

Text is released only when it can no longer change: bytes of an unfinished UTF-8 character
are held by the tokenizer's incremental decoder, and a tail that could be the start of a stop
string is held here until the next tokens decide. When a stop string appears (it may span
several tokens), the text is cut right before it and nothing after it is released.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class _FallbackDecoder:
    """Incremental decoding for a tokenizer that only has ``decode(ids)``: re-decode a short
    window and release text once it does not end in a replacement character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.done = 0  # ids already turned into released text

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids[self.done :])
        if text.endswith("\ufffd"):
            return ""
        self.done = len(self.ids)
        return text

    def flush(self) -> str:
        text = self.tok.decode(self.ids[self.done :])
        self.done = len(self.ids)
        return text


class TextStream:
    """Feed generated token ids; get back text deltas that are final."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        if hasattr(tokenizer, "incremental_decoder"):
            self.decoder = tokenizer.incremental_decoder()
        else:
            self.decoder = _FallbackDecoder(tokenizer)
        self.stop = tuple(stop)
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""  # everything decoded so far
        self.released = 0  # characters of self.text handed out
        self.stopped_by: str | None = None  # the stop string that ended the text

    def add(self, token_id: int) -> str:
        """Feed one token; return the newly final text. Sets ``stopped_by`` on a stop string."""
        searched = len(self.text)
        self.text += self.decoder.add(token_id)
        return self._release(searched, final=False)

    def finish(self) -> str:
        """End of the sequence: release what is held (unless a stop string already cut it)."""
        if self.stopped_by is not None:
            return ""
        searched = len(self.text)
        self.text += self.decoder.flush()
        return self._release(searched, final=True)

    def _release(self, searched: int, final: bool) -> str:
        if self.stop:
            # A new occurrence must end in the new text: start looking longest_stop - 1 earlier.
            start = max(0, searched - self.longest_stop + 1)
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                cut, self.stopped_by = min(hits)
                self.text = self.text[:cut]
                return self._take(cut)
        if final or not self.stop:
            return self._take(len(self.text))
        return self._take(len(self.text) - self._held_tail())

    def _held_tail(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        for n in range(min(self.longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _take(self, upto: int) -> str:
        upto = max(upto, self.released)
        delta = self.text[self.released : upto]
        self.released = upto
        return delta
