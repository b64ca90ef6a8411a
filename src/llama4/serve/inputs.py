"""Requests in, jobs out: messages and prompts -> token ids, images -> pixel tiles, sampling
fields -> ``SamplingParams``, with every client mistake reported as a ``RequestError``
(a 4xx with an OpenAI-style body naming the parameter at fault).

Images come inline only (a ``data:image/...;base64,`` URL or bare base64): the server never
fetches a URL. Each image is bounded in bytes, in pixels (checked from the header before any
pixel is decoded) and in number per request; the tiles then follow the model's vision config.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from llama4.chat import ChatFormat
from llama4.engine.sampling import SamplingParams
from llama4.serve.protocol import ChatCompletionRequest, CompletionRequest, Sampling


class RequestError(Exception):
    """A client mistake: becomes ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type


@dataclass(frozen=True)
class Limits:
    max_images: int = 8  # images per request
    max_image_bytes: int = 10 << 20  # encoded size of one image
    max_image_pixels: int = 25_000_000  # width x height of one image


@dataclass
class ServedModel:
    """What the request handlers need to know about the model being served."""

    id: str
    model: Any  # llama4 Transformer
    tokenizer: Any
    max_len: int  # tokens per sequence (prompt + completion)
    limits: Limits = field(default_factory=Limits)
    created: int = 0

    def __post_init__(self) -> None:
        self.chat = ChatFormat(self.tokenizer)
        self.vocab_size = self.model.config.text.vocab_size
        self.vision = self.model.config.vision


@dataclass
class Prepared:
    """One request, ready for the scheduler: ``prompts[i]`` gets ``n`` choices."""

    prompts: list[list[int]]
    params: list[SamplingParams]  # one per choice, prompt-major
    images: list[torch.Tensor] = field(default_factory=list)  # pixel tiles per image, in order
    image_keys: list[str] = field(default_factory=list)
    tool_names: list[str] | None = None  # parse tool calls into these names
    prompt_texts: list[str] = field(default_factory=list)  # completions: for echo


# ----- sampling ------------------------------------------------------------------------------------


def _max_tokens(
    prompt_len: int, served: ServedModel, explicit: int | None, param: str, prompt_param: str
) -> int:
    room = served.max_len - prompt_len
    if room <= 0:
        raise RequestError(
            f"the prompt is {prompt_len} tokens, but this server's context is {served.max_len} tokens "
            "(prompt and completion together); shorten the prompt",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if explicit is None:
        return room
    if explicit > room:
        raise RequestError(
            f"{param}={explicit} is too large: the prompt is {prompt_len} tokens and the context is "
            f"{served.max_len}, so at most {room} new tokens fit",
            param=param,
            code="context_length_exceeded",
        )
    return explicit


def _params(
    req: Sampling, max_tokens: int, stop_ids: tuple[int, ...], logprobs: int | None, i: int
) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty,
            # Choice i of a seeded request uses seed + i: reproducible, yet different choices.
            seed=None if req.seed is None else (req.seed + i) % 2**64,
            stop_ids=stop_ids,
            stop=req.stops,
            logprobs=logprobs,
        )
    except ValueError as e:  # the schema should have caught it; never a 500 for a bad value
        raise RequestError(str(e)) from e


# ----- images --------------------------------------------------------------------------------------

_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I
)


def decode_image_url(url: str, limits: Limits, param: str) -> bytes:
    """The bytes of an inline image: ``data:image/png;base64,...`` or bare base64."""
    url = url.strip()
    if url.lower().startswith(("http://", "https://", "file:", "ftp://")):
        raise RequestError(
            "image URLs are not fetched by this server; send the image inline as a data URL "
            "(data:image/png;base64,...)",
            param=param,
            code="invalid_image_url",
        )
    if url.lower().startswith("data:"):
        m = _DATA_URL.match(url)
        if m is None or not m.group("b64"):
            raise RequestError(
                "malformed data URL: expected data:image/<type>;base64,<data>",
                param=param,
                code="invalid_image",
            )
        mime = (m.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise RequestError(
                f"data URL of type {mime!r} is not an image", param=param, code="invalid_image"
            )
        payload = url[m.end() :]
    else:
        payload = url
    approx = len(payload) * 3 // 4
    if approx > limits.max_image_bytes:
        raise RequestError(
            f"image is about {approx} bytes, over the limit of {limits.max_image_bytes} bytes",
            param=param,
            code="image_too_large",
        )
    try:
        data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"image is not valid base64: {e}", param=param, code="invalid_image") from None
    if not data:
        raise RequestError("image is empty", param=param, code="invalid_image")
    return data


