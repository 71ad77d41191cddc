"""A new user's session in real Chromium: attach, ask, watch, inspect, stop, retry, undo, edit, clear, refusals."""

import re
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import replying, wait_until

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "assets" / "examples"
SCREENSHOT = ROOT / "docs" / "screenshot.png"


def long_sampling(chat, tokens=2000, seed=1):
    """Settings that make the random-weight model write for several seconds (something to watch and stop)."""
    chat.set_control("max-new-tokens", tokens)
    chat.set_control("temperature", 1)
    chat.set_control("seed", seed)


def test_two_images_streamed_reply_and_inspector(random_chat):
    chat = random_chat
    long_sampling(chat, tokens=1200)
    chat.send("What colour is the first image? And the second?", str(EXAMPLES / "red_circle.png"),
              str(EXAMPLES / "blue_square.png"))
    # The token count in the meters only grows (the rendered text may not: markdown can shrink by a character
    # as a token arrives, and before the first token the bubble says what is happening).
    counts = []
    deadline = time.time() + 60
    while time.time() < deadline and (not counts or not chat.input_ready()):
        if found := re.search(r"New tokens\s+(\d+)", chat.meters()):
            counts.append(int(found[1]))
        time.sleep(0.1)
    final = chat.wait_reply_done()
    assert len(set(counts)) >= 3 and counts == sorted(counts), f"the reply did not visibly grow: {counts}"
    # The meters' last update may land just after the input unlocks.
    assert wait_until(lambda: re.search(r"New tokens\s+1200\b", chat.meters()), 10), chat.meters()
    assert len(final) > 1000
    # Both images appear numbered in the chat ...
    chatbot = chat.page.locator("#chatbot").inner_text()
    assert "Image 1" in chatbot and "Image 2" in chatbot
    # ... and in both inspector galleries with their sizes.
    for gallery, size in [("inspector-lowres", "384×384"), ("inspector-highres", "1024×1024")]:
        text = chat.page.locator(f"#{gallery}").inner_text()
        assert "Image 1 · red_circle.png · 480×360 → " + size in text
        assert "Image 2 · blue_square.png · 360×480 → " + size in text
        assert chat.page.locator(f"#{gallery} img").count() >= 2
    meters = chat.meters()
    assert "2 image(s) × 576" in meters and "Time to first token" in meters and "length" in meters


def _finished_by_surface(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "metrics").text):
        for sample in family.samples:
            if sample.name == "dsvl_requests_finished_total":
                counts[sample.labels["surface"]] = counts.get(sample.labels["surface"], 0) + sample.value
    return counts


def test_the_bundled_checkpoint_answers_what_it_sees(chat, app_server):
    """Greedy (the default): the trained tiny checkpoint names the colour and the shape, and stops by itself."""
    before = _finished_by_surface(app_server[1])
    banner = chat.page.locator("#model-banner").inner_text()
    assert "bundled tiny demo checkpoint" in banner and "not DeepSeek-VL" in banner
    chat.send("What colour is the shape?", str(EXAMPLES / "red_circle.png"))
    assert chat.wait_reply_done().strip() == "The shape is red."
    assert "eos" in chat.meters()  # it ended its sentence by itself
    chat.send("What shape is it?")  # a follow-up about the same image
    assert chat.wait_reply_done().strip() == "It is a circle."
    after = _finished_by_surface(app_server[1])  # the browser's replies are counted as the UI's
    assert after["ui"] - before["ui"] >= 2
    assert all(after[s] == before[s] for s in ("chat", "v1", "mcp")), (before, after)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    chat.page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_it_tells_the_first_image_from_the_second(chat):
    """Two images in one message, then a third image in a later turn: "first"/"second" pick the right one."""
    chat.send("What colour is the second image?", str(EXAMPLES / "blue_square.png"), str(EXAMPLES / "yellow_circle.png"))
    assert chat.wait_reply_done().strip() == "The second image is yellow."
    chat.send("What colour is the first image?")
    assert chat.wait_reply_done().strip() == "The first image is blue."


