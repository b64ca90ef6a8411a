"""Dialogs <-> tokens in the Llama 4 chat format, token-identical to Meta's ``ChatFormat``.

The layout (``llama_models.llama4.chat_format.ChatFormat.encode_dialog_prompt``)::

    <|begin_of_text|>
    <|header_start|>ROLE<|header_end|>\\n\\n CONTENT <|eot|>      (one per message)
    <|header_start|>assistant<|header_end|>\\n\\n                  (the generation prompt)

Facts of the reference that matter for identical ids:

- the role and ``"\\n\\n"`` are tokenized as text; the ``tool`` role is written ``ipython``;
- each text part of a message is tokenized on its own (parts are not joined first);
- an assistant message's tool calls follow its content, each tokenized on its own, in the
  ``python_list`` form ``[name(arg=value)]`` (``llama4.tools.format_tool_call``);
- a message ends with ``<|eom|>`` ("end of message, a tool result is coming") if it is a tool
  result or an assistant message with tool calls, else with ``<|eot|>``;
- an image is ``<|image_start|>``, the tiles row by row (``<|tile_x_separator|>`` between the tiles of
  a row, ``<|tile_y_separator|>`` after each row), ``<|image|>``, the global thumbnail tile,
  ``<|image_end|>``; a single-tile image has no separators and no thumbnail:
  ``<|image_start|><|image|>`` + one tile + ``<|image_end|>``. Each tile is ``tokens_per_tile``
  ``<|patch|>`` tokens (336x336 tile, 14x14 patches, pixel shuffle 0.5: 576 / 4 = 144).

This module never looks at pixels: the caller (``llama4.image``) decides each image's tile grid.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llama4.tokenizer import Tokenizer
from llama4.tools import format_tool_call, parse_tool_calls, tool_call_arguments, tool_system_prompt

Message = Mapping[str, Any]

ROLE_NAMES = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system role
    "user": "user",
    "assistant": "assistant",
    "tool": "ipython",
    "ipython": "ipython",
}
TEXT_PART_TYPES = frozenset({"text", "input_text"})
IMAGE_PART_TYPES = frozenset({"image", "image_url", "input_image"})
DEFAULT_TOKENS_PER_TILE = 144


def image_token_layout(
    tok: Tokenizer, grid: tuple[int, int], tokens_per_tile: int = DEFAULT_TOKENS_PER_TILE
) -> list[int]:
    """Token ids standing for one image split into ``grid = (rows, cols)`` tiles.

    A ``(1, 1)`` grid is a single tile and has no thumbnail; any other grid is followed by the
    global thumbnail tile after ``<|image|>`` (so it carries ``rows * cols + 1`` tiles of patches).
    """
    rows, cols = grid
    if not (isinstance(rows, int) and isinstance(cols, int) and rows >= 1 and cols >= 1):
        raise ValueError(f"image grid must be (rows >= 1, cols >= 1) integers, got {grid!r}")
    if tokens_per_tile < 1:
        raise ValueError(f"tokens_per_tile must be >= 1, got {tokens_per_tile}")
    sp = tok.special_tokens
    tile = [sp["<|patch|>"]] * tokens_per_tile
    ids = [sp["<|image_start|>"]]
    if (rows, cols) != (1, 1):
        for _ in range(rows):
            for col in range(cols):
                ids += tile
                if col < cols - 1:
                    ids.append(sp["<|tile_x_separator|>"])
            ids.append(sp["<|tile_y_separator|>"])
    ids.append(sp["<|image|>"])
    ids += tile  # the thumbnail, or the only tile
    ids.append(sp["<|image_end|>"])
    return ids


def count_images(messages: Sequence[Message]) -> int:
    """Number of image parts in ``messages`` (the number of grids ``encode_dialog`` needs)."""
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if isinstance(part, Mapping) and part.get("type") in IMAGE_PART_TYPES
    )


@dataclass
class _Segment:
    """A run of ids and whether the training loss applies to it."""

    ids: list[int]
    trainable: bool = False


class ChatFormat:
    """OpenAI-style messages -> Llama 4 token ids, and generated ids -> an assistant message.

    Messages are dicts with ``role`` (``system``, ``user``, ``assistant``, ``tool``) and ``content``
    (a string, ``None``, or a list of parts: ``{"type": "text", "text": ...}`` or an image part of
    type ``image_url``, ``image`` or ``input_image``, whose payload is ignored here). Assistant
    messages may carry OpenAI ``tool_calls``.
    """

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self._headers = {role: self._make_header(name) for role, name in ROLE_NAMES.items()}

    def _make_header(self, role_name: str) -> list[int]:
        sp = self.tok.special_tokens
        return [
            sp["<|header_start|>"],
            *self.tok.encode(role_name),
            sp["<|header_end|>"],
            *self.tok.encode("\n\n"),
        ]

    def encode_header(self, role: str) -> list[int]:
        """``<|header_start|>ROLE<|header_end|>\\n\\n`` (``tool`` is written ``ipython``)."""
        try:
            return list(self._headers[role])
        except KeyError:
            raise ValueError(f"unknown role {role!r}; expected one of {sorted(ROLE_NAMES)}") from None

    # ----- encoding -----------------------------------------------------------------------------

    def encode_dialog(
        self,
        messages: Sequence[Message],
        *,
        image_grids: Sequence[tuple[int, int]] | None = None,
        tokens_per_tile: int = DEFAULT_TOKENS_PER_TILE,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Token ids of a dialog, ending with the assistant header when ``add_generation_prompt``.

        ``image_grids`` gives the (rows, cols) tile grid of each image part, in order of appearance.
        ``tools`` (OpenAI format) puts Meta's tool prompt in the system message
        (``llama4.tools.tool_system_prompt``); ``tool_choice="none"`` leaves the tools out.
        """
        segments = self._encode(messages, image_grids, tokens_per_tile, tools, tool_choice)
        ids = [i for seg in segments for i in seg.ids]
        if add_generation_prompt:
            ids += self._headers["assistant"]
        return ids

    def encode_dialog_for_training(
        self,
        messages: Sequence[Message],
        *,
        image_grids: Sequence[tuple[int, int]] | None = None,
        tokens_per_tile: int = DEFAULT_TOKENS_PER_TILE,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
    ) -> tuple[list[int], list[bool]]:
        """``(ids, mask)`` of a whole dialog (no generation prompt): ``mask[i]`` is True exactly on
        the assistant turns' content and tool-call tokens and their closing ``<|eot|>``/``<|eom|>``."""
        segments = self._encode(messages, image_grids, tokens_per_tile, tools, tool_choice)
        ids = [i for seg in segments for i in seg.ids]
        mask = [seg.trainable for seg in segments for _ in seg.ids]
        return ids, mask

    def _encode(
        self,
        messages: Sequence[Message],
        image_grids: Sequence[tuple[int, int]] | None,
        tokens_per_tile: int,
        tools: Sequence[Mapping[str, Any]] | None,
        tool_choice: str | Mapping[str, Any] | None,
    ) -> list[_Segment]:
        if tools and tool_choice != "none":
            messages = with_tool_prompt(messages, tools, tool_choice)
        n_images = count_images(messages)
        grids = list(image_grids or [])
        if n_images != len(grids):
            raise ValueError(f"the dialog has {n_images} image(s) but image_grids has {len(grids)} grid(s)")
        grid_iter = iter(grids)
        segments = [_Segment([self.tok.bos_id])]
        for index, message in enumerate(messages):
            try:
                segments += self._encode_message(message, grid_iter, tokens_per_tile)
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"message {index}: {e}") from e
        return segments

    def _encode_message(
        self, message: Message, grids: Iterator[tuple[int, int]], tokens_per_tile: int
    ) -> list[_Segment]:
        role = message.get("role")
        header = self.encode_header(role)
        body: list[int] = []
        for part in _content_parts(message.get("content")):
            if isinstance(part, str):
                body += self.tok.encode(part)
            else:
                body += image_token_layout(self.tok, next(grids), tokens_per_tile)
        tool_calls = message.get("tool_calls") or []
        if tool_calls and role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {role!r}")
        for call in tool_calls:
            body += self.tok.encode(format_tool_call(*tool_call_arguments(call)))
        end_of_message = role in ("tool", "ipython") or bool(tool_calls)
        end = self.tok.eom_id if end_of_message else self.tok.eot_id
        trainable = role == "assistant"
        return [_Segment(header), _Segment(body, trainable), _Segment([end], trainable)]

    # ----- decoding -----------------------------------------------------------------------------

    def decode_assistant(self, ids: Sequence[int], tool_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Generated ids -> ``{"role": "assistant", "content": ..., "tool_calls": [...]}``.

        A leading assistant header is skipped and the ids are cut at the first stop token
        (``<|eot|>``, ``<|eom|>``, ``<|end_of_text|>``). Tool calls are parsed by
        ``llama4.tools.parse_tool_calls``; ``<|python_start|>``/``<|python_end|>`` never reach the
        content. ``tool_calls`` is present only when there are calls; ``content`` is then the text
        before them, or None.
        """
        ids = list(ids)
        header = self._headers["assistant"]
        if ids[: len(header)] == header:
            ids = ids[len(header) :]
        stops = set(self.tok.stop_ids)
        for i, token in enumerate(ids):
            if token in stops:
                ids = ids[:i]
                break
        content, tool_calls = parse_tool_calls(self.tok.decode(ids), tool_names)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return message


def _content_parts(content: Any) -> Iterator[str | Mapping[str, Any]]:
    """Text strings and image parts of a message's content, in order."""
    if content is None:
        return
    if isinstance(content, str):
        yield content
        return
    if not isinstance(content, list):
        raise TypeError(f"content must be a string, a list of parts or None, got {type(content).__name__}")
    for part in content:
        if isinstance(part, str):
            yield part
        elif isinstance(part, Mapping) and part.get("type") in TEXT_PART_TYPES:
            text = part.get("text")
            if not isinstance(text, str):
                raise TypeError(f"text part without a string 'text': {part!r}")
            yield text
        elif isinstance(part, Mapping) and part.get("type") in IMAGE_PART_TYPES:
            yield part
        else:
            raise ValueError(f"unsupported content part: {str(part)[:80]}")


def _text_of(content: Any) -> str:
    """The text of a message (parts joined by newlines, as llama-stack does); no images allowed."""
    texts = []
    for part in _content_parts(content):
        if not isinstance(part, str):
            raise ValueError("a system message with tools cannot contain images")
        texts.append(part)
    return "\n".join(texts)


def with_tool_prompt(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]],
    tool_choice: str | Mapping[str, Any] | None = None,
) -> list[Message]:
    """``messages`` with the tool system prompt merged into (or put in front as) the system message."""
    messages = list(messages)
    user_system = None
    if messages and messages[0].get("role") in ("system", "developer"):
        user_system = _text_of(messages.pop(0).get("content"))
    system = tool_system_prompt(tools, user_system, tool_choice)
    return [{"role": "system", "content": system}, *messages]
