"""What a supervisor and its workers share (`server.workers` > 1; the supervisor is supervisor.py).

A worker is `python -m proxy serve` with `AUTHPROXY_WORKER` in its environment. The marker names
its slot, the supervisor's private directory (the settings the supervisor validated, the
Prometheus multiprocess files, one readiness socket per worker), the public port and a pipe whose
other end only the supervisor holds: when the supervisor dies, however it dies, the pipe reads
end-of-file and the worker drains as on SIGTERM instead of serving on as an orphan.

The exchanges are deliberately tiny: a worker answers a connection to its readiness socket with
one JSON object (`{"pid": ..., "checks": {...}}`) and closes it; nothing else travels between
the processes while they serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import pickle
import socket
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from .config import Settings
from .telemetry.metrics import MULTIPROCESS_ENV

MARKER = "AUTHPROXY_WORKER"
_SETTINGS_FILE = "settings.pickle"


def count(workers: int | Literal["auto"]) -> int:
    """`server.workers` as a number of processes: "auto" is one per usable core."""
    return usable_cores() if workers == "auto" else workers


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (a
    container limited to 2 CPUs on a 64-core node should not start 64 workers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        quota, period = (root / "cpu.max").read_text().split()  # cgroup v2: "max 100000"
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):  # cgroup v1
        v1_quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        v1_period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return v1_quota / v1_period if v1_quota > 0 else None
    return None


@dataclass(frozen=True)
class WorkerRole:
    """What the supervisor tells a worker: its slot, the private directory, the public port and
    the descriptor that reads end-of-file once the supervisor is gone."""

    index: int
    directory: str
    port: int
    parent_fd: int
    # The file a reload (SIGHUP) reads again (None: $AUTHPROXY_CONFIG, then ./config.toml).
    config_path: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> WorkerRole | None:
        raw = environ.get(MARKER)
        return None if raw is None else cls(**json.loads(raw))

    def environ(self) -> dict[str, str]:
        """The variables a worker is started with (on top of the supervisor's environment)."""
        return {
            MARKER: json.dumps(asdict(self)),
            MULTIPROCESS_ENV: metrics_dir(self.directory),
            # Each log record then leaves in one write(2) of whole lines, so the workers' lines
            # never interleave mid-line on the stdout they share.
            "PYTHONUNBUFFERED": "1",
        }

    @property
    def readiness_path(self) -> str:
        return readiness_path(self.directory, self.index)

    def settings(self) -> Settings:
        """The settings the supervisor validated (not the file again: it may have changed)."""
        with open(Path(self.directory) / _SETTINGS_FILE, "rb") as f:
            settings = pickle.load(f)  # our own file, in a directory only this user can enter
        assert isinstance(settings, Settings)
        return settings


def prepare(directory: str, settings: Settings) -> None:
    """Fill the supervisor's private directory before the first worker starts."""
    os.mkdir(metrics_dir(directory), 0o700)
    # Owner-only, like the directory: it names the environment variables secrets come from.
    fd = os.open(Path(directory) / _SETTINGS_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        pickle.dump(settings, f)


def metrics_dir(directory: str) -> str:
    return str(Path(directory) / "metrics")


def readiness_path(directory: str, index: int) -> str:
    return str(Path(directory) / f"worker-{index}.sock")


def reserve_port(host: str, port: int) -> socket.socket:
    """The supervisor's socket on host:port: bound with SO_REUSEPORT so the workers can join it,
    never listening, so the kernel sends it no connection. A port some other process already
    listens on is refused first, even one bound with SO_REUSEPORT (a second group started by
    mistake would otherwise silently take half of the first one's connections)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]  # port 0: the one the kernel chose
    return reuseport_socket(host, port)


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT: every worker binds its own, and the
    kernel spreads new connections across those that listen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn decides it
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def serve_readiness(
    path: str,
    checks: Callable[[], dict[str, bool]],
    details: Callable[[], dict[str, object]] | None = None,
) -> asyncio.Server:
    """Answer each connection to `path` with this worker's readiness checks (and its details:
    the config it runs), then close it."""

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            extra = details() if details is not None else {}
            writer.write(json.dumps({**extra, "pid": os.getpid(), "checks": checks()}).encode())
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by the worker this one replaces
    return await asyncio.start_unix_server(answer, path)


async def ask_readiness(path: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """A worker's answer on its readiness socket; None when it does not answer in time."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                raw = await reader.read()
            finally:
                writer.close()
        answer = json.loads(raw)
    except (OSError, TimeoutError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None
