"""Chat format against Meta's ``llama_models.llama4.chat_format.ChatFormat``: identical ids.

The reference module imports ``llama_models.llama4.preprocess`` at import time, which needs
torchvision (not installable here). That module only turns pixels into tiles, which the chat layer
never does, so the fixture below imports the reference with a stand-in ``preprocess`` module whose
transforms refuse to run. Everything the comparison exercises (headers, text parts, tool calls,
end tokens, ``_encode_image``'s token layout) is Meta's code. For dialogs with images the
reference still has to go from pixels to a tile grid: there the test gives it a transform that
reads the grid off the test image's size (the tests draw each image at rows x cols blocks), and
gives our side the same grids, so the image token layout and its place in the dialog are compared
with Meta's code too.
"""

from __future__ import annotations

import importlib
import io
import json
import sys
import types

import pytest

from llama4.chat import ChatFormat, count_images, image_token_layout
from llama4.tokenizer import Tokenizer
from llama4.tools import tool_system_prompt

pytest.importorskip("llama_models.llama4.tokenizer")
torch = pytest.importorskip("torch")
PIL_Image = pytest.importorskip("PIL.Image")

from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem, ToolCall, ToolPromptFormat  # noqa: E402
from llama_models.llama4.args import Size, VisionArgs  # noqa: E402
from llama_models.llama4.tokenizer import Tokenizer as ReferenceTokenizer  # noqa: E402

GRID_BLOCK_PX = 4  # test images are (rows * 4) x (cols * 4) pixels


def import_reference_chat_format():
    """``llama_models.llama4.chat_format`` without torchvision (see the module docstring)."""
    names = ("llama_models.llama4.preprocess", "llama_models.llama4.chat_format")
    saved = {name: sys.modules.get(name) for name in names}

    class _NeedsTorchvision:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("pixel transforms need torchvision, which is not installed")

    stand_in = types.ModuleType(names[0])
    stand_in.ResizeNormalizeImageTransform = _NeedsTorchvision
    stand_in.VariableSizeImageTransform = _NeedsTorchvision
    sys.modules[names[0]] = stand_in
    sys.modules.pop(names[1], None)
    try:
        return importlib.import_module(names[1])
    finally:  # leave sys.modules as we found it
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def reference():
    module = import_reference_chat_format()
    vision_args = VisionArgs(
        image_size=Size(height=336, width=336),
        patch_size=Size(height=14, width=14),
        dim=1408,
        n_layers=34,
        n_heads=16,
        mlp_ratio=4.0,
        output_dim=4096,
        pixel_shuffle_ratio=0.5,
    )
    fmt = module.ChatFormat(ReferenceTokenizer.get_instance())
    fmt.vision_args = vision_args

    def tiles_from_test_image(image, max_num_chunks):
        rows, cols = image.height // GRID_BLOCK_PX, image.width // GRID_BLOCK_PX
        assert rows * cols <= max_num_chunks
        return torch.zeros(rows * cols, 3, 336, 336), (rows, cols)

    fmt.dynamic_image_transform = tiles_from_test_image
    fmt.image_transform = lambda image: torch.zeros(3, 336, 336)  # the global thumbnail tile
    return module, fmt


@pytest.fixture(scope="module")
def chat() -> ChatFormat:
    return ChatFormat(Tokenizer.default())


def png_for_grid(grid: tuple[int, int]) -> bytes:
    rows, cols = grid
    buffer = io.BytesIO()
    PIL_Image.new("RGB", (cols * GRID_BLOCK_PX, rows * GRID_BLOCK_PX), (200, 30, 30)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def to_reference_messages(messages, grids) -> list[RawMessage]:
    """OpenAI-style messages -> llama_models RawMessages (images drawn at their grid's size)."""
    grids = iter(grids)
    raw = []
    for m in messages:
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            items = []
            for part in content:
                if isinstance(part, str):
                    items.append(RawTextItem(text=part))
                elif part["type"] == "text":
                    items.append(RawTextItem(text=part["text"]))
                else:
                    items.append(RawMediaItem(data=png_for_grid(next(grids))))
            content = items
        tool_calls = [
            ToolCall(
                call_id=c["id"],
                tool_name=c["function"]["name"],
                arguments=json.loads(c["function"]["arguments"]),
            )
            for c in m.get("tool_calls") or []
        ]
        raw.append(RawMessage(role=m["role"], content=content, tool_calls=tool_calls))
    return raw


def reference_ids(reference, messages, grids=()) -> list[int]:
    _, fmt = reference
    raw = to_reference_messages(messages, grids)
    # python_list: the tool call format llama-stack uses for Llama 4 (get_default_tool_prompt_format).
    return fmt.encode_dialog_prompt(raw, tool_prompt_format=ToolPromptFormat.python_list).tokens


def call(call_id: str, name: str, **arguments) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "description": "celsius or fahrenheit", "default": "celsius"},
            },
            "required": ["city"],
        },
    },
}

