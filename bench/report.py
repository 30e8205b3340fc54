"""Writes BENCHMARKS.md from one run's samples: medians, ratios, the issue's targets, commands."""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from proxy import compiled

from .http_load import Sample, Target
from .ws_idle import Idle

# Labels the targets are judged on (run.py names its scenarios with them).
DIRECT = "upstream direct"
NGINX = "nginx"
NGINX_AUTH = "nginx auth_request + Python JWT service"
FPL = "fastapi-proxy-lib"
SIDECAR_W1 = "sidecar w1"
JWT_SHARE_GOAL = 0.45  # issue 9: the JWT route at 32 connections, share of direct req/s
WS_SHARE_GOAL = 0.50  # issue 9: the WebSocket echo, share of direct
# bench/byte_relay.py: the floor of any relay in one Python process on this stack.
BYTE_RELAY = "Python byte relay (uvloop, nothing parsed)"
# The WebSocket echo with the client offering permessage-deflate (browsers do): the message relay.
SIDECAR_W1_DEFLATE = "sidecar w1, client offering permessage-deflate"
JWT_W1 = "sidecar w1, JWT route (RS256, cached)"


@dataclass
class Results:
    """Everything one run measured, by figure and contender label (in the order they ran)."""

    http32: dict[str, tuple[Target, list[Sample]]] = field(default_factory=dict)
    http1: dict[str, tuple[Target, list[Sample]]] = field(default_factory=dict)
    ws_echo: dict[str, list[float]] = field(default_factory=dict)
    idle: dict[str, Idle] = field(default_factory=dict)
    upload: dict[str, list[float]] = field(default_factory=dict)
    download: dict[str, list[float]] = field(default_factory=dict)
    commands: dict[str, list[str]] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)  # what each contender is
    notes: list[str] = field(default_factory=list)  # what could not run, and why
    profile: str = ""  # Markdown from bench.hotspots
    profile_command: str = ""
    ws_profile: str = ""  # the same, relaying the WebSocket echo
    ws_profile_command: str = ""
    ws_floor_profile: str = ""  # the byte relay's, under the same load
    verify: str = ""


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _http_median(samples: list[Sample], metric: Callable[[Sample], float]) -> float:
    return median([metric(s) for s in samples])


def _div(a: float, b: float) -> float:
    return math.nan if b == 0 or math.isnan(b) else a / b


def _ratio(a: float, b: float) -> str:
    return "–" if math.isnan(a) or math.isnan(b) or b == 0 else f"{a / b:.2f}"


def _num(value: float, fmt: str = ",.0f") -> str:
    return "–" if math.isnan(value) else format(value, fmt)


def _rps(results: Results, label: str) -> float:
    entry = results.http32.get(label)
    return _http_median(entry[1], lambda s: s.rps) if entry else math.nan


def _p50_1(results: Results, label: str) -> float:
    entry = results.http1.get(label)
    return _http_median(entry[1], lambda s: s.p50_ms) if entry else math.nan


def _cpu(results: Results, label: str) -> float:
    entry = results.http32.get(label)
    return _http_median(entry[1], lambda s: s.cpu_us) if entry else math.nan


def _added(results: Results, label: str) -> float:
    return _p50_1(results, label) - _p50_1(results, DIRECT)


def _ws_share(results: Results, label: str) -> float:
    return _div(median(results.ws_echo.get(label, [])), median(results.ws_echo.get(DIRECT, [])))


def _idle_kb(results: Results, label: str) -> float:
    return results.idle[label].kb_per_socket if label in results.idle else math.nan


@dataclass(frozen=True)
class Goal:
    """One row of the issue's target table: a bound, the sidecar's figure, nginx's for scale."""

    figure: str
    compare: str  # ">=", "<=" or ">"
    bound: float
    measured: float
    nginx: float
    unit: str = ""
    fmt: str = ".2f"

    def _show(self, value: float) -> str:
        return "–" if math.isnan(value) else f"{value:{self.fmt}}{self.unit}"

    @property
    def wanted(self) -> str:
        sign = {">=": "≥", "<=": "≤", ">": ">"}[self.compare]
        return f"{sign} {self._show(self.bound)}"

    @property
    def verdict(self) -> str:
        if math.isnan(self.measured):
            return "not measured"
        # Judged as shown: 0.1504 ms against 0.150 ms reads as met, not "over by 0.000 ms".
        value, bound = round(self.measured, int(self.fmt[1:-1])), self.bound
        if self.compare == "<=":
            if value <= bound:
                return "**met**"
            return f"missed: over by {self._show(value - bound)} (×{value / bound:.2f} the goal)"
        if value > bound or (self.compare == ">=" and value == bound):
            return "**met**"
        return f"missed: short by {self._show(bound - value)} (needs ×{bound / value:.2f})"

    def row(self) -> str:
        return (
            f"| {self.figure} | {self.wanted} | {self._show(self.measured)} "
            f"| {self._show(self.nginx)} | {self.verdict} |"
        )


