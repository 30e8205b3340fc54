"""Protecting the upstream, without a sidecar process: the circuit breaker and the admission gate
as sans-I/O objects, then retries and per-route timeouts through the real forwarder against
scripted upstreams on loopback sockets."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from proxy import config
from proxy.auth import consumed_headers
from proxy.errors import BadGateway, ConfigError, GatewayTimeout, ProxyError, ServiceUnavailable
from proxy.explain import explain
from proxy.relay.breaker import CircuitBreaker
from proxy.relay.headers import HeaderPolicy
from proxy.relay.http import Exchange, Forwarder, UpstreamAborted
from proxy.relay.shedding import Admission
from proxy.relay.upstream import UpstreamPool
from proxy.telemetry.metrics import Metrics
from tests.relay.test_upstream import OK, Upstream, body_of, call, upstream

# --- the circuit breaker -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_the_threshold_of_consecutive_failures() -> None:
    clock = Clock()
    b = CircuitBreaker(3, 10.0, clock=clock)
    for _ in range(2):
        b.record(False, b.admit())
    b.record(True, b.admit())  # a success in between starts the count again
    for _ in range(3):
        assert b.state == "closed"
        b.record(False, b.admit())
    assert b.state == "open"
    with pytest.raises(ServiceUnavailable) as refused:
        b.admit()
    assert refused.value.headers["Retry-After"] == "10"
    assert refused.value.details["reason"] == "circuit_open"
    clock.now += 9.5
    with pytest.raises(ServiceUnavailable) as refused:
        b.admit()
    assert refused.value.headers["Retry-After"] == "1"


def test_after_open_s_one_probe_goes_through_and_its_success_closes_the_breaker() -> None:
    clock = Clock()
    b = CircuitBreaker(1, 5.0, clock=clock)
    b.record(False, b.admit())
    clock.now += 5.0
    assert b.admit() is True and b.state == "half_open"
    with pytest.raises(ServiceUnavailable):
        b.admit()  # only one probe at a time
    b.record(True, True)
    assert b.state == "closed" and b.admit() is False


def test_a_failed_probe_opens_the_breaker_again_for_open_s() -> None:
    clock = Clock()
    b = CircuitBreaker(2, 5.0, clock=clock)
    b.record(False, b.admit())
    b.record(False, b.admit())
    clock.now += 6
    b.record(False, b.admit())
    assert b.state == "open" and b.opens == 2
    assert b.details() == {"state": "open", "consecutive_failures": 3, "retry_in_s": 5.0}


def test_a_probe_whose_client_left_lets_the_next_request_probe() -> None:
    clock = Clock()
    b = CircuitBreaker(1, 1.0, clock=clock)
    b.record(False, b.admit())
    clock.now += 1
    b.abandon(b.admit())
    assert b.admit() is True


def test_a_success_admitted_before_the_breaker_opened_does_not_close_it() -> None:
    clock = Clock()
    b = CircuitBreaker(2, 60.0, clock=clock)
    early = b.admit()  # a long stream, admitted while all was well
    b.record(False, b.admit())
    b.record(False, b.admit())
    assert b.state == "open"
    b.record(True, early)  # ... ends well now: says nothing of the last open_s
    assert b.state == "open"


async def test_a_streaming_probe_decides_at_its_head_not_at_its_end() -> None:
    """The half-open probe is a long stream: its 200 head closes the breaker at once, so other
    requests are not refused with circuit_open while it streams."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        if n == 1:
            w.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n")
        elif n == 2:  # the probe: a head, then a body that takes its time
            w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n")
            await w.drain()
            await asyncio.sleep(1.0)
            w.write(b"0\r\n\r\n")
        else:
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await w.drain()
        w.close()

    async with upstream(handler) as up:
        fw = _forwarder(up.port, circuit_breaker={"failure_threshold": 1, "open_s": 0.2})
        assert fw.breaker is not None
        await _call_route(fw)  # the 500: open
        assert fw.breaker.state == "open"
        await asyncio.sleep(0.25)
        probe = asyncio.ensure_future(_call_route(fw))
        deadline = asyncio.get_running_loop().time() + 2
        while fw.breaker.state != "closed":
            assert asyncio.get_running_loop().time() < deadline, fw.breaker.details()
            await asyncio.sleep(0.02)
        assert not probe.done()  # closed while the probe still streams
        other = await _call_route(fw)
        assert other[0]["status"] == 200
        await probe
        assert fw.pool is not None
        await fw.pool.close()


