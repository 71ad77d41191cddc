"""Chromium (Debian's) driven by Playwright against the app launched in this process."""

from __future__ import annotations

import contextlib
import time

import pytest

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"],
        )
        yield browser
        browser.close()


@contextlib.contextmanager
def open_page(browser, url: str):
    """A fresh browser context (its own session) on the app at `url`."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(url)
    page.wait_for_selector("#chat-input textarea")
    try:
        yield page
    finally:
        context.close()


@pytest.fixture
def page(browser, app_server):
    """A page on the app serving the bundled (trained) tiny checkpoint."""
    with open_page(browser, app_server[1]) as page:
        yield page


@pytest.fixture
def random_page(browser, random_app_server):
    """A page on the app serving random weights, which keep talking (for streaming and Stop)."""
    with open_page(browser, random_app_server[1]) as page:
        yield page


class ChatPage:
    """What a user does and sees, in the app's own terms."""

    def __init__(self, page):
        self.page = page

    def attach(self, *paths: str) -> None:
        self.page.locator("#chat-input input[type=file]").set_input_files(list(paths))
        self.page.wait_for_function(
            "n => document.querySelectorAll('#chat-input img').length >= n", arg=len(paths)
        )

    def send(self, text: str, *paths: str) -> None:
        if paths:
            self.attach(*paths)
        box = self.page.locator("#chat-input textarea")
        box.fill(text)
        box.press("Enter")

    def set_control(self, elem_id: str, value) -> None:
        field = self.page.locator(f"#{elem_id} input[type=number]").first
        field.fill(str(value))
        field.press("Enter")
        field.blur()

    def bot_texts(self) -> list[str]:
        """The replies shown, read at once (the chat re-renders while it streams or switches)."""
        return self.page.eval_on_selector_all('#chatbot [data-testid="bot"]', "ms => ms.map(m => m.innerText)")

    def user_count(self) -> int:
        return self.page.locator('#chatbot [data-testid="user"]').count()

    def input_ready(self) -> bool:
        return self.page.locator("#chat-input textarea").is_enabled()

    def wait_reply_done(self, timeout: float = 60) -> str:
        """Wait until the input unlocks again and the last reply stops changing."""
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            texts = self.bot_texts()
            current = texts[-1] if texts else ""
            if self.input_ready() and current == last:
                return current
            last = current
            time.sleep(0.3)
        raise AssertionError("reply did not finish")

    def meters(self) -> str:
        return self.page.locator("#meters").inner_text()

    def toast_text(self, timeout: float = 15) -> str:
        toast = self.page.locator('[data-testid="toast-body"]').first
        toast.wait_for(timeout=timeout * 1000)
        return toast.inner_text()


@pytest.fixture
def chat(page):
    return ChatPage(page)


@pytest.fixture
def random_chat(random_page):
    return ChatPage(random_page)
