"""The demo page (the reference client) against the real stack in Chromium, with eight-second
tokens: each refreshed token is handed to the open live feed in-band (`websocket.reauth`), so the
feed never reconnects; and a streamed chat completion that outlives its token ends with the
sidecar's `auth_expired` event, which the page shows and answers by refreshing and asking again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.demo_stack import Stack, demo_stack
from tests.upstream_demo.test_demo_recovery_browser import TOKEN_TTL_S

pytestmark = pytest.mark.browser

# Counts every WebSocket the page constructs (a reconnect is a second one).
COUNT_SOCKETS = """
(() => {
  const Native = window.WebSocket;
  window.__sockets = 0;
  window.WebSocket = function (...args) { window.__sockets += 1; return new Native(...args); };
  window.WebSocket.prototype = Native.prototype;
  Object.assign(window.WebSocket, { CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3 });
})();
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log = tmp_path_factory.mktemp("reauth") / "stack.log"
    args = ("--token-ttl", str(TOKEN_TTL_S), "--event-interval", "1")
    # A chat answer takes ~12 s (longer than a token); the demo config's 30 s leeway would let
    # a token outlive these tests: 1 s here.
    with demo_stack(
        log,
        *args,
        "--chat-token-delay",
        "0.5",
        env={"AUTHPROXY__AUTH__JWT__PROVIDERS__0__LEEWAY_S": "1"},
    ) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def log_in(context: BrowserContext, stack: Stack) -> Page:
    page = context.new_page()
    page.goto(stack.page_url)
    page.click("#prefill-admin")
    page.click("#login-button")
    expect(page.locator("#user")).to_have_text("admin@example.com")
    expect(page.locator("#ws-state")).to_have_text("open", timeout=10_000)
    return page


def test_the_live_feed_stays_open_across_token_refreshes(browser: Browser, stack: Stack) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(COUNT_SOCKETS)
    page = log_in(context, stack)
    try:
        events = page.locator("#events")
        # Refreshes at 3/4 of each token's life: two of them in 14 s, each handed to the socket.
        expect(events).to_contain_text("fresh token handed to the open feed", timeout=10_000)
        page.wait_for_timeout(14_000 - 6_000)
        handed = events.locator("li", has_text="fresh token handed to the open feed")
        assert 2 <= handed.count() <= 3  # at 3/4 of each token's life, not every second
        assert page.evaluate("window.__sockets") == 1  # never reconnected
        expect(page.locator("#ws-state")).to_have_text("open")
        assert "4401" not in events.inner_text()
        # Model events still flow on the one socket, well past the first token's expiry.
        expect(events.locator("li.event").first).to_be_visible(timeout=5_000)
    finally:
        context.close()


def test_a_chat_stream_that_outlives_its_token_shows_auth_expired_and_asks_again(
    browser: Browser, stack: Stack
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = log_in(context, stack)
    try:
        expect(page.locator("#models-body tr").first).to_be_visible(timeout=10_000)
        page.click("#chat-button")
        expect(page.locator("#chat-answer")).to_contain_text("Hello", timeout=5_000)
        events = page.locator("#events")
        expect(events).to_contain_text(
            "chat stream ended by the sidecar: auth_expired (token_expired)", timeout=15_000
        )
        # It refreshed and asked again: the answer starts over after the marker.
        expect(page.locator("#chat-answer")).to_contain_text("⟲ Hello", timeout=10_000)
        assert not page.locator("#error-box").is_visible()
    finally:
        context.close()
