"""Saved conversations in real Chromium: reload, server restart, switch, delete, export/import, refusals, privacy."""

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, serve
from tests.e2e.conftest import ChatPage, open_page

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "assets" / "examples"


def labels(chat: ChatPage) -> list[str]:
    """The side list's entries, read at once (the list re-renders when a conversation is saved)."""
    return chat.page.eval_on_selector_all("#chat-list label", "labels => labels.map(l => l.innerText.trim())")


def wait_for(predicate, timeout=20, what="the condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def reload(chat: ChatPage) -> None:
    chat.page.reload()
    chat.page.wait_for_selector("#chat-input textarea")


def shows_image(chat: ChatPage, number: int) -> bool:
    return chat.page.locator(f'#chatbot [data-testid="user"]:has-text("Image {number}") img').count() > 0


@pytest.fixture
def store_app(browser, settings, handle, tmp_path):
    """The bundled checkpoint with its own image store; yields (url, store folder, new_page)."""
    from dataclasses import replace

    store = tmp_path / "store"
    with serve(replace(settings, store_dir=str(store)), handle) as (_, url), contextlib.ExitStack() as pages:
        yield url, store, lambda: ChatPage(pages.enter_context(open_page(browser, url)))


def test_a_reload_brings_the_conversation_back_and_it_goes_on(store_app):
    url, _, new_page = store_app
    chat = new_page()
    chat.send("What colour is the shape?", str(EXAMPLES / "red_circle.png"))
    assert chat.wait_reply_done().strip() == "The shape is red."
    wait_for(lambda: labels(chat), what="the conversation in the side list")
    reload(chat)
    wait_for(lambda: chat.bot_texts() == ["The shape is red."], what="the restored reply")
    wait_for(lambda: shows_image(chat, 1), what="the restored image")  # its <img> renders after the text
    assert labels(chat)[0].startswith("What colour is the shape?")
    chat.send("What shape is it?")  # about the restored image
    assert chat.wait_reply_done().strip() == "It is a circle."


def test_switch_new_chat_delete_and_delete_all(store_app):
    _, _, new_page = store_app
    chat = new_page()
    chat.send("What colour is the shape?", str(EXAMPLES / "blue_square.png"))
    chat.wait_reply_done()
    chat.page.locator("#new-chat").click()
    wait_for(lambda: not chat.bot_texts(), what="an empty chat")
    chat.send("What shape is it?", str(EXAMPLES / "green_triangle.png"))
    assert chat.wait_reply_done().strip() == "It is a triangle."
    wait_for(lambda: len(labels(chat)) == 2, what="two saved conversations")
    assert labels(chat)[0].startswith("What shape is it?")  # the newest first
    chat.page.locator("#chat-list label").nth(1).click()  # back to the first conversation
    wait_for(lambda: chat.bot_texts() == ["The shape is blue."], what="the first conversation")
    chat.send("What shape is it?")
    assert chat.wait_reply_done().strip() == "It is a square."
    chat.page.locator("#delete-chat").click()
    wait_for(lambda: len(labels(chat)) == 1 and chat.bot_texts() == ["It is a triangle."], what="the other one")
    chat.page.once("dialog", lambda dialog: dialog.dismiss())
    chat.page.locator("#delete-all-chats").click()
    time.sleep(1)
    assert len(labels(chat)) == 1  # dismissed: nothing deleted
    chat.page.once("dialog", lambda dialog: dialog.accept())
    chat.page.locator("#delete-all-chats").click()
    wait_for(lambda: not labels(chat) and not chat.bot_texts(), what="everything deleted")
    reload(chat)
    assert not labels(chat) and not chat.bot_texts()


def test_two_browser_profiles_never_see_each_others_conversations(store_app):
    _, _, new_page = store_app
    ann, bob = new_page(), new_page()
    ann.send("What colour is the shape?", str(EXAMPLES / "red_circle.png"))
    ann.wait_reply_done()
    wait_for(lambda: labels(ann), what="Ann's saved conversation")
    reload(bob)
    assert not labels(bob) and not bob.bot_texts()
    bob.send("What shape is it?", str(EXAMPLES / "green_triangle.png"))
    bob.wait_reply_done()
    reload(ann)
    wait_for(lambda: ann.bot_texts() == ["The shape is red."], what="Ann's own conversation")
    assert [label.split(" · ")[0] for label in labels(ann)] == ["What colour is the shape?"]


def test_export_then_import_in_a_fresh_profile(store_app, tmp_path):
    _, _, new_page = store_app
    chat = new_page()
    chat.send("What colour is the second image?", str(EXAMPLES / "blue_square.png"), str(EXAMPLES / "yellow_circle.png"))
    assert chat.wait_reply_done().strip() == "The second image is yellow."
    wait_for(lambda: chat.page.locator("#export-chat").is_enabled(), what="the Export button")
    with chat.page.expect_download() as download:
        chat.page.locator("#export-chat").click()
    exported = tmp_path / "exported.json"
    download.value.save_as(exported)
    document = json.loads(exported.read_text())
    assert document["format"] == "dsvl-chat conversation" and document["version"] == 1
    assert [part["name"] for part in document["messages"][0]["content"] if part["type"] == "image"] == \
        ["blue_square.png", "yellow_circle.png"]

    fresh = new_page()  # another browser profile: nothing saved in it
    assert not labels(fresh)
    with fresh.page.expect_file_chooser() as chooser:
        fresh.page.locator("#import-chat").click()
    chooser.value.set_files(str(exported))
    wait_for(lambda: fresh.bot_texts() == ["The second image is yellow."], what="the imported conversation")
    wait_for(lambda: shows_image(fresh, 1) and shows_image(fresh, 2), what="the imported images")
    assert len(labels(fresh)) == 1
    fresh.send("What colour is the first image?")
    assert fresh.wait_reply_done().strip() == "The first image is blue."


@pytest.mark.parametrize("name, content, reason", [
    ("notes.json", b"this is not json", "not JSON"),
    ("other.json", json.dumps({"messages": []}).encode(), "not a dsvl-chat conversation"),
    ("future.json", json.dumps({"format": "dsvl-chat conversation", "version": 7, "messages": []}).encode(),
     "written by a newer dsvl-chat"),
    ("fake.json", json.dumps({"format": "dsvl-chat conversation", "version": 1, "messages": [{"role": "user", "content": [
        {"type": "image", "name": "holiday.png", "data": "dGhpcyBpcyB0ZXh0"}]}]}).encode(), "“holiday.png” is a text file"),
])
def test_bad_import_files_are_refused_and_the_open_chat_stays(store_app, tmp_path, name, content, reason):
    _, _, new_page = store_app
    chat = new_page()
    chat.send("What colour is the shape?", str(EXAMPLES / "red_circle.png"))
    chat.wait_reply_done()
    wait_for(lambda: labels(chat), what="the saved conversation")
    before = labels(chat)
    bad = tmp_path / name
    bad.write_bytes(content)
    with chat.page.expect_file_chooser() as chooser:
        chat.page.locator("#import-chat").click()
    chooser.value.set_files(str(bad))
    message = chat.toast_text()
    assert "Not imported" in message and reason in message
    assert labels(chat) == before and chat.bot_texts() == ["The shape is red."] and shows_image(chat, 1)


def test_an_image_gone_from_the_store_shows_a_placeholder_and_the_chat_goes_on(store_app):
    _, store, new_page = store_app
    chat = new_page()
    chat.send("What colour is the shape?", str(EXAMPLES / "yellow_circle.png"))
    chat.wait_reply_done()
    wait_for(lambda: labels(chat), what="the saved conversation")
    for image in (store / "images").iterdir():
        image.unlink()
    reload(chat)
    wait_for(lambda: "no longer stored" in chat.page.locator("#chatbot").inner_text(), what="the placeholder")
    assert chat.bot_texts()[0] == "The shape is yellow."
    chat.send("What colour is the shape?", str(EXAMPLES / "red_circle.png"))
    assert chat.wait_reply_done().strip() == "The shape is red."


@contextlib.contextmanager
def app_process(port: int, store: Path):
    """`python app.py` on the bundled checkpoint, as a user starts it (stopped on exit)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "app.py", "--model", "tiny", "--port", str(port), "--store-dir", str(store)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                urllib.request.urlopen(url + "config", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "the app did not start"
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_server_restart_keeps_the_conversation_and_its_images(browser, tmp_path):
    port, store = free_port(), tmp_path / "store"
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    chat = ChatPage(page)
    try:
        with app_process(port, store) as url:
            page.goto(url)
            page.wait_for_selector("#chat-input textarea")
            chat.send("What colour is the first image?", str(EXAMPLES / "green_triangle.png"),
                      str(EXAMPLES / "blue_square.png"))
            assert chat.wait_reply_done().strip() == "The first image is green."
            wait_for(lambda: labels(chat), what="the saved conversation")
        with app_process(port, store) as url:  # a new process: nothing in memory survives
            page.goto(url)
            page.wait_for_selector("#chat-input textarea")
            wait_for(lambda: chat.bot_texts() == ["The first image is green."], what="the restored conversation")
            wait_for(lambda: shows_image(chat, 1) and shows_image(chat, 2), what="the restored images")
            chat.send("What colour is the second image?")  # the images are read back from the store
            assert chat.wait_reply_done().strip() == "The second image is blue."
    finally:
        context.close()


def test_like_and_dislike_are_recorded_only_with_a_feedback_file(browser, settings, handle, tmp_path):
    from dataclasses import replace

    feedback = tmp_path / "feedback.jsonl"
    with serve(replace(settings, feedback_file=str(feedback), store_dir=str(tmp_path / "s")), handle) as (_, url), \
            open_page(browser, url) as page:
        chat = ChatPage(page)
        chat.send("What colour is the shape?", str(EXAMPLES / "red_circle.png"))
        chat.wait_reply_done()
        page.locator('#chatbot button[aria-label="Like"]').last.click()
        wait_for(lambda: feedback.exists() and feedback.read_text().strip(), what="a feedback line")
        line = json.loads(feedback.read_text().splitlines()[-1])
        assert line["liked"] is True and "red" in str(line["reply"])
        assert [m.get("text") for m in line["conversation"] if m["role"] == "user"][-1] == "What colour is the shape?"
    with serve(replace(settings, store_dir=str(tmp_path / "s2")), handle) as (_, url), open_page(browser, url) as page:
        chat = ChatPage(page)
        chat.send("What colour is the shape?", str(EXAMPLES / "red_circle.png"))
        chat.wait_reply_done()
        assert page.locator('#chatbot button[aria-label="Like"]').count() == 0  # off by default


def test_a_conversation_about_a_pdf_reopens_answerable(store_app, tmp_path):
    """A PDF's conversation is saved (the PDF content-addressed in the store, like an image); after a reload it is
    back with the document and its page count, and a follow-up is answered from the same pages."""
    from tests.unit.test_documents import make_pdf

    _, _, new_page = store_app
    chat = new_page()
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(make_pdf(6))
    chat.page.locator("#chat-input input[type=file]").set_input_files([str(pdf)])
    wait_for(lambda: chat.page.locator('#chat-input [aria-label="File thumbnail"]').count() == 1, what="the PDF")
    chat.send("What colour is the shape?")
    assert chat.wait_reply_done().strip() == "The shape is red."
    wait_for(lambda: labels(chat), what="the conversation in the side list")
    reload(chat)
    wait_for(lambda: chat.bot_texts() == ["The shape is red."], what="the restored reply")
    wait_for(lambda: "6 pages" in chat.page.locator("#chatbot").inner_text(), what="the document and its page count")
    chat.send("What shape is it?")
    assert chat.wait_reply_done().strip() == "It is a circle."
    assert "6 pages: pages 1-4 as images; the text of pages 5-6" in chat.meters()  # the same pages as before
    # Exported (the PDF inline, as application/pdf) and imported in a fresh profile: still answerable.
    wait_for(lambda: chat.page.locator("#export-chat").is_enabled(), what="the Export button")
    with chat.page.expect_download() as download:
        chat.page.locator("#export-chat").click()
    exported = tmp_path / "exported.json"
    download.value.save_as(exported)
    [part] = [p for p in json.loads(exported.read_text())["messages"][0]["content"] if p["type"] == "image"]
    assert part["name"] == "report.pdf" and part["media_type"] == "application/pdf"
    fresh = new_page()
    with fresh.page.expect_file_chooser() as chooser:
        fresh.page.locator("#import-chat").click()
    chooser.value.set_files(str(exported))
    wait_for(lambda: "report.pdf · 6 pages" in fresh.page.locator("#chatbot").inner_text(), what="the imported PDF")
    fresh.send("What colour is the shape?")
    assert fresh.wait_reply_done().strip() == "The shape is red."
