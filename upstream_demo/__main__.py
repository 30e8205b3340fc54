"""`python -m upstream_demo`: the demo backend on :9000 and the demo web page on :5173, one process.

Both uvicorn servers share one event loop. Neither installs signal handlers of its own (uvicorn's
would only stop the server that installed them last); this module catches SIGINT/SIGTERM once and
stops both. A second Ctrl-C forces the exit without waiting for open connections; a signal that
comes within a second of the first is the same stop, not a second one (Ctrl-C under `make run`
reaches this process twice: from the terminal and from the stack), so it never cuts the lifespan
shutdown short into a CancelledError traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Generator, Sequence

import uvicorn

from upstream_demo.app import create_app, create_web_app


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its owner."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m upstream_demo",
        description="The authproxy demo backend (REST, identity provider, /ws) and demo web page.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s)")
    parser.add_argument("--port", type=int, default=9000, help="backend port (default %(default)s)")
    parser.add_argument(
        "--event-interval",
        type=float,
        default=3.0,
        help="seconds between simulator steps; 0 turns the simulator off (default %(default)s)",
    )
    parser.add_argument(
        "--web-port",
        type=int,
        default=5173,
        help="demo web page port; 0 disables the page (default %(default)s)",
    )
    parser.add_argument(
        "--api-url",
        default="http://localhost:8000",
        help="base URL the page calls: the sidecar (default %(default)s)",
    )
    parser.add_argument(
        "--ws-url",
        default="ws://localhost:8000/ws",
        help="WebSocket URL the page opens (default %(default)s)",
    )
    parser.add_argument(
        "--identity-secret-env",
        default=None,
        metavar="NAME",
        help="check the sidecar's X-Auth-Signature with the secret in this environment variable "
        "(the sidecar's [identity] sign = true, same secret_env)",
    )
    parser.add_argument(
        "--identity-signature",
        choices=["v1", "v2"],
        default="v2",
        help="the signature scheme to accept, the sidecar's identity.signature (default "
        "%(default)s; only this one is accepted)",
    )
    parser.add_argument(
        "--identity-max-skew-s",
        type=float,
        default=30.0,
        metavar="S",
        help="refuse v2 signatures whose X-Auth-Timestamp is further than this from the clock "
        "(the sidecar's identity.max_skew_s; default %(default)s)",
    )
    parser.add_argument(
        "--issuer", default=None, help="token issuer (default http://127.0.0.1:<port>)"
    )
    parser.add_argument(
        "--token-ttl", type=int, default=300, help="access token lifetime, s (default %(default)s)"
    )
    parser.add_argument(
        "--key-rotation-s",
        type=float,
        default=3600.0,
        help="seconds between signing key rotations (default %(default)s)",
    )
    parser.add_argument(
        "--key-grace-s",
        type=float,
        default=None,
        help="seconds a rotated-out key stays in the JWKS (default 2 x --token-ttl)",
    )
    parser.add_argument(
        "--chat-token-delay",
        type=float,
        default=0.04,
        metavar="S",
        help="seconds between the tokens of a streamed chat completion (default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.issuer is None:
        args.issuer = f"http://127.0.0.1:{args.port}"
    if args.token_ttl <= 0:
        parser.error("--token-ttl must be positive")
    if args.chat_token_delay < 0:
        parser.error("--chat-token-delay must not be negative")
    if args.key_rotation_s <= 0:
        parser.error("--key-rotation-s must be positive")
    if args.identity_max_skew_s <= 0:
        parser.error("--identity-max-skew-s must be positive")
    return args


def _identity_secret(env: str | None) -> bytes | None:
    if env is None:
        return None
    secret = os.environ.get(env)
    if not secret:
        raise SystemExit(f"upstream_demo: --identity-secret-env: {env} is not set")
    return secret.encode()


def build_servers(args: argparse.Namespace) -> list[uvicorn.Server]:
    app = create_app(
        event_interval=args.event_interval,
        issuer=args.issuer,
        token_ttl=args.token_ttl,
        key_rotation_s=args.key_rotation_s,
        key_grace_s=args.key_grace_s,
        identity_secret=_identity_secret(args.identity_secret_env),
        identity_signature=args.identity_signature,
        identity_max_skew_s=args.identity_max_skew_s,
        token_delay_s=args.chat_token_delay,
    )
    servers: list[uvicorn.Server] = [
        EmbeddedServer(
            uvicorn.Config(
                app,
                host=args.host,
                port=args.port,
                log_level=args.log_level,
                lifespan="on",
                timeout_graceful_shutdown=3,
            )
        )
    ]
    if args.web_port:
        web = create_web_app(api_url=args.api_url, ws_url=args.ws_url)
        servers.append(
            EmbeddedServer(
                uvicorn.Config(
                    web,
                    host=args.host,
                    port=args.web_port,
                    log_level=args.log_level,
                    lifespan="off",
                    ws="none",
                    timeout_graceful_shutdown=1,
                )
            )
        )
    return servers


async def _run(server: uvicorn.Server) -> None:
    # uvicorn calls sys.exit() when it cannot bind; turn that into "not started" for serve().
    with contextlib.suppress(SystemExit):
        await server.serve()


_SAME_STOP_S = 1.0


async def serve(args: argparse.Namespace) -> int:
    servers = build_servers(args)
    loop = asyncio.get_running_loop()
    first_signal: float | None = None

    def on_signal() -> None:
        nonlocal first_signal
        now = loop.time()
        if first_signal is not None and now - first_signal < _SAME_STOP_S:
            return
        for server in servers:
            # A second stop (a person's second Ctrl-C, seconds later) skips the graceful part.
            server.force_exit = server.should_exit
            server.should_exit = True
        first_signal = first_signal if first_signal is not None else now

    def stop_the_rest() -> None:
        # One server ended (it stopped on a signal, or could not start): stop the other the
        # same way. Never forced: the page server ends first on Ctrl-C, and forcing the backend
        # then would skip its lifespan shutdown, which asyncio.run cancels into a traceback.
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        tasks = [asyncio.create_task(_run(server)) for server in servers]
        while not all(s.started for s in servers) and not any(t.done() for t in tasks):
            await asyncio.sleep(0.05)
        if all(s.started for s in servers):
            print(f"upstream_demo backend   http://{args.host}:{args.port}", flush=True)
            if args.web_port:
                print(f"upstream_demo web page  http://{args.host}:{args.web_port}", flush=True)
                print(f"  page calls API {args.api_url}  WS {args.ws_url}", flush=True)
        # If one server fails to start (port taken), stop the other too.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        stop_the_rest()
        await asyncio.gather(*tasks, return_exceptions=True)
        failed = any(not s.started for s in servers)
        return 1 if failed else 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