async def test_a_busy_pool_is_not_the_upstream_failing() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        await asyncio.sleep(1.0)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await w.drain()

    async with upstream(handler) as up:
        fw = _forwarder(
            up.port,
            max_connections=1,
            connect_timeout_s=0.1,
            circuit_breaker={"failure_threshold": 1, "open_s": 30},
        )
        assert fw.breaker is not None
        holder = asyncio.ensure_future(_call_route(fw))
        await asyncio.sleep(0.05)
        with pytest.raises(ProxyError) as waited:
            await _call_route(fw)
        assert waited.value.details["reason"] == "pool_timeout"
        assert fw.breaker.state == "closed"  # the sidecar's own capacity, not the upstream's
        await holder
        assert fw.pool is not None
        await fw.pool.close()


# --- the admission gate --------------------------------------------------------------------------


async def test_the_gate_admits_the_limit_queues_in_order_and_sheds_the_rest() -> None:
    gate = Admission(2, 5.0, 2)
    await gate.enter()
    await gate.enter()
    order: list[int] = []

    async def waiter(i: int) -> None:
        await gate.enter()
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(2)]
    await asyncio.sleep(0)
    assert gate.queued == 2
    with pytest.raises(ServiceUnavailable) as shed:
        await gate.enter()  # the queue is full: refused at once
    assert shed.value.details["reason"] == "queue_full"
    gate.leave()
    gate.leave()
    await asyncio.gather(*tasks)
    assert order == [0, 1] and gate.active == 2 and gate.queued == 0


async def test_a_request_that_waits_longer_than_queue_timeout_is_shed() -> None:
    gate = Admission(1, 0.05, 0)
    await gate.enter()
    start = time.monotonic()
    with pytest.raises(ServiceUnavailable) as shed:
        await gate.enter()
    assert shed.value.details["reason"] == "queue_timeout"
    assert 0.04 < time.monotonic() - start < 0.5
    assert gate.queued == 0 and gate.active == 1
    gate.leave()
    assert gate.active == 0


async def test_a_flood_holds_at_most_max_queued_waiters_whatever_its_size() -> None:
    gate = Admission(4, 0.2, 8)
    peak = 0

    async def one() -> str:
        nonlocal peak
        try:
            await gate.enter()
        except ServiceUnavailable as exc:
            return str(exc.details["reason"])
        peak = max(peak, gate.active)
        await asyncio.sleep(0.05)
        gate.leave()
        return "ok"

    results = await asyncio.gather(*(one() for _ in range(2000)))
    assert peak == 4 and gate.active == 0 and gate.queued == 0
    # The four admitted at once, and the eight queued behind them (served as slots freed).
    assert results.count("ok") == 12
    assert results.count("queue_full") == 2000 - 12


# --- retries and per-route timeouts through the forwarder ---------------------------------------


def _forwarder(up_port: int, metrics: Metrics | None = None, **upstream_keys: object) -> Forwarder:
    settings = config.from_dict(
        {"upstream": {"url": f"http://127.0.0.1:{up_port}", **upstream_keys}}
    )
    headers = HeaderPolicy(settings, credential_headers=consumed_headers(settings.auth))
    fw = Forwarder(
        settings.server.max_body_bytes, headers, upstream=settings.upstream, metrics=metrics
    )
    fw.pool = UpstreamPool(settings.upstream, asyncio.get_running_loop())
    return fw


async def _reset(w: asyncio.StreamWriter) -> None:
    sock = w.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    w.transport.abort()


def retried(metrics: Metrics, reason: str) -> float:
    return (
        metrics.registry.get_sample_value("authproxy_upstream_retries_total", {"reason": reason})
        or 0.0
    )


