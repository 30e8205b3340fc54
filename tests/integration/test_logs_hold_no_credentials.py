"""At the most talkative log level, through HTTP and WebSocket, refused and accepted, the sidecar's
output never holds a token or key: uvicorn's own lines included, whatever their wording."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.support.servers import start_sidecar, start_upstream

SECRET = "log-test-secret-log-test-secret-log-test!"
API_KEY = "ak_log_test_0123456789abcdef"


async def test_no_credential_reaches_the_log_at_debug_level(tmp_path: Path) -> None:
    upstream = start_upstream("tests.support.ws_upstream:app", tmp_path)
    body = f"""
    [logging]
    level = "debug"
    [[auth.jwt.providers]]
    name = "t"
    issuer = "https://issuer.log"
    audiences = ["log"]
    secret_env = "LOG_TEST_SECRET"
    algorithms = ["HS256"]
    [auth.api_keys]
    [[auth.api_keys.keys]]
    id = "bot"
    sha256 = "{hashlib.sha256(API_KEY.encode()).hexdigest()}"
    [[routes]]
    path = "/ws/*"
    auth = ["jwt", "api_key"]
    [[routes]]
    path = "/*"
    auth = ["jwt", "api_key"]
    """
    sidecar = start_sidecar(tmp_path, upstream.port, body, env={"LOG_TEST_SECRET": SECRET})
    now = int(time.time())
    good = jwt.encode(
        {"iss": "https://issuer.log", "aud": "log", "sub": "al", "iat": now, "exp": now + 60},
        SECRET,
        algorithm="HS256",
    )
    bad = good[:-4] + "AAAA"
    try:
        async with connect(f"{sidecar.ws_url}/ws/echo?token={good}&x=1") as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
        async with connect(f"{sidecar.ws_url}/ws/echo?api_key={API_KEY}") as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
        with pytest.raises(InvalidStatus):
            async with connect(f"{sidecar.ws_url}/ws/echo?access_token={bad}"):
                pass
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{sidecar.url}/x?access_token={good}")).status_code == 401
            r = await http.get(f"{sidecar.url}/x", headers={"Authorization": f"Bearer {bad}"})
            assert r.status_code == 401
            r = await http.get(f"{sidecar.url}/x", headers={"X-API-Key": API_KEY[:-1]})
            assert r.status_code == 401
        time.sleep(0.3)
        output = sidecar.output()
        assert '"level":"debug"' in output  # the talkative level really was on
        for secret in (good, bad, API_KEY, API_KEY[:-1], good.split(".")[2], SECRET):
            assert secret not in output
    finally:
        sidecar.stop()
        upstream.stop()
