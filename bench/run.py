"""Runs every figure with every contender in one go and rewrites BENCHMARKS.md.

    python -m bench.run            # the full run (`make bench`), about eight minutes
    python -m bench.run --quick    # one short round of everything: a smoke test of the harness

Contenders: the upstream served directly, the sidecar (public, JWT and API-key routes; one worker
and, when the sidecar knows `server.workers`, two), nginx, Caddy, nginx `auth_request` to a Python
JWT service, fastapi-proxy-lib, and the sidecar's app under granian. Figures (one module each):
`http_load` (wrk, 32 and 1 connections, CPU per request), `ws_echo`, `ws_idle`, `bulk`; `report`
writes the file. The machine is shared and noisy, so every round runs every scenario of every
figure in turn and each figure is the median of the rounds (five by default: with three, one slow
minute of the host's moved a median by more than the gaps the targets are judged by). Load goes
to loopback only, bounded in time. A contender that cannot start, or answers wrongly, is left out
with a note in the report; the rest still run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx

from tests.support.servers import ROOT

from . import bulk, contenders, hotspots, http_load, report, tokens, ws_echo, ws_idle
from .contenders import Server
from .http_load import Target
from .report import (
    BYTE_RELAY,
    DIRECT,
    FPL,
    JWT_W1,
    NGINX,
    NGINX_AUTH,
    SIDECAR_W1,
    SIDECAR_W1_DEFLATE,
    Results,
)

T = TypeVar("T")

QUICK = {
    "rounds": 1,
    "seconds": 1,
    "latency_seconds": 1,
    "ws_seconds": 1.0,
    "idle_sockets": 100,
    "bulk_mib": 10,
    "profile_seconds": 1,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (a smoke test)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3, help="wrk run at --connections")
    parser.add_argument("--latency-seconds", type=int, default=2, help="wrk run at 1 connection")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--ws-seconds", type=float, default=3.0)
    parser.add_argument("--ws-connections", type=int, default=8)
    parser.add_argument("--idle-sockets", type=int, default=1000)
    parser.add_argument("--bulk-mib", type=int, default=100)
    parser.add_argument("--profile-seconds", type=int, default=3)
    parser.add_argument("--no-profile", action="store_true", help="skip the perf profile")
    parser.add_argument("--skip-verify", action="store_true", help="skip bench.verify")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (logs)")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    if parser.parse_args(argv).quick:
        # Short defaults; a flag given explicitly still wins.
        parser.set_defaults(**QUICK, skip_verify=True)
    return parser.parse_args(argv)


class Run:
    """One bench run: its directory, credentials, running contenders and what they measured."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.creds = tokens.make(tmp)
        self.servers: list[Server] = []
        self.results = Results()
        self._failed: set[tuple[str, str]] = set()

    def note(self, text: str) -> None:
        print(f"bench: {text}", flush=True)
        self.results.notes.append(text)

    def start(self, name: str, starter: Callable[[], T]) -> T | None:
        try:
            return starter()
        except Exception as exc:
            self.note(f"{name}: could not start ({_last_line(exc)})")
            return None

    def measure(self, figure: str, label: str, job: Callable[[], T]) -> T | None:
        """One job of a round; a failure is noted once per contender and the run goes on."""
        try:
            return job()
        except Exception as exc:
            if (figure, label) not in self._failed:
                self._failed.add((figure, label))
                self.note(f"{figure}, {label}: a round failed ({_last_line(exc)})")
            return None

    def stop(self) -> None:
        for server in reversed(self.servers):
            try:
                server.stop()
            except Exception as exc:
                print(f"bench: stopping {server.name}: {exc}", file=sys.stderr)


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _http_ok(target: Target) -> str:
    """'' when the scenario answers 200, else what it answered."""
    try:
        response = httpx.get(target.url, headers=target.headers, timeout=10)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if response.status_code != 200:
        return f"answered {response.status_code}: {response.text[:160]!r}"
    return ""


