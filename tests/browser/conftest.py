"""A real Chromium (Debian's, driven by Playwright) on two page origins in front of a real sidecar.

One origin is allowed by the sidecar's CORS policy, the other is not; both serve the same probe page
(pages/index.html). The browser is launched once per module; each test gets fresh contexts, so no
preflight cache or connection is shared between tests.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.servers import ROOT, Process, Sidecar, start_sidecar, start_upstream

PAGES = Path(__file__).parent / "pages"
ARTIFACTS = ROOT / "test-artifacts"
SECRET = "cors-browser-secret-of-at-least-32-bytes!"
MAX_AGE_S = 600


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Origin:
    """A static HTTP server for the probe page, on its own port: its own origin."""

    server: ThreadingHTTPServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def serve_pages() -> Origin:
    handler = functools.partial(_QuietHandler, directory=str(PAGES))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="pages", daemon=True)
    thread.start()
    return Origin(server, thread)


def token(sub: str = "alice", ttl: int = 300) -> str:
    now = int(time.time())
    claims = {"iss": "https://idp.test", "aud": "api", "sub": sub, "iat": now, "exp": now + ttl}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def access_lines(sidecar: Sidecar) -> list[dict[str, Any]]:
    """The sidecar's access-log lines so far (one JSON object per request or session)."""
    lines = [json.loads(x) for x in sidecar.output().splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("message") == "request"]


@pytest.fixture(scope="module")
def allowed_origin() -> Iterator[Origin]:
    origin = serve_pages()
    yield origin
    origin.stop()


@pytest.fixture(scope="module")
def disallowed_origin() -> Iterator[Origin]:
    origin = serve_pages()
    yield origin
    origin.stop()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    process = start_upstream("tests.browser.ws_echo:app", tmp_path_factory.mktemp("upstream"))
    yield process
    process.stop()


def sidecar_body(allowed_origin: Origin, websocket: str = "") -> str:
    """The browser tests' sidecar: CORS for the allowed page, JWT routes; `websocket`: more
    `[websocket]` keys."""
    return f"""
    [websocket]
    drain_s = 0
    {websocket}

    [cors]
    allow_origins = ["{allowed_origin.url}"]
    allow_credentials = true
    allow_headers = ["*"]
    expose_headers = ["X-Total-Count"]
    max_age_s = {MAX_AGE_S}

    [[auth.jwt.providers]]
    name = "t"
    issuer = "https://idp.test"
    audiences = ["api"]
    secret_env = "TEST_HS_SECRET"
    algorithms = ["HS256"]

    [[routes]]
    path = "/private/*"
    auth = ["jwt"]

    [[routes]]
    path = "/ws"
    auth = ["jwt"]

    [[routes]]
    path = "/echo/*"
    auth = "public"
    """


@pytest.fixture(scope="module")
def sidecar(
    tmp_path_factory: pytest.TempPathFactory, upstream: Process, allowed_origin: Origin
) -> Iterator[Sidecar]:
    s = start_sidecar(
        tmp_path_factory.mktemp("sidecar"),
        upstream.port,
        sidecar_body(allowed_origin),
        env={"TEST_HS_SECRET": SECRET},
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is not installed (make test installs Debian's chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser: Browser, origin: Origin) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    page.goto(origin.url + "/index.html")
    yield page
    context.close()


@pytest.fixture
def allowed_page(browser: Browser, allowed_origin: Origin) -> Iterator[Page]:
    """The probe page on the origin the sidecar allows."""
    yield from open_page(browser, allowed_origin)


@pytest.fixture
def disallowed_page(browser: Browser, disallowed_origin: Origin) -> Iterator[Page]:
    """The probe page on an origin the sidecar does not allow."""
    yield from open_page(browser, disallowed_origin)
