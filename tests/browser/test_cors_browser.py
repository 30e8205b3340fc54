"""CORS as Chromium judges it: what a page on an allowed origin can do through the sidecar, and what
a page on any other origin cannot."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from playwright.sync_api import Page

from tests.browser.conftest import ARTIFACTS, Origin, access_lines, token
from tests.support.servers import Sidecar

pytestmark = pytest.mark.browser


def probe(
    page: Page, url: str, init: dict[str, Any] | None = None, read: tuple[str, ...] = ()
) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate(
        "([url, init, read]) => probe(url, init, read)", [url, init or {}, list(read)]
    )
    return result


def lines_for(
    sidecar: Sidecar, path: str, count: int = 1, origin: str | None = None, timeout: float = 3.0
) -> list[dict[str, Any]]:
    """The access lines for `path`, once at least `count` have been written (each is written
    just after its response is sent, so it may lag behind what the page saw)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [
            x for x in access_lines(sidecar) if x["path"] == path and origin in (None, x["origin"])
        ]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def requests_to(sidecar: Sidecar, path: str, count: int = 1) -> list[str]:
    """The methods of the requests the sidecar logged for `path`."""
    return [x["method"] for x in lines_for(sidecar, path, count)]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def test_allowed_page_makes_a_credentialed_fetch_and_reads_body_and_exposed_header(
    allowed_page: Page, sidecar: Sidecar
) -> None:
    path = f"/private/{unique('me')}"
    result = probe(
        allowed_page,
        sidecar.url + path,
        {
            "credentials": "include",
            "headers": {"Authorization": f"Bearer {token()}", "X-Custom": "hello"},
        },
        read=("X-Total-Count", "X-Request-ID"),
    )
    assert "error" not in result, result
    assert result["status"] == 200
    seen = {k.lower(): v for k, v in result["body"]["headers"]}
    assert seen["x-custom"] == "hello"
    assert seen["x-auth-subject"] == "alice"
    assert "authorization" not in seen
    assert result["headers"]["X-Total-Count"] == "3"  # exposed
    assert result["headers"]["X-Request-ID"] is None  # sent, but not exposed to this page
    # Authorization and X-Custom made Chromium preflight, and the sidecar answered it.
    assert requests_to(sidecar, path, count=2) == ["OPTIONS", "GET"]

    ARTIFACTS.mkdir(exist_ok=True)
    allowed_page.screenshot(path=str(ARTIFACTS / "cors-allowed-page.png"), full_page=True)


def test_disallowed_page_gets_a_cors_failure(
    disallowed_page: Page, sidecar: Sidecar, disallowed_origin: Origin
) -> None:
    path = f"/echo/{unique('simple')}"
    result = probe(disallowed_page, sidecar.url + path)
    assert result.get("error") == "TypeError", result
    # The request reached the sidecar, which refused it (not a network failure).
    [line] = lines_for(sidecar, path)
    assert line["status"] == 403 and line["origin"] == disallowed_origin.url
    assert line["upstream_status"] is None

    ARTIFACTS.mkdir(exist_ok=True)
    disallowed_page.screenshot(path=str(ARTIFACTS / "cors-disallowed-page.png"), full_page=True)


def test_disallowed_page_gets_a_cors_failure_at_the_preflight(
    disallowed_page: Page, sidecar: Sidecar
) -> None:
    path = f"/private/{unique('pre')}"
    result = probe(
        disallowed_page,
        sidecar.url + path,
        {"credentials": "include", "headers": {"Authorization": f"Bearer {token()}"}},
    )
    assert result.get("error") == "TypeError", result
    assert requests_to(sidecar, path) == ["OPTIONS"]  # the GET was never sent


def test_sidecar_401_is_readable_by_the_allowed_page(allowed_page: Page, sidecar: Sidecar) -> None:
    result = probe(allowed_page, f"{sidecar.url}/private/x", {"credentials": "include"})
    assert "error" not in result, result
    assert result["status"] == 401
    assert result["body"]["error"] == "unauthorized"


def test_repeated_preflighted_requests_within_max_age_send_one_preflight(
    allowed_page: Page, sidecar: Sidecar
) -> None:
    path = f"/echo/{unique('cache')}"
    init = {
        "method": "PUT",
        "credentials": "include",
        "headers": {"X-Custom": "1", "Content-Type": "application/json"},
        "body": "{}",
    }
    for _ in range(2):
        result = probe(allowed_page, sidecar.url + path, init)
        assert result.get("status") == 200, result
    methods = requests_to(sidecar, path, count=3)
    assert methods.count("PUT") == 2
    assert methods.count("OPTIONS") == 1, methods


def open_socket(page: Page, url: str) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate("([url]) => openSocket(url, 5000)", [url])
    return result


def test_websocket_from_the_allowed_page_connects(
    allowed_page: Page, sidecar: Sidecar, allowed_origin: Origin
) -> None:
    secret = token()
    result = open_socket(allowed_page, f"{sidecar.ws_url}/ws?access_token={secret}")
    assert result == {"opened": True, "echo": f"hello from {allowed_origin.url}"}
    assert secret not in sidecar.output()


def test_websocket_from_the_disallowed_page_does_not_connect(
    disallowed_page: Page, sidecar: Sidecar, disallowed_origin: Origin
) -> None:
    result = open_socket(disallowed_page, f"{sidecar.ws_url}/ws?access_token={token()}")
    assert result == {"opened": False, "code": 1006}
    refused = lines_for(sidecar, "/ws", origin=disallowed_origin.url)
    assert [x["status"] for x in refused] == [403]