def start_contenders(run: Run) -> dict[str, Server]:
    """Every contender that starts, by label; what does not is noted."""
    tmp, creds = run.tmp, run.creds
    started: dict[str, Server] = {}
    up = contenders.upstream(tmp)  # without it nothing can be measured: let it raise
    run.servers.append(up)
    started[DIRECT] = up

    why_not = contenders.sidecar_accepts_workers(tmp, up.port, creds)
    if why_not:
        run.note(
            "sidecar w2: skipped, `python -m proxy check-config` refuses `server.workers = 2` "
            f"({why_not})"
        )
    workers_known = not why_not

    def add(label: str, starter: Callable[[], Server]) -> None:
        server = run.start(label, starter)
        if server is not None:
            run.servers.append(server)
            started[label] = server

    add(SIDECAR_W1, lambda: contenders.sidecar(tmp, up.port, creds, 1 if workers_known else None))
    if workers_known:
        add("sidecar w2", lambda: contenders.sidecar(tmp, up.port, creds, 2))
    add("granian", lambda: contenders.granian_sidecar(tmp, up.port, creds))
    if shutil.which("nginx"):
        pair = run.start("nginx", lambda: contenders.nginx_auth_request(tmp, up.port, creds))
        if pair is not None:
            run.servers += pair
            started[NGINX], started[NGINX_AUTH] = pair
    else:
        run.note("nginx: not installed (make bench-deps installs it)")
    if shutil.which("caddy"):
        add("Caddy", lambda: contenders.caddy(tmp, up.port))
    else:
        run.note("Caddy: not installed (make bench-deps installs it)")
    add(FPL, lambda: contenders.fastapi_proxy_lib(tmp, up.port))
    add(BYTE_RELAY, lambda: contenders.byte_relay(tmp, up.port))
    for server in started.values():
        count = len(server.processes())
        run.results.details.append(
            f"{server.name}: {server.detail} ({count} process{'es' if count > 1 else ''})"
        )
    return started


def http_targets(run: Run, s: dict[str, Server]) -> tuple[list[Target], list[Target]]:
    """The scenarios at --connections, and the subset measured at one connection."""
    rs = {"Authorization": f"Bearer {run.creds.rs_token}"}
    hs = {"Authorization": f"Bearer {run.creds.hs_token}"}
    key = {"X-API-Key": run.creds.api_key}
    wanted: list[tuple[str, str, str, dict[str, str], bool]] = [
        # (label, contender, path, headers, also at one connection)
        (DIRECT, DIRECT, "/public/x", {}, True),
        (NGINX, NGINX, "/public/x", {}, True),
        ("Caddy", "Caddy", "/public/x", {}, True),
        (NGINX_AUTH + ", JWT (RS256)", NGINX_AUTH, "/jwt/x", rs, True),
        (FPL, FPL, "/public/x", {}, True),
        ("sidecar w1, public route", SIDECAR_W1, "/public/x", {}, True),
        (JWT_W1, SIDECAR_W1, "/jwt/x", rs, True),
        ("sidecar w1, JWT route (HS256, cached)", SIDECAR_W1, "/jwt/x", hs, False),
        ("sidecar w1, API-key route", SIDECAR_W1, "/key/x", key, True),
        ("sidecar w2, public route", "sidecar w2", "/public/x", {}, False),
        ("sidecar w2, JWT route (RS256, cached)", "sidecar w2", "/jwt/x", rs, False),
        ("sidecar w2, API-key route", "sidecar w2", "/key/x", key, False),
        ("granian + sidecar app, JWT route (RS256, cached)", "granian", "/jwt/x", rs, True),
    ]
    many: list[Target] = []
    one: list[Target] = []
    for label, name, path, headers, at_one in wanted:
        if name not in s:
            continue
        # The report judges targets by the plain labels; the auth_request row keeps its name.
        label = NGINX_AUTH if name == NGINX_AUTH else label
        target = Target(label, s[name], path, headers, "direct" if name == DIRECT else "proxy")
        problem = _http_ok(target)
        if problem:
            run.note(f"{label}: left out of the HTTP figures, GET {path} {problem}")
            continue
        many.append(target)
        if at_one:
            one.append(target)
    return many, one


