"""Starting every contender on loopback, and measuring the processes that make each one up.

Each contender is a `Server`: where it listens and which process trees are "the proxy" for CPU
and memory accounting (nginx's master and worker; nginx plus the JWT service for `auth_request`;
every worker of the sidecar or granian). The upstream is never part of a proxy's figures.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from proxy import config
from tests.support.servers import (
    Process,
    free_port,
    sidecar_config,
    spawn,
    start_sidecar,
    start_upstream,
)

from . import tokens

# Uploads of 100 MiB must pass the sidecar's body limit (10 MiB by default).
MAX_BODY_BYTES = 200 * 1024 * 1024
# The product's default log batching: the test harness turns it off to read logs at once.
SIDECAR_ENV = {
    tokens.HS_SECRET_ENV: tokens.HS_SECRET,
    "AUTHPROXY__LOGGING__FLUSH_INTERVAL_S": str(config.Settings().logging.flush_interval_s),
}
UVICORN_FAST = ["--http", "httptools", "--loop", "uvloop", "--ws", "websockets-sansio"]


@dataclass
class Server:
    """A running contender."""

    name: str
    port: int
    pids: list[int]
    stops: list[Callable[[], object]] = field(default_factory=list)
    detail: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def processes(self) -> list[psutil.Process]:
        found: list[psutil.Process] = []
        for pid in self.pids:
            try:
                root = psutil.Process(pid)
                found += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return found

    def cpu_seconds(self) -> float:
        """User + system CPU of every process of the contender, so far."""
        total = 0.0
        for p in self.processes():
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
        return total

    def rss_bytes(self) -> int:
        total = 0
        for p in self.processes():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def stop(self) -> None:
        for stop in reversed(self.stops):
            stop()
        self.stops.clear()


def _process_server(name: str, process: Process, detail: str = "") -> Server:
    return Server(name, process.port, [process.proc.pid], [process.stop], detail)


def _uvicorn(app: str, tmp: Path, port: int, env: dict[str, str], factory: bool = False) -> Process:
    args = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    args += [*UVICORN_FAST, "--log-level", "warning", "--no-access-log", "--lifespan", "on"]
    if factory:
        args.append("--factory")
    return spawn(args, tmp / f"{app.replace(':', '_')}-{port}.log", port, env=env)


def upstream(tmp: Path) -> Server:
    process = start_upstream("bench.upstream:app", tmp, extra_args=UVICORN_FAST)
    return _process_server("upstream", process, "bench/upstream.py on uvicorn (httptools, uvloop)")


def sidecar_body(creds: tokens.Credentials) -> str:
    """Providers, keys and routes of the bench config (listeners and upstream come from
    tests.support.servers.sidecar_config)."""
    return f"""
        [[auth.jwt.providers]]
        name = "rs"
        issuer = "{tokens.RS_ISSUER}"
        audiences = ["{tokens.AUDIENCE}"]
        jwks_file = "{creds.jwks_file}"
        algorithms = ["RS256"]
        [[auth.jwt.providers]]
        name = "hs"
        issuer = "{tokens.HS_ISSUER}"
        audiences = ["{tokens.AUDIENCE}"]
        secret_env = "{tokens.HS_SECRET_ENV}"
        algorithms = ["HS256"]
        [auth.api_keys]
        [[auth.api_keys.keys]]
        id = "bench"
        sha256 = "{creds.api_key_sha256}"
        [[routes]]
        path = "/public/*"
        auth = "public"
        [[routes]]
        path = "/jwt/*"
        auth = ["jwt"]
        [[routes]]
        path = "/key/*"
        auth = ["api_key"]
        [[routes]]
        path = "/ws"
        auth = ["jwt"]
        # The idle-memory figure opens 1,000 sockets as one caller; the per-caller cap guards
        # against abuse and would refuse them (429).
        [websocket]
        max_connections_per_identity = 0
        """


def _server_table(workers: int | None) -> str:
    table = f"max_body_bytes = {MAX_BODY_BYTES}\n"
    return table + (f"workers = {workers}\n" if workers is not None else "")


def sidecar_accepts_workers(tmp: Path, upstream_port: int, creds: tokens.Credentials) -> str:
    """'' when `server.workers = 2` passes `check-config`, else why not (its error line)."""
    path = tmp / "workers-probe.toml"
    path.write_text(
        sidecar_config(
            upstream_port, free_port(), free_port(), sidecar_body(creds), _server_table(2)
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, **SIDECAR_ENV},
        timeout=60,
    )
    if result.returncode == 0:
        return ""
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[-1] if lines else f"check-config exited {result.returncode}"


def sidecar(
    tmp: Path, upstream_port: int, creds: tokens.Credentials, workers: int | None
) -> Server:
    """`python -m proxy serve`; `workers=None` leaves the key out (a sidecar without it)."""
    running = start_sidecar(
        tmp, upstream_port, sidecar_body(creds), server=_server_table(workers), env=SIDECAR_ENV
    )
    shown = workers or 1
    return Server(
        f"sidecar w{shown}",
        running.port,
        [running.process.proc.pid],
        [running.stop],
        f"`python -m proxy serve`, server.workers = {shown}; the product's defaults (access "
        "log on) but `server.max_body_bytes` (200 MiB, for the upload figure); RS256 keys from "
        "a `jwks_file`, HS256 from `secret_env`",
    )


def granian_sidecar(tmp: Path, upstream_port: int, creds: tokens.Credentials) -> Server:
    """The same App under granian (bench/granian_app.py), one worker."""
    port = free_port()
    path = tmp / f"granian-{port}.toml"
    path.write_text(
        sidecar_config(
            upstream_port, free_port(), free_port(), sidecar_body(creds), _server_table(None)
        )
    )
    process = spawn(
        [
            sys.executable,
            "-m",
            "granian",
            "--interface",
            "asgi",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--loop",
            "uvloop",
            "--no-access-log",
            "--log-level",
            "warning",
            "bench.granian_app:create",
        ],
        tmp / f"granian-{port}.log",
        port,
        env={**SIDECAR_ENV, "AUTHPROXY_CONFIG": str(path)},
    )
    return _process_server(
        "granian + sidecar app",
        process,
        "bench/granian_app.py: `App(settings)` under granian, one worker, uvloop",
    )


def jwt_service(tmp: Path, creds: tokens.Credentials) -> Process:
    env = {
        "BENCH_JWT_PUBLIC_KEY": str(creds.public_pem),
        "BENCH_JWT_ISSUER": tokens.RS_ISSUER,
        "BENCH_JWT_AUDIENCE": tokens.AUDIENCE,
    }
    return _uvicorn("bench.jwt_service:create", tmp, free_port(), env, factory=True)


def nginx(tmp: Path, upstream_port: int, jwt_port: int) -> tuple[Server, int]:
    """One nginx worker with two listeners: a plain reverse proxy, and one that asks the JWT
    service (`auth_request`) before forwarding /jwt/. Returns the server and the second port."""
    port, auth_port = free_port(), free_port()
    temp = tmp / "nginx-temp"
    temp.mkdir(exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(
        textwrap.dedent(f"""
        worker_processes 1;
        worker_rlimit_nofile 16384;
        error_log {tmp}/nginx-error.log warn;
        pid {tmp}/nginx.pid;
        events {{ worker_connections 8192; }}
        http {{
            access_log off;
            client_body_temp_path {temp}/body;
            proxy_temp_path {temp}/proxy;
            fastcgi_temp_path {temp}/fastcgi;
            uwsgi_temp_path {temp}/uwsgi;
            scgi_temp_path {temp}/scgi;
            # The usual WebSocket recipe: Upgrade passes through, and plain requests keep the
            # upstream connection alive (an empty Connection header).
            map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
            upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
            upstream jwtcheck {{ server 127.0.0.1:{jwt_port}; keepalive 64; }}
            proxy_http_version 1.1;
            proxy_read_timeout 1h;
            server {{
                listen 127.0.0.1:{port} backlog=4096;
                client_max_body_size 0;
                location / {{
                    proxy_pass http://backend;
                    proxy_set_header Upgrade $http_upgrade;
                    proxy_set_header Connection $connection_upgrade;
                    proxy_set_header X-Forwarded-For $remote_addr;
                }}
                # Bodies stream both ways, as they do through the sidecar.
                location /public/bulk {{
                    proxy_pass http://backend;
                    proxy_set_header Connection "";
                    proxy_request_buffering off;
                    proxy_buffering off;
                }}
            }}
            server {{
                listen 127.0.0.1:{auth_port};
                location /jwt/ {{
                    auth_request /_auth;
                    auth_request_set $auth_subject $upstream_http_x_auth_subject;
                    proxy_pass http://backend;
                    proxy_set_header Connection "";
                    proxy_set_header Authorization "";
                    proxy_set_header X-Auth-Subject $auth_subject;
                    proxy_set_header X-Forwarded-For $remote_addr;
                }}
                location = /_auth {{
                    internal;
                    proxy_pass http://jwtcheck;
                    proxy_set_header Connection "";
                    proxy_pass_request_body off;
                    proxy_set_header Content-Length "";
                    proxy_set_header X-Original-URI $request_uri;
                }}
            }}
        }}
        """)
    )
    process = spawn(
        ["nginx", "-c", str(conf), "-p", str(tmp), "-g", "daemon off;"],
        tmp / "nginx.log",
        port,
    )
    return _process_server("nginx", process, "Debian nginx, one worker, keepalive pool"), auth_port


def nginx_auth_request(tmp: Path, upstream_port: int, creds: tokens.Credentials) -> list[Server]:
    """nginx (plain) and nginx `auth_request` + the JWT service; they share the nginx process."""
    check = jwt_service(tmp, creds)
    try:
        plain, auth_port = nginx(tmp, upstream_port, check.port)
    except Exception:
        check.stop()
        raise
    with_auth = Server(
        "nginx auth_request + Python JWT service",
        auth_port,
        [*plain.pids, check.proc.pid],
        [check.stop],
        "nginx `auth_request` to bench/jwt_service.py (PyJWT, RS256, no cache, on uvicorn)",
    )
    return [plain, with_auth]


def caddy(tmp: Path, upstream_port: int) -> Server:
    port = free_port()
    caddyfile = tmp / "Caddyfile"
    caddyfile.write_text(
        textwrap.dedent(f"""
        {{
            admin off
            auto_https off
        }}
        http://127.0.0.1:{port} {{
            reverse_proxy 127.0.0.1:{upstream_port}
        }}
        """)
    )
    home = tmp / "caddy-home"
    home.mkdir(exist_ok=True)
    process = spawn(
        ["caddy", "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
        tmp / "caddy.log",
        port,
        # Caddy keeps state under $HOME/XDG dirs; keep it inside the run's directory.
        env={"HOME": str(home), "XDG_DATA_HOME": str(home), "XDG_CONFIG_HOME": str(home)},
    )
    return _process_server("Caddy", process, "Debian caddy `reverse_proxy`, default settings")


def fastapi_proxy_lib(tmp: Path, upstream_port: int) -> Server:
    port = free_port()
    process = _uvicorn(
        "bench.fpl_proxy:create",
        tmp,
        port,
        {"BENCH_FPL_UPSTREAM": f"http://127.0.0.1:{upstream_port}/"},
        factory=True,
    )
    return _process_server(
        "fastapi-proxy-lib",
        process,
        "bench/fpl_proxy.py: `ReverseHttpProxy` (httpx) on a Starlette catch-all route "
        "(FastAPI's router without its dependency injection) on uvicorn",
    )


def byte_relay(tmp: Path, upstream_port: int) -> Server:
    port = free_port()
    args = [sys.executable, "-m", "bench.byte_relay", "--port", str(port)]
    process = spawn([*args, "--upstream-port", str(upstream_port)], tmp / "byte-relay.log", port)
    return _process_server(
        "byte relay",
        process,
        "bench/byte_relay.py: bytes copied both ways by asyncio protocols on uvloop, nothing "
        "parsed (the floor of a relay in one Python process)",
    )


def missing_tools(names: Sequence[str]) -> list[str]:
    return [n for n in names if shutil.which(n) is None]
