"""Two sidecar processes sharing one real redis-server: one limit under concurrent load from
both, Redis stopped and started again under them, a revocation made through one closing a
WebSocket held through the other, and per-identity session caps held across both."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest
from websockets.exceptions import InvalidStatus

from proxy.auth.apikeys import hash_key
from tests.integration.test_workers import requests_on_fresh_connections
from tests.relay.test_websocket_tunnel import close_of, open_ws
from tests.support.redis_server import RedisServer
from tests.support.servers import ROOT, Process, Sidecar, start_sidecar, start_upstream

KEYS = {name: f"ak_{name}_0123456789abcdef" for name in ("alice", "bob", "carol", "dave")}
SECRET = "a-shared-hs256-secret-of-32-bytes!!"
ISSUER = "https://idp.test"

CONFIG = """
[state]
backend = "redis"
redis_url = "{url}"
connect_timeout_s = 0.2
timeout_s = 0.2
retry_s = 0.5

[[auth.jwt.providers]]
name = "idp"
issuer = "{issuer}"
audiences = ["webplus"]
secret_env = "AP_JWT_SECRET"
algorithms = ["HS256"]

[auth.api_keys]
header = "X-API-Key"
{keys}

[[routes]]
path = "/api/*"
auth = ["api_key", "jwt"]
[[routes]]
path = "/ws/*"
auth = ["api_key", "jwt"]
[[routes]]
path = "/live/*"
auth = ["api_key", "jwt"]

[websocket]
max_connections_per_identity = 2

[[rate_limits]]
name = "shared"
routes = ["/api/*"]
limit = 20
window_s = 60

