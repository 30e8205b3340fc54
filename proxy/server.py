"""Runs the app on uvicorn: the public listener and the admin listener in one event loop; or, as
one of `server.workers` processes, the public listener alone (supervisor.py runs the admin one)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import math
import os
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Generator
from types import FrameType
from typing import Any

import uvicorn
import uvloop

from . import compiled
from .app import App
from .config import Settings, split_listen
from .config import load as load_config
from .config import warnings as config_warnings
from .errors import ConfigError
from .http11 import http_protocol
from .telemetry import logs
from .types import ASGIApp
from .workers import WorkerRole, reuseport_socket, serve_readiness
from .wsprotocol import LeanWebSocketProtocol


class TlsConfig(uvicorn.Config):
    """A uvicorn configuration serving with the app's own TLS context (tls.py): its ciphers and
    protocol floor, and the one object SIGHUP reloads the certificate into."""

    def __init__(self, app: ASGIApp, tls: ssl.SSLContext | None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.tls = tls

    def load(self) -> None:
        super().load()
        if self.tls is not None:
            self.ssl = self.tls


class QuietServer(uvicorn.Server):
    """The admin server: the public server owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


# A SIGINT this soon after the first stop signal is the same stop, not a person's second Ctrl-C.
SAME_STOP_S = 1.0


class DrainingServer(uvicorn.Server):
    """The public server: on SIGTERM or SIGINT the app starts draining before uvicorn closes."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_exit: Callable[[], None],
        drained: Callable[[], Awaitable[None]] | None = None,
        *,
        on_stop: Callable[[], None] | None = None,
        delay_s: float = 0.0,
    ) -> None:
        super().__init__(config)
        self._on_exit_once = [on_exit]
        self._drained = drained
        self._on_stop = on_stop
        self._delay_s = delay_s
        self._delayed: asyncio.TimerHandle | None = None
        self._stopping_since: float | None = None  # monotonic time the stop began

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            yield
            # uvicorn re-raises the signals its handle_exit noted once serving ends: the process
            # would die by SIGTERM (or a KeyboardInterrupt traceback) after a clean drain. Ours
            # notes none; this holds should a later uvicorn note them elsewhere.
            self._captured_signals.clear()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Stop accepting at once, then let the app drain (WebSockets get 1001 after
        # websocket.drain_s) before uvicorn closes what is left: it would send them 1012 now.
        for server in self.servers:
            server.close()
        if self._drained is not None:
            await self._drained()
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Python may run one signal handler inside another (a pending one runs between any two
        # bytecodes of the first): Ctrl-C under `make run` brings a SIGINT and the stack's SIGTERM
        # a moment apart. So every step here leaves a state the other signal reads right, and the
        # second Ctrl-C is decided here, never by uvicorn's handle_exit (which would force the
        # exit on any SIGINT that finds `should_exit` set, the same stop's included).
        if self.should_exit:
            since = self._stopping_since
            later = since is not None and time.monotonic() >= since + SAME_STOP_S
            if sig == signal.SIGINT and later:
                # A person's second Ctrl-C: exit at once, without the drain or the lifespan's
                # shutdown. Within SAME_STOP_S it is the same stop told twice (a terminal's
                # Ctrl-C reaches the whole process group, and the supervisor above, `make run`'s
                # stack or an init system, sends its SIGTERM too).
                self.force_exit = True
            return
        # SIGTERM (a rolling update, a scale-down) with `server.shutdown_delay_s`: readiness fails
        # at once, serving goes on for the delay, then the drain. SIGINT (a person at a terminal)
        # and a second signal go straight to the drain.
        if (
            self._delay_s > 0
            and sig == signal.SIGTERM
            and self._delayed is None
            and self._on_stop is not None
        ):
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
                self._on_stop()
                self._delayed = loop.call_later(self._delay_s, self._exit_now, sig)
                logging.getLogger("authproxy").info(
                    "stopping: readiness failed, serving on for server.shutdown_delay_s",
                    extra={"fields": {"shutdown_delay_s": self._delay_s}},
                )
                return
        self._exit_now(sig, frame)

    def _exit_now(self, sig: int, frame: FrameType | None = None) -> None:
        if self._delayed is not None:
            self._delayed.cancel()
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()  # before should_exit: see handle_exit
        self.should_exit = True
        try:
            # list.pop is one step no signal handler can split: the app hears of the stop once.
            on_exit = self._on_exit_once.pop()
        except IndexError:
            return
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().call_soon_threadsafe(on_exit)


def draining_server(config: uvicorn.Config, app: App, settings: Settings) -> DrainingServer:
    return DrainingServer(
        config,
        app.begin_drain,
        app.drained,
        on_stop=app.begin_stop,
        delay_s=settings.server.shutdown_delay_s,
    )


def uvicorn_configs(app: App, settings: Settings) -> tuple[uvicorn.Config, uvicorn.Config]:
    """The public and admin listeners' uvicorn configurations."""
    host, port = split_listen(settings.server.listen)
    ws = settings.websocket
    public = TlsConfig(
        app,
        app.tls,
        host=host,
        port=port,
        lifespan="on",
        ws=LeanWebSocketProtocol,
        ws_max_size=ws.max_message_bytes,
        ws_per_message_deflate=ws.client_compression,
        ws_ping_interval=ws.ping_interval_s or None,
        ws_ping_timeout=ws.ping_interval_s or None,
        timeout_graceful_shutdown=math.ceil(settings.server.graceful_shutdown_s),
        **_common_options(settings),
    )
    return public, admin_config(app.admin, settings)