def test_examples_fill_the_box_and_get_right_answers(chat):
    chat.page.get_by_text("What shape is it?").first.click()
    chat.page.wait_for_function("() => document.querySelectorAll('#chat-input img').length === 1")
    assert chat.page.locator("#chat-input textarea").input_value() == "What shape is it?"
    chat.page.locator("#chat-input textarea").press("Enter")
    assert chat.wait_reply_done().strip() == "It is a triangle."


def test_stop_really_halts_generation(random_chat, random_app_server):
    chat, engine = random_chat, random_app_server.engine
    long_sampling(chat, tokens=2000)
    chat.send("Tell me everything.", str(EXAMPLES / "green_triangle.png"))
    chat.page.wait_for_function(
        "() => { const b = document.querySelectorAll('#chatbot [data-testid=bot]'); return b.length && b[b.length-1].innerText.length > 20; }"
    )
    assert replying(engine), "expected a running reply"
    chat.page.locator("#stop").click()
    assert wait_until(lambda: not replying(engine), 1.0), "the reply kept running on the model after Stop"
    stopped_at = chat.bot_texts()[-1]
    time.sleep(1.0)
    assert chat.bot_texts()[-1] == stopped_at, "the reply kept growing after Stop"
    assert "stopped" in chat.meters()
    chat.page.wait_for_function("() => !document.querySelector('#chat-input textarea').disabled")
    # The chat is still usable.
    chat.set_control("max-new-tokens", 8)
    chat.send("And now?")
    chat.wait_reply_done()
    assert len(chat.bot_texts()) == 2


def test_retry_undo_edit_clear(random_chat):
    chat = random_chat  # sampling from random weights gives a different reply per seed
    chat.set_control("max-new-tokens", 24)
    chat.set_control("temperature", 1)
    chat.set_control("seed", 1)
    chat.send("What shape is it?", str(EXAMPLES / "green_triangle.png"))
    first = chat.wait_reply_done()
    assert first

    chat.set_control("seed", 2)
    chat.page.locator('#chatbot button[aria-label="Retry"]').click()
    time.sleep(0.5)
    retried = chat.wait_reply_done()
    assert len(chat.bot_texts()) == 1 and retried != first

    chat.page.locator('#chatbot button[aria-label="Edit"]').first.click()
    chat.page.locator("#chatbot textarea").fill("What colour is it?")
    chat.page.locator('#chatbot button[aria-label="Submit"]').click()
    time.sleep(0.5)
    chat.wait_reply_done()
    text = chat.page.locator("#chatbot").inner_text()
    assert "What colour is it?" in text and "What shape is it?" not in text
    assert "Image 1" in text and len(chat.bot_texts()) == 1  # the image stayed with the edited message

    chat.page.locator('#chatbot button[aria-label="Undo"]').click()
    chat.page.wait_for_function("() => !document.querySelectorAll('#chatbot [data-testid=bot]').length")
    assert chat.page.locator("#chat-input textarea").input_value() == "What colour is it?"
    assert chat.page.locator("#chat-input img").count() == 1  # the image came back into the box too

    chat.send("Again?")
    chat.wait_reply_done()
    chat.page.locator("#clear").click()
    chat.page.wait_for_function("() => !document.querySelectorAll('#chatbot [data-testid=user]').length")
    assert chat.page.locator("#inspector-lowres img").count() == 0
    assert "No reply yet" in chat.meters()


