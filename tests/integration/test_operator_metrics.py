"""The metrics an operator watches beside the request counts: upstream latency, requests in
flight, WebSocket traffic by direction, reloads."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.support.servers import Process, Sidecar, start_sidecar, start_upstream


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Process]:
    process = start_upstream("tests.support.upstreams:http_and_ws", tmp_path)
    yield process
    process.stop()


@pytest.fixture
def sidecar(tmp_path: Path, upstream: Process) -> Iterator[Sidecar]:
    s = start_sidecar(tmp_path, upstream.port)
    yield s
    s.stop()


def metric(sidecar: Sidecar, name: str, labels: str = "") -> float:
    text = httpx.get(sidecar.admin_url + "/metrics").text
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" (\S+)"
    m = re.search("^" + pattern + "$", text, re.M)
    assert m is not None, (name, labels)
    return float(m.group(1))


def test_upstream_latency_is_measured_apart_from_the_request(sidecar: Sidecar) -> None:
    route = 'route="/*"'
    assert httpx.get(sidecar.url + "/slow?delay=0.3").status_code == 200
    assert metric(sidecar, "authproxy_upstream_duration_seconds_count", route) == 1
    total = metric(sidecar, "authproxy_upstream_duration_seconds_sum", route)
    assert 0.3 <= total < 2
    # A refusal by the sidecar itself never reaches the upstream: not counted there.
    httpx.get(sidecar.url + "/echo", headers={"Host": "bad host"})
    assert metric(sidecar, "authproxy_upstream_duration_seconds_count", route) == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_requests_in_flight_go_up_and_come_back(
    tmp_path: Path, upstream: Process, workers: int
) -> None:
    # One process: an int the gauge reads at scrape time; workers: the multiprocess gauge, summed.
    sidecar = start_sidecar(tmp_path, upstream.port, server=f"workers = {workers}\n")
    try:
        _in_flight_round(sidecar)
    finally:
        sidecar.stop()


def _in_flight_round(sidecar: Sidecar) -> None:
    assert metric(sidecar, "authproxy_requests_in_flight") == 0
    threads = [
        threading.Thread(target=httpx.get, args=(sidecar.url + "/slow?delay=1",)) for _ in range(3)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while metric(sidecar, "authproxy_requests_in_flight") != 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert metric(sidecar, "authproxy_requests_in_flight") == 0


async def test_websocket_messages_and_bytes_are_counted_by_direction(sidecar: Sidecar) -> None:
    async with connect(sidecar.ws_url + "/ws/echo", open_timeout=5) as ws:
        for message in ("one", "two", b"\x00" * 10):
            await ws.send(message)
            assert await ws.recv() == message
        # Counted as they pass, not when the session ends.
        assert metric(sidecar, "authproxy_websocket_messages_total", 'direction="in"') == 3
        assert metric(sidecar, "authproxy_websocket_messages_total", 'direction="out"') == 3
        assert metric(sidecar, "authproxy_websocket_bytes_total", 'direction="in"') == 16
        assert metric(sidecar, "authproxy_websocket_bytes_total", 'direction="out"') == 16