def ws_targets(run: Run, s: dict[str, Server]) -> list[tuple[str, Server, str, dict[str, str]]]:
    rs = {"Authorization": f"Bearer {run.creds.rs_token}"}
    wanted = [
        (DIRECT, DIRECT, {}),
        (SIDECAR_W1, SIDECAR_W1, rs),
        (NGINX, NGINX, {}),
        ("Caddy", "Caddy", {}),
        (BYTE_RELAY, BYTE_RELAY, {}),
    ]
    found = []
    for label, name, headers in wanted:
        if name not in s:
            continue
        url = s[name].ws_url + "/ws"
        try:
            asyncio.run(ws_echo.measure(url, headers, 1, 0.1))
        except Exception as exc:
            run.note(f"{label}: left out of the WebSocket figures ({_last_line(exc)})")
            continue
        found.append((label, s[name], url, headers))
    return found


def bulk_targets(run: Run, s: dict[str, Server]) -> list[tuple[str, str]]:
    probe = bulk.make_file(run.tmp / "probe.bin", 4096)
    found = []
    for label in (DIRECT, SIDECAR_W1, NGINX, "Caddy"):
        if label not in s:
            continue
        url = s[label].url + "/public/bulk"
        try:
            bulk.download(url, 4096)
            bulk.upload(url, probe)
        except Exception as exc:
            run.note(f"{label}: left out of the bulk figures ({_last_line(exc)})")
            continue
        found.append((label, url))
    return found


def ws_echo_rows(p: Plan) -> list[tuple[str, str | None, str, dict[str, str]]]:
    """Each echo figure: (label, compression offered, URL, headers). The sidecar also with the
    client offering permessage-deflate, as browsers do: its messages then take the message relay
    (inflated, framed again) where uncompressed frames pass whole."""
    rows: list[tuple[str, str | None, str, dict[str, str]]] = []
    for label, _server, url, headers in p.ws:
        rows.append((label, None, url, headers))
        if label == SIDECAR_W1:
            rows.append((SIDECAR_W1_DEFLATE, "deflate", url, headers))
    return rows


def ws_echo_rate(
    url: str, headers: dict[str, str], args: argparse.Namespace, compression: str | None = None
) -> float:
    out = subprocess.run(
        ws_echo_command(url, headers, args, compression),
        capture_output=True,
        text=True,
        timeout=args.ws_seconds + 60,
        cwd=ROOT,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip() or f"exited {out.returncode}")
    return float(json.loads(out.stdout)["rate"])


def ws_echo_command(
    url: str, headers: dict[str, str], args: argparse.Namespace, compression: str | None = None
) -> list[str]:
    command = [sys.executable, "-m", "bench.ws_echo", url]
    command += ["--connections", str(args.ws_connections), "--seconds", str(args.ws_seconds)]
    if compression is not None:
        command += ["--compression", compression]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    return command


def shown(command: list[str], secrets: dict[str, str]) -> str:
    text = shlex.join(["python" if c == sys.executable else c for c in command])
    for secret, name in secrets.items():
        text = text.replace(secret, name)
    return text


@dataclass(frozen=True)
class Plan:
    """What this run measures: the scenarios that answered correctly at start."""

    many: list[Target]  # HTTP at --connections
    one: list[Target]  # HTTP at one connection
    ws: list[tuple[str, Server, str, dict[str, str]]]  # label, server, URL, headers
    transfers: list[tuple[str, str]]  # label, URL
    upload_file: Path
    secrets: dict[str, str]  # credential -> how commands show it