async def test_a_get_whose_fresh_connection_is_reset_before_any_answer_is_sent_again() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        if n == 1:
            await _reset(w)
            return
        w.write(OK)
        await w.drain()

    metrics = Metrics()
    async with upstream(handler) as up:
        fw = _forwarder(up.port, metrics)
        sent, _ = await call(fw, "GET")
        assert fw.pool is not None
        await fw.pool.close()
    assert sent[0]["status"] == 200 and body_of(sent) == b"ok"
    assert len(up.requests) == 2 and up.connections == 2
    assert retried(metrics, "reset") == 1


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_a_post_or_patch_whose_connection_was_reset_is_never_sent_again(method: str) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        await _reset(w)

    metrics = Metrics()
    async with upstream(handler) as up:
        fw = _forwarder(up.port, metrics, retries=3)
        with pytest.raises(BadGateway):
            await call(fw, method, [b"payload"])
        assert fw.pool is not None
        await fw.pool.close()
    assert len(up.requests) == 1 and up.requests[0].endswith(b"payload")
    assert retried(metrics, "reset") == 0


async def test_retries_0_sends_a_get_only_once() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        await _reset(w)

    async with upstream(handler) as up:
        fw = _forwarder(up.port, retries=0)
        with pytest.raises(BadGateway):
            await call(fw, "GET")
        assert fw.pool is not None
        await fw.pool.close()
    assert len(up.requests) == 1


async def test_a_post_that_could_not_connect_is_tried_again_up_to_retries() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    metrics = Metrics()
    fw = _forwarder(port, metrics, retries=2)
    start = time.monotonic()
    with pytest.raises(BadGateway) as failed:
        await call(fw, "POST", [b"x"])
    assert failed.value.details["reason"] == "connect_failed"
    assert retried(metrics, "connect_failed") == 2
    assert time.monotonic() - start < 1.0  # jittered pauses of tens of milliseconds


async def test_a_post_is_sent_once_the_upstream_comes_up_between_attempts() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    up = Upstream(lambda r, w, n: _answer(up, r, w))
    fw = _forwarder(port, Metrics(), retries=5)
    server: asyncio.Server | None = None

    async def come_up() -> None:
        nonlocal server
        await asyncio.sleep(0.03)
        server = await asyncio.start_server(up._serve, "127.0.0.1", port)

    starter = asyncio.create_task(come_up())
    sent, _ = await call(fw, "POST", [b"once"])
    await starter
    assert server is not None
    server.close()
    assert sent[0]["status"] == 200
    assert len(up.requests) == 1 and up.requests[0].endswith(b"once")


