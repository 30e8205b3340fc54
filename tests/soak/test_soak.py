"""The soak: mixed REST (model reads, start/stop calls that emit events, uploads whose SHA-256 the
upstream answers) and N WebSockets subscribed to the demo's model events, all through one sidecar
for a while. Every message is delivered once and in order (the demo numbers each session's
messages: `seq` 1, 2, 3, ... with a gap wherever it dropped one), every socket sees the same event
stream, every upload's hash is intact, nothing fails, and once the load is gone the sidecar's open
descriptors and memory are back near where they started.

The load comes in rounds (sockets opened, load, sockets closed, a pause for the descriptors to
settle), so what is left after a round can be compared with what was left after the one before.
The short soak runs with the suite; the long one (`make soak`: 500 WebSockets, three rounds over
three minutes by default; SOAK_WEBSOCKETS, SOAK_SECONDS and SOAK_ROUNDS change it) is marked
`soak`. Figures go to test-artifacts/robustness/soak_short.json and soak_long.json.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.support.figures import record
from tests.support.servers import Process, Sidecar, free_port, spawn, start_sidecar

API_KEY = "ak_soak_0123456789"
MiB = 1 << 20


@dataclass(frozen=True)
class Plan:
    websockets: int
    seconds: float
    rest_workers: int
    event_interval_s: float
    transitions_per_s: float
    rounds: int
    # After the load: at most this much more resident memory than after the warm-up.
    rss_slack_mib: float


SHORT = Plan(
    websockets=50,
    seconds=10,
    rest_workers=4,
    event_interval_s=0.2,
    transitions_per_s=4,
    rounds=2,
    rss_slack_mib=30,
)
LONG = Plan(
    websockets=int(os.environ.get("SOAK_WEBSOCKETS", "500")),
    seconds=float(os.environ.get("SOAK_SECONDS", "180")),
    rest_workers=4,
    event_interval_s=0.2,
    transitions_per_s=4,
    rounds=int(os.environ.get("SOAK_ROUNDS", "3")),
    rss_slack_mib=90,
)

CONFIG = f"""
[auth.api_keys]
[[auth.api_keys.keys]]
id = "soak"
sha256 = "{hashlib.sha256(API_KEY.encode()).hexdigest()}"

[websocket]
max_connections_per_identity = 0

[[routes]]
path = "/*"
auth = ["api_key"]
"""


@dataclass
class Stream:
    """What one WebSocket received: every seq, and the model events in arrival order."""

    seqs: list[int] = field(default_factory=list)
    events: list[tuple[str, str, str, str]] = field(default_factory=list)
    close_code: int | None = None


@dataclass
class Tally:
    requests: int = 0
    uploads: int = 0
    uploaded_bytes: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass
class Resources:
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, rss, fds)

    def take(self, process: psutil.Process) -> tuple[int, int]:
        rss, fds = process.memory_info().rss, process.num_fds()
        self.samples.append((time.monotonic(), rss, fds))
        return rss, fds


def start_upstream(tmp_path: Path, plan: Plan) -> Process:
    port = free_port()
    return spawn(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.support.soak_upstream:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--lifespan",
            "on",
            # Idle connections end soon after the load (the sidecar's keepalive_s is below it).
            "--timeout-keep-alive",
            "2",
        ],
        tmp_path / "soak-upstream.log",
        port,
        env={"SOAK_EVENT_INTERVAL": str(plan.event_interval_s)},
    )


async def subscribe(url: str) -> ClientConnection:
    ws = await connect(url, additional_headers={"X-API-Key": API_KEY}, open_timeout=30)
    await ws.send(json.dumps({"type": "subscribe", "topics": ["models"]}))
    return ws


async def listen(ws: ClientConnection, stream: Stream) -> None:
    async for raw in ws:
        message = json.loads(raw)
        stream.seqs.append(message["seq"])
        if message["type"] == "model_update":
            stream.events.append(
                (
                    message["model_id"],
                    message["status"],
                    message["timestamp"],
                    json.dumps(message["details"], sort_keys=True),
                )
            )
    stream.close_code = ws.close_code


async def chunks(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def rest_worker(
    client: httpx.AsyncClient, k: int, model_ids: list[str], stop: asyncio.Event, tally: Tally
) -> None:
    """Back to back: uploads (checked against the SHA-256 the upstream answers), lists, reads."""
    rng = random.Random(k)
    i = 0
    while not stop.is_set():
        i += 1
        what = ("upload", "list", "get")[i % 3]
        try:
            if what == "upload":
                size = rng.choice([0, 1, 1024, 65536, 256 * 1024, MiB, 3 * MiB])
                data = rng.randbytes(size)
                body: Any = data if i % 2 else chunks(data)  # Content-Length, or chunked
                r = await client.post("/upload", content=body)
                expected = {"sha256": hashlib.sha256(data).hexdigest(), "size": size}
                if r.status_code != 200 or r.json() != expected:
                    tally.failures.append(f"upload of {size} bytes: {r.status_code} {r.text[:80]}")
                tally.uploads += 1
                tally.uploaded_bytes += size
            elif what == "list":
                r = await client.get("/api/models")
                if r.status_code != 200 or "x-total-count" not in r.headers:
                    tally.failures.append(f"list: {r.status_code} {r.text[:80]}")
            else:
                r = await client.get(f"/api/models/{rng.choice(model_ids)}")
                if r.status_code != 200:
                    tally.failures.append(f"get: {r.status_code} {r.text[:80]}")
        except httpx.HTTPError as exc:
            tally.failures.append(f"{what}: {type(exc).__name__}: {exc}")
        tally.requests += 1


async def transitions(
    client: httpx.AsyncClient, model_ids: list[str], per_s: float, stop: asyncio.Event, tally: Tally
) -> None:
    """Start and stop models at a steady rate: each call makes the demo publish events, on top of
    its simulator's, so the sockets carry what the REST side caused."""
    rng = random.Random(0)
    while not stop.is_set():
        action = rng.choice(["start", "stop"])
        try:
            r = await client.post(f"/api/models/{rng.choice(model_ids)}/{action}")
            if r.status_code != 200:
                tally.failures.append(f"{action}: {r.status_code} {r.text[:80]}")
        except httpx.HTTPError as exc:
            tally.failures.append(f"{action}: {type(exc).__name__}: {exc}")
        tally.requests += 1
        await asyncio.sleep(1 / per_s)


