"""Hardening in real Chromium: bad inputs, a closed tab, HTML/script in messages and replies, session isolation."""

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import replying, wait_until

pytestmark = pytest.mark.browser
EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"


def truncated_png(path: Path) -> None:
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:2500])


BAD = {
    "renamed-text": ("holiday.png", lambda p: p.write_text("just text"), "is a text file"),
    "zero-bytes": ("empty.png", lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "truncated": ("cut.png", truncated_png, "cannot be decoded"),
    "html": ("page.jpg", lambda p: p.write_text("<!doctype html><html><body>hi</body></html>"), "HTML page"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_upload_gets_a_specific_warning_and_the_chat_survives(chat, tmp_path, case):
    name, write, reason = BAD[case]
    chat.set_control("max-new-tokens", 8)
    chat.send("First", str(EXAMPLES / "red_circle.png"))
    chat.wait_reply_done()
    bad = tmp_path / name
    write(bad)
    chat.send("What is this?", str(bad))
    message = chat.toast_text()
    assert name in message and reason in message
    chat.page.wait_for_function("() => !document.querySelector('#chat-input textarea').disabled")
    assert chat.user_count() == 2 and len(chat.bot_texts()) == 1
    assert "Image 1" in chat.page.locator("#inspector-lowres").inner_text()  # the inspector kept the last good state


def test_too_many_images_in_one_message(chat):
    files = [str(EXAMPLES / n) for n in ("red_circle.png", "blue_square.png", "green_triangle.png",
                                          "yellow_circle.png", "red_circle.png")]
    chat.send("All of them?", *files)
    assert "at most 4 are allowed per message" in chat.toast_text()
    chat.page.wait_for_function("() => !document.querySelector('#chat-input textarea').disabled")
    assert chat.user_count() == 0  # nothing was added to the conversation


def test_closing_the_tab_ends_the_generation_within_a_second(browser, random_app_server):
    context = browser.new_context()
    page = context.new_page()
    page.goto(random_app_server[1])
    page.wait_for_selector("#chat-input textarea")
    for elem_id, value in [("max-new-tokens", 2000), ("temperature", 1)]:
        field = page.locator(f"#{elem_id} input[type=number]").first
        field.fill(str(value))
        field.press("Enter")
    page.locator("#chat-input textarea").fill("Tell me a very long story.")
    page.locator("#chat-input textarea").press("Enter")
    page.wait_for_function(
        "() => { const b = document.querySelectorAll('#chatbot [data-testid=bot]'); return b.length && b[0].innerText.length > 20; }"
    )
    engine = random_app_server.engine
    assert replying(engine)
    context.close()  # the user closes the tab
    assert wait_until(lambda: not replying(engine), 1.0), "the reply kept running on the model after the tab closed"


XSS = "<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\"> **bold**"


class ScriptedReply:
    """Stands in for the model's reply (the real request is made, then cancelled) so that the reply is exactly
    the hostile HTML under test."""

    def __init__(self, real):
        real.cancel()
        self.prompt, self.inputs, self.stats = real.prompt, real.inputs, real.stats

    def updates(self):
        yield "<img src=x onerror=\"window.__xss = 3\">"
        yield "<script>window.__xss = 4</script> done"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_html_and_scripts_in_messages_and_replies_are_not_executed(chat, app_server, monkeypatch):
    engine = app_server.engine
    real_submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda *args, **kwargs: ScriptedReply(real_submit(*args, **kwargs)))
    chat.send(XSS)
    chat.page.wait_for_function(
        "() => { const b = document.querySelectorAll('#chatbot [data-testid=bot]'); return b.length && b[0].innerText.includes('done'); }"
    )
    time.sleep(0.5)
    assert chat.page.evaluate("window.__xss") is None
    assert chat.page.locator("#chatbot script").count() == 0
    assert chat.page.locator("#chatbot [onerror]").count() == 0
    assert "bold" in chat.page.locator("#chatbot").inner_text()


def test_two_sessions_do_not_share_images_previews_or_meters(browser, app_server):
    pages = []
    for image, question in [("red_circle.png", "Session A?"), ("blue_square.png", "Session B, longer question?")]:
        context = browser.new_context()
        page = context.new_page()
        page.goto(app_server[1])
        page.wait_for_selector("#chat-input textarea")
        page.locator("#chat-input input[type=file]").set_input_files([str(EXAMPLES / image)])
        page.wait_for_function("() => document.querySelectorAll('#chat-input img').length >= 1")
        page.locator("#chat-input textarea").fill(question)
        pages.append((context, page, image, question))
    for _, page, _, _ in pages:  # send both at (nearly) the same time
        page.locator("#chat-input textarea").press("Enter")
    for context, page, image, question in pages:
        page.wait_for_function("() => document.querySelector('#meters').innerText.includes('eos') || "
                               "document.querySelector('#meters').innerText.includes('length')", timeout=60_000)
        other = "blue_square.png" if image == "red_circle.png" else "red_circle.png"
        inspector = page.locator("#inspector-lowres").inner_text()
        assert image in inspector and other not in inspector
        chatbot = page.locator("#chatbot").inner_text()
        assert question in chatbot and len(page.locator('#chatbot [data-testid="bot"]').all()) == 1
        context.close()
