"""Where windows, slots and revocations live: the `Store` interface and its memory engine.

The memory engine is exact for one process (the event loop makes each check atomic). The Redis
engine (`redis_store`) gives every sidecar sharing the Redis the same answers.

Windows are sliding logs: a key's window holds the times of the requests it let through in the
last `window_s` seconds, so "at most `limit` in any `window_s`" holds exactly, a fresh caller may
send `limit` at once, and Retry-After is when the oldest of them leaves the window. A refused
request is not counted (waiting Retry-After is then always enough).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..config import StateSettings
from ..telemetry.metrics import Metrics
from .revocations import Revocation
from .rules import Rule

_SWEEP_S = 10.0


class StateUnavailable(Exception):
    """The shared state could not answer (Redis unreachable, or just found so)."""


@dataclass(slots=True)
class WindowResult:
    """What the windows of one request's rules said."""

    refused: Rule | None = None
    retry_after_s: float = 0.0
    # (rule, remaining, seconds until the window gives a unit back), one per rule
    states: list[tuple[Rule, int, float]] = field(default_factory=list)


@dataclass(slots=True)
class Slots:
    """Concurrency slots held by one request or session, to give back when it ends."""

    keys: list[str]
    member: str = ""


class Store(Protocol):
    """Windows, concurrency slots and revocations, wherever they are kept."""

    shared: bool  # seen by other processes (a revocation there reaches every sidecar)

    async def start(self, on_revocation: Callable[[Revocation], None]) -> None: ...

    async def close(self) -> None: ...

    async def hit(self, rules: Sequence[Rule], keys: Sequence[str]) -> WindowResult: ...

    async def acquire(self, rules: Sequence[Rule], keys: Sequence[str]) -> Slots | Rule: ...

    def release(self, slots: Slots) -> None: ...

    async def publish(self, revocation: Revocation) -> None: ...


class MemoryStore:
    """Everything in this process: nothing to install, exact with one worker."""

    shared = False

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._logs: dict[str, tuple[deque[float], int]] = {}  # key -> (times, window_s)
        self._slots: dict[str, int] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._on_revocation: Callable[[Revocation], None] | None = None

    def __len__(self) -> int:
        """Keys with a window or a slot held: what the sweep keeps bounded."""
        return len(self._logs) + len(self._slots)

    async def start(self, on_revocation: Callable[[Revocation], None]) -> None:
        self._on_revocation = on_revocation
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="state:sweep")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def hit(self, rules: Sequence[Rule], keys: Sequence[str]) -> WindowResult:
        return self.hit_now(rules, keys)

    def hit_now(self, rules: Sequence[Rule], keys: Sequence[str]) -> WindowResult:
        """`hit` without a coroutine: one check, atomic (nothing awaits in between)."""
        now = self._clock()
        result = WindowResult()
        found: list[deque[float] | None] = []
        for rule, key in zip(rules, keys, strict=True):
            entry = self._logs.get(key)
            log = entry[0] if entry is not None else None
            if log is not None:
                horizon = now - rule.window_s
                while log and log[0] <= horizon:
                    log.popleft()
            found.append(log)
            n = len(log) if log else 0
            if n >= rule.limit:
                assert log is not None
                wait = log[n - rule.limit] + rule.window_s - now
                if result.refused is None or wait > result.retry_after_s:
                    result.refused, result.retry_after_s = rule, wait
        allowed = result.refused is None
        for rule, key, log in zip(rules, keys, found, strict=True):
            if allowed:
                if log is None:
                    log = deque()
                    self._logs[key] = (log, rule.window_s)
                log.append(now)
            n = len(log) if log else 0
            reset = log[max(n - rule.limit, 0)] + rule.window_s - now if log else 0.0
            result.states.append((rule, rule.limit - n, reset))
        return result

    async def acquire(self, rules: Sequence[Rule], keys: Sequence[str]) -> Slots | Rule:
        for rule, key in zip(rules, keys, strict=True):
            if self._slots.get(key, 0) >= rule.concurrent:
                return rule
        for key in keys:
            self._slots[key] = self._slots.get(key, 0) + 1
        return Slots(list(keys))

    def release(self, slots: Slots) -> None:
        for key in slots.keys:
            left = self._slots.get(key, 1) - 1
            if left > 0:
                self._slots[key] = left
            else:
                self._slots.pop(key, None)

    async def publish(self, revocation: Revocation) -> None:
        if self._on_revocation is not None:
            self._on_revocation(revocation)

    def held(self, key: str) -> int:
        """Slots held now under `key` (for tests and the bench)."""
        return self._slots.get(key, 0)

    def sweep(self) -> None:
        """Forget windows whose every request has left them."""
        now = self._clock()
        for key in [k for k, (log, w) in self._logs.items() if not log or log[-1] <= now - w]:
            del self._logs[key]

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_S)
            self.sweep()


def open_store(settings: StateSettings, metrics: Metrics) -> Store:
    """The configured engine (not started)."""
    if settings.backend == "redis":
        from .redis_store import RedisStore

        return RedisStore(settings, metrics)
    return MemoryStore()
