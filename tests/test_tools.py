"""Tool prompt (Meta's documented bytes), history format, and the tool-call parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama4.tools import (
    DEFAULT_TOOL_SYSTEM_PROMPT,
    format_tool_call,
    function_list,
    parse_tool_calls,
    tool_call_arguments,
    tool_system_prompt,
)

DATA = Path(__file__).parent / "data"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather info for places",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The name of the city to get the weather for"},
                "metric": {
                    "type": "string",
                    "description": "The metric for weather. Options are: celsius, fahrenheit",
                    "default": "celsius",
                },
            },
            "required": ["city"],
        },
    },
}


def calls_of(text: str, **kw) -> tuple[str | None, list[tuple[str, dict]]]:
    """parse_tool_calls, with each call reduced to (name, parsed arguments)."""
    content, calls = parse_tool_calls(text, **kw)
    for call in calls:
        assert call["type"] == "function"
        assert call["id"].startswith("call_") and len(call["id"]) > 10
        assert isinstance(call["function"]["arguments"], str)
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


# ----- the system prompt -------------------------------------------------------------------------


def test_system_prompt_is_metas_documented_prompt():
    # tests/data/llama4_tool_system_prompt.txt is the system message of "Zero shot function calling
    # - system message" in llama-models' models/llama4/prompt_format.md.
    expected = (DATA / "llama4_tool_system_prompt.txt").read_text(encoding="utf-8").rstrip("\n")
    assert tool_system_prompt([WEATHER_TOOL]) == expected
    assert tool_system_prompt([WEATHER_TOOL["function"]]) == expected  # bare function spec


def test_function_list_several_tools():
    # Verified byte for byte against llama-stack's Jinja template (PythonListCustomToolGenerator)
    # rendered with the same tools: separators between tools, an empty parameter list.
    tools = [
        {
            "name": "a",
            "description": "A",
            "parameters": {
                "type": "object",
                "properties": {
                    "x": {"type": "string", "description": "X"},
                    "y": {"type": "integer", "description": "Y", "default": "3"},
                },
                "required": ["x"],
            },
        },
        {"name": "b", "description": "B", "parameters": {"type": "object", "properties": {}}},
    ]
    expected = (
        "Here is a list of functions in JSON format that you can invoke.\n\n[\n    {\n"
        '        "name": "a",\n        "description": "A",\n        "parameters": {\n'
        '            "type": "dict",\n            "required": ["x"],\n            "properties": {\n'
        '                "x": {\n                    "type": "string",\n                    "description": "X"\n'
        '                },\n                "y": {\n                    "type": "integer",\n'
        '                    "description": "Y",\n                    "default": "3"\n                }\n'
        "            }\n        }\n    },\n    {\n"
        '        "name": "b",\n        "description": "B",\n        "parameters": {\n'
        '            "type": "dict",\n            "required": [],\n            "properties": {\n'
        "            }\n        }\n    }\n]\n\n"
        "You can answer general questions or invoke tools when necessary.\n"
        "In addition to tool calls, you should also augment your responses by using the tool outputs."
    )
    assert function_list(tools) == expected


def test_function_list_escapes_and_keeps_extra_schema():
    tool = {
        "name": "note",
        "description": 'Save a "note"\nwith newlines',
        "parameters": {
            "properties": {
                "unit": {"type": "string", "description": "unit", "enum": ["c", "f"]},
                "n": {"type": ["integer", "null"], "description": "count", "default": 0},
            }
        },
    }
    text = function_list([tool])
    body = text[text.index("[") : text.rindex("]") + 1]
    parsed = json.loads(body)  # still valid JSON despite quotes and newlines
    assert parsed[0]["description"] == 'Save a "note"\nwith newlines'
    assert parsed[0]["parameters"]["properties"]["unit"]["enum"] == ["c", "f"]
    assert parsed[0]["parameters"]["properties"]["n"] == {
        "type": "integer | null",
        "description": "count",
        "default": "0",
    }


def test_system_prompt_with_user_system_and_tool_choice():
    text = tool_system_prompt([WEATHER_TOOL], "Answer in French.", tool_choice="required")
    assert text.startswith(DEFAULT_TOOL_SYSTEM_PROMPT)
    assert text.endswith(
        "using the tool outputs.\nAnswer in French.\n"
        "You MUST use one of the provided functions/tools to answer the user query."
    )
    named = tool_system_prompt(
        [WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    assert named.endswith("You MUST use the tool `get_weather` to answer the user query.")
    replaced = tool_system_prompt([WEATHER_TOOL], "Be brief.\n\n{{ function_description }}")
    assert (
        replaced.startswith("Be brief.\n\nHere is a list of functions")
        and DEFAULT_TOOL_SYSTEM_PROMPT not in replaced
    )
    with pytest.raises(ValueError):
        tool_system_prompt([])
    with pytest.raises(ValueError, match="name"):
        tool_system_prompt([{"type": "function", "function": {"description": "no name"}}])


# ----- calls in the history ----------------------------------------------------------------------


def test_format_tool_call_matches_reference_python_list():
    tool_utils = pytest.importorskip("llama_models.llama3.tool_utils")
    datatypes = pytest.importorskip("llama_models.datatypes")
    for args in [
        {},
        {"city": "San Francisco"},
        {"user_id": 7890, "special": "black", "ratio": 0.5, "flag": True, "none": None},
        {"ids": [1, 2, 3], "names": ["a b", "c"]},
        {"query": "日本語 🙂"},
    ]:
        call = datatypes.ToolCall(call_id="1", tool_name="fn", arguments=args)
        assert format_tool_call("fn", args) == tool_utils.ToolUtils.encode_tool_call(
            call, datatypes.ToolPromptFormat.python_list
        )


def test_history_format_deviates_from_reference_only_where_it_is_not_python():
    """For dicts and strings with quotes the reference's text is not Python (so the model would see
    calls it could never have produced correctly); ours stays parseable."""
    tool_utils = pytest.importorskip("llama_models.llama3.tool_utils")
    datatypes = pytest.importorskip("llama_models.datatypes")
    for args in [{"options": {"window": True}}, {"text": 'say "hi"'}]:
        call = datatypes.ToolCall(call_id="1", tool_name="fn", arguments=args)
        theirs = tool_utils.ToolUtils.encode_tool_call(call, datatypes.ToolPromptFormat.python_list)
        assert parse_tool_calls(theirs)[1] == []
        assert calls_of(format_tool_call("fn", args)) == (None, [("fn", args)])


@pytest.mark.parametrize(
    "args",
    [
        {"text": 'She said "hi"\nthen left \\ back'},
        {"filters": {"price": {"max": 10.5}, "tags": ["x", "y"]}},
        {"neg": -3, "big": 10**20, "flags": [True, False, None]},
        {"bracket": "a ] b ) c [ d ("},
    ],
)
def test_history_format_parses_back(args):
    text = format_tool_call("do_it", args)
    assert calls_of(text) == (None, [("do_it", args)])


def test_tool_call_arguments():
    assert tool_call_arguments({"function": {"name": "f", "arguments": '{"a": 1}'}}) == ("f", {"a": 1})
    assert tool_call_arguments({"function": {"name": "f", "arguments": ""}}) == ("f", {})
    assert tool_call_arguments({"name": "f", "arguments": {"a": 1}}) == ("f", {"a": 1})
    with pytest.raises(ValueError, match="not valid JSON"):
        tool_call_arguments({"function": {"name": "f", "arguments": "{oops"}})
    with pytest.raises(ValueError, match="JSON object"):
        tool_call_arguments({"function": {"name": "f", "arguments": "[1]"}})


# ----- parsing model output: calls ---------------------------------------------------------------

CALLS = [
    # Meta's documented outputs.
    (
        '[get_weather(city="San Francisco"), get_weather(city="Seattle")]',
        None,
        [("get_weather", {"city": "San Francisco"}), ("get_weather", {"city": "Seattle"})],
    ),
    (
        "[get_user_info(user_id=7890, special='black')]",
        None,
        [("get_user_info", {"user_id": 7890, "special": "black"})],
    ),
    ('<function=trending_songs>{"n": 10}</function>', None, [("trending_songs", {"n": 10})]),
    # A call after some text (Meta calls this INCORRECT, models do it anyway).
    (
        'Let me check the weather: [get_weather(location="New York")]',
        "Let me check the weather:",
        [("get_weather", {"location": "New York"})],
    ),
    # Wrapped in python markers, with the end token still attached.
    (
        '<|python_start|>[search(query="llama 4")]<|python_end|><|eom|>',
        None,
        [("search", {"query": "llama 4"})],
    ),
    (
        'Searching.<|python_start|>[search(query="x")]<|python_end|>',
        "Searching.",
        [("search", {"query": "x"})],
    ),
    # A bare call is a call inside the python markers.
    ('<|python_start|>get_time(tz="UTC")<|python_end|>', None, [("get_time", {"tz": "UTC"})]),
    # Nested lists and dicts, JSON literals inside pythonic syntax (Meta's own tests use true).
    (
        '[create_event(title="Sync", attendees=["a@x.com", "b@x.com"], options={"remind": true, "minutes": 15},'
        " location=null, public=False)]",
        None,
        [
            (
                "create_event",
                {
                    "title": "Sync",
                    "attendees": ["a@x.com", "b@x.com"],
                    "options": {"remind": True, "minutes": 15},
                    "location": None,
                    "public": False,
                },
            )
        ],
    ),
    # Brackets and parentheses inside strings.
    (
        '[search(query="what does a[0] ] ) ( mean?")]',
        None,
        [("search", {"query": "what does a[0] ] ) ( mean?"})],
    ),
    # No arguments at all.
    ("[get_time()]", None, [("get_time", {})]),
    ("[get_time(), get_date()]\n", None, [("get_time", {}), ("get_date", {})]),
    # Spread over lines, and with the closing bracket missing (vLLM issue 30722).
    (
        '[\n  get_weather(city="Paris"),\n  get_time(tz="CET")\n]',
        None,
        [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})],
    ),
    ('[search(query="x", ids=[[1, 2], [3]])', None, [("search", {"query": "x", "ids": [[1, 2], [3]]})]),
    # Several lists back to back: what the reference writes for an earlier turn with several calls.
    ('[a(x=1)][b(y="2")]', None, [("a", {"x": 1}), ("b", {"y": "2"})]),
    ("[a(x=1)]\n[b(y=2)]", None, [("a", {"x": 1}), ("b", {"y": 2})]),
    # Numbers and non-ASCII.
    (
        '[convert(amount=-12.5, currency="€", to="円")]',
        None,
        [("convert", {"amount": -12.5, "currency": "€", "to": "円"})],
    ),
    # JSON calls: Llama 3.1 style, OpenAI style with string arguments, lists, text before, fences.
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    (
        '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [("get_weather", {"city": "Paris"})],
    ),
    (
        '{"type": "function", "function": {"name": "f", "arguments": "{\\"a\\": [1, {\\"b\\": 2}]}"}}',
        None,
        [("f", {"a": [1, {"b": 2}]})],
    ),
    (
        'I will call two tools. [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"s": "}{"}}]',
        "I will call two tools.",
        [("a", {}), ("b", {"s": "}{"})],
    ),
    (
        '{"name": "a", "parameters": {"k": 1}}; {"name": "b", "parameters": {}}',
        None,
        [("a", {"k": 1}), ("b", {})],
    ),
    ('Sure:\n```json\n{"name": "a", "arguments": {"k": "v"}}\n```', "Sure:", [("a", {"k": "v"})]),
    ('```python\n[get_time(tz="CET")]\n```', None, [("get_time", {"tz": "CET"})]),
    # Builtin-tool style of Llama 3.
    ('brave_search.call(query="llama")', None, []),  # bare call outside markers: text (see below)
    (
        '<|python_start|>brave_search.call(query="llama")<|python_end|>',
        None,
        [("brave_search", {"query": "llama"})],
    ),
]


@pytest.mark.parametrize("text, content, calls", CALLS)
def test_parse_tool_calls(text, content, calls):
    got_content, got_calls = calls_of(text)
    assert got_calls == calls
    if calls:
        assert got_content == content
    else:
        assert got_content == text


def test_bare_call_accepted_with_known_tool_names():
    text = 'get_weather(location="New York")'
    assert calls_of(text) == (text, [])
    assert calls_of(text, tool_names=["get_weather"]) == (None, [("get_weather", {"location": "New York"})])
    assert calls_of(text, tool_names=["other"]) == (text, [])


def test_tool_names_reject_unknown_functions():
    text = "[unknown_fn(x=1)]"
    assert calls_of(text, tool_names={"get_weather"}) == (text, [])
    assert calls_of(text)[1] == [("unknown_fn", {"x": 1})]


def test_call_ids_are_unique():
    _, calls = parse_tool_calls("[a(), a(), a()]")
    assert len({c["id"] for c in calls}) == 3


# ----- parsing model output: not calls -----------------------------------------------------------

NOT_CALLS = [
    "The capital of France is Paris.",
    "See [1] and [2] for details.",
    "The list [1, 2, 3] has three items.",
    "Read the [documentation](https://example.com/docs).",
    "[click here](https://example.com)",
    "Use [get_weather(city='Paris')] like this, then read the result.",  # text after it
    '[get_weather(city="Paris"',  # generation cut off mid-call
    '[get_weather(city="Paris)]',  # unterminated string
    '{"name": "Alice", "age": 30}',  # JSON data, not a call
    '[{"name": "Alice"}, {"name": "Bob"}]',
    "[f(1, 2)]",  # positional arguments
    '[__import__("os").system("echo hacked")]',  # never evaluated, and not a name
    '[run(cmd=__import__("os").system("echo hacked"))]',  # arguments must be literals
    "[f(x=y)]",  # a name is not a literal
    "[]",
    "Math: (a + b) * [c - d]",
    "```\nsome code\n```",
    "<|python_start|>print('hello')<|python_end|>",
    "Result: {x}",
]


@pytest.mark.parametrize("text", NOT_CALLS)
def test_not_a_call(text):
    content, calls = parse_tool_calls(text)
    assert calls == []
    assert content == text.replace("<|python_start|>", "").replace("<|python_end|>", "")


def test_end_tokens_are_stripped_from_plain_text():
    assert parse_tool_calls("Hello there!<|eot|>") == ("Hello there!", [])
    assert parse_tool_calls("Bye<|eom|>\n") == ("Bye", [])


def test_absurdly_nested_json_is_not_a_crash():
    # json raises RecursionError (not JSONDecodeError) past ~1000 levels: bad input, not a 500.
    deep = "[" * 5000 + "]" * 5000
    with pytest.raises(ValueError, match="not valid JSON"):
        tool_call_arguments({"function": {"name": "f", "arguments": deep}})
    for text in ('{"name": "f", "arguments": ' + deep + "}", "<function=f>" + deep + "</function>"):
        assert parse_tool_calls(text)[1] == []