DIALOGS = {
    "single-user": [{"role": "user", "content": "Answer who are you in the form of jeopardy?"}],
    "system-multi-turn": [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Bonjour ! Comment ça va ? 日本語も話せますか？"},
        {"role": "assistant", "content": "Très bien, merci ! はい、話せます。🙂"},
        {"role": "user", "content": "What does <|eot|> mean?\n\n  Explain   briefly.  "},
    ],
    "text-parts": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "foo"},
                {"type": "text", "text": "bar"},  # tokenized apart from "foo", as the reference does
                {"type": "text", "text": ""},
                {"type": "text", "text": "\n\n"},
                "plain string part",
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "foobar"}]},
    ],
    "tool-calls-and-results": [
        {"role": "user", "content": "What is the weather in SF and Seattle?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                call("c1", "get_weather", city="San Francisco"),
                call("c2", "get_weather", city="Seattle"),
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 14, "sky": "fog"}'},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "Rain, 9°C"}]},
        {"role": "assistant", "content": "Foggy 14 °C in San Francisco; rainy 9 °C in Seattle."},
        {"role": "user", "content": "Thanks!"},
    ],
    "content-then-call": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Book a table for 2 at 7pm"},
        {
            "role": "assistant",
            "content": "Booking now.",
            # (no dict arguments here: the reference writes {k=v}, which is not Python; see test_tools)
            "tool_calls": [
                call("c9", "book", people=2, time="19:00", window=True, ratio=0.5, tags=["a", "b"])
            ],
        },
        {"role": "tool", "content": "booked"},
    ],
    "images": [
        {
            "role": "user",
            "content": [IMAGE, {"type": "text", "text": "Describe this image in two sentences"}, IMAGE],
        },
        {"role": "assistant", "content": "A dog on a skateboard, and a plate of pasta."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And this one?"}, {"type": "image", "image": "..."}],
        },
    ],
}
GRIDS = {"images": [(2, 2), (1, 1), (1, 3)]}


@pytest.mark.parametrize("name", list(DIALOGS))
def test_dialog_matches_reference(chat, reference, name):
    messages, grids = DIALOGS[name], GRIDS.get(name, [])
    ours = chat.encode_dialog(messages, image_grids=grids)
    assert ours == reference_ids(reference, messages, grids)


def test_dialog_with_tools_matches_reference(chat, reference):
    """``tools=`` puts Meta's tool prompt in the system message, as llama-stack does."""
    for messages in (DIALOGS["tool-calls-and-results"], DIALOGS["content-then-call"]):
        user_system = messages[0]["content"] if messages[0]["role"] == "system" else None
        rest = messages[1:] if user_system is not None else messages
        explicit = [{"role": "system", "content": tool_system_prompt([WEATHER_TOOL], user_system)}, *rest]
        ours = chat.encode_dialog(messages, tools=[WEATHER_TOOL])
        assert ours == reference_ids(reference, explicit)
        assert chat.encode_dialog(messages, tools=[WEATHER_TOOL], tool_choice="none") == chat.encode_dialog(
            messages
        )