async def _answer(up: Upstream, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await up.read_request(r)
    w.write(OK)
    await w.drain()


async def test_a_route_read_timeout_shorter_than_the_upstream_one_is_a_504_in_time() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        await asyncio.sleep(5)

    async with upstream(handler) as up:
        fw = _forwarder(up.port, read_timeout_s=30)
        start = time.monotonic()
        with pytest.raises(GatewayTimeout) as timed_out:
            await _call_route(fw, read_timeout=0.2)
        took = time.monotonic() - start
        assert fw.pool is not None
        await fw.pool.close()
    assert timed_out.value.details["reason"] == "read_timeout"
    assert 0.15 < took < 1.0


async def test_a_route_read_timeout_longer_than_the_upstream_one_lets_a_slow_answer_come() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        await asyncio.sleep(0.4)
        w.write(OK)
        await w.drain()

    async with upstream(handler) as up:
        fw = _forwarder(up.port, read_timeout_s=0.2)
        sent = await _call_route(fw, read_timeout=2.0)
        assert fw.pool is not None
        await fw.pool.close()
    assert sent[0]["status"] == 200 and body_of(sent) == b"ok"


async def test_a_route_deadline_is_a_504_before_the_answer_and_a_cut_after() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        if n == 1:
            await asyncio.sleep(5)
            return
        # A stream that keeps trickling: never silent, never finished.
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(50):
            w.write(b"2\r\nhi\r\n")
            await w.drain()
            await asyncio.sleep(0.05)

    async with upstream(handler) as up:
        fw = _forwarder(up.port)
        start = time.monotonic()
        with pytest.raises(GatewayTimeout) as timed_out:
            await _call_route(fw, timeout=0.3)
        assert timed_out.value.details["reason"] == "deadline"
        assert time.monotonic() - start < 1.0
        start = time.monotonic()
        with pytest.raises(UpstreamAborted):
            await _call_route(fw, timeout=0.3)
        assert 0.25 < time.monotonic() - start < 1.0
        assert fw.pool is not None
        assert fw.pool.size == 0  # the cut exchange's connection was not kept
        await fw.pool.close()


async def _call_route(
    fw: Forwarder, read_timeout: float | None = None, timeout: float | None = None
) -> list[dict[str, object]]:
    sent: list[dict[str, object]] = []
    asked: list[bool] = []

    async def receive() -> dict[str, object]:
        if asked:
            await asyncio.sleep(3600)  # the client stays: only the deadline ends a stream
        asked.append(True)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await fw.forward(
        {"type": "http", "method": "GET"},
        receive,
        send,
        raw_path=b"/x",
        query=b"",
        headers=[],
        content_length=None,
        response_headers=lambda h: h,
        exchange=Exchange(),
        read_timeout=read_timeout,
        timeout=timeout,
    )
    return sent


async def test_the_breaker_in_the_forwarder_answers_503_without_touching_the_upstream() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            await up.read_request(r)
            w.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n")
            await w.drain()

    metrics = Metrics()
    async with upstream(handler) as up:
        fw = _forwarder(up.port, metrics, circuit_breaker={"failure_threshold": 2, "open_s": 30})
        for _ in range(2):
            sent = await _call_route(fw)
            assert sent[0]["status"] == 500
        with pytest.raises(ProxyError) as refused:
            await _call_route(fw)
        assert fw.pool is not None
        await fw.pool.close()
    assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "30"
    assert len(up.requests) == 2
    assert metrics.registry.get_sample_value("authproxy_upstream_circuit_state") == 1
    shed = metrics.registry.get_sample_value(
        "authproxy_upstream_shed_total", {"reason": "circuit_open"}
    )
    assert shed == 1


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"upstream": {"max_concurrent_requests": -1}}, "upstream.max_concurrent_requests: "),
        ({"upstream": {"queue_timeout_s": -0.5}}, "upstream.queue_timeout_s: "),
        ({"upstream": {"retries": 9}}, "upstream.retries: "),
        (
            {"upstream": {"circuit_breaker": {"failure_threshold": -2}}},
            "upstream.circuit_breaker.failure_threshold: ",
        ),
        ({"upstream": {"circuit_breaker": {"open_s": 0}}}, "upstream.circuit_breaker.open_s: "),
        (
            {"routes": [{"path": "/a", "auth": "public", "timeout_s": 0}]},
            "routes[0].timeout_s: ",
        ),
        (
            {"routes": [{"path": "/a", "auth": "public", "read_timeout_s": "long"}]},
            "routes[0].read_timeout_s: ",
        ),
    ],
)
def test_a_bad_resilience_key_is_a_one_line_error_naming_it(
    data: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config.from_dict(data)
    message = str(info.value)
    assert message.startswith(expected) and "\n" not in message, message


def test_everything_that_protects_the_upstream_is_off_by_default() -> None:
    settings = config.from_dict({})
    headers = HeaderPolicy(settings, credential_headers=consumed_headers(settings.auth))
    fw = Forwarder(settings.server.max_body_bytes, headers, upstream=settings.upstream)
    assert fw.breaker is None and fw.admission is None
    assert settings.upstream.retries == 1 and settings.upstream.queue_timeout_s == 1.0
    assert settings.upstream.circuit_breaker.open_s == 10


async def test_explain_shows_a_route_s_own_timeouts() -> None:
    settings = config.from_dict(
        {
            "routes": [
                {"path": "/api/chat/*", "auth": "public", "read_timeout_s": 300, "timeout_s": 900},
                {"path": "/*", "auth": "public"},
            ]
        }
    )
    ok, text = await explain(settings, "POST", "/api/chat/completions", [])
    line = "routes[0] '/api/chat/*' (auth: public; read timeout 300 s; deadline 900 s)"
    assert ok and line in text
    ok, text = await explain(settings, "GET", "/other", [])
    assert ok and "routes[1] '/*' (auth: public)" in text