def plan(run: Run) -> Plan:
    s = start_contenders(run)
    many, one = http_targets(run, s)
    upload = bulk.make_file(run.tmp / "upload.bin", run.args.bulk_mib * 1024 * 1024)
    return Plan(
        many,
        one,
        ws_targets(run, s),
        bulk_targets(run, s),
        upload,
        {
            run.creds.rs_token: "<RS256 token>",
            run.creds.hs_token: "<HS256 token>",
            run.creds.api_key: "<API key>",
            str(upload): f"<a {run.args.bulk_mib} MiB file>",
        },
    )


def idle_memory(run: Run, p: Plan) -> None:
    for label, server, url, headers in p.ws:
        if label == DIRECT:
            continue
        job = partial(ws_idle.measure, server, url, headers, run.args.idle_sockets)
        idle = run.measure("idle WebSockets", label, job)
        if idle is not None:
            run.results.idle[label] = idle
            print(f"idle WS  {label:55s} {idle.kb_per_socket:8.1f} KB/socket", flush=True)


def one_round(run: Run, p: Plan) -> None:
    """Every scenario of every rate figure once, in a fixed order."""
    args, results = run.args, run.results
    for target in p.many:
        job = partial(http_load.run, target, args.seconds, args.connections)
        sample = run.measure("HTTP", target.name, job)
        if sample is not None:
            results.http32.setdefault(target.name, (target, []))[1].append(sample)
            print(
                f"c{args.connections:<3d} {target.name:55s} {sample.rps:9.0f} req/s "
                f"p50 {sample.p50_ms:6.2f} p99 {sample.p99_ms:6.2f} ms "
                f"cpu {sample.cpu_us:5.0f} µs/req errors {sample.errors}",
                flush=True,
            )
    for target in p.one:
        job = partial(http_load.run, target, args.latency_seconds, 1)
        sample = run.measure("HTTP, 1 connection", target.name, job)
        if sample is not None:
            results.http1.setdefault(target.name, (target, []))[1].append(sample)
            print(
                f"c1   {target.name:55s} p50 {sample.p50_ms:6.3f} p99 {sample.p99_ms:6.3f} ms",
                flush=True,
            )
    for label, compression, url, headers in ws_echo_rows(p):
        job = partial(ws_echo_rate, url, headers, args, compression)
        rate = run.measure("WebSocket echo", label, job)
        if rate is not None:
            results.ws_echo.setdefault(label, []).append(rate)
            print(f"ws echo  {label:55s} {rate:9.0f} msg/s", flush=True)
    size = p.upload_file.stat().st_size
    for label, url in p.transfers:
        up = run.measure("upload", label, partial(bulk.upload, url, p.upload_file))
        down = run.measure("download", label, partial(bulk.download, url, size))
        if up is not None:
            results.upload.setdefault(label, []).append(up)
        if down is not None:
            results.download.setdefault(label, []).append(down)
        print(f"bulk     {label:55s} up {up or 0:7.0f} down {down or 0:7.0f} MiB/s", flush=True)


def profile(run: Run, p: Plan) -> None:
    """perf profiles of the sidecar (one worker): on the JWT route, and relaying the WebSocket
    echo (frames passing whole), each while its load runs."""
    if run.args.no_profile:
        return
    seconds, connections = run.args.profile_seconds, run.args.connections
    jwt = next((t for t in p.many if t.name == JWT_W1), None)
    if jwt is not None:
        job = partial(hotspots.record, jwt, seconds, connections, run.tmp / "prof")
        found = run.measure("profile", JWT_W1, job)
        if found is not None:
            run.results.profile = found.markdown()
            run.results.profile_command = (
                hotspots.record_command(seconds)
                + ", while "
                + http_load.command(jwt, seconds + 2, connections, p.secrets)
            )
    # The WebSocket echo through the sidecar, and through the byte relay (its floor) alike.
    longer = argparse.Namespace(**{**vars(run.args), "ws_seconds": float(seconds + 2)})
    for label, server, url, headers in p.ws:
        if label not in (SIDECAR_W1, BYTE_RELAY):
            continue
        load = ws_echo_command(url, headers, longer)
        job = partial(hotspots.record_under, load, server, seconds, run.tmp / "ws_prof")
        found = run.measure("profile", f"{label}, WebSocket echo", job)
        if found is None:
            continue
        if label == SIDECAR_W1:
            run.results.ws_profile = found.markdown()
            run.results.ws_profile_command = (
                hotspots.record_command(seconds) + ", while " + shown(load, p.secrets)
            )
        else:
            run.results.ws_floor_profile = found.markdown(inclusive=False)


