"""The trace context through a real sidecar: kept or started, passed upstream on both hops, and
named in the access line."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.support.servers import Process, Sidecar, start_sidecar, start_upstream

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


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


def access_lines(sidecar: Sidecar, at_least: int = 1) -> list[dict[str, Any]]:
    """The access lines so far, once there are `at_least` (the log is written by a thread)."""
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(x) for x in sidecar.output().splitlines() if x.startswith("{")]
        found = [x for x in lines if x.get("message") in ("request", "websocket")]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_a_callers_context_reaches_the_upstream_unchanged(sidecar: Sidecar) -> None:
    r = httpx.get(
        sidecar.url + "/echo/t",
        headers={"traceparent": VALID, "tracestate": "congo=t61rcWkgMzE"},
    )
    seen = r.json()["headers"]
    assert [v for k, v in seen if k == "traceparent"] == [VALID]
    assert [v for k, v in seen if k == "tracestate"] == ["congo=t61rcWkgMzE"]
    line = access_lines(sidecar)[-1]
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_a_request_without_one_starts_a_trace_the_log_and_upstream_share(
    sidecar: Sidecar,
) -> None:
    for n, headers in enumerate(({}, {"traceparent": "garbage", "tracestate": "congo=1"})):
        r = httpx.get(sidecar.url + "/echo/t", headers=headers)
        seen = dict(r.json()["headers"])
        request_id = r.headers["x-request-id"]
        assert seen["traceparent"].startswith(f"00-{request_id}-")
        assert seen["traceparent"].endswith("-00")
        assert "tracestate" not in seen
        assert access_lines(sidecar, n + 1)[-1]["trace_id"] == request_id


async def test_a_websocket_handshake_carries_the_context(sidecar: Sidecar) -> None:
    async with connect(
        sidecar.ws_url + "/ws/t", additional_headers={"traceparent": VALID}, open_timeout=5
    ) as ws:
        await ws.send("!info")
        report = json.loads(await ws.recv())
    headers = {k.lower(): v for k, v in report["headers"]}
    assert headers["traceparent"] == VALID
