"""bench/byte_relay.py, the WebSocket echo's floor in `make bench`: a real relay process between a
real client and bench/upstream.py passes a WebSocket's handshake and frames, and plain HTTP, as
they are."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from bench import contenders, ws_echo


def test_the_byte_relay_passes_websocket_frames_and_http_untouched(tmp_path: Path) -> None:
    up = contenders.upstream(tmp_path)
    relay = None
    try:
        relay = contenders.byte_relay(tmp_path, up.port)
        response = httpx.get(relay.url + "/public/x")
        direct = httpx.get(up.url + "/public/x")
        assert response.status_code == 200 and response.content == direct.content
        result = asyncio.run(ws_echo.measure(relay.ws_url + "/ws", {}, 2, 0.3))
        assert result["messages"] > 0
        assert relay.pids and relay.processes()  # measured as its own process
    finally:
        if relay is not None:
            relay.stop()
        up.stop()
