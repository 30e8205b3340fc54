"""WebSocket echo rate: N connections, each sending a message and waiting for its echo, for S s.

    python -m bench.ws_echo ws://127.0.0.1:PORT/ws --connections 8 --seconds 3 [-H 'Name: value']
        [--compression deflate]

Prints one JSON object: {"messages": round trips completed, "seconds": elapsed, "rate": per s}.
It runs in its own process so that its CPU is not the orchestrator's. Compression is not offered
unless `--compression deflate`: the figure is the relay's cost, not zlib's (and the upstream is
pod-local, so the sidecar does not compress toward it either). Browsers offer permessage-deflate:
through the sidecar (`websocket.client_compression`, on by default) their messages are inflated
and framed again, where uncompressed frames pass whole; the option measures that way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import uvloop
from websockets.asyncio.client import ClientConnection, connect

MESSAGE = '{"type":"ping","seq":12345,"payload":"bench"}'


async def _loop(ws: ClientConnection, deadline: float) -> int:
    count = 0
    while time.monotonic() < deadline:
        await ws.send(MESSAGE)
        await ws.recv()
        count += 1
    return count


async def measure(
    url: str,
    headers: dict[str, str],
    connections: int,
    seconds: float,
    compression: str | None = None,
) -> dict[str, float]:
    # Connect every socket first, then start the loops together: handshakes are not in the rate.
    sockets = await asyncio.gather(
        *(
            connect(
                url,
                additional_headers=headers,
                compression=compression,
                ping_interval=None,
                open_timeout=10,
            )
            for _ in range(connections)
        )
    )
    try:
        begin = time.monotonic()
        counts = await asyncio.gather(*(_loop(ws, begin + seconds) for ws in sockets))
        elapsed = time.monotonic() - begin
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets))
    return {"messages": sum(counts), "seconds": elapsed, "rate": sum(counts) / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("-H", "--header", action="append", default=[])
    parser.add_argument("--compression", choices=["deflate"], default=None)
    args = parser.parse_args()
    headers = dict(h.split(": ", 1) for h in args.header)
    result = uvloop.run(
        measure(args.url, headers, args.connections, args.seconds, args.compression)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
