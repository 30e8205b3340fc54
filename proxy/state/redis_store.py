"""The Redis engine: every check one atomic script, one round trip; revocations by pub/sub.

Windows are sorted sets of the requests let through (score: Redis's own clock in ms, so sidecars
with skewed clocks agree); concurrency slots are sorted sets of leases (score: lease end), renewed
by the sidecar holding them, so a sidecar that dies gives its slots back after `lease_s`.

A dead Redis must never stall requests: a command gets `connect_timeout_s` + `timeout_s` at most,
without retries, and after a failure Redis is not asked again for `retry_s` (`on_error` answers
at once meanwhile); the first request after that tries again, so recovery needs no restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..config import StateSettings
from ..telemetry.metrics import Metrics
from .resp import ScriptPipe
from .revocations import Revocation
from .rules import Rule
from .store import Slots, StateUnavailable, WindowResult

log = logging.getLogger("authproxy.state")

# KEYS: one window per rule. ARGV[1]: this request's member; ARGV[2i], ARGV[2i+1]: rule i's
# limit and window (ms). Returns {now, refused, n1, first1, ...}: each window's count after the
# request and the score of the entry whose leaving gives a unit back (-1: empty).
_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local counts = {}
local refused = 0
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - tonumber(ARGV[2 * i + 1]))
  counts[i] = redis.call('ZCARD', KEYS[i])
  if counts[i] >= tonumber(ARGV[2 * i]) then refused = 1 end
end
local out = {now, refused}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i])
  local n = counts[i]
  if refused == 0 then
    redis.call('ZADD', KEYS[i], now, ARGV[1])
    redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[2 * i + 1]))
    n = n + 1
  end
  local at = n - limit
  if at < 0 then at = 0 end
  local first = redis.call('ZRANGE', KEYS[i], at, at, 'WITHSCORES')
  out[#out + 1] = n
  out[#out + 1] = first[2] and tonumber(first[2]) or -1
end
return out
"""

# KEYS: one slot set per rule. ARGV[1]: member, ARGV[2]: lease (ms), ARGV[2+i]: rule i's cap.
# Returns 0 (taken in every set) or the index of the first full set (nothing taken).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  if redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[2 + i]) then return i end
end
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[i], 2 * tonumber(ARGV[2]))
end
return 0
"""

# KEYS: slot sets; ARGV[1]: lease (ms); ARGV[1+i]: the member held in KEYS[i].
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + tonumber(ARGV[1]), ARGV[1 + i])
  redis.call('PEXPIRE', KEYS[i], 2 * tonumber(ARGV[1]))
end
return #KEYS
"""

_FAILURES = (RedisError, OSError, TimeoutError)


def client(settings: StateSettings, *, read_timeout: bool = True) -> Redis:
    """A pooled client that fails fast: short timeouts, no retries."""
    return Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.connect_timeout_s,
        socket_timeout=settings.timeout_s if read_timeout else None,
        retry=Retry(NoBackoff(), 0),
        max_connections=settings.max_connections,
        health_check_interval=0 if read_timeout else 5,
    )


def deny_list(settings: StateSettings) -> str:
    return settings.key_prefix + "revoked"


def channel(settings: StateSettings) -> str:
    return settings.key_prefix + "revocations"


async def publish(redis: Redis, settings: StateSettings, revocation: Revocation) -> None:
    """Write `revocation` to the deny list and tell every subscribed sidecar, atomically."""
    until = "inf" if revocation.until is None else repr(revocation.until)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(deny_list(settings), revocation.field, until)
        pipe.publish(channel(settings), revocation.encode())
        await pipe.execute()


