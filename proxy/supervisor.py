"""`server.workers` > 1: a supervisor that serves no request itself, and N workers that do.

    supervisor ── admin listener: /metrics sums every worker's (Prometheus multiprocess files),
    │             /readyz asks each worker on its readiness socket
    ├── worker 0 ── public listener: its own socket on server.listen, SO_REUSEPORT
    └── worker 1 ── public listener: its own socket on server.listen, SO_REUSEPORT

The supervisor validates the configuration and builds every stage once as a worker will (a bad
configuration exits 2 before any worker starts), binds the public port with SO_REUSEPORT without
listening on it (a port that is taken fails here, and the port stays ours while a worker is being
replaced; the kernel hands connections only to listening sockets), creates a private directory
(0700, removed at exit) and starts the workers in sessions of their own, so a terminal's Ctrl-C
reaches them once, through the supervisor. SIGTERM and SIGINT are forwarded (each worker drains
exactly as a single process does) and the supervisor exits once every worker has: 0 when all of
them exited 0. SIGHUP is forwarded to every worker that has started (one still starting reads the
current files anyway). A worker that dies otherwise is logged and replaced, a second apart when
it keeps dying young; one that dies before the group has first come up stops the group with its
exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import uvloop

from . import compiled
from .admin import AdminApp, Exposition
from .app import App
from .config import Settings, split_listen
from .errors import ConfigError
from .server import QuietServer, admin_config, log_config_warnings, serve_quietly
from .telemetry import logs
from .telemetry.metrics import GroupMetrics
from .workers import (
    WorkerRole,
    ask_readiness,
    metrics_dir,
    prepare,
    readiness_path,
    reserve_port,
)

log = logging.getLogger("authproxy")

_YOUNG_S = 10.0  # a worker that dies younger than this is replaced only after _RESTART_DELAY_S
_RESTART_DELAY_S = 1.0
_KILL_MARGIN_S = 10.0  # past graceful_shutdown_s + websocket.drain_s, what is left is killed


def supervise(settings: Settings, workers: int, config_path: str | None = None) -> int:
    """Run `workers` worker processes until SIGTERM/SIGINT; the exit status of the group."""
    logs.configure(settings.logging.level, settings.logging.flush_interval_s)
    try:
        # Every stage as a worker builds it (secrets, key files): a mistake stops the group here.
        asyncio.run(App(settings).check())
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return 2
    log_config_warnings(settings)
    host, port = split_listen(settings.server.listen)
    try:
        reserved = reserve_port(host, port)
    except OSError as exc:
        log.error("cannot listen on server.listen %s: %s", settings.server.listen, exc)
        return 1
    directory = tempfile.mkdtemp(prefix="authproxy-")
    try:
        prepare(directory, settings)
        log.info(
            "authproxy starting",
            extra={
                "fields": {
                    "listen": settings.server.listen,
                    "admin": settings.admin.listen,
                    "upstream": settings.upstream.url,
                    "workers": workers,
                    "compiled": compiled.summary(),
                }
            },
        )
        port = reserved.getsockname()[1]  # server.listen may ask for port 0
        supervisor = Supervisor(settings, workers, directory, port, config_path=config_path)
        return uvloop.run(supervisor.run())
    finally:
        reserved.close()
        shutil.rmtree(directory, ignore_errors=True)


@dataclass(frozen=True)
class WorkerStatus:
    """A worker as /readyz reports it; `checks` is None when it did not answer (or is not there)."""

    worker: int  # its slot: 0 .. server.workers - 1
    pid: int | None
    checks: dict[str, bool] | None
    config: dict[str, str] | None = None  # the sha256 and load time of the config it runs


@dataclass
class _Slot:
    """One worker's place in the group; its process changes when it is replaced."""

    index: int
    process: asyncio.subprocess.Process | None = None
    started: bool = False  # has answered on its readiness socket