def load_request_image(data: bytes, served: ServedModel, param: str) -> torch.Tensor:
    """Pixel tiles (n_tiles, 3, S, S) and the grid, or a RequestError that says what is wrong."""
    from llama4.image import ImageError, load_image, preprocess_image

    vision = served.vision
    try:
        limit = served.limits.max_image_pixels
        image = load_image(data, max_pixels=limit)
        return preprocess_image(
            image, tile_size=vision.image_size, max_tiles=vision.max_tiles, max_pixels=limit
        )
    except ImageError as e:
        code = "image_too_large" if "limit" in str(e) or "too large" in str(e) else "invalid_image"
        raise RequestError(f"bad image: {e}", param=param, code=code) from None


# ----- chat ----------------------------------------------------------------------------------------


def prepare_chat(req: ChatCompletionRequest, served: ServedModel) -> Prepared:
    tok = served.tokenizer
    messages: list[dict[str, Any]] = []
    pixel_tiles: list[torch.Tensor] = []
    grids: list[tuple[int, int]] = []
    keys: list[str] = []
    n_images = 0
    for i, msg in enumerate(req.messages):
        m = msg.model_dump(exclude_none=True)
        if m["role"] == "developer":
            m["role"] = "system"
        if isinstance(m.get("content"), list):
            for j, part in enumerate(m["content"]):
                if part.get("type") != "image_url":
                    continue
                param = f"messages.{i}.content.{j}.image_url"
                if served.vision is None:
                    raise RequestError(
                        f"the model {served.id!r} has no vision tower and cannot read images",
                        param=param,
                        code="images_not_supported",
                    )
                n_images += 1
                if n_images > served.limits.max_images:
                    raise RequestError(
                        f"too many images: at most {served.limits.max_images} per request",
                        param=param,
                        code="too_many_images",
                    )
                data = decode_image_url(part["image_url"]["url"], served.limits, param)
                image = load_request_image(data, served, param)
                pixel_tiles.append(image.pixel_values)
                grids.append(image.grid)
                keys.append(hashlib.sha256(data).hexdigest())
        for call in m.get("tool_calls") or []:
            call.setdefault("id", "call_0")
        messages.append(m)

    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    tool_choice = req.tool_choice
    if tool_choice is not None and not isinstance(tool_choice, str):
        tool_choice = tool_choice.model_dump()
    try:
        prompt = served.chat.encode_dialog(
            messages,
            image_grids=grids,
            tokens_per_tile=served.vision.tokens_per_tile if served.vision else 144,
            tools=tools,
            tool_choice=tool_choice,
        )
    except (ValueError, TypeError, KeyError) as e:
        raise RequestError(f"cannot format the messages: {e}", param="messages") from None

    explicit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = _max_tokens(len(prompt), served, explicit, param, "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    stop_ids = () if req.ignore_eos else tok.stop_ids
    params = [_params(req, max_tokens, stop_ids, logprobs, i) for i in range(req.n)]
    tool_names = [t.function.name for t in req.tools] if req.tools and req.tool_choice != "none" else None
    return Prepared([prompt], params, pixel_tiles, keys, tool_names)


# ----- completions ---------------------------------------------------------------------------------


def prepare_completion(req: CompletionRequest, served: ServedModel) -> Prepared:
    tok = served.tokenizer
    raw = req.prompt
    if isinstance(raw, str):
        raw = [raw]
    if not raw:
        raise RequestError("prompt is empty", param="prompt")
    if isinstance(raw[0], int):
        raw = [raw]
    prompts, texts = [], []
    for i, p in enumerate(raw):
        if isinstance(p, str):
            ids = tok.encode(p, bos=True)
            texts.append(p)
        else:
            if not p:
                raise RequestError(f"prompt {i} has no tokens", param="prompt")
            bad = [t for t in p if t >= served.vocab_size]
            if bad:
                raise RequestError(
                    f"token id {bad[0]} is out of range: the vocabulary has {served.vocab_size} tokens",
                    param="prompt",
                    code="invalid_token",
                )
            if served.model.config.image_token_id in p:
                raise RequestError(
                    "prompt token ids contain the image patch token, but a completion has no images",
                    param="prompt",
                    code="invalid_token",
                )
            ids = list(p)
            texts.append(tok.decode(ids))
        prompts.append(ids)
    longest = max(prompts, key=len)
    max_tokens = _max_tokens(len(longest), served, req.max_tokens, "max_tokens", "prompt")
    stop_ids = () if req.ignore_eos else tok.stop_ids
    params = [_params(req, max_tokens, stop_ids, req.logprobs, i) for _ in prompts for i in range(req.n)]
    return Prepared(prompts, params, prompt_texts=texts)
