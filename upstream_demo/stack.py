"""`make run`: the whole demo — upstream_demo (:9000 and the page on :5173) and the sidecar (:8000,
admin :8001) — as two child processes. Ctrl-C (or SIGTERM) stops both, and so does the end of the
process that started this one: make waits for its recipe on SIGINT instead of passing it on, so the
Makefile runs this from `$(shell ...)`, where make dies at once and this process sees its parent go.

Every port can be moved (`make run WEB_PORT=5174 SIDECAR_PORT=8100 ...`): the sidecar gets the
matching `AUTHPROXY__*` overrides of config.toml (listen, admin, upstream, the demo provider's
issuer and JWKS URL, the page's CORS origins), so the file itself never needs editing. Each port is
checked before anything starts; a taken one is a one-line error naming the variable that moves it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from types import FrameType

DEFAULT_WEB_PORT = 5173


class ParentGone(Exception):
    """The process that started the stack (make) has exited: stop, as for Ctrl-C."""


def _watch_parent(parent: int) -> None:
    if parent != 1 and os.getppid() != parent:
        raise ParentGone


def _wait_for(
    host: str,
    port: int,
    proc: subprocess.Popen[bytes],
    what: str,
    parent: int,
    timeout: float = 30.0,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _watch_parent(parent)
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


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _replace_port(url: str, old: int, new: int) -> str:
    """`url` with its `:old` port (followed by a path or nothing) moved to `:new`."""
    scheme, sep, rest = url.partition("://")
    hostport, slash, path = rest.partition("/")
    if hostport.rsplit(":", 1)[-1] != str(old):
        return url
    return f"{scheme}{sep}{hostport.rsplit(':', 1)[0]}:{new}{slash}{path}"


def sidecar_overrides(
    config: dict[str, object],
    *,
    sidecar_port: int | None,
    admin_port: int | None,
    upstream_port: int | None,
    web_port: int,
) -> dict[str, str]:
    """The `AUTHPROXY__*` variables that move the sidecar's ports (and what names them) in step."""
    env: dict[str, str] = {}
    server = config.get("server", {})
    admin = config.get("admin", {})
    upstream = config.get("upstream", {})
    cors = config.get("cors", {})
    assert isinstance(server, dict) and isinstance(admin, dict)
    assert isinstance(upstream, dict) and isinstance(cors, dict)
    if sidecar_port is not None:
        host, _ = _split(server.get("listen", "127.0.0.1:8000"))
        env["AUTHPROXY__SERVER__LISTEN"] = json.dumps(f"{host}:{sidecar_port}")
    if admin_port is not None:
        host, _ = _split(admin.get("listen", "127.0.0.1:8001"))
        env["AUTHPROXY__ADMIN__LISTEN"] = json.dumps(f"{host}:{admin_port}")
    if upstream_port is not None:
        url = upstream.get("url", "http://127.0.0.1:9000")
        old = int(url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[1])
        env["AUTHPROXY__UPSTREAM__URL"] = json.dumps(_replace_port(url, old, upstream_port))
        # The demo IdP names itself by its port: its tokens' `iss` and its JWKS move with it.
        auth = config.get("auth", {})
        jwt = auth.get("jwt", {}) if isinstance(auth, dict) else {}
        providers = jwt.get("providers", []) if isinstance(jwt, dict) else []
        for i, p in enumerate(providers if isinstance(providers, list) else []):
            for key in ("issuer", "jwks_url"):
                value = p.get(key) if isinstance(p, dict) else None
                if isinstance(value, str) and _replace_port(value, old, upstream_port) != value:
                    name = f"AUTHPROXY__AUTH__JWT__PROVIDERS__{i}__{key.upper()}"
                    env[name] = json.dumps(_replace_port(value, old, upstream_port))
    origins = cors.get("allow_origins")
    if web_port != DEFAULT_WEB_PORT and isinstance(origins, list):
        moved = [
            _replace_port(o, DEFAULT_WEB_PORT, web_port) if isinstance(o, str) else o
            for o in origins
        ]
        env["AUTHPROXY__CORS__ALLOW_ORIGINS"] = json.dumps(moved)
    return env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m upstream_demo.stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="config.toml", help="the sidecar's config")
    parser.add_argument(
        "--web-port", type=int, default=DEFAULT_WEB_PORT, help="the demo page (make: WEB_PORT)"
    )
    parser.add_argument(
        "--sidecar-port", type=int, help="the sidecar (default: config's server.listen)"
    )
    parser.add_argument("--admin-port", type=int, help="admin listener (default: admin.listen)")
    parser.add_argument(
        "--upstream-port", type=int, help="upstream_demo and its IdP (default: upstream.url)"
    )
    parser.add_argument("--token-ttl", type=int, help="demo access token lifetime, s (300)")
    parser.add_argument("--event-interval", type=float, default=3.0)
    parser.add_argument(
        "--chat-token-delay", type=float, help="seconds between streamed chat tokens (0.04)"
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=os.getppid(),
        help="stop when this process exits (default: the parent)",
    )
    args = parser.parse_args(argv)

    with open(args.config, "rb") as f:
        config = tomllib.load(f)
    overrides = sidecar_overrides(
        config,
        sidecar_port=args.sidecar_port,
        admin_port=args.admin_port,
        upstream_port=args.upstream_port,
        web_port=args.web_port,
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **overrides}
    listen = json.loads(overrides.get("AUTHPROXY__SERVER__LISTEN", "null")) or config.get(
        "server", {}
    ).get("listen", "127.0.0.1:8000")
    admin = json.loads(overrides.get("AUTHPROXY__ADMIN__LISTEN", "null")) or config.get(
        "admin", {}
    ).get("listen", "127.0.0.1:8001")
    upstream_url = json.loads(overrides.get("AUTHPROXY__UPSTREAM__URL", "null")) or config.get(
        "upstream", {}
    ).get("url", "http://127.0.0.1:9000")
    upstream_port = int(upstream_url.rsplit(":", 1)[1].split("/")[0])
    host, port = _split(listen)
    admin_host, admin_port = _split(admin)
    public = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::", "::1") else host

    for what, variable, flag, bind_host, taken in (
        ("the demo page", "WEB_PORT", "--web-port", "127.0.0.1", args.web_port),
        ("upstream_demo", "UPSTREAM_PORT", "--upstream-port", "127.0.0.1", upstream_port),
        ("the sidecar", "SIDECAR_PORT", "--sidecar-port", host, port),
        ("the admin listener", "ADMIN_PORT", "--admin-port", admin_host, admin_port),
    ):
        if _port_taken(bind_host, taken):
            other = taken + 1
            print(
                f"make run: port {taken} ({what}) is already in use; free it or choose another: "
                f"make run {variable}={other} (python -m upstream_demo.stack {flag} {other})",
                file=sys.stderr,
            )
            return 2

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
                *(["--token-ttl", str(args.token_ttl)] if args.token_ttl else []),
                *(
                    ["--chat-token-delay", str(args.chat_token_delay)]
                    if args.chat_token_delay is not None
                    else []
                ),
                "--api-url",
                f"http://{public}:{port}",
                "--ws-url",
                f"ws://{public}:{port}/ws",
            ],
            env=env,
        )
        children.append(demo)
        names[demo.pid] = "upstream_demo"
        _wait_for("127.0.0.1", upstream_port, demo, "upstream_demo", args.parent_pid)
        _wait_for("127.0.0.1", args.web_port, demo, "the demo page", args.parent_pid)
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", args.config], env=env
        )
        children.append(sidecar)
        names[sidecar.pid] = "the sidecar"
        _wait_for(
            host if host not in ("0.0.0.0", "::") else "127.0.0.1",
            port,
            sidecar,
            "the sidecar",
            args.parent_pid,
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
            _watch_parent(args.parent_pid)
            time.sleep(0.2)
        failed = [c for c in children if c.poll() is not None]
        print(f"make run: {names[failed[0].pid]} exited; stopping the rest", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, ParentGone):
        return 0
    finally:
        stop()


if __name__ == "__main__":
    raise SystemExit(main())
