"""Runs every benchmark in one go and rewrites BENCHMARKS.md.

Throughput figures are taken in one run and reported as ratios to the upstream served directly,
because these machines are shared and noisy: sidecar vs. upstream direct vs. nginx in front of the
same upstream. Load goes to loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from tests.support.servers import ROOT, free_port, spawn, start_sidecar, start_upstream

HS_SECRET = "bench-secret-bench-secret-bench-secret!"
API_KEY = "ak_bench_key"
# The product's default log batching (the test harness turns it off to read logs at once).
SIDECAR_ENV = {"BENCH_HS_SECRET": HS_SECRET, "AUTHPROXY__LOGGING__FLUSH_INTERVAL_S": "0.1"}


@dataclass
class Figure:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    command: str


def wrk(url: str, seconds: int, connections: int, headers: dict[str, str]) -> tuple[Figure, str]:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    args.append(url)
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    shown = " ".join(a if " " not in a else repr(a) for a in args)
    shown = shown.replace(headers.get("Authorization", "\0"), "Bearer <token>")
    return Figure("", rps, pct("50"), pct("99"), shown), out


def nginx(tmp: Path, upstream_port: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        textwrap.dedent(f"""
        worker_processes 1;
        error_log {tmp}/nginx-error.log;
        pid {tmp}/nginx.pid;
        events {{ worker_connections 1024; }}
        http {{
            access_log off;
            upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
            server {{
                listen 127.0.0.1:{port};
                location / {{
                    proxy_pass http://backend;
                    proxy_http_version 1.1;
                    proxy_set_header Connection "";
                    proxy_set_header X-Forwarded-For $remote_addr;
                }}
            }}
        }}
        """)
    )
    proc = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(tmp), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, port


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=4, help="per scenario and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            print(f"bench: {tool} is missing (make bench installs it)", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="authproxy-bench-"))
    upstream = start_upstream("bench.upstream:app", tmp, extra_args=["--http", "httptools"])

    body = f"""
        [[auth.jwt.providers]]
        name = "bench"
        issuer = "https://idp.bench"
        audiences = ["bench"]
        secret_env = "BENCH_HS_SECRET"
        algorithms = ["HS256"]
        [auth.api_keys]
        [[auth.api_keys.keys]]
        id = "bench"
        sha256 = "{hashlib.sha256(API_KEY.encode()).hexdigest()}"
        [[routes]]
        path = "/public/*"
        auth = "public"
        [[routes]]
        path = "/jwt/*"
        auth = ["jwt"]
        [[routes]]
        path = "/key/*"
        auth = ["api_key"]
        """
    sidecar = start_sidecar(
        tmp,
        upstream.port,
        body,
        env=SIDECAR_ENV,
        upstream="max_connections = 64",
    )
    sidecar_quiet = start_sidecar(
        tmp,
        upstream.port,
        body + "\n[logging]\naccess_log = false\n",
        env=SIDECAR_ENV,
    )
    nginx_proc, nginx_port = nginx(tmp, upstream.port)
    minimal_port = free_port()
    minimal = spawn(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.minimal_proxy:app",
            "--port",
            str(minimal_port),
            "--http",
            "httptools",
            "--loop",
            "uvloop",
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        tmp / "minimal.log",
        minimal_port,
        env={"MINIMAL_PROXY_UPSTREAM": f"http://127.0.0.1:{upstream.port}"},
    )
    token = jwt.encode(
        {
            "sub": "bench",
            "iss": "https://idp.bench",
            "aud": "bench",
            "exp": int(time.time()) + 3600,
            "scope": "models:read",
        },
        HS_SECRET,
        algorithm="HS256",
    )
    figures: list[Figure] = []
    scenarios = [
        ("upstream direct", f"http://127.0.0.1:{upstream.port}/public/x", {}),
        ("nginx -> upstream", f"http://127.0.0.1:{nginx_port}/public/x", {}),
        (
            "bare aiohttp ASGI proxy (bench/minimal_proxy.py, no policy)",
            f"http://127.0.0.1:{minimal_port}/public/x",
            {},
        ),
        ("sidecar, public route", f"{sidecar.url}/public/x", {}),
        (
            "sidecar, JWT route (HS256, cached verification)",
            f"{sidecar.url}/jwt/x",
            {"Authorization": f"Bearer {token}"},
        ),
        ("sidecar, API key route", f"{sidecar.url}/key/x", {"X-API-Key": API_KEY}),
        ("sidecar, public route, access log off", f"{sidecar_quiet.url}/public/x", {}),
    ]
    try:
        time.sleep(0.5)
        for _, url, headers in scenarios:
            wrk(url, 1, args.connections, headers)  # warm-up: pools, caches
        # Round-robin rounds, median per scenario: the machine's noise drifts over a run, and
        # taking the scenarios one after another would fold that drift into the ratios.
        runs: dict[str, list[Figure]] = {name: [] for name, _, _ in scenarios}
        for _ in range(args.rounds):
            for name, url, headers in scenarios:
                figure, _raw = wrk(url, args.seconds, args.connections, headers)
                figure.name = name
                runs[name].append(figure)
        for name, _, _ in scenarios:
            ordered = sorted(runs[name], key=lambda f: f.rps)
            figure = ordered[len(ordered) // 2]
            figures.append(figure)
            print(
                f"{name:62s} {figure.rps:10.0f} req/s  p50 {figure.p50_ms:.2f} ms  "
                f"p99 {figure.p99_ms:.2f} ms  (rounds: "
                + ", ".join(f"{f.rps:.0f}" for f in runs[name])
                + ")",
                flush=True,
            )
    finally:
        nginx_proc.terminate()
        nginx_proc.wait()
        minimal.stop()
        sidecar.stop()
        sidecar_quiet.stop()
        upstream.stop()
    micro = subprocess.run(
        [sys.executable, "-m", "bench.verify"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    write_report(Path(args.output), figures, micro, args)
    return 0


def write_report(path: Path, figures: list[Figure], micro: str, args: argparse.Namespace) -> None:
    direct = figures[0].rps
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m bench.run`). All figures come from one run on this "
        "machine; compare the ratios, not the absolute numbers (shared, noisy 2-core machines). "
        f"Each figure is the median of {args.rounds} rounds of {args.seconds} s, the scenarios "
        "taken in turn within each round. "
        "wrk, the upstream, nginx and the sidecar share the same two cores.",
        "",
        f"- when: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "- upstream: `bench/upstream.py` on uvicorn (httptools), one process; sidecar: "
        "`python -m proxy serve`, one process (uvloop, httptools, aiohttp client); nginx: one "
        "worker, keepalive pool to the upstream",
        "",
        "## Throughput, small GET (34-byte JSON answer)",
        "",
        "| path | req/s | vs. direct | vs. nginx | vs. bare aiohttp proxy | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    nginx_rps = figures[1].rps
    bare_rps = figures[2].rps
    for f in figures:
        lines.append(
            f"| {f.name} | {f.rps:,.0f} | {f.rps / direct:.2f} | {f.rps / nginx_rps:.2f} "
            f"| {f.rps / bare_rps:.2f} | {f.p50_ms:.2f} | {f.p99_ms:.2f} |"
        )
    lines += ["", "Commands (the token is a valid HS256 JWT):", ""]
    lines += [f"- {f.name}: `{f.command}`" for f in figures]
    lines += ["", "## Token verification cost (in-process, `python -m bench.verify`)", "", micro]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
