"""Engine events out, OpenAI responses in: messages with parsed tool calls, log-probabilities,
and the streaming state of one chat choice.

Tool calls: Llama 4 writes them as text (``[get_weather(city="Paris")]``, see ``llama4.tools``),
recognised only at the end of a reply. A streamed reply with tools therefore sends its text
as it comes until something that could open a call appears (``[``, ``{``, ``<``, a code fence,
or the start of a bare ``tool_name(``); from there the text is held to the end, then parsed: a
call becomes a ``tool_calls`` delta (finish reason ``tool_calls``), anything else is sent as
content after all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from llama4.engine.sampling import TokenLogprob
from llama4.tools import parse_tool_calls


def build_chat_message(text: str, tool_names: Sequence[str] | None) -> tuple[dict[str, Any], str | None]:
    """The assistant message for a finished reply, and the finish reason it implies
    (``"tool_calls"`` when calls were parsed, else None: keep the engine's)."""
    if tool_names is None:
        return {"role": "assistant", "content": text}, None
    content, calls = parse_tool_calls(text, tool_names)
    if not calls:
        return {"role": "assistant", "content": content}, None
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"


_MAY_OPEN_CALL = re.compile(r"[\[{<`]")


class ChatChoiceStream:
    """Content deltas of one streamed chat choice (see the module doc for tools)."""

    def __init__(self, tool_names: Sequence[str] | None) -> None:
        self.tool_names = list(tool_names) if tool_names is not None else None
        self.text = ""
        self.sent = 0  # characters of self.text sent as content
        self.holding = False

    def add(self, delta: str) -> str:
        """Feed the next text delta; return the content that can be sent now."""
        self.text += delta
        if self.tool_names is None:
            return self._send(len(self.text))
        if not self.holding:
            # Trailing whitespace waits for what follows: before a call it is not content (the
            # parsed reply's content ends before it), so it must not have been streamed.
            m = _MAY_OPEN_CALL.search(self.text, self.sent)
            if m is not None:
                self.holding = True
                return self._send(len(self.text[: m.start()].rstrip()))
            if self._may_be_bare_call():
                return ""
            return self._send(len(self.text.rstrip()))
        return ""

    def _may_be_bare_call(self) -> bool:
        """Whether the reply so far may be the start of ``tool_name(...)`` (which counts as a
        call only when it is the whole reply, so only before any content was sent)."""
        if self.sent:
            return False
        s = self.text.lstrip()
        if not s:
            return True  # only whitespace so far: wait for the first word
        return any(name.startswith(s) or re.match(re.escape(name) + r"\s*\(", s) for name in self.tool_names)

    def finish(self) -> tuple[str, list[dict[str, Any]] | None]:
        """End of the reply: (content still to send, tool calls or None)."""
        if self.tool_names is None:
            return self._send(len(self.text)), None
        content, calls = parse_tool_calls(self.text, self.tool_names)
        sent = self.text[: self.sent]
        if not calls:
            content = content or ""
            rest = content[len(sent) :] if content.startswith(sent) else self.text[self.sent :]
            self.sent = len(self.text)
            return rest, None
        content = content or ""
        rest = content[len(sent) :] if content.startswith(sent) else ""
        self.sent = len(self.text)
        return rest, calls

    def _send(self, upto: int) -> str:
        delta = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return delta


# ----- log-probabilities ---------------------------------------------------------------------------


def token_text(tokenizer: Any, token: int) -> tuple[str, list[int]]:
    """A token's text (bytes of a partial UTF-8 character shown as U+FFFD) and its bytes."""
    raw = tokenizer.token_bytes(token)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprob(tokenizer: Any, lp: TokenLogprob) -> dict[str, Any]:
    """One entry of ``choices[i].logprobs.content`` (chat)."""
    text, raw = token_text(tokenizer, lp.token)
    top = []
    for t, v in lp.top:
        tt, tr = token_text(tokenizer, t)
        top.append({"token": tt, "logprob": v, "bytes": tr})
    return {"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top}


class CompletionLogprobs:
    """The legacy ``logprobs`` object of /v1/completions, built token by token."""

    def __init__(self, tokenizer: Any, offset: int = 0) -> None:
        self.tok = tokenizer
        self.offset = offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[dict[str, float]] = []
        self.text_offset: list[int] = []

    def add(self, lp: TokenLogprob) -> dict[str, Any]:
        """Append one token; return the entry for it alone (a streamed chunk's logprobs)."""
        text, _ = token_text(self.tok, lp.token)
        top: dict[str, float] = {}
        for t, v in lp.top:
            top.setdefault(token_text(self.tok, t)[0], v)
        entry = {
            "tokens": [text],
            "token_logprobs": [lp.logprob],
            "top_logprobs": [top],
            "text_offset": [self.offset],
        }
        self.tokens.append(text)
        self.token_logprobs.append(lp.logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(text)
        return entry

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }
