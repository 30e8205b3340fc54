"""The Redis engine against a real redis-server: the same exact windows as the memory engine,
shared by every store on that Redis, slots that outlive no holder, revocations by pub/sub, and a
dead Redis that costs a bounded time and is found again without a restart."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from proxy.config import StateSettings
from proxy.state import Revocation
from proxy.state.redis_store import RedisStore
from proxy.state.rules import Rule
from proxy.state.store import Slots, StateUnavailable
from proxy.telemetry.metrics import Metrics
from tests.support.redis_server import RedisServer
from tests.support.servers import ROOT


def settings(server: RedisServer, **extra: object) -> StateSettings:
    return StateSettings.model_validate({"backend": "redis", "redis_url": server.url, **extra})


@asynccontextmanager
async def store(
    server: RedisServer, heard: Callable[[Revocation], None] | None = None, **extra: object
) -> AsyncIterator[RedisStore]:
    s = RedisStore(settings(server, **extra), Metrics())
    await s.start(heard or (lambda _: None))
    try:
        yield s
    finally:
        await s.close()


async def test_a_fresh_caller_gets_exactly_limit_at_once_and_an_honest_wait(
    redis_server: RedisServer,
) -> None:
    rule = Rule("r", False, 5, 60, 0)
    async with store(redis_server) as s:
        results = await asyncio.gather(*(s.hit([rule], ["r|a"]) for _ in range(8)))
    allowed = [r for r in results if r.refused is None]
    assert len(allowed) == 5
    assert sorted(r.states[0][1] for r in allowed) == [0, 1, 2, 3, 4]
    refused = [r for r in results if r.refused is not None]
    assert all(59.0 < r.retry_after_s <= 60.0 for r in refused)


async def test_two_stores_on_one_redis_share_one_window_and_a_short_one_reopens(
    redis_server: RedisServer,
) -> None:
    rule = Rule("r", False, 4, 1, 0)
    async with store(redis_server) as a, store(redis_server) as b:
        results = await asyncio.gather(*(x.hit([rule], ["r|k"]) for x in (a, b) * 5))
        assert sum(r.refused is None for r in results) == 4
        wait = max(r.retry_after_s for r in results if r.refused is not None)
        assert 0 < wait <= 1.0
        await asyncio.sleep(wait + 0.01)
        assert (await b.hit([rule], ["r|k"])).refused is None


async def test_slots_are_shared_given_back_and_lost_with_a_holder_that_never_renews(
    redis_server: RedisServer,
) -> None:
    rule = Rule("c", False, 0, 60, 1)
    async with store(redis_server, lease_s=3) as a, store(redis_server, lease_s=3) as b:
        held = await a.acquire([rule], ["c|k"])
        assert isinstance(held, Slots)
        assert await b.acquire([rule], ["c|k"]) == rule
        a.release(held)
        await asyncio.sleep(0.1)
        taken = await b.acquire([rule], ["c|k"])
        assert isinstance(taken, Slots)
        # b "dies": it forgets the slot without giving it back or renewing it.
        b._held.clear()
        assert await a.acquire([rule], ["c|k"]) == rule
        await asyncio.sleep(3.1)
        assert isinstance(await a.acquire([rule], ["c|k"]), Slots)


async def test_a_burst_of_releases_never_takes_the_store_down(redis_server: RedisServer) -> None:
    """Two hundred capped streams ending at once (more than the pool's connections) give every
    slot back and leave the limits working: releases are housekeeping, not an outage."""
    rule = Rule("c", False, 0, 60, 1000)
    window = Rule("w", False, 5, 60, 0)
    async with store(redis_server, max_connections=8) as s:
        held = [await s.acquire([rule], ["c|burst"]) for _ in range(200)]
        assert all(isinstance(h, Slots) for h in held)
        for h in held:
            assert isinstance(h, Slots)
            s.release(h)
        await asyncio.sleep(0)
        # The window keeps being judged by Redis meanwhile (not by on_error).
        results = [await s.hit([window], ["w|x"]) for _ in range(6)]
        assert [r.refused is None for r in results] == [True] * 5 + [False]
        deadline = asyncio.get_running_loop().time() + 5
        while s._background:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        left = await s._redis.zcard(s._prefix + "c:c|burst")
        assert left == 0 and not s._down


async def test_a_revocation_published_by_one_store_reaches_the_others_and_late_joiners(
    redis_server: RedisServer,
) -> None:
    heard_b: list[Revocation] = []
    revocation = Revocation("key", "ci-bot")
    async with store(redis_server) as a, store(redis_server, heard_b.append) as b:
        assert b.subscribed.is_set()
        await a.publish(revocation)
        deadline = time.monotonic() + 1
        while not heard_b:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert heard_b == [revocation]
    late: list[Revocation] = []
    async with store(redis_server, late.append):
        assert late == [revocation]  # from the deny list, at start


async def test_a_garbage_deny_list_entry_does_not_stop_revocations(
    redis_server: RedisServer,
) -> None:
    """A bad `until` in the deny list (hand-edited, another tool's) is skipped: the listener that
    loads the list must live on, or every later revocation would go unheard."""
    async with store(redis_server) as a:
        await a._redis.hset(a._prefix + "revoked", "key:odd", "not-a-time")
        await a.publish(Revocation("key", "before"))
    heard: list[Revocation] = []
    async with store(redis_server, heard.append) as b, store(redis_server) as c:
        assert heard == [Revocation("key", "before")]  # the good entry loaded, the bad skipped
        await c.publish(Revocation("key", "after"))
        deadline = time.monotonic() + 2
        while len(heard) < 2:
            assert time.monotonic() < deadline, heard
            await asyncio.sleep(0.01)
        assert heard[-1] == Revocation("key", "after") and b.subscribed.is_set()


async def test_a_dead_redis_costs_a_bounded_time_once_per_retry_and_is_found_again(
    redis_server: RedisServer,
) -> None:
    rule = Rule("r", False, 2, 60, 0)
    async with store(redis_server, retry_s=0.5) as s:
        assert (await s.hit([rule], ["r|k"])).refused is None
        redis_server.stop()
        started = time.monotonic()
        with pytest.raises(StateUnavailable):
            await s.hit([rule], ["r|k"])
        assert time.monotonic() - started < 0.6  # connect + command timeouts, no retries
        started = time.monotonic()
        for _ in range(50):  # within retry_s: not even tried
            with pytest.raises(StateUnavailable):
                await s.hit([rule], ["r|k"])
        assert time.monotonic() - started < 0.05
        redis_server.start()
        await asyncio.sleep(0.55)
        # Back, without a restart of the store (its window was lost with Redis' memory).
        assert (await s.hit([rule], ["r|k"])).refused is None
        assert (await s.hit([rule], ["r|k"])).refused is None
        assert (await s.hit([rule], ["r|k"])).refused == rule


async def test_scripts_flushed_behind_its_back_are_loaded_again_and_the_url_s_db_is_used(
    redis_server: RedisServer,
) -> None:
    from redis.asyncio import Redis

    rule = Rule("r", False, 3, 60, 0)
    url = redis_server.url.rsplit("/", 1)[0] + "/3"
    s = RedisStore(StateSettings(backend="redis", redis_url=url), Metrics())
    await s.start(lambda _: None)
    admin = Redis.from_url(url)
    try:
        assert (await s.hit([rule], ["r|k"])).refused is None
        await admin.script_flush()
        assert (await s.hit([rule], ["r|k"])).refused is None
        assert await admin.zcard("authproxy:w:r|k") == 2  # in db 3, where the URL says
        db0 = Redis.from_url(redis_server.url)
        assert await db0.zcard("authproxy:w:r|k") == 0
        await db0.aclose()
    finally:
        await admin.aclose()
        await s.close()


async def test_a_redis_that_takes_connections_and_never_answers_costs_a_bounded_time() -> None:
    # A listening socket nobody reads from: connects succeed, replies never come.
    writers: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda r, w: writers.append(w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    s = RedisStore(
        StateSettings(backend="redis", redis_url=f"redis://127.0.0.1:{port}/0", retry_s=0.2),
        Metrics(),
    )
    await s.start(lambda _: None)  # returns although the deny list never loads
    try:
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(StateUnavailable):
                await s.hit([Rule("r", False, 3, 60, 0)], ["r|k"])
            assert time.monotonic() - started < 0.6
            await asyncio.sleep(0.25)

        # Past retry_s, one request probes; the others at the same moment do not wait with it.
        async def timed() -> float:
            started = time.monotonic()
            with pytest.raises(StateUnavailable):
                await s.hit([Rule("r", False, 3, 60, 0)], ["r|k"])
            return time.monotonic() - started

        took = await asyncio.gather(*(timed() for _ in range(10)))
        assert sum(t > 0.2 for t in took) == 1 and max(took) < 0.6
    finally:
        await s.close()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_password_in_the_url_is_used_and_never_printed(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="s3cret-redis-pass")
    server.start()
    try:
        heard: list[Revocation] = []
        async with store(server, heard.append) as s:
            assert s.subscribed.is_set()  # redis-py's connection authenticated
            rule = Rule("r", False, 1, 60, 0)
            assert (await s.hit([rule], ["r|k"])).refused is None  # the pipe's too
            assert (await s.hit([rule], ["r|k"])).refused == rule
            config = tmp_path / "c.toml"
            config.write_text(
                f'[state]\nbackend = "redis"\nredis_url = "{server.url}"\n'
                '[[routes]]\npath = "/*"\nauth = "public"\n'
            )
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "proxy", "revoke", "--config", str(config)]
                + ["--key-id", "k"],
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=30,
            )
            assert done.returncode == 0, done.stderr
            assert "s3cret" not in done.stdout + done.stderr
            deadline = time.monotonic() + 1
            while not heard:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert heard == [Revocation("key", "k")]
        wrong = RedisStore(
            settings(server, redis_url=server.url.replace("s3cret", "wrong")), Metrics()
        )
        with pytest.raises(StateUnavailable):
            await wrong.hit([Rule("r", False, 1, 60, 0)], ["r|k"])
        await wrong.close()
    finally:
        server.stop()
