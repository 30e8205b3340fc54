"""Clients that stall must not hold the upstream pool: the attack of issue 11 (finding 2), with a
pool of one connection so a single stalled client would block everyone."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.servers import Process, Sidecar, start_sidecar


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, upstream: Process) -> Iterator[Sidecar]:
    s = start_sidecar(
        tmp_path_factory.mktemp("stalls"),
        upstream.port,
        server="send_timeout_s = 0.6\nclient_body_timeout_s = 0.6\nmax_body_bytes = 100000000",
        upstream="max_connections = 1\nconnect_timeout_s = 2.0",
    )
    yield s
    s.stop()


def access_lines(sidecar: Sidecar) -> list[dict[str, object]]:
    out = []
    for line in sidecar.output().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("message") == "request":
                out.append(record)
    return out


def test_a_client_that_stops_reading_is_cut_and_frees_the_upstream_connection(
    sidecar: Sidecar,
) -> None:
    with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /download?size=60000000 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
        # ...and never read again: the sidecar's writes back up, its send waits.
        started = time.monotonic()
        r = httpx.get(f"{sidecar.url}/echo/after", timeout=10)
        assert r.status_code == 200, r.text  # the pool's only connection came back
        assert time.monotonic() - started < 5
    lines = [x for x in access_lines(sidecar) if x.get("error") == "send_timeout"]
    assert lines and lines[-1]["path"] == "/download"


def test_a_client_that_stops_sending_its_body_gets_408_and_frees_the_upstream_connection(
    sidecar: Sidecar,
) -> None:
    with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100
        )
        sock.settimeout(10)
        started = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        assert time.monotonic() - started < 5
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "request_timeout"
    assert body["details"]["reason"] == "client_body_timeout"
    assert httpx.get(f"{sidecar.url}/echo/after", timeout=10).status_code == 200


def test_a_trickle_that_keeps_coming_is_not_a_stall(sidecar: Sidecar) -> None:
    def body() -> Iterator[bytes]:
        for _ in range(6):
            time.sleep(0.25)  # each gap well under client_body_timeout_s, the whole well over
            yield b"y" * 1000

    r = httpx.post(f"{sidecar.url}/upload", content=body(), timeout=10)
    assert r.status_code == 200 and r.json()["size"] == 6000


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory, upstream: Process) -> Iterator[Sidecar]:
    s = start_sidecar(
        tmp_path_factory.mktemp("capped"),
        upstream.port,
        server='trusted_proxies = ["127.0.0.0/8"]',
        upstream="max_concurrent_per_client = 1",
    )
    yield s
    s.stop()


def test_one_client_address_gets_at_most_its_share_of_concurrent_upstream_requests(
    capped: Sidecar,
) -> None:
    slow: dict[str, int] = {}

    def hold(name: str, xff: str) -> None:
        r = httpx.get(f"{capped.url}/slow?delay=1", headers={"X-Forwarded-For": xff}, timeout=10)
        slow[name] = r.status_code

    first = threading.Thread(target=hold, args=("first", "203.0.113.7"))
    first.start()
    time.sleep(0.3)
    same = httpx.get(f"{capped.url}/echo/x", headers={"X-Forwarded-For": "203.0.113.7"})
    other = httpx.get(f"{capped.url}/echo/x", headers={"X-Forwarded-For": "198.51.100.9"})
    first.join()
    assert slow["first"] == 200
    assert same.status_code == 429 and same.headers["retry-after"] == "1"
    assert same.json()["details"]["reason"] == "client_concurrency"
    assert other.status_code == 200  # another client behind the same trusted proxy
    # The slot came back when the slow request ended.
    again = httpx.get(f"{capped.url}/echo/x", headers={"X-Forwarded-For": "203.0.113.7"})
    assert again.status_code == 200