def commands(args: argparse.Namespace, p: Plan) -> dict[str, list[str]]:
    size = p.upload_file.stat().st_size
    return {
        f"HTTP, {args.connections} connections": [
            f"{t.name}: {http_load.command(t, args.seconds, args.connections, p.secrets)}"
            for t in p.many
        ],
        "HTTP, 1 connection": [
            f"{t.name}: {http_load.command(t, args.latency_seconds, 1, p.secrets)}" for t in p.one
        ],
        "WebSocket echo": [
            f"{label}: {shown(ws_echo_command(url, h, args, compression), p.secrets)}"
            for label, compression, url, h in ws_echo_rows(p)
        ],
        "Idle WebSockets (RSS read from /proc by `bench.ws_idle.measure`)": [
            f"{label}: {shown(ws_idle.command(url, args.idle_sockets, h), p.secrets)}"
            for label, _, url, h in p.ws
            if label != DIRECT
        ],
        "Bulk transfer": [
            f"{label} {what}: {shown(argv, p.secrets)}"
            for label, url in p.transfers
            for what, argv in (
                ("upload", bulk.upload_args(url, p.upload_file)),
                ("download", bulk.download_args(url, size)),
            )
        ],
    }


def bench(run: Run) -> None:
    p = plan(run)
    print("bench: warming up", flush=True)
    for target in p.many:
        job = partial(http_load.warm, target, run.args.connections)
        run.measure("warm-up", target.name, job)
    # Memory first, on processes that have only been warmed up: after the bulk transfers the
    # allocators hold freed buffers that new sockets would reuse, and the figure would flatter.
    idle_memory(run, p)
    for n in range(run.args.rounds):
        print(f"bench: round {n + 1} of {run.args.rounds}", flush=True)
        one_round(run, p)
    # After the rounds, so the sampler's own cost lands on no figure.
    profile(run, p)
    run.results.commands = commands(run.args, p)


def verify(run: Run) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.verify"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    if out.returncode == 0:
        run.results.verify = out.stdout
    else:
        run.note(f"bench.verify failed ({_last_line(RuntimeError(out.stderr))})")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = contenders.missing_tools(["wrk", "curl"])
    if missing:
        print(
            f"bench: {', '.join(missing)} missing (make bench-deps installs them)", file=sys.stderr
        )
        return 2
    # The contenders inherit it: 1,000 idle sockets through a proxy are 2,000 descriptors there.
    ws_idle.raise_fd_limit(4 * args.idle_sockets + 1024)
    began = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="authproxy-bench-"))
    run = Run(args, tmp)
    try:
        bench(run)
    finally:
        run.stop()
        if args.keep:
            print(f"bench: logs and configs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if not args.skip_verify:
        verify(run)
    invocation = "`python -m bench.run" + "".join(f" {a}" for a in (argv or sys.argv[1:])) + "`"
    meta = {
        "rounds": str(args.rounds),
        "connections": str(args.connections),
        "ws_connections": str(args.ws_connections),
        "bulk_mib": str(args.bulk_mib),
        "invocation": f"{invocation}, {time.monotonic() - began:.0f} s",
    }
    report.write(Path(args.output), run.results, meta)
    print(f"bench: wrote {args.output} in {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
