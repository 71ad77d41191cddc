"""Several people at once in real Chromium: replies decoded together, a place in line shown while waiting."""

import re
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import serve, wait_until
from tests.e2e.conftest import ChatPage, open_page

pytestmark = pytest.mark.browser
EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"


def long_reply(chat: ChatPage, tokens: int) -> None:
    chat.set_control("max-new-tokens", tokens)
    chat.set_control("temperature", 1)


def new_tokens(chat: ChatPage) -> int:
    found = re.search(r"New tokens\s+(\d+)", chat.meters())
    return int(found[1]) if found else 0


def test_two_people_are_answered_together(browser, random_app_server):
    """The default batch (4 on CPU): both replies stream at the same time, neither waits for the other."""
    with open_page(browser, random_app_server[1]) as a, open_page(browser, random_app_server[1]) as b:
        first, second = ChatPage(a), ChatPage(b)
        for chat in (first, second):
            long_reply(chat, 600)
        first.send("Tell me a long story.", str(EXAMPLES / "red_circle.png"))
        assert wait_until(lambda: new_tokens(first) > 5, 30)
        second.send("And me another.", str(EXAMPLES / "blue_square.png"))
        assert wait_until(lambda: new_tokens(second) > 5, 30)
        running = new_tokens(first)
        assert 5 < running < 600, "the first reply was not still streaming when the second began"
        for chat in (first, second):
            chat.wait_reply_done(120)
            assert "length" in chat.meters() and new_tokens(chat) == 600


def test_a_waiting_person_sees_their_place_in_line(browser, settings, random_handle):
    """--batch 1: the second person sees they are first in line, then gets their reply once the first stops."""
    with serve(replace(settings, batch=1), random_handle) as served, \
            open_page(browser, served[1]) as a, open_page(browser, served[1]) as b:
        first, second = ChatPage(a), ChatPage(b)
        long_reply(first, 2000)
        second.set_control("max-new-tokens", 16)
        first.send("Tell me everything.", str(EXAMPLES / "green_triangle.png"))
        assert wait_until(lambda: new_tokens(first) > 5, 30)
        second.send("Is it my turn?", str(EXAMPLES / "yellow_circle.png"))
        assert wait_until(lambda: "1st in line" in "".join(second.bot_texts()), 15)
        assert "Place in line" in second.meters() and "1st" in second.meters()
        time.sleep(1.0)
        assert "1st in line" in second.bot_texts()[-1]  # still waiting: one reply at a time
        first.page.locator("#stop").click()
        reply = second.wait_reply_done(60)
        assert "in line" not in reply and new_tokens(second) == 16
        assert re.search(r"Time to first token\s+[\d.]+ s \([\d.]+ s of it in line\)", second.meters())