class Supervisor:
    """Starts, watches, signals and replaces the workers; answers for them on the admin listener."""

    def __init__(
        self,
        settings: Settings,
        workers: int,
        directory: str,
        port: int,
        *,
        config_path: str | None = None,
    ) -> None:
        self._settings = settings
        self._config_path = config_path
        self._directory = directory
        self._port = port
        self._slots = [_Slot(i) for i in range(workers)]
        self._metrics = GroupMetrics(metrics_dir(directory))
        self._draining = False
        self._stopping = asyncio.Event()
        self._up = False  # every worker has started at least once
        self._failure: int | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        self._parent_fd = -1  # the read end of a pipe whose write end only this process holds

    def checks(self) -> dict[str, bool]:
        """The supervisor's own readiness checks."""
        return {"not_draining": not self._draining}

    async def worker_readiness(self) -> list[WorkerStatus]:
        """What each worker answers now on its readiness socket."""

        async def ask(slot: _Slot) -> WorkerStatus:
            process = slot.process
            if process is None or process.returncode is not None:
                return WorkerStatus(slot.index, None, None)
            answer = await ask_readiness(readiness_path(self._directory, slot.index))
            if answer is not None and slot.process is process:
                self._started(slot)  # so a group /readyz saw ready is a group that is up
            checks = None if answer is None else answer.get("checks")
            if not isinstance(checks, dict):
                checks = None
            config = None if answer is None else answer.get("config")
            return WorkerStatus(
                slot.index, process.pid, checks, config if isinstance(config, dict) else None
            )

        return list(await asyncio.gather(*(ask(slot) for slot in self._slots)))

    def stop(self, sig: int) -> None:
        """SIGTERM/SIGINT: every worker drains; a second SIGINT makes them stop at once."""
        if not self._draining:
            self._draining = True
            self._stopping.set()
            log.info("draining workers", extra={"fields": {"signal": signal.Signals(sig).name}})
            grace = (
                self._settings.server.shutdown_delay_s
                + self._settings.server.graceful_shutdown_s
                + self._settings.websocket.drain_s
                + _KILL_MARGIN_S
            )
            self._kill_timer = asyncio.get_running_loop().call_later(grace, self._kill)
        self._signal(sig, started_only=False)

    def reload(self) -> None:
        """SIGHUP: every started worker reloads (one still starting reads the files anyway; one
        draining may have dropped its handler, and SIGHUP's default action would kill it)."""
        if self._draining:
            return
        sent = self._signal(signal.SIGHUP, started_only=True)
        log.info("SIGHUP forwarded", extra={"fields": {"workers": sent}})

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self.stop, signal.SIGINT)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        # When the write end closes (this process exits, however), every worker's read end sees
        # end-of-file and the worker drains instead of serving on as an orphan.
        self._parent_fd, parent_write_fd = os.pipe()
        group = GroupAdmin(self._metrics, self.checks, self.worker_readiness)
        admin = QuietServer(admin_config(group, self._settings))
        admin_task = asyncio.create_task(serve_quietly(admin))
        try:
            # The admin listener first: /healthz answers while the workers start.
            while not admin.started and not admin_task.done():
                await asyncio.sleep(0.01)
            if admin_task.done():
                log.error("cannot listen on admin.listen %s", self._settings.admin.listen)
                return 1
            codes = await asyncio.gather(*(self._keep(slot) for slot in self._slots))
        finally:
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            admin.should_exit = True
            await admin_task
            # Only now: a signal's default action would end this process before its clean-up.
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            os.close(self._parent_fd)
            os.close(parent_write_fd)
        if self._failure is not None:
            return self._failure
        return 0 if all(code == 0 for code in codes) else 1

    async def _keep(self, slot: _Slot) -> int:
        """Keep a worker running in this slot until the group drains; its last exit status."""
        while True:
            process = await self._spawn(slot)
            born = time.monotonic()
            await self._until_started(slot, process)
            code = await process.wait()
            started, slot.process, slot.started = slot.started, None, False
            self._metrics.forget(process.pid)
            fields = {"worker": slot.index, "pid": process.pid, "exit": code}
            if self._draining:
                log.info("worker exited", extra={"fields": fields})
                # One that had not started had nothing in flight: how it ended does not matter.
                return code if started else 0
            if not self._up:
                log.error("worker exited before the group started", extra={"fields": fields})
                if self._failure is None:
                    self._failure = code if code > 0 else 1
                self.stop(signal.SIGTERM)
                return code
            log.warning("worker exited unexpectedly; replacing it", extra={"fields": fields})
            if time.monotonic() - born < _YOUNG_S:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), _RESTART_DELAY_S)
                # Set meanwhile by a signal: mypy narrows the attribute across the await.
                if self._draining:
                    return code  # type: ignore[unreachable]

    async def _spawn(self, slot: _Slot) -> asyncio.subprocess.Process:
        role = WorkerRole(
            slot.index, self._directory, self._port, self._parent_fd, self._config_path
        )
        environ = {**os.environ, **role.environ()}
        environ.pop("prometheus_multiproc_dir", None)  # the old spelling would win over ours
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "serve",
            env=environ,
            pass_fds=(self._parent_fd,),
            start_new_session=True,
        )
        slot.process = process
        log.info("worker spawned", extra={"fields": {"worker": slot.index, "pid": process.pid}})
        if self._draining:  # the signal went out while this one was being spawned
            process.send_signal(signal.SIGTERM)
        return process

    async def _until_started(self, slot: _Slot, process: asyncio.subprocess.Process) -> None:
        path = readiness_path(self._directory, slot.index)
        while process.returncode is None and not slot.started:
            if await ask_readiness(path) is not None and slot.process is process:
                self._started(slot)
            else:
                await asyncio.sleep(0.05)

    def _started(self, slot: _Slot) -> None:
        if slot.started:
            return
        slot.started = True
        if not self._up and all(s.started for s in self._slots):
            self._up = True
            log.info("workers started", extra={"fields": {"workers": len(self._slots)}})

    def _signal(self, sig: int, *, started_only: bool) -> int:
        sent = 0
        for slot in self._slots:
            process = slot.process
            if process is None or process.returncode is not None:
                continue
            if started_only and not slot.started:
                continue
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
                sent += 1
        return sent

    def _kill(self) -> None:
        left = self._signal(signal.SIGKILL, started_only=False)
        if left:
            log.error("workers still draining; killed", extra={"fields": {"workers": left}})


class GroupAdmin(AdminApp):
    """The group's admin app: every worker's metrics; ready when the supervisor and every worker
    are (the body lists each worker's checks)."""

    def __init__(
        self,
        metrics: Exposition,
        checks: Callable[[], dict[str, bool]],
        workers: Callable[[], Awaitable[list[WorkerStatus]]],
    ) -> None:
        super().__init__(metrics, checks)
        self._workers = workers

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        checks = self._readiness()
        workers = []
        for worker in await self._workers():
            ready = worker.checks is not None and all(worker.checks.values())
            workers.append({**asdict(worker), "ready": ready})
            for name, ok in (worker.checks or {}).items():  # holds when it holds in every worker
                checks[name] = checks.get(name, True) and bool(ok)
        checks["all_workers_ready"] = all(w["ready"] for w in workers)
        return all(checks.values()), {"checks": checks, "workers": workers}
