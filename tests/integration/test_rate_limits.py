"""`[[rate_limits]]` through a real sidecar (memory backend) and upstream: exact limits, honest
Retry-After, the IETF RateLimit headers, CORS on the refusal, concurrency slots given back however
a request ends, and `authproxy revoke` through the admin listener."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from proxy.auth.apikeys import hash_key
from tests.support.servers import ROOT, Process, Sidecar, start_sidecar

ALICE, BOB, CAROL = "ak_alice_0123456789", "ak_bob_0123456789ab", "ak_carol_0123456789"
ORIGIN = "http://app.test"
ADMIN_TOKEN = "admin-secret-0123456789"
# The helpers write [admin] themselves: admin.token_env comes as an override.
TOKEN_ENV = {"AUTHPROXY__ADMIN__TOKEN_ENV": "AP_ADMIN_TOKEN"}

CONFIG = f"""
[cors]
allow_origins = ["{ORIGIN}"]
expose_headers = ["X-Request-ID"]

[auth.api_keys]
header = "X-API-Key"
[[auth.api_keys.keys]]
id = "alice"
sha256 = "{hash_key(ALICE)}"
[[auth.api_keys.keys]]
id = "bob"
sha256 = "{hash_key(BOB)}"
[[auth.api_keys.keys]]
id = "carol"
sha256 = "{hash_key(CAROL)}"

[[routes]]
path = "/api/*"
auth = ["api_key"]
[[routes]]
path = "/slow"
auth = ["api_key"]
[[routes]]
path = "/sse"
auth = ["api_key"]
[[routes]]
path = "/quick/*"
auth = ["api_key"]
[[routes]]
path = "/open/*"
auth = "public"
[[routes]]
path = "/free/*"
auth = "public"

[[rate_limits]]
name = "per-caller"
routes = ["/api/*"]
limit = 5
window_s = 60

[[rate_limits]]
name = "per-ip"
routes = ["/open/*"]
by = "ip"
limit = 3
window_s = 60

[[rate_limits]]
name = "streams"
routes = ["/slow", "/sse"]
concurrent = 2

