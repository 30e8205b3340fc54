"""`make run`: the whole demo — upstream_demo (:9000 and the page on :5173) and the sidecar (:8000,
admin :8001) — as two child processes. Ctrl-C (or SIGTERM) stops both.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from types import FrameType


def _wait_for(
    host: str, port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"make run: {what} exited with {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"make run: {what} is not listening on {host}:{port} after {timeout:.0f}s")


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m upstream_demo.stack", description=__doc__)
    parser.add_argument("--config", default="config.toml", help="the sidecar's config")
    parser.add_argument("--web-port", type=int, default=5173)
    parser.add_argument("--event-interval", type=float, default=3.0)
    args = parser.parse_args(argv)

    with open(args.config, "rb") as f:
        config = tomllib.load(f)
    listen = config.get("server", {}).get("listen", "127.0.0.1:8000")
    admin = config.get("admin", {}).get("listen", "127.0.0.1:8001")
    upstream_url = config.get("upstream", {}).get("url", "http://127.0.0.1:9000")
    upstream_port = int(upstream_url.rsplit(":", 1)[1].split("/")[0])
    host, port = _split(listen)
    public = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::", "::1") else host

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    children: list[subprocess.Popen[bytes]] = []
    names: dict[int, str] = {}

    def stop() -> None:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in reversed(children):
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()

    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # The first Ctrl-C or SIGTERM stops the stack; more (make and the terminal both send
        # one) are ignored while the children shut down.
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        demo = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "upstream_demo",
                "--port",
                str(upstream_port),
                "--web-port",
                str(args.web_port),
                "--event-interval",
                str(args.event_interval),
                "--api-url",
                f"http://{public}:{port}",
                "--ws-url",
                f"ws://{public}:{port}/ws",
            ],
            env=env,
        )
        children.append(demo)
        names[demo.pid] = "upstream_demo"
        _wait_for("127.0.0.1", upstream_port, demo, "upstream_demo")
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", args.config], env=env
        )
        children.append(sidecar)
        names[sidecar.pid] = "the sidecar"
        _wait_for(
            host if host not in ("0.0.0.0", "::") else "127.0.0.1", port, sidecar, "the sidecar"
        )
        print(
            "\n  authproxy demo is running:\n"
            f"    demo page        http://127.0.0.1:{args.web_port}   "
            "(admin@example.com / admin, viewer@example.com / viewer)\n"
            f"    sidecar          http://{public}:{port}   (WebSocket ws://{public}:{port}/ws)\n"
            f"    admin            http://{admin}/healthz  /readyz  /metrics\n"
            f"    upstream_demo    {upstream_url}   (behind the sidecar)\n"
            "  Ctrl-C stops all three.\n",
            flush=True,
        )
        while all(child.poll() is None for child in children):
            time.sleep(0.3)
        failed = [c for c in children if c.poll() is not None]
        print(f"make run: {names[failed[0].pid]} exited; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop()


if __name__ == "__main__":
    raise SystemExit(main())
