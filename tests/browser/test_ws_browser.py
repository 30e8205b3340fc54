"""Chromium's WebSockets through the sidecar both ways: with permessage-deflate on the client hop
(the default; Chromium always offers it), messages take the message relay; with
`websocket.client_compression = false`, nothing is negotiated and Chromium's whole frames pass as
they arrived (relay/ws_passthrough.py). Text (ASCII and not), binary and a message over the
64 KiB whole-frame limit come back intact either way, in order, counted in the session's line."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page

from tests.browser.conftest import SECRET, Origin, open_page, sidecar_body, token
from tests.support.servers import Process, Sidecar, start_sidecar

# Opens a socket, sends each message in turn (text, or bytes given as an array of numbers) and
# waits for its echo; returns the negotiated extensions, what came back, and the close code.
ROUND_TRIPS = """
([url, messages]) => new Promise((resolve) => {
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  const back = [];
  let i = 0;
  const next = () => {
    const m = messages[i];
    ws.send(typeof m === "string" ? m : new Uint8Array(m));
  };
  ws.onopen = next;
  ws.onmessage = (ev) => {
    back.push(typeof ev.data === "string" ? ev.data : Array.from(new Uint8Array(ev.data)));
    if (++i < messages.length) next(); else ws.close(1000, "done");
  };
  ws.onclose = (ev) => resolve({ extensions: ws.extensions, back, code: ev.code });
  setTimeout(() => resolve({ timeout: true, back }), 10000);
})
"""

MESSAGES: list[Any] = [
    "hello from the page",
    "caf\u00e9 \u2603 \u00fcber",
    list(range(256)),
    "x" * 70_000,  # over the whole-frame limit: the parser's way either way
    "after the big one",
]


def session_lines(sidecar: Sidecar, subject: str) -> list[dict[str, Any]]:
    """The sidecar's WebSocket session lines for `subject`."""
    lines = [json.loads(x) for x in sidecar.output().splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("message") == "websocket" and x.get("subject") == subject]


@pytest.fixture(scope="module", params=[True, False], ids=["client-deflate", "whole-frames"])
def ws_sidecar(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    upstream: Process,
    allowed_origin: Origin,
) -> Iterator[tuple[Sidecar, bool]]:
    compress = request.param
    body = sidecar_body(allowed_origin, f"client_compression = {str(compress).lower()}")
    s = start_sidecar(
        tmp_path_factory.mktemp("ws-sidecar"), upstream.port, body, env={"TEST_HS_SECRET": SECRET}
    )
    yield s, compress
    s.stop()


@pytest.fixture
def page(browser: Browser, allowed_origin: Origin) -> Iterator[Page]:
    yield from open_page(browser, allowed_origin)


def test_chromium_messages_cross_whole_and_in_order_both_ways(
    page: Page, ws_sidecar: tuple[Sidecar, bool]
) -> None:
    sidecar, compress = ws_sidecar
    subject = f"page-{compress}"
    url = f"{sidecar.ws_url}/ws?access_token={token(subject)}"
    result = page.evaluate(ROUND_TRIPS, [url, MESSAGES])
    assert result.get("timeout") is None, result.get("back", [])[:2]
    assert result["back"] == MESSAGES
    assert result["code"] == 1000
    assert ("permessage-deflate" in result["extensions"]) == compress
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = session_lines(sidecar, subject)
        if lines:
            break
        time.sleep(0.05)
    assert len(lines) == 1
    line = lines[0]
    assert (line["messages_in"], line["messages_out"]) == (5, 5)
    expected_bytes = sum(len(m.encode()) if isinstance(m, str) else len(m) for m in MESSAGES)
    assert (line["bytes_in"], line["bytes_out"]) == (expected_bytes, expected_bytes)
    assert line["close_code"] == 1000 and line["closed_by"] == "client"
