"""Real servers for integration tests: subprocesses on ephemeral loopback ports."""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


# Ports this process handed out lately: the kernel may give a probed port again once its probe
# closed, and a sidecar once got the same one for server.listen and admin.listen.
_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=256)


def free_port() -> int:
    """A loopback port free now, and none that this process handed out lately."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.append(port)
            return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


@dataclass
class Process:
    """A child process whose output is collected in a file."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int

    def output(self) -> str:
        """What it wrote so far, in whole lines while it runs: the file is read as the process
        appends to it, and a batch of log lines caught mid-write would end in half a line
        (a JSON line a test then fails to parse)."""
        text = self.log_path.read_text(errors="replace")
        if self.proc.poll() is None and not text.endswith("\n"):
            return text[: text.rfind("\n") + 1]
        return text

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def spawn(
    args: Sequence[str],
    log_path: Path,
    port: int,
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> Process:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            list(args), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env
        )
    process = Process(proc, log_path, port)
    if wait:
        try:
            wait_for_port(port, proc)
        except Exception:
            process.stop()
            raise RuntimeError(f"{args} did not start:\n{process.output()}") from None
    return process


def start_upstream(
    app: str, tmp_path: Path, port: int | None = None, extra_args: Sequence[str] = ()
) -> Process:
    """Run an ASGI app ("module:attr") on uvicorn."""
    port = port or free_port()
    name = app.replace(":", "_").replace(".", "_")
    return spawn(
        [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--lifespan",
            "off",
            *extra_args,
        ],
        tmp_path / f"upstream-{name}-{port}.log",
        port,
    )


@dataclass
class Sidecar:
    """A running `python -m proxy serve`."""

    process: Process
    port: int
    admin_port: int
    config_path: Path
    routes: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def output(self) -> str:
        return self.process.output()

    def stop(self) -> int:
        return self.process.stop()


DEFAULT_ROUTES = """
[[routes]]
path = "/*"
auth = "public"
"""


def sidecar_config(
    upstream_port: int,
    port: int,
    admin_port: int,
    body: str = "",
    server: str = "",
    upstream: str = "",
    upstream_scheme: str = "http",
) -> str:
    """A config with listeners and upstream filled in. `server`/`upstream` add keys to those
    tables; `body` adds other tables and routes (a public catch-all route when it has none)."""
    body = textwrap.dedent(body)
    url = f"{upstream_scheme}://127.0.0.1:{upstream_port}"
    text = (
        f'[server]\nlisten = "127.0.0.1:{port}"\n{textwrap.dedent(server)}\n'
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
        f'[upstream]\nurl = "{url}"\n{textwrap.dedent(upstream)}\n'
    )
    return text + body + ("" if "[[routes]]" in body else DEFAULT_ROUTES)


def start_sidecar(
    tmp_path: Path,
    upstream_port: int,
    body: str = "",
    *,
    server: str = "",
    upstream: str = "",
    upstream_scheme: str = "http",
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
) -> Sidecar:
    """Write a config and run the sidecar on fresh ports; waits until it listens."""
    port, admin_port = free_port(), free_port()
    config_path = tmp_path / f"authproxy-{port}.toml"
    config_path.write_text(
        sidecar_config(upstream_port, port, admin_port, body, server, upstream, upstream_scheme)
    )
    # Tests read the log right after a request: access lines are written at once unless a test
    # asks for batching (the default of 0.1 s) through the same override.
    env = {"AUTHPROXY__LOGGING__FLUSH_INTERVAL_S": "0", **(env or {})}
    process = spawn(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config_path)],
        tmp_path / f"sidecar-{port}.log",
        port,
        env=env,
    )
    sidecar = Sidecar(process, port, admin_port, config_path)
    if wait_ready:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if httpx.get(sidecar.admin_url + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    return sidecar