[[rate_limits]]
name = "sessions"
routes = ["/ws/*"]
concurrent = 1
"""


@dataclass
class Pair:
    a: Sidecar  # state.on_error = "allow" (the default)
    b: Sidecar  # state.on_error = "deny"
    upstream: Process
    redis: RedisServer


@pytest.fixture
def pair(tmp_path: Path, redis_server: RedisServer) -> Iterator[Pair]:
    upstream = start_upstream("tests.support.ws_upstream:app", tmp_path)
    keys = "\n".join(
        f'[[auth.api_keys.keys]]\nid = "{name}"\nsha256 = "{hash_key(key)}"'
        for name, key in KEYS.items()
    )
    body = CONFIG.format(url=redis_server.url, issuer=ISSUER, keys=keys)
    env = {"AP_JWT_SECRET": SECRET}
    a = start_sidecar(tmp_path, upstream.port, body, env=env)
    b = start_sidecar(
        tmp_path, upstream.port, body, env={**env, "AUTHPROXY__STATE__ON_ERROR": "deny"}
    )
    yield Pair(a, b, upstream, redis_server)
    a.stop()
    b.stop()
    upstream.stop()


def key(name: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[name]}


def token(jti: str, sub: str = "erin") -> dict[str, str]:
    claims = {"iss": ISSUER, "aud": "webplus", "sub": sub, "exp": time.time() + 600, "jti": jti}
    return {"Authorization": "Bearer " + jwt.encode(claims, SECRET, "HS256")}


async def test_two_sidecars_hold_one_limit_under_concurrent_load_from_both(pair: Pair) -> None:
    async def load(sidecar: Sidecar) -> list[int]:
        async with httpx.AsyncClient(base_url=sidecar.url, timeout=10) as client:
            answers = await asyncio.gather(
                *(client.get("/api/x", headers=key("alice")) for _ in range(25))
            )
        return [a.status_code for a in answers]

    a, b = await asyncio.gather(load(pair.a), load(pair.b))
    # Counted apart, each sidecar would have let 20 through: 40 in all.
    assert (a + b).count(200) == 20 and (a + b).count(429) == 30
    refused = httpx.get(pair.b.url + "/api/x", headers=key("alice"))
    assert refused.status_code == 429 and 58 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["ratelimit"].startswith('"shared";r=0;')


def timed_get(sidecar: Sidecar, name: str) -> tuple[int, float, httpx.Response]:
    started = time.monotonic()
    answer = httpx.get(sidecar.url + "/api/x", headers=key(name), timeout=10)
    return answer.status_code, time.monotonic() - started, answer


def test_redis_stopped_gives_each_sidecar_its_on_error_at_once_and_limits_return_after(
    pair: Pair,
) -> None:
    assert timed_get(pair.a, "dave")[0] == 200
    pair.redis.stop()
    for _ in range(10):
        status, took, _ = timed_get(pair.a, "dave")
        assert status == 200 and took < 0.8  # allow: served, never stalled
        status, took, answer = timed_get(pair.b, "dave")
        assert status == 503 and took < 0.8  # deny: refused, never stalled
        assert answer.json()["details"]["reason"] == "state_unavailable"
        assert "retry-after" in answer.headers
    assert "redis unreachable" in pair.a.output() and "redis unreachable" in pair.b.output()
    metrics = httpx.get(pair.b.admin_url + "/metrics").text
    assert 'authproxy_state_fallbacks_total{outcome="deny"} 10.0' in metrics

    pair.redis.start()  # same port, empty: as a Redis restarted without persistence
    time.sleep(0.6)  # past retry_s
    statuses = [timed_get(pair.a if i % 2 else pair.b, "dave")[0] for i in range(21)]
    assert statuses == [200] * 20 + [429]
    assert "redis reachable again" in pair.b.output()


def revoke(sidecar: Sidecar, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "revoke", "--config", str(sidecar.config_path), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "AP_JWT_SECRET": SECRET},
    )
    assert done.returncode == 0, done.stderr


async def test_a_revocation_through_one_sidecar_closes_a_websocket_held_through_the_other(
    pair: Pair,
) -> None:
    by_key = await open_ws(pair.b, "/ws/echo", headers=key("bob"))
    by_token = await open_ws(pair.b, "/ws/echo", headers=token("tok-1"))
    try:
        await by_key.send("hello")
        assert await by_key.recv() == "hello"
        await asyncio.to_thread(revoke, pair.a, "--key-id", "bob")
        # Within a second of the revocation reaching Redis (the CLI has returned by then).
        assert await close_of(by_key, timeout=1.0) == (4403, "api key revoked")
        for sidecar in (pair.a, pair.b):
            refused = httpx.get(sidecar.url + "/api/x", headers=key("bob"))
            assert refused.status_code == 401 and refused.json()["details"]["reason"] == "revoked"
            assert httpx.get(sidecar.url + "/api/x", headers=key("carol")).status_code == 200

        # A JWT by its jti: refused even though both sidecars hold it verified in their caches.
        assert httpx.get(pair.a.url + "/api/x", headers=token("tok-1")).status_code == 200
        await by_token.send("still here")
        assert await by_token.recv() == "still here"
        await asyncio.to_thread(revoke, pair.a, "--jti", "tok-1")
        assert await close_of(by_token, timeout=1.0) == (4403, "token revoked")
        for sidecar in (pair.a, pair.b):
            refused = httpx.get(sidecar.url + "/api/x", headers=token("tok-1"))
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"].startswith("Bearer ")
            assert httpx.get(sidecar.url + "/api/x", headers=token("tok-2")).status_code == 200
    finally:
        await by_key.close()
        await by_token.close()


async def test_a_session_cap_per_identity_holds_across_sidecars_and_frees_on_close(
    pair: Pair,
) -> None:
    held = await open_ws(pair.a, "/ws/echo", headers=key("carol"))
    try:
        with pytest.raises(InvalidStatus) as info:
            async with open_ws(pair.b, "/ws/echo", headers=key("carol")):
                pass
        assert info.value.response.status_code == 429
        other = await open_ws(pair.b, "/ws/echo", headers=key("dave"))  # another identity
        await other.close()
    finally:
        await held.close()
    deadline = time.monotonic() + 3
    while True:
        try:
            async with open_ws(pair.b, "/ws/echo", headers=key("carol")) as ws:
                await ws.send("mine now")
                assert await ws.recv() == "mine now"
                break
        except InvalidStatus as exc:
            assert exc.response.status_code == 429
            assert time.monotonic() < deadline, "the closed session's slot was never given back"
            await asyncio.sleep(0.1)


def test_workers_of_one_sidecar_hold_one_limit_through_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    upstream = start_upstream("tests.support.upstreams:app", tmp_path)
    body = f"""
        [state]
        backend = "redis"
        redis_url = "{redis_server.url}"
        [[routes]]
        path = "/*"
        auth = "public"
        [[rate_limits]]
        name = "per-ip"
        by = "ip"
        limit = 10
        window_s = 60
        """
    sidecar = start_sidecar(tmp_path, upstream.port, body, server="workers = 2")
    try:
        answers = requests_on_fresh_connections(sidecar, "/echo/x")
        # Both workers served; counted apart, each would have let 10 through.
        assert len({pid for _, pid in answers}) == 2
        assert [status for status, _ in answers] == [200] * 10 + [429] * (len(answers) - 10)
    finally:
        sidecar.stop()
        upstream.stop()


async def test_the_websocket_cap_per_identity_holds_across_sidecars_on_redis(pair: Pair) -> None:
    first = await open_ws(pair.a, "/live/echo", headers=key("dave"))
    second = await open_ws(pair.b, "/live/echo", headers=key("dave"))
    try:
        for sidecar in (pair.a, pair.b):
            with pytest.raises(InvalidStatus) as info:
                async with open_ws(sidecar, "/live/echo", headers=key("dave")):
                    pass
            assert info.value.response.status_code == 429
            assert b"websocket_identity_limit" in info.value.response.body
    finally:
        await first.close()
    deadline = time.monotonic() + 3
    while True:  # the closed session's slot comes back
        try:
            async with open_ws(pair.b, "/live/echo", headers=key("dave")) as ws:
                await ws.send("third")
                assert await ws.recv() == "third"
                break
        except InvalidStatus as exc:
            assert exc.response.status_code == 429
            assert time.monotonic() < deadline, "the closed session's slot was never given back"
            await asyncio.sleep(0.1)
    await second.close()