[[rate_limits]]
name = "quick"
routes = ["/quick/*"]
limit = 2
window_s = 1
"""


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, upstream: Process) -> Iterator[Sidecar]:
    s = start_sidecar(
        tmp_path_factory.mktemp("rate-limits"),
        upstream.port,
        CONFIG,
        server='trusted_proxies = ["127.0.0.0/8"]',
        env={"AP_ADMIN_TOKEN": ADMIN_TOKEN, **TOKEN_ENV},
    )
    yield s
    s.stop()


def access_lines(sidecar: Sidecar) -> list[dict[str, Any]]:
    out = []
    for line in sidecar.output().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("message") == "request":
                out.append(record)
    return out


def metric(sidecar: Sidecar, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(sidecar.admin_url + "/metrics").text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def burst(
    sidecar: Sidecar, n: int, path: str, headers: dict[str, str]
) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=sidecar.url, timeout=10) as client:
        return list(await asyncio.gather(*(client.get(path, headers=headers) for _ in range(n))))


async def test_a_fresh_caller_sends_exactly_limit_at_once_and_the_next_gets_an_honest_429(
    sidecar: Sidecar,
) -> None:
    headers = {"X-API-Key": ALICE, "Origin": ORIGIN}
    answers = await burst(sidecar, 5, "/api/models", headers)
    assert [a.status_code for a in answers] == [200] * 5
    assert {a.headers["ratelimit-policy"] for a in answers} == {'"per-caller";q=5;w=60'}
    remaining = sorted(a.headers["ratelimit"].split(";")[1] for a in answers)
    assert remaining == ["r=0", "r=1", "r=2", "r=3", "r=4"]

    refused = httpx.get(sidecar.url + "/api/models", headers=headers)
    assert refused.status_code == 429
    body = refused.json()
    assert body["error"] == "rate_limited" and body["details"]["rule"] == "per-caller"
    assert body["request_id"] == refused.headers["x-request-id"]
    assert 59 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["ratelimit-policy"] == '"per-caller";q=5;w=60'
    assert refused.headers["ratelimit"] == f'"per-caller";r=0;t={refused.headers["retry-after"]}'
    # The page can read all of it.
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    exposed = {
        h.strip().lower() for h in refused.headers["access-control-expose-headers"].split(",")
    }
    assert {"retry-after", "ratelimit", "ratelimit-policy", "x-request-id"} <= exposed

    # Another caller has a window of its own; the refusal was logged and counted by rule.
    assert httpx.get(sidecar.url + "/api/models", headers={"X-API-Key": BOB}).status_code == 200
    lines = [line for line in access_lines(sidecar) if line.get("status") == 429]
    assert lines and lines[-1]["rate_limit"] == "per-caller" and lines[-1]["subject"] == "alice"
    assert metric(sidecar, "authproxy_rate_limited_total", rule="per-caller", kind="rate") >= 1


def test_a_short_window_lets_the_caller_back_after_retry_after(sidecar: Sidecar) -> None:
    headers = {"X-API-Key": BOB}
    with httpx.Client(base_url=sidecar.url) as client:
        assert [client.get("/quick/a", headers=headers).status_code for _ in range(2)] == [200, 200]
        refused = client.get("/quick/a", headers=headers)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        time.sleep(1.0)
        assert client.get("/quick/a", headers=headers).status_code == 200


def test_anonymous_callers_are_counted_by_the_address_a_trusted_proxy_gives(
    sidecar: Sidecar,
) -> None:
    def get(address: str) -> int:
        return httpx.get(sidecar.url + "/open/x", headers={"X-Forwarded-For": address}).status_code

    assert [get("10.0.0.1") for _ in range(4)] == [200, 200, 200, 429]
    assert get("10.0.0.2") == 200  # another client behind the same proxy


def test_a_route_no_rule_covers_carries_no_ratelimit_headers(sidecar: Sidecar) -> None:
    answer = httpx.get(sidecar.url + "/free/x")
    assert answer.status_code == 200
    assert "ratelimit" not in answer.headers and "ratelimit-policy" not in answer.headers


async def test_concurrency_slots_are_given_back_when_streams_end_or_clients_vanish(
    sidecar: Sidecar,
) -> None:
    headers = {"X-API-Key": CAROL}
    async with httpx.AsyncClient(base_url=sidecar.url, timeout=10) as client:
        slow = [
            asyncio.create_task(client.get("/slow", params={"delay": "1"}, headers=headers))
            for _ in range(2)
        ]
        await asyncio.sleep(0.3)
        third = await client.get("/slow", params={"delay": "0"}, headers=headers)
        assert third.status_code == 429
        assert third.json()["details"] == {
            "reason": "concurrency_limit",
            "rule": "streams",
            "concurrent": 2,
        }
        assert [r.status_code for r in await asyncio.gather(*slow)] == [200, 200]
        # Both ended: both slots are back.
        again = await asyncio.gather(
            *(client.get("/slow", params={"delay": "0"}, headers=headers) for _ in range(2))
        )
        assert [r.status_code for r in again] == [200, 200]

    # Two clients vanish in the middle of long streams: their slots come back at once, not when
    # the streams would have ended.
    for _ in range(2):
        sock = socket.create_connection(("127.0.0.1", sidecar.port))
        sock.sendall(
            f"GET /sse?n=300&delay=0.1 HTTP/1.1\r\nHost: x\r\nX-API-Key: {CAROL}\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        sock.close()
    deadline = time.monotonic() + 5
    while True:
        status = httpx.get(sidecar.url + "/slow?delay=0", headers=headers).status_code
        if status == 200:
            break
        assert time.monotonic() < deadline, "the vanished clients' slots were never given back"
        time.sleep(0.1)


def revoke(
    sidecar: Sidecar, *args: str, token: str | None = ADMIN_TOKEN
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "AP_ADMIN_TOKEN"} | TOKEN_ENV
    if token is not None:
        env["AP_ADMIN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "proxy", "revoke", "--config", str(sidecar.config_path), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=30,
    )


def test_revoke_through_the_admin_listener_needs_the_token_then_refuses_the_key(
    sidecar: Sidecar,
) -> None:
    headers = {"X-API-Key": BOB}
    assert httpx.get(sidecar.url + "/free/x", headers=headers).status_code == 200
    wrong = revoke(sidecar, "--key-id", "bob", token="not-the-admin-secret")
    assert wrong.returncode == 1 and "answered 401" in wrong.stderr
    anonymous = httpx.post(sidecar.admin_url + "/revocations", json={"key_id": "bob"})
    assert anonymous.status_code == 401
    assert httpx.get(sidecar.url + "/quick/b", headers=headers).status_code in (200, 429)

    done = revoke(sidecar, "--key-id", "bob")
    assert done.returncode == 0, done.stderr
    refused = httpx.get(sidecar.url + "/api/models", headers=headers)
    assert refused.status_code == 401 and refused.json()["details"]["reason"] == "revoked"
    assert httpx.get(sidecar.url + "/api/models", headers={"X-API-Key": CAROL}).status_code == 200
    assert ADMIN_TOKEN not in sidecar.output()
