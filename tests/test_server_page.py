"""The chat page at /, in headless Chromium (Debian's chromium driven by Playwright): a question typed in,
the answer streamed in, the reasoning shown in a collapsible block, the conversation kept for the next
turn. A screenshot is saved (to $GPTOSS_TEST_ARTIFACTS if set, else the test's tmp_path)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from gptoss import harmony as h
from gptoss.engine import Engine
from gptoss.server import create_app
from test_server import Server, expected, render, scripted_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not os.path.exists(CHROMIUM):
    pytest.skip("no chromium binary (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def server():
    with Engine(scripted_model(), max_concurrency=2) as engine:
        with Server(create_app(engine, "tiny-scripted"), engine) as s:
            yield s


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 900, "height": 640})
        page.goto(server.url + "/")
        yield page
        browser.close()


def test_chat_page_streams_the_answer_and_shows_the_reasoning(page, tmp_path):
    requests = []
    page.on("request", lambda r: requests.append(json.loads(r.post_data)) if r.method == "POST" else None)
    page.wait_for_function("document.getElementById('model').textContent === 'tiny-scripted'")
    page.fill("#temperature", "0")
    page.select_option("#effort", "medium")
    # Count the answer's updates as they happen: a streamed answer changes many times.
    page.evaluate("""() => {
        window.answerUpdates = 0;
        new MutationObserver((records) => {
            for (const r of records) if (r.target.closest && r.target.closest('.answer')) window.answerUpdates++;
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#prompt", "Hello")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant.done", timeout=60_000)

    bubble = page.locator(".msg.assistant").last
    assert page.locator(".msg.user").last.text_content() == "Hello"
    assert bubble.locator(".answer").text_content() == "Hello! How can I help?"
    reasoning = bubble.locator("details.reasoning")
    assert reasoning.is_visible() and reasoning.locator("summary").text_content() == "Reasoning"
    assert reasoning.locator(".reasoning-text").text_content() == "The user greets me."
    assert reasoning.get_attribute("open") is None  # folded once the answer started...
    reasoning.locator("summary").click()
    assert reasoning.locator(".reasoning-text").is_visible()  # ...and opens on a click
    assert page.evaluate("window.answerUpdates") >= 5  # streamed token by token, not set once
    assert "tokens" in bubble.locator(".stats").text_content()  # usage from the last chunk
    assert requests[-1]["reasoning_effort"] == "medium" and requests[-1]["stream"] is True

    # Second turn: the page sends the whole conversation (without the finished turn's reasoning).
    page.fill("#max-tokens", "12")
    page.fill("#prompt", "Thanks!")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant.done').length === 2", timeout=60_000)
    assert requests[-1]["messages"] == [{"role": "user", "content": "Hello"},
                                        {"role": "assistant", "content": "Hello! How can I help?"},
                                        {"role": "user", "content": "Thanks!"}]
    want = expected(scripted_model(), render([h.Message.user("Hello"), h.Message.assistant("Hello! How can I help?"),
                                              h.Message.user("Thanks!")]), 12)
    second = page.locator(".msg.assistant").last
    assert second.locator(".answer").text_content() == want["content"]
    assert second.locator(".reasoning-text").text_content() == want["reasoning"]

    out = Path(os.environ.get("GPTOSS_TEST_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    page.locator(".msg.assistant").first.locator("details.reasoning").evaluate("d => d.open = true")
    page.screenshot(path=str(out / "chat_page.png"), full_page=True)
    assert (out / "chat_page.png").stat().st_size > 10_000
    print(f"screenshot: {out / 'chat_page.png'}")


def test_chat_page_shows_errors_and_keeps_working(page):
    page.fill("#temperature", "5")  # out of range: the server answers 400, the page shows its message
    page.fill("#prompt", "Hello")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant .error", timeout=30_000)
    assert "temperature" in page.locator(".msg.assistant .error").last.text_content()
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "")
    page.fill("#prompt", "Hello")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant.done').length === 1", timeout=60_000)
    assert page.locator(".msg.assistant .answer").last.text_content() == "Hello! How can I help?"
