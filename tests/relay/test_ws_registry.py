"""The session registry without sockets: admission caps, the revocation and signing-key indexes,
each session's deadlines, the drain, the keepalive wheel and the shutdown, with a fake upstream."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable
from typing import Any

from proxy.config import from_dict
from proxy.errors import RateLimited, ServiceUnavailable
from proxy.identity import Identity
from proxy.relay.ws_outcomes import (
    DRAINING,
    IDLE,
    KEY_EXPIRED,
    KEY_REVOKED,
    LIFETIME,
    SHUTDOWN,
    SIGNING_KEY_WITHDRAWN,
    TOKEN_EXPIRED,
    UPSTREAM_PING_TIMEOUT,
    Outcome,
)
from proxy.relay.ws_registry import SessionRegistry
from proxy.relay.ws_session import Session


class FakeUpstream:
    """An upstream hop without a socket: answers pings (or not) and records being cut."""

    def __init__(self, answers_pings: bool = True) -> None:
        self.answers_pings = answers_pings
        self.pings = 0
        self.aborted = False

    async def ping(self) -> Awaitable[float]:
        self.pings += 1
        pong: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if self.answers_pings:
            pong.set_result(0.0)
        return pong

    @property
    def transport(self) -> FakeUpstream:
        return self

    def abort(self) -> None:
        self.aborted = True


def registry(**websocket: Any) -> SessionRegistry:
    return SessionRegistry(from_dict({"websocket": websocket}).websocket, handshake_timeout_s=5)


def opened(
    r: SessionRegistry,
    identity: Identity | None = None,
    upstream: FakeUpstream | None = None,
    started: float | None = None,
) -> Session:
    s = Session(identity, upstream or FakeUpstream(), asyncio.get_running_loop().time())
    r.register(s, started=time.perf_counter() if started is None else started)
    return s


async def ended(s: Session, timeout: float = 3.0) -> Outcome:
    async with asyncio.timeout(timeout):
        while s.outcome is None:
            await asyncio.sleep(0.01)
    return s.outcome


def who(sub: str) -> Identity:
    return Identity("jwt", sub, issuer="https://issuer.test")


def jwt_identity(sub: str, provider: str, key: str) -> Identity:
    return Identity(
        "jwt", sub, issuer=f"https://{provider}", credential_id=provider, signing_key=key
    )


def api_key(key_id: str) -> Identity:
    return Identity("api_key", key_id, credential_id=key_id)


# --- admission -----------------------------------------------------------------------------------


def test_the_per_identity_cap_refuses_with_429_and_the_total_cap_with_503() -> None:
    r = registry(max_connections=3, max_connections_per_identity=2)
    assert r.admit(who("a")) is None
    assert r.admit(who("a")) is None
    assert isinstance(r.admit(who("a")), RateLimited)
    assert r.admit(who("b")) is None
    assert isinstance(r.admit(who("c")), ServiceUnavailable)
    r.release(who("a"))
    assert r.admit(who("c")) is None
    assert [r.admitted_for(who(sub)) for sub in "abc"] == [1, 1, 1]
    assert r.admitted == 3


def test_one_identity_is_its_method_issuer_and_subject() -> None:
    r = registry(max_connections_per_identity=1)
    assert r.admit(who("a")) is None
    assert r.admit(Identity("jwt", "a", issuer="https://other.test")) is None
    assert r.admit(Identity("api_key", "a")) is None
    assert isinstance(r.admit(who("a")), RateLimited)


def test_anonymous_sessions_count_only_towards_the_total() -> None:
    r = registry(max_connections=2, max_connections_per_identity=1)
    assert r.admit(None) is None
    assert r.admit(None) is None
    assert isinstance(r.admit(None), ServiceUnavailable)
    r.release(None)
    assert r.admitted == 1


def test_by_default_one_identity_cannot_take_every_slot() -> None:
    ws = from_dict({}).websocket
    r = registry()
    cap = ws.max_connections_per_identity
    assert 0 < cap < ws.max_connections
    assert all(r.admit(who("a")) is None for _ in range(cap))
    assert isinstance(r.admit(who("a")), RateLimited)
    assert r.admit(who("b")) is None


def test_zero_means_no_per_identity_cap() -> None:
    r = registry(max_connections_per_identity=0)
    assert all(r.admit(who("a")) is None for _ in range(100))


# --- revocations and withdrawn signing keys ------------------------------------------------------


async def test_a_revocation_ends_only_that_keys_sessions() -> None:
    r = registry()
    k1 = opened(r, api_key("k1"))
    k2 = opened(r, api_key("k2"))
    jwt = opened(r, Identity("jwt", "k1", issuer="i", credential_id="k1"))
    r.revoke_api_key("k1")
    assert k1.outcome is KEY_REVOKED
    assert k2.outcome is None and jwt.outcome is None
    for s in (k1, k2, jwt):
        r.unregister(s)
    assert r.indexed == (0, 0) and len(r) == 0


async def test_a_key_revoked_while_its_session_connected_upstream_is_ended_on_register() -> None:
    r = registry()
    authenticated = time.perf_counter()
    r.revoke_api_key("k1")  # announced while the upstream handshake was under way
    late = opened(r, api_key("k1"), started=authenticated)
    assert late.outcome is KEY_REVOKED
    fresh = opened(r, api_key("k1"))  # authenticated after: the key is back
    assert fresh.outcome is None
    for s in (late, fresh):
        r.unregister(s)


async def test_a_jti_revoked_while_its_session_connected_upstream_is_ended_on_register() -> None:
    r = registry()
    authenticated = time.perf_counter()
    r.revoke_token("tok-1")  # `authproxy revoke --jti` while the upstream handshake was under way
    identity = dataclasses.replace(jwt_identity("a", "idp", "fp"), token_id="tok-1")
    late = opened(r, identity, started=authenticated)
    assert late.outcome is not None and late.outcome.why == "token_revoked"
    other = opened(r, dataclasses.replace(identity, token_id="tok-2"), started=authenticated)
    assert other.outcome is None
    for s in (late, other):
        r.unregister(s)


async def test_a_withdrawn_signing_key_ends_only_the_sessions_it_verified() -> None:
    r = registry()
    doomed = opened(r, jwt_identity("a", "idp", "fp-old"))
    doomed_too = opened(r, jwt_identity("b", "idp", "fp-old"))
    other_key = opened(r, jwt_identity("a", "idp", "fp-new"))
    other_provider = opened(r, jwt_identity("a", "partner", "fp-old"))  # same key, other trust
    key = opened(r, api_key("fp-old"))
    r.withdraw_signing_keys("idp", frozenset({"fp-old", "fp-never-used"}))
    assert doomed.outcome is SIGNING_KEY_WITHDRAWN and doomed_too.outcome is SIGNING_KEY_WITHDRAWN
    assert all(s.outcome is None for s in (other_key, other_provider, key))
    for s in (doomed, doomed_too, other_key, other_provider, key):
        r.unregister(s)
    assert r.indexed == (0, 0)


async def test_a_key_withdrawn_while_its_session_connected_upstream_is_ended_on_register() -> None:
    r = registry()
    authenticated = time.perf_counter()
    r.withdraw_signing_keys("idp", frozenset({"fp-old"}))  # while the handshake was under way
    late = opened(r, jwt_identity("a", "idp", "fp-old"), started=authenticated)
    assert late.outcome is SIGNING_KEY_WITHDRAWN
    fresh = opened(r, jwt_identity("a", "idp", "fp-old"))  # verified after: the key is back
    assert fresh.outcome is None
    for s in (late, fresh):
        r.unregister(s)


async def test_the_first_reason_to_end_a_session_is_the_one_kept() -> None:
    r = registry()
    s = opened(r, api_key("k1"))
    r.revoke_api_key("k1")
    r.begin_drain()
    s.end(SHUTDOWN)
    assert s.outcome is KEY_REVOKED
    r.unregister(s)


# --- deadlines -----------------------------------------------------------------------------------


async def test_a_session_ends_when_its_credential_stops_being_valid() -> None:
    r = registry()
    key = opened(r, Identity("api_key", "k1", expires_at=time.time() - 1))
    assert await ended(key) is KEY_EXPIRED
    # A JWT past its exp is still valid within its provider's leeway: it ends after that.
    token = opened(r, Identity("jwt", "a", expires_at=time.time() - 1, leeway_s=1.4))
    await asyncio.sleep(0.1)
    assert token.outcome is None
    assert await ended(token) is TOKEN_EXPIRED
    forever = opened(r, Identity("api_key", "k2"))
    await asyncio.sleep(0.05)
    assert forever.outcome is None
    for s in (key, token, forever):
        r.unregister(s)


async def test_a_session_ends_at_its_lifetime() -> None:
    r = registry(max_connection_lifetime_s=0.1)
    s = opened(r)
    assert await ended(s) is LIFETIME
    r.unregister(s)


async def test_an_idle_session_ends_and_activity_postpones_it() -> None:
    r = registry(idle_timeout_s=0.5)
    s = opened(r)
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0.3)
    s.last_activity = loop.time()  # a message, either way
    await asyncio.sleep(0.3)
    assert s.outcome is None
    assert await ended(s) is IDLE
    assert loop.time() - s.last_activity >= 0.5
    r.unregister(s)


async def test_only_a_watched_session_asks_the_clock_for_its_activity() -> None:
    # Without an idle timeout (the default) a relayed message leaves the clock alone.
    quiet = opened(registry())
    assert quiet.idle_clock is None
    watched = opened(registry(idle_timeout_s=5))
    assert watched.idle_clock is not None
    before = watched.last_activity
    await asyncio.sleep(0.01)
    assert watched.idle_clock() > before


async def test_no_timer_outlives_its_session() -> None:
    r = registry(idle_timeout_s=0.1, max_connection_lifetime_s=0.1)
    s = opened(r, Identity("api_key", "k1", expires_at=time.time() + 0.1))
    r.unregister(s)
    await asyncio.sleep(0.3)
    assert s.outcome is None


# --- drain and shutdown --------------------------------------------------------------------------


async def test_a_drain_ends_every_session_after_drain_s_and_any_that_registers_later() -> None:
    r = registry(drain_s=0.2)
    s = opened(r)
    r.begin_drain()
    await asyncio.sleep(0.05)
    assert s.outcome is None  # the drain period: sessions may finish by themselves
    assert await ended(s) is DRAINING
    late = opened(r)
    assert late.outcome is DRAINING
    drained = asyncio.create_task(r.drained())
    r.unregister(s)
    await asyncio.sleep(0)
    assert not drained.done()
    r.unregister(late)
    await asyncio.wait_for(drained, 1)


async def test_drained_returns_at_once_when_no_session_is_open() -> None:
    r = registry()
    await asyncio.wait_for(r.drained(), 1)


async def test_stop_ends_every_session_and_cuts_those_that_do_not_close_in_time() -> None:
    r = registry()
    polite_upstream, stuck_upstream = FakeUpstream(), FakeUpstream()
    polite = opened(r, upstream=polite_upstream)
    stuck = opened(r, upstream=stuck_upstream)

    async def relay_of_polite() -> None:
        await ended(polite)
        r.unregister(polite)

    closing = asyncio.create_task(relay_of_polite())
    await r.stop(grace_s=0.2)
    await closing
    assert polite.outcome is SHUTDOWN and stuck.outcome is SHUTDOWN
    assert not polite_upstream.aborted and stuck_upstream.aborted
    r.unregister(stuck)


# --- keepalive -----------------------------------------------------------------------------------


async def test_an_upstream_that_does_not_answer_pings_ends_its_session_with_1011() -> None:
    r = registry(ping_interval_s=0.1)
    alive_upstream = FakeUpstream()
    alive = opened(r, upstream=alive_upstream)
    silent = opened(r, upstream=FakeUpstream(answers_pings=False))
    assert await ended(silent) is UPSTREAM_PING_TIMEOUT
    assert UPSTREAM_PING_TIMEOUT.client_code == 1011
    assert alive.outcome is None and alive_upstream.pings >= 1
    for s in (alive, silent):
        r.unregister(s)
    await r.stop(grace_s=0)


async def test_no_upstream_is_pinged_when_ping_interval_s_is_zero() -> None:
    r = registry(ping_interval_s=0)
    upstream = FakeUpstream(answers_pings=False)
    s = opened(r, upstream=upstream)
    await asyncio.sleep(0.2)
    assert upstream.pings == 0 and s.outcome is None
    r.unregister(s)
