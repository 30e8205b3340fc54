"""A WebSocket outlives no withdrawn signing key: through a real sidecar, a JWKS endpoint (and a
JWKS file reloaded on SIGHUP) that drops a key closes exactly the sessions that key verified with
4401, while an endpoint that is down withdraws nothing."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from tests.auth.support import public_jwk, rsa_key
from tests.relay.test_websocket_tunnel import close_of, open_ws, stats, wait_for, ws_log_lines
from tests.support.servers import Process, Sidecar, start_sidecar, start_upstream

IDP, FILES = "https://idp.test", "https://files.test"
WITHDRAWN = (4401, "signing key withdrawn")

CONFIG = """
[[auth.jwt.providers]]
name = "idp"
issuer = "{idp}"
audiences = ["webplus"]
jwks_url = "{jwks_url}"
algorithms = ["RS256"]
leeway_s = 0
jwks_refresh_s = 5
jwks_min_refresh_s = 1

[[auth.jwt.providers]]
name = "files"
issuer = "{files}"
audiences = ["webplus"]
jwks_file = "{jwks_file}"
algorithms = ["RS256"]
leeway_s = 0

[[routes]]
path = "/ws/*"
auth = ["jwt"]
"""


@dataclass
class JwksEndpoint:
    """A JWKS URL on a thread of its own (the sidecar's first fetch happens while the test waits
    synchronously for readiness), asking to be refetched every second."""

    keys: list[dict[str, Any]]
    down: bool = False
    fetches: int = 0
    failed: int = 0
    url: str = ""
    _server: ThreadingHTTPServer | None = field(default=None, repr=False)

    def start(self) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoint.fetches += 1
                if endpoint.down:
                    endpoint.failed += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"keys": endpoint.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "max-age=1")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/jwks.json"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@dataclass
class Stack:
    sidecar: Sidecar
    upstream: Process
    jwks: JwksEndpoint
    jwks_file: Path


def jwks_doc(*names: str) -> str:
    return json.dumps({"keys": [public_jwk(rsa_key(n), n) for n in names]})


def token(issuer: str, key: str, sub: str = "alice") -> str:
    now = int(time.time())
    payload = {"iss": issuer, "aud": "webplus", "sub": sub, "iat": now, "exp": now + 300}
    return jwt.encode(payload, rsa_key(key), algorithm="RS256", headers={"kid": key})


def bearer(issuer: str, key: str, sub: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(issuer, key, sub)}"}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    jwks = JwksEndpoint([public_jwk(rsa_key(n), n) for n in ("idp-old", "idp-stays")])
    jwks.start()
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(jwks_doc("file-old", "file-stays"))
    upstream = start_upstream("tests.support.ws_upstream:app", tmp_path)
    body = CONFIG.format(idp=IDP, files=FILES, jwks_url=jwks.url, jwks_file=jwks_file)
    sidecar = start_sidecar(tmp_path, upstream.port, body)
    yield Stack(sidecar, upstream, jwks, jwks_file)
    sidecar.stop()
    upstream.stop()
    jwks.stop()


async def echoes(ws: ClientConnection, text: str = "still here") -> bool:
    await ws.send(text)
    async with asyncio.timeout(5):
        return await ws.recv() == text


async def refused(sidecar: Sidecar, headers: dict[str, str]) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(sidecar, headers=headers):
            pass
    return info.value.response.status_code


async def test_a_key_dropped_from_the_jwks_closes_its_sessions_with_4401_and_no_others(
    stack: Stack,
) -> None:
    sidecar, upstream, jwks = stack.sidecar, stack.upstream, stack.jwks
    before = len(stats(upstream)["closes"])
    old = await open_ws(sidecar, headers=bearer(IDP, "idp-old"))
    stays = await open_ws(sidecar, headers=bearer(IDP, "idp-stays"))
    opened = [old, stays]
    try:
        assert await echoes(old) and await echoes(stays)

        # The endpoint goes down: refreshes fail, the last good keys keep serving, no session
        # is closed, and a new session signed by the soon-withdrawn key is still admitted.
        jwks.down = True
        await wait_for(lambda: jwks.failed >= 2, timeout=8)
        assert "serving the last good keys" in sidecar.output()
        late = await open_ws(sidecar, headers=bearer(IDP, "idp-old", sub="late"))
        opened.append(late)
        assert await echoes(old) and await echoes(stays) and await echoes(late)

        # It comes back without `idp-old`: the next refresh closes what that key verified.
        jwks.keys = [public_jwk(rsa_key("idp-stays"), "idp-stays")]
        jwks.down = False
        started = time.monotonic()
        assert await close_of(old, timeout=12) == WITHDRAWN
        assert await close_of(late, timeout=2) == WITHDRAWN
        assert time.monotonic() - started < 10
        assert await echoes(stays, "untouched")
        assert await refused(sidecar, bearer(IDP, "idp-old")) == 401
    finally:
        for ws in opened:
            await ws.close()
    await wait_for(lambda: len(stats(upstream)["closes"]) >= before + 3)
    closes = stats(upstream)["closes"][before:]
    assert closes.count([1001, "signing key withdrawn"]) == 2
    ended = [line for line in ws_log_lines(sidecar) if line.get("end") == "signing_key_withdrawn"]
    assert sorted(line["subject"] for line in ended) == ["alice", "late"]
    assert all(line["close_code"] == 4401 for line in ended)


async def test_a_key_dropped_from_a_jwks_file_closes_its_sessions_on_sighup(stack: Stack) -> None:
    sidecar = stack.sidecar
    old = await open_ws(sidecar, headers=bearer(FILES, "file-old"))
    stays = await open_ws(sidecar, headers=bearer(FILES, "file-stays"))
    elsewhere = await open_ws(sidecar, headers=bearer(IDP, "idp-old"))
    try:
        assert await echoes(old) and await echoes(stays) and await echoes(elsewhere)
        stack.jwks_file.write_text("{ half a file")  # a bad file keeps the keys
        sidecar.process.signal(signal.SIGHUP)
        await wait_for(lambda: "keeping the old keys" in sidecar.output())
        assert await echoes(old)
        stack.jwks_file.write_text(jwks_doc("file-stays"))
        sidecar.process.signal(signal.SIGHUP)
        assert await close_of(old, timeout=5) == WITHDRAWN
        assert await echoes(stays, "untouched") and await echoes(elsewhere, "untouched")
        assert await refused(sidecar, bearer(FILES, "file-old")) == 401
    finally:
        for ws in (old, stays, elsewhere):
            await ws.close()