def test_non_image_file_is_refused_and_conversation_survives(chat, tmp_path):
    chat.set_control("max-new-tokens", 8)
    chat.send("First question", str(EXAMPLES / "red_circle.png"))
    chat.wait_reply_done()
    fake = tmp_path / "holiday.png"
    fake.write_text("this is a text file, not a picture")
    chat.send("What is this?", str(fake))
    message = chat.toast_text()
    assert "holiday.png" in message and "text file" in message
    chat.page.wait_for_function("() => !document.querySelector('#chat-input textarea').disabled")
    assert chat.user_count() == 2 and len(chat.bot_texts()) == 1  # image + text of the first turn, intact
    assert chat.page.locator("#chat-input textarea").input_value() == "What is this?"  # the message is back
    # Replace the bad file with a good one and carry on.
    chat.page.locator('#chat-input button[aria-label="Remove file"], #chat-input [aria-label*="emove"]').first.click()
    chat.send("What is this?", str(EXAMPLES / "blue_square.png"))
    chat.wait_reply_done()
    assert len(chat.bot_texts()) == 2 and "Image 2" in chat.page.locator("#chatbot").inner_text()


def test_an_attached_image_is_encoded_before_enter_and_later_turns_are_reused(chat, handle, tmp_path):
    """Encode on attach, then the meters show what the reply did not recompute."""
    from PIL import ImageDraw

    from dsvl_app.media import load_image
    from dsvl_app.reuse import image_keys
    from dsvl_app.settings import Limits

    path = tmp_path / "purple_square.png"  # drawn now: no earlier test can have encoded it
    image = Image.new("RGB", (300, 220), (235, 235, 225))
    ImageDraw.Draw(image).rectangle((90, 50, 210, 170), fill=(128, 0, 160))
    image.save(path)
    pixels = handle.processor.image_processor(images=[load_image(path, Limits())], return_tensors="pt")
    key = image_keys(pixels)[0]
    assert handle.reuse.get_features(key) is None
    chat.attach(str(path))
    deadline = time.time() + 30
    while handle.reuse.get_features(key) is None and time.time() < deadline:
        time.sleep(0.1)
    assert handle.reuse.get_features(key) is not None, "the attached image was not encoded while the model was idle"
    chat.send("What colour is the shape?")
    assert chat.wait_reply_done().strip() == "The shape is purple."
    assert "1 of 1 image(s) not re-encoded" in chat.meters()
    chat.send("What shape is it?")
    assert chat.wait_reply_done().strip() == "It is a square."
    reused = chat.meters().split("Reused from earlier turns")[1].split("\n")[0]
    tokens, total = (int(n.replace(",", "")) for n in reused.split("prompt tokens")[0].split(" of "))
    assert 576 < tokens < total and "1 of 1 image(s) not re-encoded" in reused


