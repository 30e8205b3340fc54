"""Request-head limits that hold before the application sees a byte: size and time."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import psutil
import pytest

from tests.support.servers import Process, Sidecar, start_sidecar


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, upstream: Process) -> Iterator[Sidecar]:
    s = start_sidecar(
        tmp_path_factory.mktemp("limits"),
        upstream.port,
        server="max_header_bytes = 16384\nheader_timeout_s = 1.0",
    )
    yield s
    s.stop()


def read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return out


def test_an_endless_request_head_is_cut_off_at_the_limit(sidecar: Sidecar) -> None:
    rss_before = psutil.Process(sidecar.process.proc.pid).memory_info().rss
    with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
        sock.sendall(b"GET /echo/x HTTP/1.1\r\nHost: a\r\n")
        sent = 0
        try:
            for i in range(2000):  # up to 2 MB of header lines, never finished
                sock.sendall(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000))
                sent += 1000
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400 ")
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "bad_request" and body["details"]["reason"] == "headers_too_large"
    rss_after = psutil.Process(sidecar.process.proc.pid).memory_info().rss
    assert rss_after - rss_before < 8 * 1024 * 1024


def test_a_slow_request_head_is_closed_after_the_header_timeout(sidecar: Sidecar) -> None:
    with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /echo/x HTTP/1.1\r\nHost: a\r\n")
        closed = False
        for i in range(20):  # one header line every 0.3 s: never finishes in time
            time.sleep(0.3)
            try:
                sock.sendall(b"X-Slow-%d: 1\r\n" % i)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sock.settimeout(0.01)
            try:
                if sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        assert closed
        assert time.monotonic() - started < 3.0


def test_each_keep_alive_request_gets_its_own_head_deadline(sidecar: Sidecar) -> None:
    """One head timer per connection: a second request's slow head is measured from its own
    start (not cut early by the first request's deadline, nor spared by it)."""
    with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
        sock.sendall(b"GET /echo/one HTTP/1.1\r\nHost: a\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(0.7)  # most of the first head's second gone
        begun = time.monotonic()
        sock.sendall(b"GET /echo/two HTTP/1.1\r\nHost: a\r\n")  # ... and never ends
        sock.settimeout(3)
        assert sock.recv(1) == b""  # closed
        waited = time.monotonic() - begun
        assert 0.9 <= waited < 2.0, waited  # header_timeout_s = 1.0 from the second head


def test_a_connection_that_sends_nothing_is_closed(sidecar: Sidecar) -> None:
    with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
        started = time.monotonic()
        assert read_all(sock, timeout=5.0) == b""
        assert time.monotonic() - started < 3.0


def test_a_slow_response_is_not_cut_by_the_header_timeout(sidecar: Sidecar) -> None:
    with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
        sock.sendall(b"GET /slow?delay=2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        answer = read_all(sock, timeout=10.0)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b'{"slow":true}')


def test_a_head_just_under_the_limit_is_served(sidecar: Sidecar) -> None:
    with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
        sock.sendall(
            b"GET /echo/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Pad: "
            + b"a" * 15000
            + b"\r\n\r\n"
        )
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_a_request_that_is_not_http_gets_the_json_error_format(sidecar: Sidecar) -> None:
    with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
        sock.sendall(
            b"GET /echo/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400 ")
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "bad_request" and body["details"]["reason"] == "malformed_request"
    assert set(body) == {"error", "message", "details", "request_id", "timestamp"}
