"""The demo page in Chromium, against the demo backend behind a stand-in for the sidecar.

The real end-to-end test (the whole `make run` stack, with the real sidecar) lives with the
integration tests; this one checks the page's own client logic: login, bearer calls across origins,
the live socket with re-subscription, status updates in the table and a refreshed token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
from playwright.async_api import Page, async_playwright, expect
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from upstream_demo.app import create_app, create_web_app

ServeApp = Callable[..., AbstractAsyncContextManager[str]]


class BearerGate:
    """A minimal stand-in for the sidecar: `/api/*` needs a bearer token, `/ws` a `bearer.<token>`
    subprotocol, which it echoes back as the sidecar does (browsers fail a handshake that selects
    none of the offered subprotocols)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen_tokens: list[str] = []
        self.ws_queries: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/"):
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"").decode()
            if not auth.startswith("Bearer ") or auth == "Bearer expired":
                body = {"error": "unauthorized", "message": "token expired", "request_id": "r-1"}
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
            self.seen_tokens.append(auth.removeprefix("Bearer "))
        if scope["type"] == "websocket":
            self.ws_queries.append(scope["query_string"])
            offered = scope.get("subprotocols") or []
            bearer = next((p for p in offered if p.startswith("bearer.")), None)
            if bearer is None:
                await send({"type": "websocket.close", "code": 4401})
                return

            async def echo(message: Message) -> None:
                if message["type"] == "websocket.accept" and not message.get("subprotocol"):
                    message = {**message, "subprotocol": bearer}
                await send(message)

            await self.app(scope, receive, echo)
            return
        await self.app(scope, receive, send)


@pytest.mark.browser
async def test_the_page_logs_in_lists_models_and_shows_live_events(
    serve_app: ServeApp, tmp_path: Path
) -> None:
    # No random simulator steps: every event comes from the clicks below, so the story is exact.
    backend = create_app(event_interval=0, heartbeat_s=5, transition_s=0.3)
    gate = BearerGate(backend)
    async with serve_app(
        CORSMiddleware(
            gate,
            allow_origin_regex=r"http://127\.0\.0\.1:\d+",
            allow_credentials=True,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Total-Count", "X-Request-ID"],
        )
    ) as api:
        web = create_web_app(api_url=f"http://{api}", ws_url=f"ws://{api}/ws")
        async with serve_app(web, lifespan="off") as page_address, async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=str(CHROMIUM), chromium_sandbox=False, args=CHROMIUM_ARGS
            )
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 860})
                await page.goto(f"http://{page_address}/")
                shot = Path(os.environ.get("AUTHPROXY_ARTIFACTS_DIR", tmp_path)) / "demo-page.png"
                await run_the_story(page, gate, shot)
            finally:
                await browser.close()


async def run_the_story(page: Page, gate: BearerGate, shot: Path) -> None:
    await expect(page.locator("#ws-state")).to_have_text("closed")

    # A wrong password shows the identity provider's JSON error.
    await page.fill("#username", "admin@example.com")
    await page.fill("#password", "nope")
    await page.click("#login-button")
    await expect(page.locator("#error")).to_contain_text("invalid username or password")

    await page.click("#prefill-admin")
    await page.click("#login-button")
    await expect(page.locator("#user")).to_have_text("admin@example.com")
    rows = page.locator("#models-table tr[data-model-id]")
    await expect(rows).to_have_count(3)
    await expect(page.locator("#ws-state")).to_have_text("open")
    assert gate.seen_tokens, "the page called /api without a bearer token"
    assert gate.ws_queries == [b""], "the token rides in the subprotocol, never in the URL"
    subscribed = page.locator("#events .note", has_text="subscribed to models")
    await expect(subscribed).to_have_count(1)  # events published before this would be missed

    # Stop and start models from the table; the status cells follow the live events.
    llama = page.locator('tr[data-model-id="llama2"]')
    await expect(llama.locator("button.start")).to_be_disabled()
    await llama.locator("button.stop").click()
    await expect(llama.locator(".status")).to_have_text("stopped", timeout=5000)
    events = page.locator("#events .event")
    await expect(events).to_have_count(2)  # stopping, stopped
    await expect(events.first).to_have_attribute("data-model-id", "llama2")
    phi = page.locator('tr[data-model-id="phi-3"]')
    await phi.locator("button.start").click()
    await expect(phi.locator(".status")).to_have_text("running", timeout=5000)
    await expect(events).to_have_count(4)
    seqs = [int(s) for s in await events.evaluate_all("(els) => els.map((e) => e.dataset.seq)")]
    assert seqs == [5, 4, 3, 2]  # newest first; seq 1 was the subscribe ack

    # Create a model through the form.
    await page.fill("#model-name", "Gemma 2B")
    await page.click("#create-button")
    await expect(page.locator('tr[data-model-id="gemma-2b"]')).to_have_count(1)

    # An access token the sidecar refuses: the client refreshes once and retries.
    await page.evaluate(
        "() => { const s = window.authproxyDemo.session; s.data.accessToken = 'expired'; }"
    )
    tokens_before = len(gate.seen_tokens)
    await page.click("#whoami-button")
    await expect(page.locator("#whoami")).to_contain_text("identity_headers")
    assert len(gate.seen_tokens) > tokens_before
    assert gate.seen_tokens[-1] != "expired"

    # A dropped socket reconnects and re-subscribes.
    await page.evaluate("() => window.authproxyDemo.socket.ws.close(4000, 'test')")
    await expect(page.locator("#ws-state")).to_have_text("open", timeout=5000)
    await expect(subscribed).to_have_count(2)

    stored = await page.evaluate("() => sessionStorage.getItem('authproxy-demo-session')")
    assert json.loads(stored)["user"]["sub"] == "admin@example.com"

    shot.parent.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    await page.click("#logout-button")
    await expect(page.locator("#ws-state")).to_have_text("closed")
    await expect(page.locator("#user")).to_have_text("")
    await expect(page.locator("#login-button")).to_be_visible()
