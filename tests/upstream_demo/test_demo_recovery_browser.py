"""The reference client recovers, in Chromium, against the real stack (sidecar + upstream_demo) with
eight-second tokens: a refresh the IdP answers 502, or one the network drops, is retried until it
works; the live feed comes back; a banner about it clears itself. The faults are injected in the
browser's own network layer (Playwright's request routing), between the page and the sidecar.

Also what a viewer and a narrow window see, and that no token ever appears in a WebSocket URL or
in the browser console."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.demo_stack import Stack, demo_stack

TOKEN_TTL_S = 8  # the page refreshes at 3/4 of the lifetime: 6 s after login

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """What `make run TOKEN_TTL=8` runs, on free ports."""
    log = tmp_path_factory.mktemp("recovery") / "stack.log"
    with demo_stack(log, "--token-ttl", str(TOKEN_TTL_S), "--event-interval", "1") as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser: Browser, stack: Stack, user: str = "admin", width: int = 1280) -> Page:
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.goto(stack.page_url)
    page.click(f"#prefill-{user}")
    page.click("#login-button")
    expect(page.locator("#user")).to_have_text(f"{user}@example.com")
    expect(page.locator("#ws-state")).to_have_text("open", timeout=10_000)
    return page


def seconds_left(page: Page) -> int:
    text = page.locator("#token-expiry").inner_text()
    found = re.fullmatch(r"token (\d+) s", text)
    return int(found.group(1)) if found else 0


def test_a_refresh_answered_502_is_retried_until_it_works_and_its_banner_clears(
    browser: Browser, stack: Stack
) -> None:
    page = open_page(browser, stack)
    answered: list[str] = []

    def bad_gateway(route: Route) -> None:
        answered.append(route.request.url)
        route.fulfill(
            status=502,
            content_type="application/json",
            body='{"error": "bad_gateway", "message": "upstream down", "request_id": "t-502"}',
        )

    page.route("**/auth/refresh", bad_gateway)
    banner = page.locator("#error-box")
    expect(page.locator("#error")).to_contain_text(
        "Token refresh failed (502 bad_gateway); retrying in", timeout=15_000
    )
    deadline = time.monotonic() + 15
    while len(answered) < 2:  # retried, not given up on
        assert time.monotonic() < deadline, answered
        page.wait_for_timeout(200)
    page.unroute("**/auth/refresh")
    expect(banner).to_be_hidden(timeout=15_000)
    assert seconds_left(page) > TOKEN_TTL_S // 2  # a fresh token, not the old one running out
    expect(page.locator("#ws-state")).to_have_text("open")
    page.close()


def test_after_a_refresh_lost_on_the_network_the_live_feed_comes_back(
    browser: Browser, stack: Stack
) -> None:
    page = open_page(browser, stack)
    page.route("**/auth/refresh", lambda route: route.abort("connectionrefused"))
    expect(page.locator("#token-expiry")).to_have_text("token expired", timeout=15_000)
    # The feed has to reconnect now (its token is out): the refresh it needs fails.
    page.evaluate("() => window.authproxyDemo.socket.ws.close(4000, 'test')")
    expect(page.locator("#events .note", has_text="token refresh failed (network)")).to_have_count(
        1, timeout=10_000
    )
    state = page.locator("#ws-state")
    expect(state).to_have_text("reconnecting")
    page.wait_for_timeout(2_000)
    expect(state).not_to_have_text("closed")  # waiting to try again, not given up for good
    page.unroute("**/auth/refresh")
    expect(state).to_have_text("open", timeout=20_000)
    expect(page.locator("#error-box")).to_be_hidden()
    assert seconds_left(page) > 0
    # Re-subscribed: live events flow again on the new socket.
    count = page.locator("#events .event").count()
    expect(page.locator("#events .event")).not_to_have_count(count, timeout=10_000)
    page.close()


def test_no_token_in_a_websocket_url_or_the_console_and_a_refused_handshake_recovers(
    browser: Browser, stack: Stack
) -> None:
    page = browser.new_page()
    urls: list[str] = []
    console: list[str] = []
    page.on("websocket", lambda ws: urls.append(ws.url))
    page.on("console", lambda message: console.append(message.text))
    page.goto(stack.page_url)
    page.click("#prefill-admin")
    page.click("#login-button")
    expect(page.locator("#ws-state")).to_have_text("open", timeout=10_000)
    token = page.evaluate("() => window.authproxyDemo.session.accessToken")
    # The IdP hands out, once, a token the sidecar refuses (as after a botched key rotation). The
    # browser shows the page only a 1006 for the sidecar's 401.
    bad = "eyJhbGciOiJub25lIn0.e30.x"

    def bad_grant(route: Route) -> None:
        response = route.fetch()
        grant = {**response.json(), "access_token": bad, "expires_in": 300}
        route.fulfill(response=response, json=grant)

    page.route("**/auth/refresh", bad_grant, times=1)
    page.evaluate("() => window.authproxyDemo.socket.ws.close(4000, 'test')")
    expect(page.locator("#events .note", has_text="closed 1006 before opening")).to_have_count(
        1, timeout=10_000
    )
    # The page took the hidden refusal as a reason to refresh, and is back.
    expect(page.locator("#ws-state")).to_have_text("open", timeout=15_000)
    fresh = page.evaluate("() => window.authproxyDemo.session.accessToken")
    assert fresh not in (token, bad)
    assert len(urls) >= 3
    assert all("token" not in url and "eyJ" not in url for url in urls), urls
    text = "\n".join(console)
    assert token not in text and fresh not in text and "eyJ" not in text, text
    lines = [json.loads(x) for x in stack.log.read_text().splitlines() if x.startswith("{")]
    assert any(x.get("path") == "/ws" and x.get("status") == 401 for x in lines)
    page.close()


def test_the_viewer_sees_no_enabled_write_action_and_logout_clears_the_identity_panel(
    browser: Browser, stack: Stack
) -> None:
    page = open_page(browser, stack, "viewer")
    rows = page.locator("#models-table tr[data-model-id]")
    expect(rows).to_have_count(3)
    for button in page.locator("#models-table button").all():
        expect(button).to_be_disabled()
        expect(button).to_have_attribute("title", "needs the models:write scope")
    expect(page.locator("#create-button")).to_be_disabled()
    expect(page.locator("#model-name")).to_be_disabled()
    expect(page.locator("#create-hint")).to_be_visible()
    page.click("#whoami-button")
    expect(page.locator("#whoami")).to_contain_text("viewer@example.com")
    page.click("#logout-button")
    page.click("#prefill-admin")
    page.click("#login-button")
    expect(page.locator("#user")).to_have_text("admin@example.com")
    whoami = page.locator("#whoami")
    expect(whoami).not_to_contain_text("viewer@example.com")
    expect(whoami).to_have_text("Identity headers the sidecar sent upstream appear here.")
    expect(page.locator("#create-button")).to_be_enabled()
    expect(page.locator("#create-hint")).to_be_hidden()
    page.close()


def test_a_narrow_window_keeps_pills_on_one_line_and_event_lines_whole(
    browser: Browser, stack: Stack, tmp_path: Path
) -> None:
    page = open_page(browser, stack, "admin", width=380)
    expect(page.locator("#events .event")).not_to_have_count(0, timeout=10_000)
    expect(page.locator("#events .event")).not_to_have_count(1, timeout=10_000)
    page.evaluate("() => window.authproxyDemo.renderSocketState('reconnecting')")
    lines = page.evaluate(
        """() => [...document.querySelectorAll('.badge')].map((b) => b.getClientRects().length)"""
    )
    assert lines and all(n == 1 for n in lines), lines  # an inline box per line: 1 = no wrap
    heights = page.evaluate(
        "() => [...document.querySelectorAll('#ws-state, .badge.status-running, .badge')]"
        ".map((b) => Math.round(b.getBoundingClientRect().height))"
    )
    assert max(heights) - min(heights) <= 1, heights
    cut = page.evaluate(
        """() => [...document.querySelectorAll('#events .event')].filter((li) => {
             const what = li.querySelector('.what'), badge = what.querySelector('.badge');
             return what.scrollWidth > what.clientWidth + 1
               || badge.getBoundingClientRect().right > li.getBoundingClientRect().right;
           }).length"""
    )
    assert cut == 0
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 380  # nothing widens the page past the window
    shot = tmp_path / "narrow.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.close()


def test_a_reload_while_the_idp_is_unreachable_keeps_the_session_and_recovers(
    browser: Browser, stack: Stack
) -> None:
    page = open_page(browser, stack)
    page.route("**/auth/refresh", lambda route: route.abort("connectionrefused"))
    page.reload()  # with tokens this short, resuming the session needs a refresh at once
    expect(page.locator("#error")).to_contain_text(
        "Token refresh failed (network error)", timeout=15_000
    )
    expect(page.locator("#user")).to_have_text("admin@example.com")  # not logged out
    expect(page.locator("#login-card")).to_be_hidden()
    page.unroute("**/auth/refresh")
    expect(page.locator("#ws-state")).to_have_text("open", timeout=20_000)
    expect(page.locator("#error-box")).to_be_hidden()
    expect(page.locator("#models-table tr[data-model-id]")).not_to_have_count(0)
    page.close()
