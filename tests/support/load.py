"""Closed-loop HTTP load for fault tests: clients that send requests back to back until told to
stop, every outcome recorded with when it started and ended."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Outcome:
    """One request: its start and end (time.monotonic), and its status or the client's error."""

    start: float
    end: float
    status: int | None
    error: str | None
    code: str | None  # the SPEC error code of a JSON error body

    @property
    def duration(self) -> float:
        return self.end - self.start


async def run_load(
    base_url: str,
    stop: asyncio.Event,
    *,
    workers: int = 6,
    timeout: float = 10.0,
    paths: tuple[str, ...] = ("/",),
    keepalive: bool = True,
) -> list[Outcome]:
    """`workers` clients GET `paths` in turn until `stop` is set."""
    outcomes: list[Outcome] = []
    limits = httpx.Limits(
        max_connections=workers, max_keepalive_connections=workers if keepalive else 0
    )

    async def worker(client: httpx.AsyncClient, k: int) -> None:
        i = k
        while not stop.is_set():
            path = paths[i % len(paths)]
            i += 1
            start = time.monotonic()
            try:
                response = await client.get(base_url + path)
            except httpx.HTTPError as exc:
                outcomes.append(Outcome(start, time.monotonic(), None, type(exc).__name__, None))
                await asyncio.sleep(0.01)  # a refused connection fails in microseconds
                continue
            code = None
            if response.status_code >= 400:
                try:
                    document = response.json()
                except ValueError:
                    document = None
                if isinstance(document, dict):
                    code = document.get("error")
            outcomes.append(Outcome(start, time.monotonic(), response.status_code, None, code))

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(worker(client, k) for k in range(workers)))
    return sorted(outcomes, key=lambda o: o.start)


def summary(outcomes: list[Outcome]) -> dict[str, float | int]:
    """Count, median and worst duration (ms) of some outcomes."""
    if not outcomes:
        return {"count": 0}
    durations = [o.duration * 1000 for o in outcomes]
    return {
        "count": len(outcomes),
        "median_ms": round(statistics.median(durations), 1),
        "max_ms": round(max(durations), 1),
    }
