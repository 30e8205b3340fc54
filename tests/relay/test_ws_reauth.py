"""In-band WebSocket re-authentication (`websocket.reauth`): a client hands its open socket a fresh
token instead of reconnecting; the sidecar consumes the frame, answers it, and moves the session's
expiry. Real sidecar, real echo upstream, real client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.relay.test_websocket_tunnel import (  # noqa: F401 (a fixture: every test runs both ways)
    CLIENT_COMPRESSION,
    client_compression,
    close_of,
    ws_log_lines,
)
from tests.support.servers import Process, Sidecar, start_sidecar, start_upstream

SECRET = "reauth-secret-reauth-secret-reauth-secret"
OTHER_SECRET = "another-secret-another-secret-another!!"


def config(reauth: bool = True) -> str:
    return f"""
[[auth.jwt.providers]]
name = "t"
issuer = "https://idp.test"
audiences = ["api"]
secret_env = "REAUTH_SECRET"
algorithms = ["HS256"]
leeway_s = 0
[websocket]
reauth = {"true" if reauth else "false"}
[[routes]]
path = "/ws/*"
auth = ["jwt"]
scopes = ["feed"]
"""


def token(lifetime: float, sub: str = "ada", scope: str = "feed", secret: str = SECRET) -> str:
    now = time.time()
    claims = {"iss": "https://idp.test", "aud": "api", "sub": sub, "scope": scope}
    claims |= {"iat": int(now), "exp": now + lifetime}
    return jwt.encode(claims, secret, algorithm="HS256")


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Process]:
    process = start_upstream("tests.support.ws_upstream:app", tmp_path)
    yield process
    process.stop()


@pytest.fixture
def sidecar(tmp_path: Path, upstream: Process) -> Iterator[Sidecar]:
    s = start_sidecar(tmp_path, upstream.port, config(), env={"REAUTH_SECRET": SECRET})
    yield s
    s.stop()


def open_ws(sidecar: Sidecar, bearer: str) -> connect:
    return connect(
        sidecar.ws_url + "/ws/feed",
        additional_headers={"Authorization": f"Bearer {bearer}"},
        open_timeout=5,
        ping_interval=None,
        compression=CLIENT_COMPRESSION[0],
    )


async def reauth(ws: ClientConnection, bearer: str) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "authproxy.reauth", "token": bearer}))
    reply: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
    return reply


async def closed(ws: ClientConnection, timeout: float = 10) -> tuple[int, str, float]:
    """The close code and reason (close_of), and when they came."""
    code, reason = await close_of(ws, timeout)
    return code, reason, time.time()


async def test_a_session_reauthenticated_before_expiry_outlives_its_first_token(
    sidecar: Sidecar,
) -> None:
    first, second = token(1.5), token(3.5)
    second_exp = jwt.decode(second, options={"verify_signature": False})["exp"]
    async with open_ws(sidecar, first) as ws:
        await asyncio.sleep(0.5)
        reply = await reauth(ws, second)
        assert reply["type"] == "authproxy.reauth_ok"
        stated = datetime.fromisoformat(reply["expires_at"].replace("Z", "+00:00"))
        assert abs(stated.timestamp() - second_exp) < 1.0
        assert stated.tzinfo == UTC
        await asyncio.sleep(1.5)  # past the first token's expiry
        await ws.send("still here")
        assert await ws.recv() == "still here"
        code, reason, at = await closed(ws)
        assert code == 4401 and "expired" in reason
        assert second_exp <= at < second_exp + 1.0  # closed at the second token's expiry


async def test_a_bad_reauth_changes_nothing(sidecar: Sidecar) -> None:
    first = token(2.0)
    first_exp = jwt.decode(first, options={"verify_signature": False})["exp"]
    bad = {
        "not a token": "malformed",
        token(-5): "token_expired",
        token(60, secret=OTHER_SECRET): "bad_signature",
        token(60, scope="other"): "insufficient_scope",
    }
    async with open_ws(sidecar, first) as ws:
        for bearer, reason in bad.items():
            reply = await reauth(ws, bearer)
            assert reply["type"] == "authproxy.reauth_failed"
            assert reason in reply["reason"], (reason, reply)
        await ws.send(json.dumps({"type": "authproxy.reauth"}))  # no token at all
        assert json.loads(await ws.recv())["reason"] == "malformed"
        code, _, at = await closed(ws)
        assert code == 4401 and first_exp <= at < first_exp + 1.0  # the first token's expiry


async def test_a_token_of_another_subject_closes_the_session(sidecar: Sidecar) -> None:
    async with open_ws(sidecar, token(60)) as ws:
        await ws.send(json.dumps({"type": "authproxy.reauth", "token": token(60, sub="eve")}))
        code, reason, _ = await closed(ws, 5)
        assert code == 4403 and "subject" in reason


async def test_reauth_frames_never_reach_the_upstream(sidecar: Sidecar) -> None:
    async with open_ws(sidecar, token(60)) as ws:
        assert (await reauth(ws, token(120)))["type"] == "authproxy.reauth_ok"
        assert (await reauth(ws, "junk"))["type"] == "authproxy.reauth_failed"
        # Escaped, the type is the same string to a JSON parser: still the sidecar's.
        escaped = ' {"type": "authproxy\\u002ereauth", "token": "' + token(120) + '"}'
        await ws.send(escaped)
        assert json.loads(await ws.recv())["type"] == "authproxy.reauth_ok"
        # A message of the application's own that merely mentions the type is forwarded.
        lookalike = json.dumps({"type": "chat", "text": 'about "authproxy.reauth"'})
        await ws.send(lookalike)
        assert await ws.recv() == lookalike
        await ws.send("!report")  # the echo upstream reports what it received and checked
        await ws.send("last")
        received = [await ws.recv() for _ in range(2)]
        assert received[-1] == "last"
    # Client -> upstream: the look-alike, !report and "last" only; the two reauth frames stayed.
    deadline = time.monotonic() + 5
    while not (line := ws_log_lines(sidecar)):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert line[-1]["messages_in"] == 3


async def test_with_reauth_off_the_frame_is_the_upstreams(
    tmp_path: Path, upstream: Process
) -> None:
    s = start_sidecar(tmp_path, upstream.port, config(reauth=False), env={"REAUTH_SECRET": SECRET})
    try:
        async with open_ws(s, token(60)) as ws:
            frame = json.dumps({"type": "authproxy.reauth", "token": token(120)})
            await ws.send(frame)
            assert await ws.recv() == frame  # echoed by the upstream: it was forwarded
    finally:
        s.stop()
