"""SIGHUP reloads the whole config file: all of it or, when the new file is invalid, none of it
(one log line naming the key, a metric, the old policy stays). In-flight requests finish under the
policy that admitted them; open WebSockets stay open unless the new policy no longer admits them."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from proxy.auth.apikeys import hash_key
from tests.support.servers import Process, Sidecar, sidecar_config, start_sidecar, start_upstream

KEY_A = "ak_reload_test_key_a_0123456789abcdef"
KEY_B = "ak_reload_test_key_b_0123456789abcdef"


def policy(
    *,
    echo_auth: str = '"public"',
    keys: tuple[tuple[str, str], ...] = (("a", KEY_A),),
    origins: tuple[str, ...] = ("https://app.example",),
    extra: str = "",
) -> str:
    records = "".join(
        f'[[auth.api_keys.keys]]\nid = "{kid}"\nsha256 = "{hash_key(key)}"\n' for kid, key in keys
    )
    return f"""
[cors]
allow_origins = {json.dumps(list(origins))}
[auth.api_keys]
header = "X-API-Key"
{records}
[[routes]]
path = "/echo/*"
auth = {echo_auth}
[[routes]]
path = "/slow"
auth = "public"
[[routes]]
path = "/ws/*"
auth = ["api_key"]
{extra}
"""


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Process]:
    process = start_upstream("tests.support.upstreams:http_and_ws", tmp_path)
    yield process
    process.stop()


def lines(sidecar: Sidecar) -> list[dict[str, Any]]:
    return [json.loads(x) for x in sidecar.output().splitlines() if x.startswith("{")]


def rewrite(sidecar: Sidecar, upstream: Process, body: str, server: str = "") -> None:
    text = sidecar_config(upstream.port, sidecar.port, sidecar.admin_port, body, server=server)
    sidecar.config_path.write_text(text)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def reloads(sidecar: Sidecar, event: str) -> int:
    return sum(1 for line in lines(sidecar) if line.get("event") == event)


def sighup(sidecar: Sidecar, event: str = "config_reloaded") -> None:
    before = reloads(sidecar, event)
    sidecar.process.signal(signal.SIGHUP)
    wait_for(lambda: reloads(sidecar, event) > before)


def config_of(sidecar: Sidecar) -> dict[str, str]:
    info: dict[str, str] = httpx.get(sidecar.admin_url + "/readyz").json()["config"]
    return info


def test_a_reload_applies_routes_cors_and_keys_together(tmp_path: Path, upstream: Process) -> None:
    sidecar = start_sidecar(tmp_path, upstream.port, policy())
    try:
        before = config_of(sidecar)
        assert httpx.get(sidecar.url + "/echo/open").status_code == 200
        preflight = {"Origin": "https://new.example", "Access-Control-Request-Method": "GET"}
        assert httpx.options(sidecar.url + "/echo/x", headers=preflight).status_code == 403

        rewrite(
            sidecar,
            upstream,
            policy(
                echo_auth='["api_key"]',
                keys=(("a", KEY_A), ("b", KEY_B)),
                origins=("https://app.example", "https://new.example"),
            ),
        )
        sighup(sidecar)
        assert httpx.get(sidecar.url + "/echo/open").status_code == 401  # the new route
        assert httpx.get(sidecar.url + "/echo/k", headers={"X-API-Key": KEY_B}).status_code == 200
        allowed = httpx.options(sidecar.url + "/echo/x", headers=preflight)
        assert allowed.status_code == 204
        assert allowed.headers["access-control-allow-origin"] == "https://new.example"
        after = config_of(sidecar)
        assert after["sha256"] != before["sha256"] and after["loaded_at"] >= before["loaded_at"]
        metrics = httpx.get(sidecar.admin_url + "/metrics").text
        assert 'authproxy_config_reloads_total{result="ok"} 1.0' in metrics
        assert KEY_B not in sidecar.output() and hash_key(KEY_B) not in sidecar.output()
    finally:
        sidecar.stop()


def test_an_invalid_file_changes_nothing_and_says_which_key(
    tmp_path: Path, upstream: Process
) -> None:
    sidecar = start_sidecar(tmp_path, upstream.port, policy())
    try:
        before = config_of(sidecar)
        # Valid TOML, one bad key among good changes (the route would need a key now).
        broken = policy(echo_auth='["api_key"]').replace('path = "/slow"', 'path = "slow"')
        rewrite(sidecar, upstream, broken)
        sighup(sidecar, "config_reload_failed")
        (failure,) = [x for x in lines(sidecar) if x.get("event") == "config_reload_failed"]
        assert "routes[1].path" in failure["message"], failure
        assert "\n" not in failure["message"]
        assert httpx.get(sidecar.url + "/echo/open").status_code == 200  # the old policy
        assert config_of(sidecar) == before
        # Not TOML at all: the same.
        sidecar.config_path.write_text("[server\nlisten = ")
        sighup(sidecar, "config_reload_failed")
        assert httpx.get(sidecar.url + "/echo/open").status_code == 200
        metrics = httpx.get(sidecar.admin_url + "/metrics").text
        assert 'authproxy_config_reloads_total{result="error"} 2.0' in metrics
        assert "Traceback" not in sidecar.output()
        assert httpx.get(sidecar.admin_url + "/readyz").status_code == 200
    finally:
        sidecar.stop()


def test_keys_a_reload_cannot_change_wait_for_a_restart_and_the_rest_applies(
    tmp_path: Path, upstream: Process
) -> None:
    sidecar = start_sidecar(tmp_path, upstream.port, policy())
    try:
        rewrite(
            sidecar,
            upstream,
            policy(echo_auth='["api_key"]') + "\n[websocket]\nmax_connections = 7\n",
            server="max_header_bytes = 4096\n",
        )
        sighup(sidecar)
        pinned = sorted(
            x["key"] for x in lines(sidecar) if x.get("event") == "config_reload_pinned"
        )
        assert pinned == ["server.max_header_bytes", "websocket.max_connections"]
        assert httpx.get(sidecar.url + "/echo/open").status_code == 401  # the rest applied
        # The listener kept its limit: a 6 KiB head still passes.
        big = {"X-Pad": "p" * 6000, "X-API-Key": KEY_A}
        assert httpx.get(sidecar.url + "/echo/big", headers=big).status_code == 200
    finally:
        sidecar.stop()


def test_a_request_in_flight_finishes_under_the_policy_that_admitted_it(
    tmp_path: Path, upstream: Process
) -> None:
    sidecar = start_sidecar(tmp_path, upstream.port, policy())
    try:
        result: dict[str, httpx.Response] = {}

        def slow() -> None:
            result["r"] = httpx.get(sidecar.url + "/slow?delay=1.5", timeout=10)

        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(0.4)
        # The new policy removes the route the request was admitted on.
        rewrite(sidecar, upstream, policy().replace('path = "/slow"', 'path = "/gone"'))
        sighup(sidecar)
        assert httpx.get(sidecar.url + "/slow?delay=0").status_code == 404  # new requests
        thread.join()
        assert result["r"].status_code == 200 and result["r"].json() == {"slow": True}
    finally:
        sidecar.stop()


async def test_open_websockets_stay_unless_the_new_policy_revokes_them(
    tmp_path: Path, upstream: Process
) -> None:
    both = (("a", KEY_A), ("b", KEY_B))
    sidecar = start_sidecar(tmp_path, upstream.port, policy(keys=both))
    try:
        url = sidecar.ws_url + "/ws/feed"
        async with (
            connect(url, additional_headers={"X-API-Key": KEY_A}, open_timeout=5) as kept,
            connect(url, additional_headers={"X-API-Key": KEY_B}, open_timeout=5) as revoked,
        ):
            await kept.send("before")
            assert await kept.recv() == "before"
            # Key b leaves the config; the CORS list changes too (nothing to do with sessions).
            body = policy(keys=(("a", KEY_A),), origins=("https://other.example",))
            await asyncio.to_thread(rewrite, sidecar, upstream, body)
            await asyncio.to_thread(sighup, sidecar)
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(5):
                    await revoked.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
            await kept.send("after")
            assert await kept.recv() == "after"  # untouched by the reload
            # A route change that no longer admits API keys closes the other one too.
            body = policy().replace(
                'path = "/ws/*"\nauth = ["api_key"]', 'path = "/ws/*"\nauth = ["jwt"]'
            )
            body += (
                '\n[[auth.jwt.providers]]\nname = "t"\nissuer = "https://idp.test"\n'
                'audiences = ["api"]\nsecret_env = "RELOAD_SECRET"\nalgorithms = ["HS256"]\n'
            )
            await asyncio.to_thread(rewrite, sidecar, upstream, body)
            await asyncio.to_thread(sighup, sidecar, "config_reload_failed")  # no secret yet
            await kept.send("still")
            assert await kept.recv() == "still"  # a refused reload changed nothing
        ws_lines = [x for x in lines(sidecar) if x.get("message") == "websocket"]
        assert any(x["end"] == "api_key_revoked" and x["close_code"] == 4403 for x in ws_lines)
    finally:
        sidecar.stop()


async def test_a_route_that_no_longer_admits_a_session_closes_it(
    tmp_path: Path, upstream: Process
) -> None:
    sidecar = start_sidecar(tmp_path, upstream.port, policy(), env={"RELOAD_SECRET": "s" * 32})
    try:
        async with connect(
            sidecar.ws_url + "/ws/feed", additional_headers={"X-API-Key": KEY_A}, open_timeout=5
        ) as ws:
            body = policy().replace(
                'path = "/ws/*"\nauth = ["api_key"]', 'path = "/ws/*"\nauth = ["jwt"]'
            )
            body += (
                '\n[[auth.jwt.providers]]\nname = "t"\nissuer = "https://idp.test"\n'
                'audiences = ["api"]\nsecret_env = "RELOAD_SECRET"\nalgorithms = ["HS256"]\n'
            )
            await asyncio.to_thread(rewrite, sidecar, upstream, body)
            await asyncio.to_thread(sighup, sidecar)
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(5):
                    await ws.recv()
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
                4403,
                "no longer allowed by the reloaded policy",
            )
    finally:
        sidecar.stop()


def test_every_worker_reloads_and_reports_the_same_config(
    tmp_path: Path, upstream: Process
) -> None:
    sidecar = start_sidecar(tmp_path, upstream.port, policy(), server="workers = 2\n")
    try:

        def shas() -> set[str]:
            workers = httpx.get(sidecar.admin_url + "/readyz").json()["workers"]
            return {w["config"]["sha256"] for w in workers if w["config"]}

        wait_for(lambda: len(httpx.get(sidecar.admin_url + "/readyz").json()["workers"]) == 2)
        (before,) = shas()
        rewrite(sidecar, upstream, policy(echo_auth='["api_key"]'), server="workers = 2\n")
        sidecar.process.signal(signal.SIGHUP)
        wait_for(lambda: reloads(sidecar, "config_reloaded") == 2)
        (after,) = shas()
        assert after != before
        for _ in range(10):  # new connections, spread across both workers
            r = httpx.get(sidecar.url + "/echo/x", headers={"Connection": "close"})
            assert r.status_code == 401
    finally:
        sidecar.stop()


def test_rate_limits_come_and_go_with_a_reload(tmp_path: Path, upstream: Process) -> None:
    sidecar = start_sidecar(tmp_path, upstream.port, policy())
    try:
        for _ in range(5):
            assert httpx.get(sidecar.url + "/echo/free").status_code == 200
        rule = '\n[[rate_limits]]\nname = "tight"\nroutes = ["/echo/*"]\nby = "ip"\nlimit = 2\n'
        rewrite(sidecar, upstream, policy() + rule)
        sighup(sidecar)
        codes = [httpx.get(sidecar.url + "/echo/limited").status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        rewrite(sidecar, upstream, policy())
        sighup(sidecar)
        assert httpx.get(sidecar.url + "/echo/free-again").status_code == 200
    finally:
        sidecar.stop()


def test_turning_tls_on_waits_for_a_restart(tmp_path: Path, upstream: Process) -> None:
    sidecar = start_sidecar(tmp_path, upstream.port, policy())
    try:
        server = f'tls_cert_file = "{tmp_path / "c.pem"}"\ntls_key_file = "{tmp_path / "k.pem"}"\n'
        rewrite(sidecar, upstream, policy(echo_auth='["api_key"]'), server=server)
        sighup(sidecar)
        pinned = {x["key"] for x in lines(sidecar) if x.get("event") == "config_reload_pinned"}
        assert pinned == {"server.tls_cert_file", "server.tls_key_file"}
        assert httpx.get(sidecar.url + "/echo/plain").status_code == 401  # still plain HTTP
    finally:
        sidecar.stop()