def stream_problems(streams: list[Stream]) -> list[str]:
    """Each session numbered 1..n without a gap or repeat, each event stream a run of the one
    stream the bus published (a socket subscribed later or closed earlier sees a part of it)."""
    problems: list[str] = []
    for n, s in enumerate(streams):
        if s.seqs != list(range(1, len(s.seqs) + 1)):
            bad = next(i for i, q in enumerate(s.seqs) if q != i + 1)
            problems.append(f"socket {n}: seq {s.seqs[bad]} at position {bad + 1}")
        if len(set(s.events)) != len(s.events):
            problems.append(f"socket {n}: an event delivered twice")
    reference = max(streams, key=lambda s: len(s.events)).events
    position = {event: i for i, event in enumerate(reference)}
    for n, s in enumerate(streams):
        inside = [position[e] for e in s.events if e in position]
        if inside and inside != list(range(inside[0], inside[0] + len(inside))):
            problems.append(f"socket {n}: events missing or out of order against the others")
        outside = [i for i, e in enumerate(s.events) if e not in position]
        # Events the reference missed can only be at the edges (it subscribed later or closed
        # earlier), never in the middle.
        if any(0 < i < len(s.events) - 1 and s.events[i - 1] in position for i in outside):
            problems.append(f"socket {n}: an event in the middle nobody else saw")
    return problems


@dataclass
class Round:
    """One round of load: N sockets opened, REST alongside for a while, all closed."""

    streams: list[Stream]
    tally: Tally
    open_s: float
    rss_after: int = 0
    fds_after: int = 0


async def load_round(
    client: httpx.AsyncClient, url: str, plan: Plan, model_ids: list[str], seconds: float
) -> Round:
    opened = time.monotonic()
    sockets: list[ClientConnection] = []
    for i in range(0, plan.websockets, 50):
        batch = min(50, plan.websockets - i)
        sockets += await asyncio.gather(*(subscribe(url) for _ in range(batch)))
    open_s = time.monotonic() - opened
    streams = [Stream() for _ in sockets]
    listeners = [asyncio.create_task(listen(ws, s)) for ws, s in zip(sockets, streams, strict=True)]
    stop = asyncio.Event()
    tally = Tally()
    workers = [
        asyncio.create_task(rest_worker(client, k, model_ids, stop, tally))
        for k in range(plan.rest_workers)
    ]
    workers.append(
        asyncio.create_task(transitions(client, model_ids, plan.transitions_per_s, stop, tally))
    )
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*workers)
    for i in range(0, len(sockets), 50):
        await asyncio.gather(*(ws.close() for ws in sockets[i : i + 50]))
    await asyncio.wait_for(asyncio.gather(*listeners), 30)
    return Round(streams, tally, open_s)


async def settle(process: psutil.Process, resources: Resources, fds_start: int) -> tuple[int, int]:
    """Resident memory and descriptors once the load is gone: idle pooled upstream connections
    close when the upstream's keep-alive (2 s) ends, so at least 3 s."""
    began = time.monotonic()
    while True:
        rss, fds = resources.take(process)
        waited = time.monotonic() - began
        if (fds <= fds_start and waited > 3) or waited > 15:
            return rss, fds
        await asyncio.sleep(0.5)