def test_the_browser_and_a_v1_client_at_once(chat, app_server):
    """A person in the UI and a program on /v1 share the model and get their own answers."""
    import base64
    import threading

    import openai

    client = openai.OpenAI(base_url=app_server[1] + "v1", api_key="unused", max_retries=0, timeout=120)
    image = "data:image/png;base64," + base64.b64encode((EXAMPLES / "blue_square.png").read_bytes()).decode()
    answers = {}

    def program():
        answers["v1"] = client.chat.completions.create(model="tiny-dsvl-hybrid", temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": "What colour is the shape?"}]}]).choices[0].message.content

    thread = threading.Thread(target=program)
    chat.send("What colour is the shape?", str(EXAMPLES / "red_circle.png"))
    thread.start()
    assert chat.wait_reply_done().strip() == "The shape is red."
    thread.join(60)
    assert answers["v1"].strip() == "The shape is blue."


def test_thumbnails_stop_only_while_replying_and_the_api_footer(random_chat):
    chat = random_chat
    page = chat.page
    assert page.get_by_text("Use via API").is_visible()  # the footer with the API page
    assert not page.locator("#stop").is_visible()  # nothing runs: no Stop
    long_sampling(chat, tokens=600)
    chat.send("Describe it.", str(EXAMPLES / "green_triangle.png"))
    page.wait_for_selector("#stop", state="visible", timeout=10_000)
    page.locator("#stop").click()
    page.wait_for_selector("#stop", state="hidden", timeout=10_000)
    thumbnail = page.locator('#chatbot [data-testid="user"]:has-text("Image 1") img').first
    box = thumbnail.bounding_box()
    assert box["height"] <= 100 and box["width"] <= 210  # compact, whatever the image's size
    thumbnail.click()  # enlarges it
    page.wait_for_function("() => document.fullscreenElement && document.fullscreenElement.querySelector('img')")
    assert page.evaluate("() => document.fullscreenElement.querySelector('img').getBoundingClientRect().height") > 300


def test_a_json_schema_answer_is_held_to_the_schema_and_shown_formatted(chat):
    """Answer format → JSON schema: the schema box appears (an example in it); the reply is JSON matching it, shown
    indented in a code block; back to Text, the next answer is prose again."""
    import json

    page = chat.page
    assert not page.locator("#json-schema").is_visible()
    page.locator("#answer-format label", has_text="JSON schema").click()
    assert wait_until(lambda: page.locator("#json-schema").is_visible(), 10)
    chat.send("What colour is the shape?", str(EXAMPLES / "red_circle.png"))
    chat.wait_reply_done()
    block = page.locator('#chatbot [data-testid="bot"] pre code').last
    assert wait_until(lambda: block.count() and "\n" in block.inner_text(), 10)
    answer = json.loads(block.inner_text())
    assert set(answer) == {"colour", "shape"} and answer["shape"] in ("circle", "square", "triangle", "other")
    page.locator("#answer-format label", has_text="Text").first.click()
    chat.send("What colour is the shape?", str(EXAMPLES / "blue_square.png"))
    assert chat.wait_reply_done().strip().startswith("The shape is")  # prose again


def test_a_pdf_attached_with_pages_chosen_is_answered_and_its_pages_inspected(chat, tmp_path):
    """A 10-page PDF, pages 2-3 chosen: the answer; the meters and a toast say which pages were seen how; the
    inspector shows the two page images the model received."""
    from tests.unit.test_documents import make_pdf

    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(make_pdf(10))
    page = chat.page
    pages = page.locator("#pdf-pages input, #pdf-pages textarea").first
    pages.fill("2-3")
    pages.blur()
    page.locator("#chat-input input[type=file]").set_input_files([str(pdf)])
    thumbnail = page.locator('#chat-input [aria-label="File thumbnail"]')
    assert wait_until(lambda: thumbnail.count() == 1, 30)  # (a file icon: no image thumbnail for a PDF)
    chat.send("What colour is the shape?")
    assert chat.wait_reply_done().strip() == "The shape is red."
    meters = chat.meters()
    assert "“report.pdf”, 10 pages: pages 2-3 as images; the text of pages 1, 4-10" in meters
    low = page.locator("#inspector-lowres").inner_text()
    assert "report-p2.png" in low and "report-p3.png" in low and "report-p1.png" not in low
    assert page.locator("#inspector-lowres img").count() == 2


def test_the_inspector_shows_each_view_whole_with_its_caption_below(chat):
    """A 1400-px window, two images: no caption covers its view, no label covers a view, no gap between galleries."""
    page = chat.page
    page.set_viewport_size({"width": 1400, "height": 1000})
    chat.send("What colour is the first image?", str(EXAMPLES / "red_circle.png"), str(EXAMPLES / "blue_square.png"))
    chat.wait_reply_done()
    for gallery in ("#inspector-lowres", "#inspector-highres"):
        assert wait_until(lambda g=gallery: page.locator(f"{g} .thumbnail-item img").count() == 2, 10)
        label = page.locator(f"{gallery} label").first.bounding_box()
        for item in page.locator(f"{gallery} .thumbnail-item").all():
            image = item.locator("img").bounding_box()
            caption = item.locator(".caption-label").bounding_box()
            assert caption["y"] >= image["y"] + image["height"] - 1, (caption, image)  # below, not over it
            assert image["y"] >= label["y"] + label["height"] - 1, (image, label)  # the gallery's label is above
    low = page.locator("#inspector-lowres").bounding_box()
    high = page.locator("#inspector-highres").bounding_box()
    assert high["y"] - (low["y"] + low["height"]) < 40  # no large gap between the two galleries
