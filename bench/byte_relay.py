"""The floor of a relay in one Python process: bytes copied both ways, nothing parsed.

    python -m bench.byte_relay --port P --upstream-port U

Each client connection gets its own upstream connection; whatever one sends is written to the
other as it arrives (asyncio `Protocol`s on uvloop, the sidecar's loop), so a WebSocket's
handshake and frames pass untouched. No checks, no logs, no metrics: what it costs is what any
relay written in Python on this stack pays for the system calls and the loop, before doing
anything. `make bench` runs the WebSocket echo through it beside the sidecar, so the sidecar's
share of direct can be read against the most such a relay gets on the same machine, same run.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import uvloop


class _Upstream(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        client = self.client
        client.upstream = self
        if client.early:  # what the client sent before this connection was up
            self.transport.write(b"".join(client.early))
            client.early.clear()

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class _Client(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.upstream: _Upstream | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: _Upstream(self), "127.0.0.1", self.upstream_port)
        except OSError:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            self.early.append(data)
        else:
            upstream.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Client(upstream_port), "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream_port))


if __name__ == "__main__":
    main()
