"""Idle memory per WebSocket: the proxy's RSS with N idle sockets open through it, minus before.

The client side runs in its own process, so its memory is not counted:

    python -m bench.ws_idle ws://127.0.0.1:PORT/ws --count 1000 [-H 'Name: value']

opens COUNT sockets (no compression, no pings, so they stay idle), prints `ready COUNT`, and
holds them until its stdin closes. `measure` drives it and reads the proxy's RSS (every process
of the contender) before the first socket opens and once they have all settled.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import select
import subprocess
import sys
import time
from dataclasses import dataclass

import uvloop
from websockets.asyncio.client import ClientConnection, connect

from tests.support.servers import ROOT

from .contenders import Server

OPEN_TIMEOUT_S = 120
BATCH = 100  # handshakes in flight at once: a burst of 1,000 would only measure the accept queue


@dataclass(frozen=True)
class Idle:
    """RSS of a proxy before and after COUNT idle sockets."""

    count: int
    before: int
    after: int

    @property
    def kb_per_socket(self) -> float:
        return (self.after - self.before) / 1024 / self.count


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def _hold(url: str, headers: dict[str, str], count: int) -> None:
    sockets: list[ClientConnection] = []
    for start in range(0, count, BATCH):
        sockets += await asyncio.gather(
            *(
                connect(url, additional_headers=headers, compression=None, ping_interval=None)
                for _ in range(min(BATCH, count - start))
            )
        )
    print(f"ready {len(sockets)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


def command(url: str, count: int, headers: dict[str, str]) -> list[str]:
    args = [sys.executable, "-m", "bench.ws_idle", url, "--count", str(count)]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    return args


def measure(
    server: Server, url: str, headers: dict[str, str], count: int, settle_s: float = 1.0
) -> Idle:
    before = server.rss_bytes()
    client = subprocess.Popen(
        command(url, count, headers),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert client.stdin is not None and client.stdout is not None
    try:
        # Bounded: a proxy that stalls a handshake must not hang the whole run.
        readable, _, _ = select.select([client.stdout], [], [], OPEN_TIMEOUT_S)
        line = client.stdout.readline() if readable else ""
        if not line.startswith("ready"):
            client.kill()
            client.wait(10)
            error = (client.stderr.read() if client.stderr else "").strip().splitlines()
            raise RuntimeError(error[-1] if error else f"client exited {client.returncode}")
        time.sleep(settle_s)  # buffers released after the handshakes, lazy allocations made
        after = server.rss_bytes()
    finally:
        client.stdin.close()
        try:
            client.wait(30)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait()
    return Idle(count, before, after)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("-H", "--header", action="append", default=[])
    args = parser.parse_args()
    raise_fd_limit(args.count + 256)
    headers = dict(h.split(": ", 1) for h in args.header)
    uvloop.run(_hold(args.url, headers, args.count))


if __name__ == "__main__":
    main()