def test_documented_prompt_text(chat):
    """The exact bytes of Meta's prompt_format.md example."""
    messages = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Answer who are you in the form of jeopardy?"},
    ]
    text = chat.tok.decode(chat.encode_dialog(messages))
    assert text == (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are a helpful assistant<|eot|>"
        "<|header_start|>user<|header_end|>\n\nAnswer who are you in the form of jeopardy?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )


def test_developer_role_is_system(chat):
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat.encode_dialog(developer) == chat.encode_dialog(system)
    tools = [WEATHER_TOOL]
    assert chat.encode_dialog(developer, tools=tools) == chat.encode_dialog(system, tools=tools)


def test_ends_of_messages(chat):
    ids = chat.encode_dialog(DIALOGS["tool-calls-and-results"], add_generation_prompt=False)
    text = chat.tok.decode(ids)
    assert '[get_weather(city="San Francisco")][get_weather(city="Seattle")]<|eom|>' in text
    assert "<|header_start|>ipython<|header_end|>\n\n" in text
    assert text.count("<|eom|>") == 3  # the call turn and both tool results
    assert text.endswith("Thanks!<|eot|>")


# ----- images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 4), (4, 4), (1, 16)])
def test_image_layout_matches_reference_encode_image(chat, reference, grid):
    module, fmt = reference
    rows, cols = grid
    n_tiles = rows * cols + (0 if grid == (1, 1) else 1)  # + the global thumbnail
    image = module.TransformedImage(image_tiles=torch.zeros(n_tiles, 3, 336, 336), aspect_ratio=grid)
    assert image_token_layout(chat.tok, grid) == fmt._encode_image(image)


def test_image_layout_structure(chat):
    tok = chat.tok
    sp = tok.special
    assert image_token_layout(tok, (1, 1), 3) == [
        sp("image_start"),
        sp("image"),
        *[sp("patch")] * 3,
        sp("image_end"),
    ]
    patch = [sp("patch")] * 2
    x, y = sp("tile_x_separator"), sp("tile_y_separator")
    assert image_token_layout(tok, (2, 2), 2) == [
        sp("image_start"),
        *patch,
        x,
        *patch,
        y,
        *patch,
        x,
        *patch,
        y,
        sp("image"),
        *patch,
        sp("image_end"),
    ]
    assert len(image_token_layout(tok, (4, 4))) == 17 * 144 + 4 * 3 + 4 + 3  # the 2448-token maximum + markup
    with pytest.raises(ValueError):
        image_token_layout(tok, (0, 2))


def test_image_grid_count_must_match(chat):
    messages = DIALOGS["images"]
    assert count_images(messages) == 3
    with pytest.raises(ValueError, match="3 image"):
        chat.encode_dialog(messages)
    with pytest.raises(ValueError, match="3 image"):
        chat.encode_dialog(messages, image_grids=[(1, 1)])


def test_tokens_per_tile(chat):
    ids = chat.encode_dialog(DIALOGS["images"], image_grids=GRIDS["images"], tokens_per_tile=5)
    assert ids.count(chat.tok.special("patch")) == 5 * (4 + 1 + 1 + 3 + 1)


# ----- training mask -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DIALOGS))
def test_training_mask_covers_exactly_the_assistant_turns(chat, name):
    messages, grids = DIALOGS[name], GRIDS.get(name, [])
    ids, mask = chat.encode_dialog_for_training(messages, image_grids=grids)
    assert ids == chat.encode_dialog(messages, image_grids=grids, add_generation_prompt=False)
    assert len(mask) == len(ids)
    runs, current = [], []
    for token, trained in zip(ids, mask):
        if trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    expected = []
    for m in messages:
        if m["role"] != "assistant":
            continue
        body = chat.encode_dialog([m], add_generation_prompt=False)[1:]  # drop BOS
        expected.append(body[len(chat.encode_header("assistant")) :])
    assert runs == expected
    assert all(run[-1] in (chat.tok.eot_id, chat.tok.eom_id) for run in runs)


# ----- decoding assistant output -----------------------------------------------------------------


def test_decode_plain_answer(chat):
    tok = chat.tok
    ids = tok.encode("The answer is 42.") + [tok.eot_id]
    assert chat.decode_assistant(ids) == {"role": "assistant", "content": "The answer is 42."}
    with_header = chat.encode_header("assistant") + ids + tok.encode("ignored after the stop token")
    assert chat.decode_assistant(with_header) == {"role": "assistant", "content": "The answer is 42."}


def test_decode_tool_calls(chat):
    tok = chat.tok
    ids = [
        tok.special("python_start"),
        *tok.encode('[get_weather(city="San Francisco"), get_weather(city="Seattle")]'),
        tok.special("python_end"),
        tok.eom_id,
    ]
    message = chat.decode_assistant(ids)
    assert message["content"] is None
    assert [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]
    ] == [
        ("get_weather", {"city": "San Francisco"}),
        ("get_weather", {"city": "Seattle"}),
    ]
    text_then_call = tok.encode('Checking. [get_time(tz="UTC")]') + [tok.eot_id]
    message = chat.decode_assistant(text_then_call)
    assert message["content"] == "Checking." and message["tool_calls"][0]["function"]["name"] == "get_time"


def test_decode_strips_python_markers_without_calls(chat):
    tok = chat.tok
    ids = [tok.special("python_start"), *tok.encode("print('hi')"), tok.special("python_end"), tok.eot_id]
    assert chat.decode_assistant(ids) == {"role": "assistant", "content": "print('hi')"}


def test_history_round_trip_through_decode(chat):
    """An assistant turn encoded into the history decodes back to the same calls."""
    message = DIALOGS["content-then-call"][2]
    ids = chat.encode_dialog([message], add_generation_prompt=False)[1:]
    decoded = chat.decode_assistant(ids)
    assert decoded["content"] == "Booking now."
    assert json.loads(decoded["tool_calls"][0]["function"]["arguments"]) == json.loads(
        message["tool_calls"][0]["function"]["arguments"]
    )


# ----- errors ------------------------------------------------------------------------------------


def test_errors_name_the_message(chat):
    with pytest.raises(ValueError, match="message 1: unknown role 'robot'"):
        chat.encode_dialog([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="message 0: only assistant"):
        chat.encode_dialog([{"role": "user", "content": "hi", "tool_calls": [call("1", "f")]}])
    with pytest.raises(ValueError, match="unsupported content part"):
        chat.encode_dialog([{"role": "user", "content": [{"type": "audio", "data": "..."}]}])
    with pytest.raises(ValueError, match="not valid JSON"):
        bad = {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{"}}
        chat.encode_dialog([{"role": "assistant", "content": "", "tool_calls": [bad]}])
