"""The web chat page in a real browser: Playwright (sync API) driving Debian's Chromium, headless,
against a ``llama4 serve`` process on a tiny random model.

It opens the page, sends a message and sees the reply stream in, attaches an image (preview,
then sent as a data URL), stops a long reply mid-stream (and checks the server freed the slot),
and starts a new chat. Screenshots go to the test's tmp dir and to ``tests/artifacts/``.

Chromium is required: Playwright's own browser download needs the internet, so this uses
``/usr/bin/chromium`` (``apt-get install chromium``; CI's ``.ci/run`` installs it). Without it the
test FAILS with that message rather than passing silently.
"""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from llama4.serve.testing import ServerProcess, shared_random_model

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        pytest.fail(
            "the browser test needs Debian's Chromium at /usr/bin/chromium: run "
            "'apt-get update && apt-get install -y chromium' (CI's .ci/run installs it)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = shared_random_model(
        tmp_path_factory.getbasetemp(), preset="debug-vision", seed=0, max_seq_len=2048
    )
    with ServerProcess(["--model", str(model), "--max-batch", "4"]) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs 'pip install playwright' (the dev extra has it)", pytrace=False)
    executable = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def running(server) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("llama4_running_requests "):
            return float(line.split()[1])
    raise AssertionError("no llama4_running_requests in /metrics")


def save_screenshot(page, tmp_path: Path, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(tmp_path / name), full_page=False)
    shutil.copyfile(tmp_path / name, ARTIFACTS / name)


def test_chat_page(server, browser, tmp_path):
    from playwright.sync_api import expect

    image = tmp_path / "photo.png"
    buf = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize((96, 64)).save(buf, format="PNG")
    image.write_bytes(buf.getvalue())

    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    expect(page.locator("#model-name")).to_have_class("model-name online", timeout=15_000)
    expect(page.locator("#model-name")).to_contain_text("tiny-llama4")

    # Settings: a system prompt and a short reply.
    page.fill("#system-prompt", "You are a concise assistant.")
    page.fill("#max-tokens", "24")

    # 1. A message, and a reply that streams in.
    page.fill("#prompt", "Hello! Who are you?")
    page.press("#prompt", "Enter")
    expect(page.locator(".message.user .text")).to_have_text("Hello! Who are you?")
    reply = page.locator(".message.assistant .text").first
    expect(reply).not_to_be_empty(timeout=20_000)
    expect(page.locator("#send")).to_be_visible(timeout=30_000)  # the reply finished
    expect(page.locator(".message.assistant .meta").first).to_contain_text("tokens")

    # 2. An image: preview, then sent with the message.
    page.set_input_files("#file-input", str(image))
    expect(page.locator("#attachments img")).to_have_count(1)
    page.fill("#prompt", "What is in this picture?")
    page.click("#send")
    expect(page.locator(".message.user .images img")).to_have_count(1)
    expect(page.locator("#attachments img")).to_have_count(0)
    expect(page.locator(".message.assistant")).to_have_count(2)
    expect(page.locator("#send")).to_be_visible(timeout=30_000)
    assert page.locator(".message.error").count() == 0, page.locator(".message.error").all_inner_texts()
    expect(page.locator(".message.assistant .text").nth(1)).not_to_be_empty()
    save_screenshot(page, tmp_path, "web_page.png")

    # 3. A long reply, stopped mid-stream: the server frees the slot.
    page.fill("#max-tokens", "1500")
    page.fill("#prompt", "Write a very long story.")
    page.press("#prompt", "Enter")
    expect(page.locator("#stop")).to_be_visible()
    third = page.locator(".message.assistant .text").nth(2)
    expect(third).not_to_be_empty(timeout=20_000)
    page.click("#stop")
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator(".message.assistant").nth(2).locator(".meta")).to_contain_text("stopped")
    deadline = time.monotonic() + 10
    while running(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(server) == 0
    stopped_text = third.inner_text()
    time.sleep(0.3)
    assert third.inner_text() == stopped_text  # nothing more arrives
    save_screenshot(page, tmp_path, "web_page_stopped.png")

    # 4. New chat clears the conversation.
    page.click("#new-chat")
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()

    # 5. New chat pressed while a reply streams: the old turn is not sent with the next message.
    sent: list[list[dict]] = []
    page.on(
        "request",
        lambda r: sent.append(r.post_data_json["messages"]) if r.url.endswith("/chat/completions") else None,
    )
    page.fill("#prompt", "OLD CONVERSATION message")
    page.press("#prompt", "Enter")
    expect(page.locator(".message.assistant .text").first).not_to_be_empty(timeout=20_000)
    expect(page.locator("#stop")).to_be_visible()
    page.click("#new-chat")
    expect(page.locator("#send")).to_be_visible()
    page.fill("#max-tokens", "8")
    page.fill("#prompt", "fresh start")
    page.press("#prompt", "Enter")
    expect(page.locator(".message.assistant .meta")).to_contain_text("tokens", timeout=30_000)
    expect(page.locator(".message.user .text")).to_have_text(["fresh start"])
    assert [m["content"] for m in sent[-1]] == ["You are a concise assistant.", "fresh start"], sent[-1]

    # 6. A message the server refuses (longer than the context): the error shows, the text comes
    # back to the prompt box, and the page keeps working.
    page.click("#new-chat")
    long_text = " ".join(["word"] * 3000)
    page.fill("#prompt", long_text)
    page.press("#prompt", "Enter")
    expect(page.locator(".message.error")).to_contain_text("context", timeout=20_000)
    expect(page.locator("#prompt")).to_have_value(long_text)
    page.fill("#prompt", "short again")
    page.press("#prompt", "Enter")
    expect(page.locator(".message.assistant .meta")).to_contain_text("tokens", timeout=30_000)
    assert not errors, errors

    # A phone-sized screen: the settings panel folds away, the conversation stays readable.
    phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    phone.goto(server.url + "/")
    expect(phone.locator("#model-name")).to_have_class("model-name online", timeout=15_000)
    expect(phone.locator("#settings")).not_to_be_in_viewport()
    phone.click("#toggle-settings")
    expect(phone.locator("#settings")).to_be_in_viewport()
    phone.fill("#max-tokens", "16")
    save_screenshot(phone, tmp_path, "web_page_phone_settings.png")
    phone.click("#close-settings")
    expect(phone.locator("#settings")).not_to_be_in_viewport()
    phone.fill("#prompt", "Hi from a phone")
    phone.press("#prompt", "Enter")
    expect(phone.locator(".message.assistant .text")).not_to_be_empty(timeout=20_000)
    expect(phone.locator("#send")).to_be_visible(timeout=30_000)
    expect(phone.locator(".message.assistant .meta")).to_contain_text("tokens")
    save_screenshot(phone, tmp_path, "web_page_phone.png")
    phone.close()
    page.close()