def admin_config(admin: ASGIApp, settings: Settings) -> uvicorn.Config:
    """The admin listener's uvicorn configuration (a process's own admin app, or a group's)."""
    admin_host, admin_port = split_listen(settings.admin.listen)
    return uvicorn.Config(
        admin,
        host=admin_host,
        port=admin_port,
        lifespan="off",
        ws="none",
        **_common_options(settings),
    )


def _common_options(settings: Settings) -> dict[str, Any]:
    # uvicorn's own proxy-headers handling trusts 127.0.0.1; forwarding headers are decided in
    # relay/headers.py against server.trusted_proxies instead.
    return dict(
        loop="none",
        http=http_protocol(settings.server.max_header_bytes, settings.server.header_timeout_s),
        proxy_headers=False,
        server_header=False,
        date_header=False,
        log_config=None,
        access_log=False,
    )


def log_config_warnings(settings: Settings) -> None:
    """What `check-config` prints as warnings, logged once at start."""
    log = logging.getLogger("authproxy")
    for line in config_warnings(settings):
        log.warning("config warning: %s", line, extra={"fields": {"event": "config_warning"}})


# Python's cyclic collector runs a young-generation pass every 700 allocations by default: a few
# times per proxied request, which allocates ~100 short-lived objects that reference counting
# frees anyway. The sidecar makes few cycles; a pass per GC_YOUNG_THRESHOLD allocations is ~5 %
# less CPU a request (bench). The objects built at start (modules, config, the app) are moved out
# of the collector's sight first: older generations stay small to scan.
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def serve(settings: Settings, source: Callable[[], Settings] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; in-flight requests finish, new ones are refused."""
    logs.configure(settings.logging.level, settings.logging.flush_interval_s)
    app = App(settings, source)
    tune_gc()
    public_config, admin_config = uvicorn_configs(app, settings)
    public = draining_server(public_config, app, settings)
    admin = QuietServer(admin_config)

    log = logging.getLogger("authproxy")
    log_config_warnings(settings)

    async def run() -> int:
        # The admin listener first: /healthz answers while the app starts (JWKS are fetched).
        admin_task = asyncio.create_task(serve_quietly(admin))
        while not admin.started and not admin_task.done():
            await asyncio.sleep(0.01)
        if admin_task.done():
            log.error("cannot listen on admin.listen %s", settings.admin.listen)
            return 1
        try:
            if not await serve_quietly(public):
                return _startup_failure(app, settings)
            return 0
        finally:
            admin.should_exit = True
            await admin_task

    logging.getLogger("authproxy").info(
        "authproxy starting",
        extra={
            "fields": {
                "listen": settings.server.listen,
                "admin": settings.admin.listen,
                "upstream": settings.upstream.url,
                "compiled": compiled.summary(),
            }
        },
    )
    return uvloop.run(run())


def serve_worker(settings: Settings, role: WorkerRole) -> int:
    """One of `server.workers` processes: the public listener on a SO_REUSEPORT socket of its own.
    The supervisor runs the admin listener and asks this process for its readiness; SIGTERM,
    SIGINT and SIGHUP reach it from the supervisor and mean what they mean to a single process."""
    logs.configure(settings.logging.level, settings.logging.flush_interval_s)
    app = App(settings, _worker_source(role))
    tune_gc()
    public_config, _ = uvicorn_configs(app, settings)
    public = draining_server(public_config, app, settings)
    log = logging.getLogger("authproxy")
    host, _ = split_listen(settings.server.listen)

    async def run() -> int:
        loop = asyncio.get_running_loop()
        try:
            sock = reuseport_socket(host, role.port)
        except OSError as exc:
            log.error("cannot listen on server.listen %s: %s", settings.server.listen, exc)
            return 1

        def orphaned() -> None:  # the supervisor is gone: drain as on SIGTERM, then exit
            loop.remove_reader(role.parent_fd)
            public.handle_exit(signal.SIGTERM, None)

        loop.add_reader(role.parent_fd, orphaned)
        public_task = asyncio.create_task(serve_quietly(public, [sock]))
        while not public.started and not public_task.done():
            await asyncio.sleep(0.01)
        readiness: asyncio.Server | None = None
        if not public_task.done():
            # Answering on its readiness socket is how the supervisor learns this worker started.
            readiness = await serve_readiness(
                role.readiness_path, app.readiness, app.readiness_details
            )
        try:
            if not await public_task:
                return _startup_failure(app, settings)
            return 0
        finally:
            if readiness is not None:
                readiness.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(role.readiness_path)

    log.info(
        "authproxy worker starting",
        extra={"fields": {"worker": role.index, "listen": settings.server.listen}},
    )
    return uvloop.run(run())


def _worker_source(role: WorkerRole) -> Callable[[], Settings]:
    """What a worker's reload reads: the file the supervisor was started with, each worker for
    itself (an invalid one is refused by each, with its line and metric)."""
    return functools.partial(load_config, role.config_path)


def _startup_failure(app: App, settings: Settings) -> int:
    """The exit status (and its one log line) when the public listener did not start."""
    log = logging.getLogger("authproxy")
    if isinstance(app.startup_error, ConfigError):
        log.error("config error: %s", app.startup_error)
        return 2
    if app.startup_error is not None:
        log.error("startup failed: %s", app.startup_error)
    else:
        log.error("cannot start on server.listen %s", settings.server.listen)
    return 1


async def serve_quietly(server: uvicorn.Server, sockets: list[socket.socket] | None = None) -> bool:
    """Run a uvicorn server; False when it could not start (uvicorn exits the process then)."""
    try:
        await server.serve(sockets)
    except SystemExit:
        return False
    return server.started