async def soak(tmp_path: Path, plan: Plan, name: str) -> None:
    upstream = start_upstream(tmp_path, plan)
    try:
        sidecar: Sidecar = start_sidecar(
            tmp_path,
            upstream.port,
            CONFIG,
            upstream="keepalive_s = 1.0\n",  # below the upstream's keep-alive of 2 s
            env={"AUTHPROXY__LOGGING__FLUSH_INTERVAL_S": "0.1"},
        )
    except BaseException:
        upstream.stop()
        raise
    process = psutil.Process(sidecar.process.proc.pid)
    resources = Resources()
    url = sidecar.ws_url + "/ws"
    headers = {"X-API-Key": API_KEY}
    limits = httpx.Limits(max_connections=plan.rest_workers + 2)
    rounds: list[Round] = []
    try:
        async with httpx.AsyncClient(
            base_url=sidecar.url, headers=headers, timeout=30, limits=limits
        ) as client:
            # Warm-up: every path once, so the baseline holds what steady state holds.
            model_ids = [m["id"] for m in (await client.get("/api/models")).json()]
            await client.post("/upload", content=b"x" * MiB)
            warm = [await subscribe(url) for _ in range(5)]
            await asyncio.sleep(0.5)
            for ws in warm:
                await ws.close()
            await asyncio.sleep(1.0)
            rss_start, fds_start = resources.take(process)

            sampling = True

            async def sample() -> None:
                while sampling:
                    resources.take(process)
                    await asyncio.sleep(0.5)

            sampler = asyncio.create_task(sample())
            for _ in range(plan.rounds):
                r = await load_round(client, url, plan, model_ids, plan.seconds / plan.rounds)
                r.rss_after, r.fds_after = await settle(process, resources, fds_start)
                rounds.append(r)
            sampling = False
            await sampler
            alive = sidecar.process.proc.poll() is None
    finally:
        sidecar.stop()
        upstream.stop()

    log = sidecar.output()
    errors = [line for line in log.splitlines() if '"level":"error"' in line]
    streams = [s for r in rounds for s in r.streams]
    failures = [f for r in rounds for f in r.tally.failures]
    messages = sum(len(s.seqs) for s in streams)
    events = [len(s.events) for s in streams]
    figures = {
        "websockets": plan.websockets,
        "rounds": plan.rounds,
        "seconds": plan.seconds,
        "websocket_open_s": [round(r.open_s, 2) for r in rounds],
        "messages_delivered": messages,
        "messages_per_s": round(messages / plan.seconds),
        "events_per_socket_min": min(events),
        "events_per_socket_max": max(events),
        "rest_requests": sum(r.tally.requests for r in rounds),
        "uploads": sum(r.tally.uploads for r in rounds),
        "uploaded_mib": round(sum(r.tally.uploaded_bytes for r in rounds) / MiB, 1),
        "failures": len(failures),
        "rss_mib": {
            "start": round(rss_start / MiB, 1),
            "peak": round(max(rss for _, rss, _ in resources.samples) / MiB, 1),
            "after_each_round": [round(r.rss_after / MiB, 1) for r in rounds],
        },
        "fds": {
            "start": fds_start,
            "peak": max(fds for _, _, fds in resources.samples),
            "after_each_round": [r.fds_after for r in rounds],
        },
        "error_log_lines": len(errors),
    }
    record(name, figures)

    assert alive
    assert not failures, failures[:5]
    assert min(events) > 0, "a socket received no event"
    assert {s.close_code for s in streams} == {1000}
    for r in rounds:
        problems = stream_problems(r.streams)
        assert not problems, problems[:5]
    assert not errors, errors[:3]
    for r in rounds:
        assert r.fds_after <= fds_start + 2, figures["fds"]
    # Memory: CPython and its allocators keep what a load made them take (measured: the RSS after
    # each round climbs to a plateau, +22 MiB for 50 sockets with uploads, +55 MiB for 500, then
    # stays; the Python heap and object count stay flat throughout). So: within a high-water
    # slack of the start, and, given enough rounds to reach the plateau, flat over the second half
    # (a leak grows with every round).
    after = [r.rss_after for r in rounds]
    assert after[-1] <= rss_start + plan.rss_slack_mib * MiB, figures["rss_mib"]
    if len(rounds) >= 6:
        assert after[-1] <= after[len(after) // 2] + 4 * MiB, figures["rss_mib"]


async def test_short_soak_of_rest_uploads_and_websockets_loses_nothing_and_leaks_nothing(
    tmp_path: Path,
) -> None:
    await soak(tmp_path, SHORT, "soak_short")


@pytest.mark.soak
async def test_long_soak_of_rest_uploads_and_websockets_loses_nothing_and_leaks_nothing(
    tmp_path: Path,
) -> None:
    await soak(tmp_path, LONG, "soak_long")
