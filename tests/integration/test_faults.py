"""Faults around a real sidecar: the upstream killed and restarted under load, a slow upstream, a
resetting upstream, the JWKS endpoint down at start and during operation, a log that cannot be
written, and the sidecar itself restarted under load. Each test records what it measured in
test-artifacts/robustness/ (ROBUSTNESS.md quotes those figures)."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import os
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support.figures import record
from tests.support.load import run_load, summary
from tests.support.servers import (
    Process,
    Sidecar,
    free_port,
    sidecar_config,
    spawn,
    start_sidecar,
    wait_for_port,
)

# The longest any request may take while the upstream is gone: a refused connection on loopback
# fails in well under a millisecond, so anything near this bound is a hang.
GAP_BOUND_S = 2.0


def start_demo(tmp_path: Path, port: int, *extra: str) -> Process:
    """`python -m upstream_demo` on `port` (no web page)."""
    return spawn(
        [
            sys.executable,
            "-m",
            "upstream_demo",
            "--port",
            str(port),
            "--web-port",
            "0",
            "--log-level",
            "warning",
            *extra,
        ],
        tmp_path / f"demo-{port}-{time.monotonic_ns()}.log",
        port,
    )


def kill(process: Process) -> None:
    process.proc.kill()
    process.proc.wait()


# --- the upstream restarted under load -----------------------------------------------------------


async def test_rest_during_an_upstream_restart_gets_quick_502s_then_recovers(
    tmp_path: Path,
) -> None:
    port = free_port()
    demo = start_demo(tmp_path, port, "--event-interval", "0")
    try:
        sidecar = start_sidecar(tmp_path, port)
    except BaseException:
        kill(demo)
        raise
    pid = sidecar.process.proc.pid
    try:
        stop = asyncio.Event()
        load = asyncio.create_task(
            run_load(sidecar.url, stop, workers=6, paths=("/api/models", "/api/models/llama2"))
        )
        await asyncio.sleep(1.0)
        killed = time.monotonic()
        kill(demo)
        await asyncio.sleep(1.5)
        demo = await asyncio.to_thread(start_demo, tmp_path, port, "--event-interval", "0")
        back = time.monotonic()
        await asyncio.sleep(2.0)
        stop.set()
        outcomes = await load
    finally:
        kill(demo)
        alive = sidecar.process.proc.poll() is None
        sidecar.stop()

    assert alive and sidecar.process.proc.pid == pid, "the sidecar did not survive"
    assert all(o.error is None for o in outcomes), {o.error for o in outcomes}
    assert max(o.duration for o in outcomes) < GAP_BOUND_S
    before = [o for o in outcomes if o.end < killed]
    # The gap: after the kill, before the restart was even begun (the new process may listen a
    # moment before start_demo returns, so `back` is too late a bound).
    gap = [o for o in outcomes if killed + 0.05 < o.start and o.end < killed + 1.5]
    after = [o for o in outcomes if o.start > back + 1.0]
    assert before and gap and after
    assert {o.status for o in before} == {200}
    assert {(o.status, o.code) for o in gap} == {(502, "bad_gateway")}
    assert {o.status for o in after} == {200}
    first_200 = min(o.end for o in outcomes if o.start > back and o.status == 200)
    record(
        "upstream_restart_rest",
        {
            "requests": len(outcomes),
            "before": summary(before),
            "gap_502": summary(gap),
            "after": summary(after),
            "not_200_in_total": sum(o.status != 200 for o in outcomes),
            "first_200_after_upstream_back_ms": round((first_200 - back) * 1000, 1),
        },
    )


async def _subscribed(url: str) -> Any:
    ws = await connect(url, open_timeout=5)
    await ws.send(json.dumps({"type": "subscribe", "topics": ["models"]}))
    while json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] != "subscribed":
        pass
    return ws


async def _closed(ws: Any) -> tuple[int | None, float]:
    """Read until the sidecar closes: the close code, and when it came."""
    try:
        while True:
            await ws.recv()
    except ConnectionClosed as exc:
        return (exc.rcvd.code if exc.rcvd else None), time.monotonic()


async def test_websockets_get_1011_when_the_upstream_dies_and_reconnect_after(
    tmp_path: Path,
) -> None:
    port = free_port()
    demo = start_demo(tmp_path, port, "--event-interval", "0.2")
    try:
        sidecar = start_sidecar(tmp_path, port, "[websocket]\nmax_connections_per_identity = 0\n")
    except BaseException:
        kill(demo)
        raise
    url = sidecar.ws_url + "/ws"
    try:
        sockets = [await _subscribed(url) for _ in range(20)]
        closing = [asyncio.create_task(_closed(ws)) for ws in sockets]
        await asyncio.sleep(0.5)
        killed = time.monotonic()
        kill(demo)
        results = await asyncio.wait_for(asyncio.gather(*closing), 10)
        # While the upstream is gone a handshake is refused with 502, before any upgrade.
        with pytest.raises(InvalidStatus) as refused:
            await connect(url, open_timeout=5)
        refused_status = refused.value.response.status_code
        demo = await asyncio.to_thread(start_demo, tmp_path, port, "--event-interval", "0.2")
        back = time.monotonic()
        again = await _subscribed(url)
        reconnect_ms = (time.monotonic() - back) * 1000
        event = json.loads(await asyncio.wait_for(again.recv(), 5))
        await again.close()
    finally:
        kill(demo)
        sidecar.stop()

    assert {code for code, _ in results} == {1011}
    assert refused_status == 502
    assert event["type"] in ("model_update", "heartbeat")
    delays = [(at - killed) * 1000 for _, at in results]
    record(
        "upstream_restart_websocket",
        {
            "sessions": len(sockets),
            "close_codes": sorted({code for code, _ in results}),
            "close_after_kill_max_ms": round(max(delays), 1),
            "handshake_while_down": refused_status,
            "reconnect_after_upstream_back_ms": round(reconnect_ms, 1),
        },
    )


# --- slow and resetting upstreams ----------------------------------------------------------------


def test_a_slow_upstream_is_a_504_at_read_timeout_and_blocks_no_one_else(
    tmp_path: Path, upstream: Process
) -> None:
    sidecar = start_sidecar(tmp_path, upstream.port, upstream="read_timeout_s = 1.0\n")
    try:

        async def scenario() -> tuple[list[tuple[int, str, float]], float]:
            async with httpx.AsyncClient(base_url=sidecar.url, timeout=10) as client:

                async def slow() -> tuple[int, str, float]:
                    start = time.monotonic()
                    r = await client.get("/slow?delay=5")
                    return (
                        r.status_code,
                        r.json()["details"].get("reason"),
                        time.monotonic() - start,
                    )

                slow_calls = [asyncio.create_task(slow()) for _ in range(10)]
                await asyncio.sleep(0.2)
                start = time.monotonic()
                fast = await client.get("/echo/fast")
                assert fast.status_code == 200
                fast_s = time.monotonic() - start
                return await asyncio.gather(*slow_calls), fast_s

        results, fast_s = asyncio.run(scenario())
    finally:
        sidecar.stop()
    assert {(status, reason) for status, reason, _ in results} == {(504, "read_timeout")}
    durations = [d for _, _, d in results]
    assert 1.0 <= min(durations) and max(durations) < 1.6, durations
    assert fast_s < 0.5
    record(
        "slow_upstream",
        {
            "read_timeout_s": 1.0,
            "concurrent_slow_requests": len(results),
            "504_after_s_min": round(min(durations), 3),
            "504_after_s_max": round(max(durations), 3),
            "fast_request_meanwhile_ms": round(fast_s * 1000, 1),
        },
    )


class _Faulty(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def faulty_upstream(mode: str) -> _Faulty:
    """A TCP upstream that misbehaves after reading a request head: `reset` (RST, no answer),
    `close` (FIN, no answer), `reset-mid-body` (a head promising 100000 bytes, 1000 sent, RST)."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                data += chunk
            if mode == "reset-mid-body":
                sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000)
                time.sleep(0.05)
            if mode in ("reset", "reset-mid-body"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    server = _Faulty(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("mode", ["reset", "close"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_an_upstream_that_resets_or_closes_without_answering_is_a_502(
    tmp_path: Path, mode: str, method: str
) -> None:
    server = faulty_upstream(mode)
    sidecar = start_sidecar(tmp_path, server.server_address[1])
    try:
        start = time.monotonic()
        r = httpx.request(method, sidecar.url + "/x", content=b"body" if method == "POST" else None)
        took = time.monotonic() - start
        alive = httpx.get(sidecar.admin_url + "/healthz").status_code
    finally:
        sidecar.stop()
        server.shutdown()
        server.server_close()
    assert r.status_code == 502 and r.json()["error"] == "bad_gateway", r.text
    assert took < 1.0 and alive == 200
    record(f"resetting_upstream_{mode}_{method}", {"status": 502, "took_ms": round(took * 1000, 1)})


def test_an_upstream_reset_mid_body_never_looks_like_a_complete_answer(tmp_path: Path) -> None:
    server = faulty_upstream("reset-mid-body")
    sidecar = start_sidecar(tmp_path, server.server_address[1])
    try:
        # A truncated body must never look complete: the client sees the connection cut, or a
        # 502 when the sidecar had not started the answer yet.
        try:
            r = httpx.get(sidecar.url + "/x")
        except httpx.RemoteProtocolError:
            pass
        else:
            assert r.status_code == 502 and r.json()["error"] == "bad_gateway", r.status_code
        assert httpx.get(sidecar.admin_url + "/healthz").status_code == 200
    finally:
        sidecar.stop()
        server.shutdown()
        server.server_close()


# --- the JWKS endpoint down ----------------------------------------------------------------------

ISSUER = "https://idp.faults.test"
API_KEY = "ak_faults_0123456789"


class JwksEndpoint:
    """A JWKS document served by `python -m http.server` from a directory, on a fixed port, so it
    can be stopped and started again."""

    def __init__(self, tmp_path: Path) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.root = tmp_path / "jwks"
        (self.root / ".well-known").mkdir(parents=True)
        jwk = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        jwk.update({"kid": "k1", "use": "sig", "alg": "RS256"})
        (self.root / ".well-known" / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/.well-known/jwks.json"
        self.log = tmp_path / "jwks.log"
        self.process: Process | None = None

    def start(self) -> None:
        self.process = spawn(
            [
                sys.executable,
                "-m",
                "http.server",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--directory",
                str(self.root),
            ],
            self.log,
            self.port,
        )

    def stop(self) -> None:
        if self.process is not None:
            kill(self.process)
            self.process = None

    def token(self, kid: str = "k1", sub: str = "alice") -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": "api", "sub": sub, "iat": now, "exp": now + 300}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": kid})


def jwks_config(jwks: JwksEndpoint) -> str:
    return f"""
[[auth.jwt.providers]]
name = "idp"
issuer = "{ISSUER}"
audiences = ["api"]
jwks_url = "{jwks.url}"
algorithms = ["RS256"]
jwks_refresh_s = 5
jwks_min_refresh_s = 0.5
jwks_timeout_s = 1

[auth.api_keys]
[[auth.api_keys.keys]]
id = "ops"
sha256 = "{hashlib.sha256(API_KEY.encode()).hexdigest()}"

[[routes]]
path = "/*"
auth = ["jwt", "api_key"]
"""


def stale_gauge(sidecar: Sidecar) -> float:
    for line in httpx.get(sidecar.admin_url + "/metrics").text.splitlines():
        if line.startswith("authproxy_jwks_stale{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no authproxy_jwks_stale in /metrics")


def until(predicate: Any, timeout: float) -> float:
    """Poll until `predicate()` is true; how long it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true after {timeout} s")
        time.sleep(0.1)
    return time.monotonic() - start


def test_a_jwks_endpoint_down_at_start_delays_jwt_only_and_is_picked_up_when_back(
    tmp_path: Path, upstream: Process
) -> None:
    jwks = JwksEndpoint(tmp_path)
    sidecar = start_sidecar(tmp_path, upstream.port, jwks_config(jwks), wait_ready=False)
    try:
        until(lambda: httpx.get(sidecar.admin_url + "/healthz").status_code == 200, 10)
        ready = httpx.get(sidecar.admin_url + "/readyz").status_code
        token = jwks.token()
        down = httpx.get(sidecar.url + "/echo/a", headers={"Authorization": f"Bearer {token}"})
        keyed = httpx.get(sidecar.url + "/echo/a", headers={"X-API-Key": API_KEY})
        jwks.start()
        recovered_s = until(
            lambda: (
                httpx.get(
                    sidecar.url + "/echo/a", headers={"Authorization": f"Bearer {token}"}
                ).status_code
                == 200
            ),
            15,
        )
        ready_after = httpx.get(sidecar.admin_url + "/readyz").status_code
    finally:
        jwks.stop()
        sidecar.stop()
    assert ready == 503 and ready_after == 200
    # Not the caller's fault: 503 with Retry-After, never 401.
    assert down.status_code == 503 and down.json()["error"] == "service_unavailable", down.text
    assert "retry-after" in down.headers
    assert keyed.status_code == 200  # API keys do not depend on the JWKS
    record(
        "jwks_down_at_start",
        {
            "jwt_while_down": down.status_code,
            "jwt_reason": down.json()["details"].get("reason"),
            "api_key_while_down": keyed.status_code,
            "readyz_while_down": ready,
            "jwt_ok_after_jwks_back_s": round(recovered_s, 2),
        },
    )


def test_a_jwks_endpoint_down_in_operation_serves_stale_keys(
    tmp_path: Path, upstream: Process
) -> None:
    jwks = JwksEndpoint(tmp_path)
    jwks.start()
    sidecar = start_sidecar(tmp_path, upstream.port, jwks_config(jwks))
    try:
        seen = jwks.token(sub="seen")

        def status(token: str) -> int:
            r = httpx.get(sidecar.url + "/echo/a", headers={"Authorization": f"Bearer {token}"})
            return r.status_code

        assert status(seen) == 200
        jwks.stop()
        # A token naming an unknown kid makes the sidecar refetch at once: the fetch fails.
        unknown = status(jwks.token(kid="k-unknown"))
        until(lambda: stale_gauge(sidecar) == 1.0, 10)
        cached = status(seen)
        fresh = status(jwks.token(sub="never-seen"))
        time.sleep(6)  # past jwks_refresh_s: the background refresh fails as well
        later = status(jwks.token(sub="later"))
        healthy = httpx.get(sidecar.admin_url + "/readyz").status_code
        jwks.start()
        recovered_s = until(lambda: stale_gauge(sidecar) == 0.0, 30)
        log = sidecar.output()
    finally:
        jwks.stop()
        sidecar.stop()
    assert (cached, fresh, later) == (200, 200, 200)
    assert unknown == 401
    assert healthy == 200
    assert "serving the last good keys" in log
    record(
        "jwks_down_in_operation",
        {
            "cached_token": cached,
            "new_token_known_kid": fresh,
            "after_background_refresh_failed": later,
            "unknown_kid": unknown,
            "readyz_while_stale": healthy,
            "stale_cleared_after_jwks_back_s": round(recovered_s, 2),
        },
    )


class _SlowUpstreamWithJwks(http.server.ThreadingHTTPServer):
    daemon_threads = True
    jwks: bytes = b'{"keys": []}'


class _SlowOrJwks(http.server.BaseHTTPRequestHandler):
    """GET /.well-known/jwks.json: the server's JWKS at once; anything else: 5 s, then 200."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        assert isinstance(self.server, _SlowUpstreamWithJwks)
        body = self.server.jwks if self.path == "/.well-known/jwks.json" else b"{}"
        if self.path != "/.well-known/jwks.json":
            time.sleep(5)
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_jwks_fetch_never_waits_behind_a_saturated_upstream_pool(tmp_path: Path) -> None:
    # Issue 11, finding 2: the JWKS is served by the upstream itself (as in the demo) and user
    # traffic holds every pooled upstream connection; a token naming a new key must still get its
    # key fetched at once, not after the pool frees up.
    jwks = JwksEndpoint(tmp_path)  # only for its keys and tokens
    rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server = _SlowUpstreamWithJwks(("127.0.0.1", 0), _SlowOrJwks)

    def publish(*keys: tuple[str, Any]) -> None:
        docs = []
        for kid, key in keys:
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
            docs.append(jwk)
        server.jwks = json.dumps({"keys": docs}).encode()

    publish(("k1", jwks.key))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    jwks.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    sidecar = start_sidecar(
        tmp_path, port, jwks_config(jwks), upstream="max_connections = 2\nconnect_timeout_s = 3\n"
    )
    try:
        token = jwks.token()
        holders = [
            threading.Thread(
                target=httpx.get,
                args=(sidecar.url + "/held",),
                kwargs={"headers": {"Authorization": f"Bearer {token}"}, "timeout": 10},
            )
            for _ in range(2)
        ]
        for t in holders:
            t.start()
        time.sleep(0.5)  # both pooled connections now wait on the upstream
        publish(("k1", jwks.key), ("k2", rotated))
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": "not-ours", "sub": "x", "iat": now, "exp": now + 60}
        new = jwt.encode(claims, rotated, algorithm="RS256", headers={"kid": "k2"})
        start = time.monotonic()
        r = httpx.get(sidecar.url + "/x", headers={"Authorization": f"Bearer {new}"}, timeout=10)
        took = time.monotonic() - start
        for t in holders:
            t.join()
    finally:
        sidecar.stop()
        server.shutdown()
        server.server_close()
    # The new key was fetched (the token got as far as its audience) while the pool was full.
    assert r.status_code == 401 and r.json()["details"].get("reason") == "wrong_audience", r.text
    assert took < 1.0, took
    record("jwks_fetch_with_pool_saturated", {"status": 401, "took_ms": round(took * 1000, 1)})


# --- a log that cannot be written ----------------------------------------------------------------


def start_sidecar_with_stdout(
    tmp_path: Path, upstream_port: int, stdout: Any
) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    port, admin = free_port(), free_port()
    path = tmp_path / "sidecar.toml"
    path.write_text(sidecar_config(upstream_port, port, admin))
    stderr = tmp_path / "sidecar.stderr"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(path)],
            stdout=stdout,
            stderr=err,
            cwd=Path(__file__).resolve().parents[2],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    wait_for_port(port, proc)
    return proc, port, admin, stderr


def serve_requests(port: int, n: int, timeout: float = 3.0) -> tuple[list[int | str], float]:
    """`n` sequential GETs; stops after three client errors. Outcomes and requests per second."""
    outcomes: list[int | str] = []
    start = time.monotonic()
    with httpx.Client(timeout=timeout) as client:
        for i in range(n):
            try:
                outcomes.append(client.get(f"http://127.0.0.1:{port}/echo/{i}").status_code)
            except httpx.HTTPError as exc:
                outcomes.append(type(exc).__name__)
                if sum(isinstance(o, str) for o in outcomes) >= 3:
                    break
    return outcomes, len(outcomes) / (time.monotonic() - start)


def test_a_full_log_device_does_not_stop_the_sidecar(tmp_path: Path, upstream: Process) -> None:
    with open("/dev/full", "wb") as full:
        proc, port, admin, stderr = start_sidecar_with_stdout(tmp_path, upstream.port, full)
    try:
        rss_start = psutil.Process(proc.pid).memory_info().rss
        outcomes, rate = serve_requests(port, 2000)
        healthz = httpx.get(f"http://127.0.0.1:{admin}/healthz", timeout=3).status_code
        rss_end = psutil.Process(proc.pid).memory_info().rss
        alive = proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    assert alive and healthz == 200
    assert outcomes == [200] * 2000, {o for o in outcomes if o != 200}
    record(
        "log_on_dev_full",
        {
            "requests": len(outcomes),
            "all_200": outcomes == [200] * 2000,
            "requests_per_s": round(rate),
            "stderr_bytes_per_request": round(stderr.stat().st_size / len(outcomes)),
            "rss_growth_mib": round((rss_end - rss_start) / 2**20, 1),
        },
    )


def test_a_log_pipe_nobody_reads_does_not_stop_the_sidecar(
    tmp_path: Path, upstream: Process
) -> None:
    # stdout is a pipe (a container runtime, a log shipper) whose reader stalls: once its buffer
    # is full a blocking write would stop the event loop, and every request with it.
    proc, port, admin, _ = start_sidecar_with_stdout(tmp_path, upstream.port, subprocess.PIPE)
    try:
        outcomes, _ = serve_requests(port, 1000)
        try:
            healthz: int | str = httpx.get(
                f"http://127.0.0.1:{admin}/healthz", timeout=3
            ).status_code
        except httpx.HTTPError as exc:
            healthz = type(exc).__name__
        alive = proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    served = next((i for i, o in enumerate(outcomes) if o != 200), len(outcomes))
    record(
        "log_pipe_not_read",
        {
            "requests_answered_before_first_failure": served,
            "failures": [o for o in outcomes if o != 200][:3],
            "admin_healthz_after": healthz,
            "alive": alive,
        },
    )
    assert alive
    assert outcomes == [200] * 1000, f"served {served}, then {[o for o in outcomes if o != 200]}"
    assert healthz == 200


# --- the sidecar restarted under load ------------------------------------------------------------


async def test_a_sidecar_restart_under_load_costs_clients_only_the_gap(
    tmp_path: Path, upstream: Process
) -> None:
    sidecar = start_sidecar(
        tmp_path,
        upstream.port,
        server="graceful_shutdown_s = 2\n",
        body="[websocket]\ndrain_s = 0\n",
    )
    replacement: Sidecar | None = None
    try:
        stop = asyncio.Event()
        load = asyncio.create_task(
            run_load(sidecar.url, stop, workers=6, paths=("/echo/a", "/slow?delay=0.2"))
        )
        await asyncio.sleep(1.0)
        terminated = time.monotonic()
        sidecar.process.signal(signal.SIGTERM)
        code = await asyncio.to_thread(sidecar.process.proc.wait, 10)
        exited = time.monotonic()
        # The same configuration file, ports and all.
        port, admin_port = sidecar.port, sidecar.admin_port
        process = await asyncio.to_thread(
            spawn,
            [sys.executable, "-m", "proxy", "serve", "--config", str(sidecar.config_path)],
            tmp_path / "sidecar-replacement.log",
            port,
            {"AUTHPROXY__LOGGING__FLUSH_INTERVAL_S": "0"},
        )
        replacement = Sidecar(process, port, admin_port, sidecar.config_path)
        listening = time.monotonic()
        await asyncio.sleep(2.0)
        stop.set()
        outcomes = await load
    finally:
        sidecar.stop()
        if replacement is not None:
            replacement.stop()

    assert code == 0
    assert max(o.duration for o in outcomes) < 3.0, "a request hung"
    before = [o for o in outcomes if o.end < terminated]
    during = [o for o in outcomes if terminated <= o.end and o.start < listening]
    after = [o for o in outcomes if o.start > listening + 0.2]
    assert {o.status for o in before} == {200}
    assert {o.status for o in after} == {200}
    # During the gap: answers, connection errors, or 503 from the draining sidecar; nothing else.
    kinds = {(o.status, o.code, o.error) for o in during}
    allowed = {(200, None, None), (503, "service_unavailable", None)}
    assert all(k in allowed or (k[0] is None and k[2] is not None) for k in kinds), kinds
    errors = [o for o in outcomes if o.error is not None]
    assert all(terminated <= o.end <= listening + 0.2 for o in errors)
    record(
        "sidecar_restart",
        {
            "requests": len(outcomes),
            "drain_then_exit_s": round(exited - terminated, 2),
            "gap_until_replacement_listens_s": round(listening - terminated, 2),
            "connection_errors": len(errors),
            "error_kinds": sorted({o.error for o in errors if o.error}),
            "503_draining": sum(o.status == 503 for o in outcomes),
            "after": summary(after),
        },
    )
