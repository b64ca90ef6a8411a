"""``llama4 serve`` end to end: a real server process on a loopback port, driven by the
official ``openai`` client (and raw ``httpx`` where the wire format itself is under test).

The model is tiny and random (preset ``debug-vision`` with Llama 4's 202048-token vocabulary
and Meta's tokenizer.model), so replies are gibberish, but greedy replies are deterministic,
which is what the comparisons need: streamed == non-streamed, concurrent == alone.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import openai
import pytest
from PIL import Image

from llama4.chat import ChatFormat
from llama4.serve.testing import ServerProcess, shared_random_model
from llama4.tokenizer import Tokenizer

MAX_LEN = 2048  # the model's max_seq_len: the server's context (room for the tool prompt)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return shared_random_model(
        tmp_path_factory.getbasetemp(), preset="debug-vision", seed=0, max_seq_len=MAX_LEN
    )


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerProcess(["--model", str(model_dir), "--max-batch", "16", "--max-queue", "32"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def chat_format():
    return ChatFormat(Tokenizer.default())


def png_data_url(size=(40, 30), color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def metrics(server) -> dict[str, float]:
    """The /metrics samples by name (with labels), as floats."""
    out = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_for_health(server, timeout=10, **want):
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(server.url + "/health").json()
        if all(health[k] == v for k, v in want.items()):
            return health
        assert time.monotonic() < deadline, (health, want)
        time.sleep(0.05)


def greedy_chat(client, model_id, text, max_tokens=12, **kw):
    return client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
        temperature=0,
        **kw,
    )


# ----- basics --------------------------------------------------------------------------------------


def test_health_models_openapi(server, client, model_id):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert model_id == "tiny-llama4"
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(spec["paths"])
    fields = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "n",
        "logprobs",
        "tools",
    } <= set(fields)
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<textarea" in page.text
    assert httpx.get(server.url + "/static/app.js").status_code == 200


def test_chat_greedy_is_deterministic_and_counts_usage(client, model_id, chat_format):
    a = greedy_chat(client, model_id, "Hello there")
    b = greedy_chat(client, model_id, "Hello there")
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.role == "assistant"
    assert a.choices[0].finish_reason in ("stop", "length")
    expected_prompt = chat_format.encode_dialog([{"role": "user", "content": "Hello there"}])
    assert a.usage.prompt_tokens == len(expected_prompt)
    assert 1 <= a.usage.completion_tokens <= 12
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    assert a.id.startswith("chatcmpl-") and a.model == model_id


def test_chat_stream_equals_non_stream(server, client, model_id):
    full = greedy_chat(client, model_id, "Tell me a story", max_tokens=20)
    chunks = list(
        client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "Tell me a story"}],
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # The raw wire format: SSE lines, chunk objects, and the final [DONE].
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    raw = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_stream_with_n_choices(client, model_id):
    full = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0.9,
        seed=3,
        n=2,
    )
    stream = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0.9,
        seed=3,
        n=2,
        stream=True,
    )
    texts, finishes = ["", ""], [None, None]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert texts == [c.message.content for c in full.choices]
    assert finishes == [c.finish_reason for c in full.choices]


def test_cli_errors_are_clear(tmp_path):
    import subprocess
    import sys

    run = [sys.executable, "-m", "llama4.cli", "serve", "--port", "0"]
    r = subprocess.run([*run, "--model", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "llama4 serve:" in r.stderr and "nope" in r.stderr, r.stderr
    from llama4.engine.assets import default_model_path

    try:
        default_model_path()
    except FileNotFoundError:  # no bundled model installed: `llama4 serve` says so and how to fix it
        r = subprocess.run(run, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "--model" in r.stderr, r.stderr


def test_max_completion_tokens_and_length(client, model_id):
    r = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Count"}],
        max_completion_tokens=4,
        temperature=0,
    )
    assert r.usage.completion_tokens <= 4
    if r.usage.completion_tokens == 4:
        assert r.choices[0].finish_reason == "length"


def test_seed_n_and_stop(client, model_id):
    kw = dict(
        model=model_id, messages=[{"role": "user", "content": "Pick words"}], max_tokens=10, temperature=1.0
    )
    a = client.chat.completions.create(seed=7, n=3, **kw)
    b = client.chat.completions.create(seed=7, n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # seed + i per choice
    assert a.usage.completion_tokens >= 3
    # A stop string taken from the greedy reply cuts the text right before it.
    full = greedy_chat(client, model_id, "Tell me a story", max_tokens=20).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    if stop.strip():
        cut = greedy_chat(client, model_id, "Tell me a story", max_tokens=20, stop=[stop]).choices[0]
        assert cut.finish_reason == "stop"
        assert cut.message.content == full[: full.index(stop)]


def test_logprobs(client, model_id):
    r = greedy_chat(client, model_id, "Hello", max_tokens=5, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5)  # greedy: the best token
        assert bytes(e.bytes).decode("utf-8", errors="replace") == e.token
    streamed = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    tokens = [
        e.token
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert tokens == [e.token for e in entries]


def test_completions(client, model_id):
    r = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=8, temperature=0)
    text = r.choices[0].text
    assert r.object == "text_completion" and r.usage.completion_tokens <= 8
    tok = Tokenizer.default()
    ids = tok.encode("Once upon a time", bos=True)
    by_ids = client.completions.create(model=model_id, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == text
    echo = client.completions.create(
        model=model_id, prompt="Once upon a time", max_tokens=8, temperature=0, echo=True
    )
    assert echo.choices[0].text == "Once upon a time" + text
    several = client.completions.create(
        model=model_id, prompt=["Once upon a time", "The sea"], max_tokens=8, temperature=0, n=2
    )
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text == text
    stream = client.completions.create(
        model=model_id, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True, logprobs=2
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == text
    lp = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert len(lp) == r.usage.completion_tokens and all(v <= 0 for v in lp)
    with_lp = client.completions.create(
        model=model_id, prompt="Once upon a time", max_tokens=4, temperature=0, logprobs=2
    )
    lps = with_lp.choices[0].logprobs
    assert len(lps.tokens) == len(lps.token_logprobs) == len(lps.top_logprobs) == len(lps.text_offset)
    assert all(len(t) <= 2 for t in lps.top_logprobs)


# ----- tools ---------------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_tools_are_put_in_the_prompt(client, model_id, chat_format):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(
        model=model_id, messages=messages, tools=[WEATHER], max_tokens=4, temperature=0
    )
    assert r.usage.prompt_tokens == len(chat_format.encode_dialog(messages, tools=[WEATHER]))
    assert r.usage.prompt_tokens > len(chat_format.encode_dialog(messages)) + 100
    none = client.chat.completions.create(
        model=model_id, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=4, temperature=0
    )
    assert none.usage.prompt_tokens == len(chat_format.encode_dialog(messages))
    # A history with a tool call and its result is accepted, and streaming with tools works.
    history = [
        *messages,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    chunks = list(
        client.chat.completions.create(
            model=model_id, messages=history, tools=[WEATHER], max_tokens=6, temperature=0, stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_call_parsing_builds_openai_messages():
    from llama4.serve.outputs import ChatChoiceStream, build_chat_message

    msg, finish = build_chat_message('[get_weather(city="Paris")]', ["get_weather"])
    assert finish == "tool_calls" and msg["content"] is None
    (call,) = msg["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {
        "city": "Paris"
    }
    msg, finish = build_chat_message(
        'Let me look. <|python_start|>get_weather(city="Oslo")<|python_end|>', ["get_weather"]
    )
    assert finish == "tool_calls" and msg["content"] == "Let me look."
    msg, finish = build_chat_message("[1] is a citation", ["get_weather"])
    assert finish is None and msg == {"role": "assistant", "content": "[1] is a citation"}
    msg, finish = build_chat_message("[other(x=1)]", ["get_weather"])  # not an offered tool: text
    assert finish is None and msg["content"] == "[other(x=1)]"
    assert build_chat_message("plain", None) == ({"role": "assistant", "content": "plain"}, None)

    # Streaming: text before a possible call goes out at once (whitespace once more text follows),
    # the call is held and parsed at the end.
    st = ChatChoiceStream(["get_weather"])
    sent = "".join(st.add(d) for d in ["Sure. ", "[get_", 'weather(city="Paris")', "]"])
    rest, calls = st.finish()
    assert sent == "Sure." and rest == "" and calls[0]["function"]["name"] == "get_weather"
    # Whatever the split, the streamed content is the non-streamed content.
    for text in [
        'Sure: [get_weather(city="Paris")]',
        'Hi <|python_start|>get_weather(city="a")<|python_end|>',
        'One moment.\n\n{"name": "get_weather", "parameters": {"city": "Oslo"}}',
        "Two  spaces  and [1] a citation  ",
        "plain text\n",
        '  Hi [get_weather(city="Paris")]',
        '\nHi\n[get_weather(city="a")]',
        '\n[get_weather(city="a")]',
    ]:
        msg, _ = build_chat_message(text, ["get_weather"])
        for size in (1, 2, 5, len(text)):
            st = ChatChoiceStream(["get_weather"])
            sent = "".join(st.add(text[i : i + size]) for i in range(0, len(text), size))
            rest, calls = st.finish()
            assert sent + rest == (msg["content"] or ""), (text, size)
            assert (calls is None) == ("tool_calls" not in msg), (text, size)
    st = ChatChoiceStream(["get_weather"])
    sent = "".join(st.add(d) for d in ["get_wea", 'ther(city="Rome")'])
    rest, calls = st.finish()
    assert sent == "" and rest == "" and json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    st = ChatChoiceStream(["get_weather"])
    sent = "".join(st.add(d) for d in ["See ", "[1] and ", "more"])
    rest, calls = st.finish()
    assert calls is None and sent + rest == "See [1] and more"


# ----- images --------------------------------------------------------------------------------------


def test_image_message(client, model_id, chat_format):
    from llama4.image import preprocess_image

    def ask(url):
        return client.chat.completions.create(
            model=model_id,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "What is this?"},
                    ],
                }
            ],
            max_tokens=8,
            temperature=0,
        )

    red, blue = png_data_url(), png_data_url(color=(20, 40, 220))
    r = ask(red)
    image = preprocess_image(base64.b64decode(red.split(",", 1)[1]), tile_size=56, max_tiles=4)
    expected = chat_format.encode_dialog(
        [{"role": "user", "content": [{"type": "image_url"}, {"type": "text", "text": "What is this?"}]}],
        image_grids=[image.grid],
        tokens_per_tile=4,
    )
    assert r.usage.prompt_tokens == len(expected)
    # Bare base64 works too, and the same image gives the same greedy reply (prefix cache included).
    assert ask(red.split(",", 1)[1]).choices[0].message.content == r.choices[0].message.content
    # A different image behind the same placeholder tokens must not reuse the cached red features.
    alone_blue = ask(blue).choices[0].message.content
    assert ask(blue).choices[0].message.content == alone_blue


# ----- bad input -----------------------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]
# fmt: off
BAD_REQUESTS = [
    # (case, path, body, status, expected words in the message, param)
    ("malformed json", "/v1/chat/completions", b'{"messages": [', 400, "not valid JSON", None),
    ("empty body", "/v1/chat/completions", b"", 400, "JSON", None),
    ("wrong type", "/v1/chat/completions", {"messages": USER, "max_tokens": "many"}, 400, "integer", "max_tokens"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "wizard", None),
    ("no messages", "/v1/chat/completions", {"messages": []}, 400, "at least 1", "messages"),
    ("unknown field", "/v1/chat/completions", {"messages": USER, "max_token": 5}, 400, "max_token", "max_token"),
    ("content type", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "content", None),
    ("max_tokens 0", "/v1/chat/completions", {"messages": USER, "max_tokens": 0}, 400, "greater than", "max_tokens"),
    ("max_tokens huge", "/v1/chat/completions", {"messages": USER, "max_tokens": 10**6}, 400, "too large", "max_tokens"),
    ("temperature", "/v1/chat/completions", {"messages": USER, "temperature": 9}, 400, "less than", "temperature"),
    ("n too big", "/v1/chat/completions", {"messages": USER, "n": 1000}, 400, "less than", "n"),
    ("too many stops", "/v1/chat/completions", {"messages": USER, "stop": list("abcde")}, 400, "stop", None),
    ("top_logprobs alone", "/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, 400, "logprobs", None),
    ("unknown tool choice", "/v1/chat/completions",
     {"messages": USER, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     400, "nope", None),
    ("prompt too long", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * (MAX_LEN + 10)}]},
     400, "context", "messages"),
    ("wrong model", "/v1/chat/completions", {"model": "gpt-9", "messages": USER}, 404, "gpt-9", "model"),
    ("bad token id", "/v1/completions", {"prompt": [1, 2, 999999]}, 400, "out of range", "prompt"),
    ("negative token id", "/v1/completions", {"prompt": [1, -2]}, 400, "greater than", None),
    ("completion too long", "/v1/completions", {"prompt": "hello " * (MAX_LEN + 10)}, 400, "context", "prompt"),
    ("suffix", "/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix", None),
]
# fmt: on


def image_body(url):
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


def big_png_data_url() -> str:
    buf = io.BytesIO()
    Image.new("L", (6000, 5000), 0).save(buf, format="PNG")  # 30 MP, a few KB compressed
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def truncated_png_data_url() -> str:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()[: buf.tell() // 2]).decode()


BAD_IMAGES = [
    (
        "not an image",
        image_body("data:image/png;base64," + base64.b64encode(b"hello world").decode()),
        "bad image",
    ),
    ("bad base64", image_body("data:image/png;base64,@@@@"), "base64"),
    ("remote url", image_body("https://example.com/cat.png"), "not fetched"),
    ("not image mime", image_body("data:text/plain;base64,aGVsbG8="), "not an image"),
    ("truncated png", image_body(truncated_png_data_url()), "bad image"),
    ("too many pixels", image_body(big_png_data_url()), "over the limit"),
    (
        "too many images",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}}] * 9}
            ]
        },
        "too many images",
    ),
]


@pytest.mark.parametrize(
    "case, path, body, status, words, param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests_get_4xx_with_reason(server, case, path, body, status, words, param):
    kw = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = httpx.post(server.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert words.lower() in err["message"].lower(), err
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize("case, body, words", BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
def test_bad_images_get_400_with_reason(server, case, body, words):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words.lower() in err["message"].lower(), err
    assert err["param"].startswith("messages.0.content.")


def test_server_still_serves_after_bad_input(server, client, model_id):
    assert httpx.get(server.url + "/nope").status_code == 404
    assert httpx.get(server.url + "/nope").json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405
    assert greedy_chat(client, model_id, "still there?", max_tokens=3).choices[0].message.content is not None
    m = metrics(server)
    assert not any(k.startswith("llama4_http_requests_total") and 'code="5' in k for k in m), m


# ----- continuous batching -------------------------------------------------------------------------


def test_16_concurrent_streams_equal_served_alone(server, client, model_id):
    prompts = [f"Request number {i}: tell me about topic {i * 7}" for i in range(16)]
    alone = [greedy_chat(client, model_id, p, max_tokens=16).choices[0].message.content for p in prompts]
    before = metrics(server)
    results: list[str | None] = [None] * 16
    errors: list[BaseException] = []

    def one(i):
        try:
            stream = client.chat.completions.create(
                model=model_id,
                messages=[{"role": "user", "content": prompts[i]}],
                max_tokens=16,
                temperature=0,
                stream=True,
            )
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results == alone
    after = metrics(server)
    # The decode forwards really were batched: some step held more than a few rows.
    big = after["llama4_decode_batch_size_count"] - after['llama4_decode_batch_size_bucket{le="4.0"}']
    big_before = (
        before["llama4_decode_batch_size_count"] - before['llama4_decode_batch_size_bucket{le="4.0"}']
    )
    assert big > big_before, after


def test_cancelled_stream_frees_its_slot(server, model_id):
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": "Write a very long essay"}],
        "max_tokens": 400,
        "temperature": 0.8,
        "stream": True,
    }
    before = metrics(server)
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()  # kept open: leaving a for loop over it would close the connection
            assert sum(next(lines).startswith("data: ") for _ in range(8)) == 4
            during = metrics(server)
            assert during["llama4_running_requests"] >= 1 and during["llama4_kv_cache_used_tokens"] > 0
        # Leaving the block closes the connection mid-stream.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = metrics(server)
        if m["llama4_running_requests"] == 0 and m["llama4_kv_cache_used_tokens"] == 0:
            break
        time.sleep(0.05)
    assert m["llama4_running_requests"] == 0 and m["llama4_kv_cache_slots_used"] == 0
    assert m["llama4_kv_cache_used_tokens"] == 0
    cancelled = 'llama4_requests_total{outcome="cancelled"}'
    assert m.get(cancelled, 0) == before.get(cancelled, 0) + 1
    generated = m["llama4_generation_tokens_total"] - before["llama4_generation_tokens_total"]
    assert generated < 400  # it did not run to the end

    # A non-streaming request whose client gives up is cancelled too (the server polls for it).
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = metrics(server)
        if m.get(cancelled, 0) == before.get(cancelled, 0) + 2 and m["llama4_running_requests"] == 0:
            break
        time.sleep(0.05)
    assert m.get(cancelled, 0) == before.get(cancelled, 0) + 2 and m["llama4_kv_cache_used_tokens"] == 0


# ----- API key, body limit, queue limit ------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server(model_dir):
    args = ["--model", str(model_dir), "--max-batch", "1", "--max-queue", "1", "--max-body-mb", "0.5"]
    with ServerProcess(args, env={"LLAMA4_API_KEY": "sekrit"}) as s:
        yield s


def test_api_key(small_server):
    url = small_server.url
    assert httpx.get(url + "/health").status_code == 200  # probes stay open
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic c2Vrcml0"}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/metrics").status_code == 401
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0)
    model = good.models.list().data[0].id
    r = good.chat.completions.create(model=model, messages=USER, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_body_limit(small_server):
    r = httpx.post(
        small_server.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x" * (600 << 10)}]},
        headers={"Authorization": "Bearer sekrit"},
    )
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]


def test_queue_limit_gives_429_with_retry_after(small_server):
    url, headers = small_server.url + "/v1/chat/completions", {"Authorization": "Bearer sekrit"}
    long = {"messages": USER, "max_tokens": 300, "temperature": 0.8, "stream": True}
    with httpx.Client(timeout=30, headers=headers) as h:
        with h.stream("POST", url, json=long):  # takes the only slot
            wait_for_health(small_server, running=1, waiting=0)
            with h.stream("POST", url, json=long) as waiting:  # waits in the queue (limit 1)
                wait_for_health(small_server, running=1, waiting=1)
                r = httpx.post(url, json={"messages": USER, "max_tokens": 2}, headers=headers)
                assert r.status_code == 429, r.text
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "queue_full"
                assert waiting.status_code == 200
    # Both streams were dropped: the server serves again.
    deadline = time.monotonic() + 10
    while True:
        r = httpx.post(url, json={"messages": USER, "max_tokens": 2}, headers=headers, timeout=30)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text


def test_shutdown_ends_running_and_queued_requests_cleanly(model_dir):
    # SIGTERM with a stream running and a request queued behind it (one slot): the stream ends
    # with an error event, the queued request gets a JSON 503, and the process exits promptly.
    import signal

    with ServerProcess(["--model", str(model_dir), "--max-batch", "1"]) as s:
        body = {"prompt": "Once", "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
        queued: dict = {}

        def wait_in_queue() -> None:
            r = httpx.post(s.url + "/v1/completions", json={**body, "max_tokens": 4}, timeout=60)
            queued.update(status=r.status_code, body=r.json())

        lines = []
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            it = r.iter_lines()
            for line in it:  # the stream is running
                if line.startswith("data: {"):
                    break
            waiter = threading.Thread(target=wait_in_queue)
            waiter.start()
            wait_for_health(s, running=1, waiting=1)
            started = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            lines = [line for line in it if line.startswith("data:")]
        waiter.join(30)
        assert s.proc.wait(20) is not None and time.monotonic() - started < 10
    assert any("shutting down" in line for line in lines[-2:]), lines[-2:]
    assert queued.get("status") == 503 and "shutting down" in queued["body"]["error"]["message"], queued