def goals(r: Results) -> list[Goal]:
    direct, jwt = _rps(r, DIRECT), _rps(r, JWT_W1)
    nan = math.nan
    return [
        Goal(
            "JWT route (RS256, cached), 32 connections, share of direct req/s",
            ">=",
            JWT_SHARE_GOAL,
            _div(jwt, direct),
            _div(_rps(r, NGINX), direct),
        ),
        Goal(
            "sidecar CPU per request on that route, one worker",
            "<=",
            100,
            _cpu(r, JWT_W1),
            _cpu(r, NGINX),
            " µs",
            ".0f",
        ),
        Goal(
            "latency added at one connection, p50 (JWT route)",
            "<=",
            0.15,
            _added(r, JWT_W1),
            _added(r, NGINX),
            " ms",
            ".3f",
        ),
        Goal(
            "WebSocket echo, 8 connections, share of direct",
            ">=",
            WS_SHARE_GOAL,
            _ws_share(r, SIDECAR_W1),
            _ws_share(r, NGINX),
        ),
        Goal(
            "RSS per idle WebSocket",
            "<=",
            30,
            _idle_kb(r, SIDECAR_W1),
            _idle_kb(r, NGINX),
            " KB",
            ".1f",
        ),
        Goal(
            "JWT route req/s ÷ fastapi-proxy-lib req/s",
            ">=",
            15,
            _div(jwt, _rps(r, FPL)),
            nan,
            "×",
            ".1f",
        ),
        Goal(
            "JWT route req/s ÷ nginx auth_request + Python JWT service req/s",
            ">",
            1.0,
            _div(jwt, _rps(r, NGINX_AUTH)),
            nan,
            "×",
        ),
    ]


def ws_floor(r: Results) -> list[str]:
    """What the byte relay (bench/byte_relay.py) says of the WebSocket echo goal: the most a relay
    in one Python process on this stack reaches, measured in the same run."""
    floor, sidecar = _ws_share(r, BYTE_RELAY), _ws_share(r, SIDECAR_W1)
    if math.isnan(floor) or math.isnan(sidecar):
        return []
    return [
        f"WebSocket echo against its floor: a relay in one Python process on uvloop that copies "
        f"bytes both ways and parses nothing (`{BYTE_RELAY}` below) reached {floor:.2f} of "
        f"direct in this run; the sidecar, which checks every frame, {sidecar:.2f}, that is "
        f"{sidecar / floor:.2f} of the floor. "
        + (
            "The goal is above the floor: no relay written in Python on this stack reaches it "
            "on this machine."
            if floor < WS_SHARE_GOAL
            else "The goal is within the floor's reach."
        ),
        "",
    ]


# Issue 9's table was measured when nginx spent 20-30 µs of CPU a request on the small GET: the
# absolute goals (CPU a request, latency added) were set against a host of that pace.
ISSUE_NGINX_CPU_US = (20, 30)


def host_pace(r: Results) -> list[str]:
    """How fast the shared host was in this run, and what that does to the JWT share.
    (The same build spent 40 µs a JWT request in one hour and 145 µs in another.)"""
    nginx, direct, sidecar = _cpu(r, NGINX), _cpu(r, DIRECT), _cpu(r, JWT_W1)
    if any(math.isnan(v) or v <= 0 for v in (nginx, direct, sidecar)):
        return []
    low, high = ISSUE_NGINX_CPU_US
    share = _div(_rps(r, JWT_W1), _rps(r, DIRECT))
    measured = "" if math.isnan(share) else f" (measured: {share:.2f})"
    return [
        f"The host's pace in this run: nginx spent {nginx:.0f} µs of CPU a request and the "
        f"upstream {direct:.0f} µs (issue 9's table, against which the CPU and latency goals "
        f"were set, had nginx at {low}–{high} µs). Absolute figures (CPU a request, latency) "
        "move with the host's pace. The sidecar's CPU a JWT request was "
        f"{sidecar / nginx:.1f}× nginx's and {sidecar / direct:.1f}× the upstream's own.",
        "",
        "What the JWT share measures: at one worker the sidecar and the upstream are each one "
        "process, and each keeps its core busy under this load, so the share of direct is the "
        "upstream's CPU a request over the sidecar's: "
        f"{direct:.0f} / {sidecar:.0f} = {direct / sidecar:.2f}{measured}. The goal of "
        f"{JWT_SHARE_GOAL:.2f} asks the sidecar to spend at most {1 / JWT_SHARE_GOAL:.2f}× the "
        "CPU the upstream (uvicorn answering from a bare ASGI function) spends a request. That "
        "ratio is not fixed: it grows when the host is busy, and the share falls with it.",
        "",
    ]


