"""Protecting a struggling upstream, around a real sidecar: the circuit breaker against an upstream
that fails on command, load shedding under a flood, retries after a reset."""

from __future__ import annotations

import asyncio
import http.server
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

from tests.support.servers import Sidecar, start_sidecar, start_upstream


class Commanded(http.server.ThreadingHTTPServer):
    """An upstream told what to do: `mode` "ok" (200) or "fail" (500), `delay_s` per request; it
    counts requests and the most it ever had at once; `reset_first` resets that many requests
    (RST after reading the head, no answer)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.mode = "ok"
        self.delay_s = 0.0
        self.reset_first = 0
        self.requests: list[str] = []
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Commanded

    def _any(self) -> None:
        s = self.server
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        with s.lock:
            s.requests.append(f"{self.command} {body.decode()}")
            resetting = s.reset_first > 0
            s.reset_first -= 1 if resetting else 0
            s.active += 1
            s.peak = max(s.peak, s.active)
        try:
            if resetting:
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()
                self.close_connection = True
                return
            time.sleep(s.delay_s)
            status = 500 if s.mode == "fail" else 200
            payload = b'{"ok":true}' if status == 200 else b'{"error":"boom"}'
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        finally:
            with s.lock:
                s.active -= 1

    do_GET = do_POST = do_PUT = do_PATCH = _any  # noqa: N815 (http.server's naming)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def metric(sidecar: Sidecar, line_start: str) -> float:
    for line in httpx.get(sidecar.admin_url + "/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def test_the_breaker_opens_answers_503_fast_then_half_opens_and_recovers(tmp_path: Path) -> None:
    up = Commanded()
    sidecar = start_sidecar(
        tmp_path,
        up.port,
        upstream="retries = 0\n[upstream.circuit_breaker]\nfailure_threshold = 3\nopen_s = 1\n",
    )
    try:
        with httpx.Client(base_url=sidecar.url) as client:
            assert client.get("/a").status_code == 200
            up.mode = "fail"
            assert [client.get("/a").status_code for _ in range(3)] == [500, 500, 500]
            seen = len(up.requests)
            start = time.monotonic()
            refused = [client.get("/a") for _ in range(20)]
            took = time.monotonic() - start
            assert len(up.requests) == seen  # while open, nothing reaches the upstream
            for r in refused:
                assert r.status_code == 503 and r.json()["error"] == "service_unavailable"
                assert r.json()["details"]["reason"] == "circuit_open"
                assert r.headers["retry-after"] == "1"
            assert took < 1.0  # twenty refusals: answered at once, not waited out
            ready = httpx.get(sidecar.admin_url + "/readyz").json()
            assert ready["circuit_breaker"]["state"] == "open"
            assert metric(sidecar, "authproxy_upstream_circuit_state") == 1
            assert metric(sidecar, "authproxy_upstream_circuit_opens_total") == 1

            time.sleep(1.1)  # open_s over: the next request is the probe, and still fails
            assert client.get("/a").status_code == 500
            assert client.get("/a").status_code == 503  # opened again by the failed probe
            up.mode = "ok"
            time.sleep(1.1)
            assert client.get("/a").status_code == 200  # the probe succeeds: closed
            assert [client.get("/a").status_code for _ in range(5)] == [200] * 5
            ready = httpx.get(sidecar.admin_url + "/readyz").json()
            assert ready["circuit_breaker"] == {"state": "closed", "consecutive_failures": 0}
            assert ready["status"] == "ready"
            assert metric(sidecar, "authproxy_upstream_circuit_state") == 0
            assert metric(sidecar, "authproxy_upstream_circuit_opens_total") == 2
    finally:
        sidecar.stop()
        up.close()


def test_an_unreachable_upstream_opens_the_breaker_too(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sidecar = start_sidecar(
        tmp_path, port, upstream="[upstream.circuit_breaker]\nfailure_threshold = 2\nopen_s = 30\n"
    )
    try:
        codes = [httpx.get(sidecar.url + "/a") for _ in range(3)]
    finally:
        sidecar.stop()
    assert [r.status_code for r in codes] == [502, 502, 503]
    assert codes[0].json()["details"]["reason"] == "connect_failed"
    assert codes[2].headers["retry-after"] == "30"


def test_a_flood_beyond_the_cap_gets_quick_503s_and_the_upstream_never_sees_more(
    tmp_path: Path,
) -> None:
    up = Commanded()
    up.delay_s = 0.4
    sidecar = start_sidecar(
        tmp_path,
        up.port,
        upstream="max_concurrent_requests = 4\nqueue_timeout_s = 0.2\nmax_queued_requests = 8\n",
    )

    async def flood() -> list[tuple[int, float, str]]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=sidecar.url, limits=limits, timeout=10) as client:

            async def one(i: int) -> tuple[int, float, str]:
                start = time.monotonic()
                r = await client.get(f"/f{i}")
                reason = (
                    r.json().get("details", {}).get("reason", "") if r.status_code != 200 else ""
                )
                assert r.status_code != 503 or r.headers["retry-after"] == "1"
                return r.status_code, time.monotonic() - start, reason

            return await asyncio.gather(*(one(i) for i in range(60)))

    try:
        results = asyncio.run(flood())
        after = httpx.get(sidecar.url + "/after")
        shed_full = metric(sidecar, 'authproxy_upstream_shed_total{reason="queue_full"}')
        shed_wait = metric(sidecar, 'authproxy_upstream_shed_total{reason="queue_timeout"}')
    finally:
        sidecar.stop()
        up.close()
    ok = [r for r in results if r[0] == 200]
    shed = [r for r in results if r[0] == 503]
    assert len(ok) + len(shed) == len(results)  # nothing else: no 502, no 504
    assert 4 <= len(ok) < 60 and shed
    assert up.peak <= 4  # the upstream never had more than the cap at once
    assert all(took < 0.4 + 0.3 for _, took, _ in shed)  # refused quickly, never the full wait
    assert {reason for _, _, reason in shed} <= {"queue_full", "queue_timeout"}
    assert shed_full + shed_wait == len(shed)
    assert after.status_code == 200  # the slots all came back


def test_a_get_is_retried_after_a_reset_and_a_post_never_sent_again(tmp_path: Path) -> None:
    up = Commanded()
    sidecar = start_sidecar(tmp_path, up.port, upstream="retries = 1\n")
    try:
        up.reset_first = 1
        got = httpx.get(sidecar.url + "/r")
        up.reset_first = 1
        posted = httpx.post(sidecar.url + "/r", content=b"charge-once")
        retries = metric(sidecar, 'authproxy_upstream_retries_total{reason="reset"}')
    finally:
        sidecar.stop()
        up.close()
    assert got.status_code == 200 and got.json() == {"ok": True}
    assert posted.status_code == 502 and posted.json()["error"] == "bad_gateway"
    assert up.requests == ["GET ", "GET ", "POST charge-once"]  # the POST reached it once
    assert retries == 1


def test_a_route_sets_its_own_read_timeout_and_deadline(tmp_path: Path) -> None:
    up = start_upstream("tests.support.upstreams:app", tmp_path)
    routes = """
    [[routes]]
    path = "/slow"
    methods = ["GET"]
    auth = "public"
    read_timeout_s = 2.0

    [[routes]]
    path = "/sse"
    auth = "public"
    timeout_s = 0.5

    [[routes]]
    path = "/*"
    auth = "public"
    """
    sidecar = start_sidecar(tmp_path, up.port, routes, upstream="read_timeout_s = 0.3")
    try:
        slow_ok = httpx.get(sidecar.url + "/slow?delay=0.6", timeout=5)  # its route waits longer
        start = time.monotonic()
        # The same endpoint through the catch-all route: upstream.read_timeout_s applies.
        default = httpx.post(sidecar.url + "/slow?delay=0.6", timeout=5)
        default_took = time.monotonic() - start
        start = time.monotonic()
        cut = ""
        received = b""
        try:
            with httpx.stream("GET", sidecar.url + "/sse?n=20&delay=0.1", timeout=5) as r:
                assert r.status_code == 200
                for piece in r.iter_raw():
                    received += piece
        except httpx.HTTPError as exc:
            cut = type(exc).__name__
        sse_took = time.monotonic() - start
    finally:
        sidecar.stop()
        up.stop()
    assert slow_ok.status_code == 200 and slow_ok.json() == {"slow": True}
    assert default.status_code == 504 and default.json()["details"]["reason"] == "read_timeout"
    assert 0.25 < default_took < 0.6
    # A stream past its route's deadline is cut (never ended as if complete), on time.
    assert cut and b"data: 0" in received and b"data: 19" not in received
    assert 0.4 < sse_took < 1.5


async def test_websocket_sessions_do_not_take_the_slots_of_max_concurrent_requests(
    tmp_path: Path,
) -> None:
    up = start_upstream("tests.support.ws_upstream:app", tmp_path)
    sidecar = start_sidecar(
        tmp_path, up.port, upstream="max_concurrent_requests = 1\nqueue_timeout_s = 0\n"
    )
    try:
        sessions = [await connect(sidecar.ws_url + f"/ws{i}") for i in range(3)]
        for i, ws in enumerate(sessions):
            await ws.send(f"hello {i}")
            assert await ws.recv() == f"hello {i}"
        async with httpx.AsyncClient(base_url=sidecar.url) as client:
            answers = [await client.get("/stats") for _ in range(3)]
        for ws in sessions:
            await ws.close()
    finally:
        sidecar.stop()
        up.stop()
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[-1].json()["connects"] == 3
