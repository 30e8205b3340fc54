"""The whole demo (`make run`: upstream_demo, its page and the sidecar) on free ports, as the
browser tests drive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.servers import ROOT, free_port


@dataclass
class Stack:
    proc: subprocess.Popen[bytes]
    log: Path
    ports: dict[str, int]

    @property
    def page_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['web']}/"


def ready(admin_port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{admin_port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def demo_stack(
    log: Path, *extra: str, env: dict[str, str] | None = None, timeout: float = 30
) -> Iterator[Stack]:
    """`python -m upstream_demo.stack --config config.toml` with `extra` arguments, until it is
    running and the sidecar ready; stopped with SIGINT (Ctrl-C) afterwards."""
    ports = {name: free_port() for name in ("web", "sidecar", "admin", "upstream")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "upstream_demo.stack",
                "--config",
                "config.toml",
                *("--web-port", str(ports["web"]), "--sidecar-port", str(ports["sidecar"])),
                *("--admin-port", str(ports["admin"]), "--upstream-port", str(ports["upstream"])),
                *extra,
            ],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout
        while b"demo is running" not in log.read_bytes() or not ready(ports["admin"]):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield Stack(proc, log, ports)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