def render(r: Results, meta: dict[str, str]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m bench.run`); every contender ran in this one run, "
        "on loopback. The machine is shared and noisy and wrk, the upstream and the proxies share "
        "its cores, so compare ratios, not absolute numbers. Each figure is the **median of "
        f"{meta['rounds']} interleaved round(s)**: every round runs every scenario of every "
        "figure in turn, so drift over the run lands on all contenders alike. Idle memory is "
        "measured once, before the rounds.",
        "",
        f"- when: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {platform.platform(terse=True)}",
        f"- run: {meta['invocation']}",
        f"- sidecar build: request path compiled: {compiled.summary()} (`proxy/compiled.py`)",
        "",
    ]
    lines += ["## Targets (issue 9)", "", "| figure | goal | sidecar | nginx | verdict |"]
    lines += ["| --- | --- | ---: | ---: | --- |"]
    lines += [g.row() for g in goals(r)]
    lines += [
        "",
        "The sidecar figures are at `server.workers = 1` unless the row says otherwise (the "
        "sidecar's default). CPU is every process of the proxy (utime + stime from /proc, "
        "through psutil) over the wrk run, divided by the requests it completed.",
        "",
        *host_pace(r),
        *ws_floor(r),
    ]

    direct, nginx = _rps(r, DIRECT), _rps(r, NGINX)
    lines += [
        f"## HTTP, small GET (34-byte JSON), {meta['connections']} connections",
        "",
        "| contender | req/s | vs. direct | vs. nginx | p50 ms | p99 ms | CPU µs/req | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, (_, samples) in r.http32.items():
        rps = _http_median(samples, lambda s: s.rps)
        lines.append(
            f"| {label} | {_num(rps)} | {_ratio(rps, direct)} | {_ratio(rps, nginx)} "
            f"| {_num(_http_median(samples, lambda s: s.p50_ms), '.2f')} "
            f"| {_num(_http_median(samples, lambda s: s.p99_ms), '.2f')} "
            f"| {_num(_http_median(samples, lambda s: s.cpu_us), '.0f')} "
            f"| {sum(s.errors for s in samples)} |"
        )
    lines += [
        "",
        "CPU µs/req of `upstream direct` is the upstream's own cost; every other row counts only "
        "the proxy's processes (for `auth_request`: nginx and the JWT service). req/s rounds: "
        + "; ".join(
            f"{label} " + "/".join(f"{s.rps:.0f}" for s in samples)
            for label, (_, samples) in r.http32.items()
        ),
        "",
    ]

    if r.profile:
        lines += [
            "## Where the sidecar's time goes (JWT route, one worker)",
            "",
            f"`{r.profile_command}`",
            "",
            r.profile,
            "",
            "How to read it: every sample is CPU the sidecar spent. `kernel: write` is more than "
            "copying bytes: on loopback the writer's system call also delivers them to the "
            "reading socket and wakes the process waiting on it (wrk, the upstream), which on "
            "this virtual machine costs most of that share. `CPython` is the interpreter's C "
            "code that compiled functions call (objects, dictionaries, method calls); Python "
            "code that still runs interpreted counts there too.",
            "",
        ]

    direct_p50 = _p50_1(r, DIRECT)
    lines += [
        "## HTTP, small GET, 1 connection (latency)",
        "",
        "| contender | p50 ms | p99 ms | added p50 vs. direct, ms | req/s | CPU µs/req "
        "| p50 rounds, ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, (_, samples) in r.http1.items():
        p50 = _http_median(samples, lambda s: s.p50_ms)
        added = "–" if label == DIRECT else f"{p50 - direct_p50:+.3f}"
        lines.append(
            f"| {label} | {_num(p50, '.3f')} "
            f"| {_num(_http_median(samples, lambda s: s.p99_ms), '.3f')} | {added} "
            f"| {_num(_http_median(samples, lambda s: s.rps))} "
            f"| {_num(_http_median(samples, lambda s: s.cpu_us), '.0f')} "
            f"| {' / '.join(f'{s.p50_ms:.3f}' for s in samples)} |"
        )
    lines += [
        "",
        "At one connection a p50 moves by a few hundredths of a millisecond between rounds, "
        "with where the scheduler puts the client and the server (one core or two); read "
        "smaller differences as noise.",
        "",
    ]

    ws_direct, ws_nginx = median(r.ws_echo.get(DIRECT, [])), median(r.ws_echo.get(NGINX, []))
    lines += [
        f"## WebSocket echo, {meta['ws_connections']} connections",
        "",
        "Round trips per second (send a 45-byte text message, wait for its echo), no "
        "compression; one client process (websockets on uvloop) drives every connection. "
        "Uncompressed frames pass the sidecar whole; the row whose client offers "
        "permessage-deflate (as browsers do) takes the message relay: each message inflated "
        "and framed again, toward the client deflated.",
        "",
        "| contender | messages/s | vs. direct | vs. nginx | rounds |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for label, rates in r.ws_echo.items():
        rate = median(rates)
        lines.append(
            f"| {label} | {_num(rate)} | {_ratio(rate, ws_direct)} | {_ratio(rate, ws_nginx)} "
            f"| {' / '.join(f'{x:.0f}' for x in rates)} |"
        )
    lines.append("")
    if r.ws_profile:
        lines += [
            "### Where the sidecar's time goes (WebSocket echo, one worker)",
            "",
            f"`{r.ws_profile_command}`",
            "",
            r.ws_profile,
            "",
            "Each round trip through the sidecar is two reads and two writes (one of each a hop "
            "and a direction) and, shared with the frames around it, part of an `epoll_pwait`: "
            "the kernel's share is those system calls, the delivery and wake-up in each write, "
            "and the sleep and wake-up in each `epoll_pwait`. The byte relay pays the same calls; "
            "what the sidecar adds is in its compiled functions and the `CPython` they call.",
            "",
        ]
        if r.ws_floor_profile:
            lines += [
                "The byte relay, sampled the same way under the same load:",
                "",
                r.ws_floor_profile,
                "",
            ]

    lines += [
        "## Idle WebSockets",
        "",
        "RSS of the proxy's processes before the sockets opened, and with all of them open and "
        "idle.",
        "",
        "| contender | sockets | RSS before MiB | RSS after MiB | KB per socket |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, idle in r.idle.items():
        lines.append(
            f"| {label} | {idle.count:,} | {idle.before / 2**20:.1f} | {idle.after / 2**20:.1f} "
            f"| {idle.kb_per_socket:.1f} |"
        )
    lines.append("")

    up_direct, down_direct = median(r.upload.get(DIRECT, [])), median(r.download.get(DIRECT, []))
    up_nginx, down_nginx = median(r.upload.get(NGINX, [])), median(r.download.get(NGINX, []))
    lines += [
        f"## Bulk transfer, {meta['bulk_mib']} MiB",
        "",
        "| contender | upload MiB/s | vs. direct | vs. nginx | download MiB/s | vs. direct "
        "| vs. nginx |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label in dict.fromkeys([*r.upload, *r.download]):
        up, down = median(r.upload.get(label, [])), median(r.download.get(label, []))
        lines.append(
            f"| {label} | {_num(up)} | {_ratio(up, up_direct)} | {_ratio(up, up_nginx)} "
            f"| {_num(down)} | {_ratio(down, down_direct)} | {_ratio(down, down_nginx)} |"
        )
    lines.append("")

    lines += ["## Contenders", ""] + [f"- {d}" for d in r.details] + [""]
    if r.notes:
        lines += ["## Not measured, or measured with a caveat", ""]
        lines += [f"- {n}" for n in r.notes] + [""]
    lines += ["## Commands", "", "Ports are the run's ephemeral ones; credentials by name.", ""]
    for figure, commands in r.commands.items():
        lines += [f"### {figure}", ""] + [f"- `{c}`" for c in commands] + [""]
    if r.verify:
        lines += [
            "## Token verification cost (in-process, `python -m bench.verify`)",
            "",
            r.verify.strip(),
            "",
        ]
    return "\n".join(lines)


def write(path: Path, results: Results, meta: dict[str, str]) -> None:
    """The run's report; sections other bench modules wrote (`python -m bench.state`, ...) and
    this run does not produce are kept after it, each with the command that made it."""
    text = render(results, meta)
    ours = {line for line in text.splitlines() if line.startswith("## ")}
    kept = [s for s in _sections(path) if s.splitlines()[0] not in ours]
    path.write_text(text.rstrip("\n") + "\n" + "".join("\n" + s for s in kept))


def _sections(path: Path) -> list[str]:
    """The `## ` sections of an existing report, each up to the next."""
    if not path.exists():
        return []
    sections: list[str] = []
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("## "):
            sections.append(line)
        elif sections:
            sections[-1] += line
    return [s.rstrip("\n") + "\n" for s in sections]