class RedisStore:
    """Windows, slots and revocations shared by every sidecar of one Redis."""

    shared = True

    def __init__(self, settings: StateSettings, metrics: Metrics) -> None:
        self._settings = settings
        self._redis = client(settings)
        # The per-request scripts go through their own pipelined connection (resp.py).
        self._pipe = ScriptPipe(
            settings.redis_url, settings.connect_timeout_s, {"window": _WINDOW, "acquire": _ACQUIRE}
        )
        self._renew = self._redis.register_script(_RENEW)
        self._prefix = settings.key_prefix
        self._lease_ms = int(settings.lease_s * 1000)
        self._bound_s = settings.connect_timeout_s + settings.timeout_s + 0.05
        self._ids = itertools.count()
        self._me = f"{uuid.uuid4().hex[:12]}:{os.getpid()}:"
        self._down_until = 0.0
        self._down = False
        self._errors = {op: metrics.state_errors.labels(op) for op in _OPS}
        self._held: dict[str, list[str]] = {}  # slot member -> its slot sets
        self._background: set[asyncio.Future[Any]] = set()
        # Releases of a burst of ending streams wait for a quarter of the pool: they may never
        # take every connection (the pool refuses, it does not queue) from the per-request path.
        self._release_gate = asyncio.Semaphore(max(1, settings.max_connections // 4))
        self._tasks: list[asyncio.Task[None]] = []
        self._on_revocation: Callable[[Revocation], None] | None = None
        self.subscribed = asyncio.Event()  # set while the revocation channel is listened to

    # --- availability -------------------------------------------------------------------------

    async def _run(self, op: str, call: Callable[[], Any]) -> Any:
        if self._down:
            now = time.monotonic()
            if now < self._down_until:
                raise StateUnavailable("redis was unreachable moments ago")
            # This request probes; the others keep on_error until it knows (a Redis that takes
            # connections and answers nothing would otherwise hold every one of them).
            self._down_until = now + self._settings.retry_s
        try:
            async with asyncio.timeout(self._bound_s):
                result = await call()
        except _FAILURES as exc:
            self._failed(op, exc)
            raise StateUnavailable(str(exc)) from exc
        if self._down:
            self._down = False
            log.warning("state: redis reachable again", extra={"fields": {"event": "state_up"}})
        return result

    def _failed(self, op: str, exc: BaseException) -> None:
        self._errors[op].inc()
        self._pipe.reset()  # a timed-out connection may be a stuck one: the next try reconnects
        self._down_until = time.monotonic() + self._settings.retry_s
        if not self._down:
            self._down = True
            log.error(
                "state: redis unreachable (%s: %s); on_error = %s until it answers",
                type(exc).__name__,
                exc,
                self._settings.on_error,
                extra={"fields": {"event": "state_down", "op": op}},
            )

    # --- windows and slots --------------------------------------------------------------------

    async def hit(self, rules: Sequence[Rule], keys: Sequence[str]) -> WindowResult:
        args: list[Any] = [self._me + str(next(self._ids))]
        for rule in rules:
            args += [rule.limit, rule.window_s * 1000]
        names = [self._prefix + "w:" + k for k in keys]
        out = await self._run("window", lambda: self._pipe.run("window", names, args))
        now, refused = out[0], out[1]
        result = WindowResult()
        for i, rule in enumerate(rules):
            n, first = out[2 + 2 * i], out[3 + 2 * i]
            reset_s = (first + rule.window_s * 1000 - now) / 1000 if first >= 0 else 0.0
            result.states.append((rule, rule.limit - n, reset_s))
            if (
                refused
                and n >= rule.limit
                and (result.refused is None or reset_s > result.retry_after_s)
            ):
                result.refused, result.retry_after_s = rule, reset_s
        return result

    async def acquire(self, rules: Sequence[Rule], keys: Sequence[str]) -> Slots | Rule:
        member = self._me + str(next(self._ids))
        names = [self._prefix + "c:" + k for k in keys]
        args: list[str | int] = [member, self._lease_ms, *(r.concurrent for r in rules)]
        full = await self._run("acquire", lambda: self._pipe.run("acquire", names, args))
        if full:
            return rules[int(full) - 1]
        self._held[member] = names
        return Slots(names, member)

    def release(self, slots: Slots) -> None:
        # Called from `finally` (also of a cancelled task): the ZREM runs on its own.
        if self._held.pop(slots.member, None) is None:
            return
        future = asyncio.ensure_future(self._release(slots))
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    async def _release(self, slots: Slots) -> None:
        async def zrem() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in slots.keys:
                    pipe.zrem(name, slots.member)
                await pipe.execute()

        # Housekeeping, not a verdict on Redis: a failure here never marks the store down (every
        # limit would fail open or shut for retry_s); the lease ends the slot after lease_s.
        async with self._release_gate:
            try:
                async with asyncio.timeout(self._bound_s):
                    await zrem()
            except _FAILURES:
                self._errors["release"].inc()

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.lease_s / 3)
            held = list(self._held.items())
            if not held:
                continue
            names = [name for _, keys in held for name in keys]
            members = [member for member, keys in held for _ in keys]
            args: list[str | int] = [self._lease_ms, *members]
            try:  # as for releases: a failed renewal is housekeeping, not an outage
                async with asyncio.timeout(self._bound_s):
                    await self._renew(keys=names, args=args)
            except _FAILURES:
                self._errors["renew"].inc()

    # --- revocations --------------------------------------------------------------------------

    async def publish(self, revocation: Revocation) -> None:
        await self._run("publish", lambda: publish(self._redis, self._settings, revocation))

    async def _load(self) -> list[Revocation]:
        now = time.time()
        out, stale = [], []
        raw = await self._redis.hgetall(deny_list(self._settings))
        for field, until in raw.items():
            name = field.decode() if isinstance(field, bytes) else field
            kind, _, value = name.partition(":")
            try:
                end = float(until)
            except ValueError:
                # Not ours (or hand-edited): one bad entry must not stop every revocation after it.
                log.warning("state: ignoring a deny-list entry that is not a time: %r", name[:80])
                continue
            if end <= now:
                stale.append(field)
            elif kind in ("key", "jti") and value:
                out.append(Revocation(kind, value, None if end == float("inf") else end))  # type: ignore[arg-type]
        if stale:
            await self._redis.hdel(deny_list(self._settings), *stale)
        return out

    async def _listen_forever(self) -> None:
        """Subscribe, then load the deny list (what was revoked while we were not listening);
        on any failure, again after retry_s."""
        listener = client(self._settings, read_timeout=False)
        try:
            while True:
                pubsub = listener.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(channel(self._settings))
                    for revocation in await self._load():
                        self._deliver(revocation)
                    self.subscribed.set()
                    while True:
                        message = await pubsub.get_message(timeout=5.0)
                        if message is not None and message.get("type") == "message":
                            try:
                                self._deliver(Revocation.decode(message["data"]))
                            except ValueError as exc:
                                log.warning("state: ignoring a bad revocation message: %s", exc)
                except _FAILURES as exc:
                    if self.subscribed.is_set():
                        log.warning("state: revocation channel lost (%s); resubscribing", exc)
                    self.subscribed.clear()
                    self._errors["subscribe"].inc()
                finally:
                    with contextlib.suppress(*_FAILURES):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
                await asyncio.sleep(self._settings.retry_s)
        finally:
            with contextlib.suppress(*_FAILURES):
                await listener.aclose()

    def _deliver(self, revocation: Revocation) -> None:
        if self._on_revocation is not None:
            self._on_revocation(revocation)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, on_revocation: Callable[[Revocation], None]) -> None:
        self._on_revocation = on_revocation
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="state:revocations"),
            asyncio.create_task(self._renew_forever(), name="state:leases"),
        ]
        # Start with the deny list when Redis answers; never hold start-up hostage to it.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._bound_s * 4):
                await self.subscribed.wait()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        held = [Slots(keys, member) for member, keys in self._held.items()]
        self._held.clear()
        for slots in held:
            await self._release(slots)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self._pipe.close()
        with contextlib.suppress(*_FAILURES):
            await self._redis.aclose()


_OPS = ("window", "acquire", "release", "renew", "publish", "subscribe")
