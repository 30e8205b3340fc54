"""Small GETs with wrk: req/s, p50/p99, and the CPU the proxy's processes spent per request.

CPU is read from the kernel's per-process counters (utime + stime, through psutil) of every
process of the contender, just before and just after the wrk run, and divided by the requests wrk
completed. wrk, the upstream and the proxy share the machine's cores, so req/s is a ratio figure;
CPU per request is the one that does not depend on who else ran.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

from .contenders import Server


@dataclass(frozen=True)
class Target:
    """One HTTP scenario: a contender, a path on it, and the credential headers it needs."""

    name: str
    server: Server
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    kind: str = "proxy"  # "direct", "proxy" or "sidecar": how the report groups it

    @property
    def url(self) -> str:
        return self.server.url + self.path


@dataclass(frozen=True)
class Sample:
    """One wrk run."""

    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    requests: int
    errors: int


def wrk_args(url: str, seconds: int, connections: int, headers: dict[str, str]) -> list[str]:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    return [*args, url]


def command(target: Target, seconds: int, connections: int, secrets: dict[str, str]) -> str:
    """The wrk command as a reader can re-run it (credentials shown by name, not value)."""
    shown = " ".join(
        a if " " not in a else repr(a)
        for a in wrk_args(target.url, seconds, connections, target.headers)
    )
    for secret, name in secrets.items():
        shown = shown.replace(secret, name)
    return shown


def _latency_ms(out: str, percentile: str) -> float:
    m = re.search(rf"^\s+{percentile}%\s+([\d.]+)(us|ms|s)\b", out, re.M)
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def parse(out: str) -> tuple[float, float, float, int, int]:
    """(req/s, p50 ms, p99 ms, requests, errors) from wrk's --latency output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rps is None or total is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non_2xx:
        errors += int(non_2xx.group(1))
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    if sockets:
        errors += sum(int(g) for g in sockets.groups())
    return (
        float(rps.group(1)),
        _latency_ms(out, "50"),
        _latency_ms(out, "99"),
        int(total.group(1)),
        errors,
    )


def run(target: Target, seconds: int, connections: int) -> Sample:
    args = wrk_args(target.url, seconds, connections, target.headers)
    cpu_before = target.server.cpu_seconds()
    out = subprocess.run(
        args, capture_output=True, text=True, check=True, timeout=seconds + 30
    ).stdout
    cpu = target.server.cpu_seconds() - cpu_before
    rps, p50, p99, requests, errors = parse(out)
    return Sample(rps, p50, p99, cpu / max(requests, 1) * 1e6, requests, errors)


def warm(target: Target, connections: int) -> None:
    """One second of load: pools filled, caches (the verified token) warm, code paths hot."""
    subprocess.run(
        wrk_args(target.url, 1, connections, target.headers),
        capture_output=True,
        check=True,
        timeout=30,
    )
