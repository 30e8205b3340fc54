"""The open WebSocket sessions of a worker, apart from their sockets: admission caps (in all and
per identity), each session's deadlines, the indexes that end sessions when an API key is revoked
or a JWT signing key withdrawn, the drain, and the upstream keepalive wheel.

Nothing here reads or writes a socket. A session's upstream is anything that can be pinged and
cut (`ws_session.UpstreamHop`; websockets' `ClientConnection` is one), so the registry is tested
with a fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import TypeVar

from websockets.exceptions import ConnectionClosed

from ..config import WebSocketSettings
from ..errors import ProxyError, RateLimited, ServiceUnavailable
from ..identity import Identity
from .ws_outcomes import (
    DRAINING,
    IDLE,
    KEY_REVOKED,
    LIFETIME,
    SHUTDOWN,
    SIGNING_KEY_WITHDRAWN,
    TOKEN_REVOKED,
    UPSTREAM_PING_TIMEOUT,
    Outcome,
    credential_expired,
)
from .ws_session import Session

log = logging.getLogger("authproxy.websocket")


IdentityKey = tuple[str, str | None, str]
SigningKey = tuple[str, str]  # (JWT provider, key fingerprint)
_K = TypeVar("_K", str, SigningKey)
_V = TypeVar("_V")


class SessionRegistry:
    """Every open session of a worker, and whatever ends sessions from outside their relay."""

    def __init__(self, ws: WebSocketSettings, *, handshake_timeout_s: float) -> None:
        self._ws = ws
        # How long a revocation or withdrawal is remembered: longer than a session can take from
        # authentication to registration (the upstream handshake), with a margin.
        self._mark_horizon_s = handshake_timeout_s + 60
        self._sessions: set[Session] = set()
        self._by_key: dict[str, set[Session]] = {}
        self._by_signing_key: dict[SigningKey, set[Session]] = {}
        self._admitted = 0
        self._per_identity: dict[IdentityKey, int] = {}
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self._drain_handle: asyncio.TimerHandle | None = None
        self._drained = False
        self._revoked_at: dict[str, float] = {}  # key id -> perf_counter() of its revocation
        self._token_revoked_at: dict[str, float] = {}  # likewise, JWT ids (`revoke --jti`)
        self._withdrawn_at: dict[SigningKey, float] = {}  # likewise, for JWT signing keys
        interval = ws.ping_interval_s
        slots = max(1, round(interval)) if interval else 0
        self._wheel: list[set[Session]] = [set() for _ in range(slots)]
        self._wheel_tick_s = interval / slots if slots else 0.0
        self._wheel_at = 0
        self._wheel_timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """Sessions registered now."""
        return len(self._sessions)

    # --- admission --------------------------------------------------------------------------------

    def admit(self, identity: Identity | None) -> ProxyError | None:
        """Count one more session for `identity` (None: anonymous, counted only in all), or the
        error that refuses it: 503 past `max_connections`, 429 past `max_connections_per_identity`
        (0: no such cap). Every admission is given back with `release`."""
        ws = self._ws
        key = _identity_key(identity)
        if self._admitted >= ws.max_connections:
            return ServiceUnavailable(
                "too many WebSocket connections",
                retry_after_s=5,
                details={"reason": "websocket_capacity", "limit": ws.max_connections},
            )
        if (
            key is not None
            and ws.max_connections_per_identity
            and self._per_identity.get(key, 0) >= ws.max_connections_per_identity
        ):
            return RateLimited(
                "too many WebSocket connections for this identity",
                details={
                    "reason": "websocket_identity_limit",
                    "limit": ws.max_connections_per_identity,
                },
                headers={"Retry-After": "5"},
            )
        self._admitted += 1
        if key is not None:
            self._per_identity[key] = self._per_identity.get(key, 0) + 1
        return None

    def release(self, identity: Identity | None) -> None:
        """Give back what `admit(identity)` counted."""
        self._admitted -= 1
        key = _identity_key(identity)
        if key is not None:
            left = self._per_identity.get(key, 1) - 1
            if left > 0:
                self._per_identity[key] = left
            else:
                self._per_identity.pop(key, None)

    @property
    def admitted(self) -> int:
        """Admissions not yet released, in all."""
        return self._admitted

    def admitted_for(self, identity: Identity) -> int:
        """Admissions not yet released for `identity` (its method, issuer and subject)."""
        key = _identity_key(identity)
        return self._per_identity.get(key, 0) if key is not None else 0

    @property
    def indexed(self) -> tuple[int, int]:
        """Entries in the API-key and the signing-key index: one per key that has an open session,
        so (0, 0) once every session is unregistered."""
        return len(self._by_key), len(self._by_signing_key)

    # --- one session ------------------------------------------------------------------------------

    def register(self, s: Session, started: float) -> None:
        """Track an accepted session and arm its deadlines. `started` is the `perf_counter()` of
        its authentication: a revocation or withdrawal announced since ends it at once, as does a
        drain that is over."""
        self._sessions.add(s)
        self._wheel_add(s)
        self._all_closed.clear()
        key_id = revocable_key(s.identity)
        if key_id is not None:
            self._by_key.setdefault(key_id, set()).add(s)
            if self._revoked_at.get(key_id, float("-inf")) >= started:
                s.end(KEY_REVOKED)
        token_id = s.identity.token_id if s.identity is not None else None
        if token_id is not None and self._token_revoked_at.get(token_id, -math.inf) >= started:
            s.end(TOKEN_REVOKED)
        signer = signing_key(s.identity)
        if signer is not None:
            self._by_signing_key.setdefault(signer, set()).add(s)
            if self._withdrawn_at.get(signer, float("-inf")) >= started:
                s.end(SIGNING_KEY_WITHDRAWN)
        if self._drained:
            s.end(DRAINING)
        self._schedule(s, asyncio.get_running_loop())

    def unregister(self, s: Session) -> None:
        """Forget a session that is over: its timers, its keepalive, its index entries."""
        for timer in (s.expiry, s.lifetime):
            if timer is not None:
                timer.cancel()
        if s.idle_timer is not None:
            s.idle_timer.cancel()
        self._wheel_remove(s)
        self._sessions.discard(s)
        unindex(self._by_key, revocable_key(s.identity), s)
        unindex(self._by_signing_key, signing_key(s.identity), s)
        if not self._sessions:
            self._all_closed.set()

    def _schedule(self, s: Session, loop: asyncio.AbstractEventLoop) -> None:
        """Timers instead of polling: one per deadline the session has."""
        ws = self._ws
        _arm_expiry(s, loop)
        if ws.max_connection_lifetime_s:
            s.lifetime = loop.call_later(ws.max_connection_lifetime_s, s.end, LIFETIME)
        if ws.idle_timeout_s:
            s.idle_clock = loop.time
            s.idle_timer = loop.call_later(ws.idle_timeout_s, self._idle_check, s, loop)

    def _idle_check(self, s: Session, loop: asyncio.AbstractEventLoop) -> None:
        # Messages only touch `last_activity`; the timer re-arms itself for the remainder.
        remaining = s.last_activity + self._ws.idle_timeout_s - loop.time()
        if remaining <= 0:
            s.idle_timer = None
            s.end(IDLE)
        else:
            s.idle_timer = loop.call_later(remaining, self._idle_check, s, loop)

    def reauthenticated(self, s: Session, identity: Identity) -> None:
        """In-band re-authentication (`websocket.reauth`) gave the session a fresh credential of
        the same subject: its expiry moves, it is indexed under the key that signed the new one."""
        unindex(self._by_signing_key, signing_key(s.identity), s)
        s.identity = identity
        signer = signing_key(identity)
        if signer is not None:
            self._by_signing_key.setdefault(signer, set()).add(s)
        if s.expiry is not None:
            s.expiry.cancel()
            s.expiry = None
        _arm_expiry(s, asyncio.get_running_loop())

    # --- ended from outside -----------------------------------------------------------------------

    def rejudge(self, verdict: Callable[[Session], Outcome | None]) -> int:
        """After a reload: end every open session `verdict` no longer admits, with the outcome it
        gives; the number ended."""
        ended = 0
        for s in list(self._sessions):
            if s.outcome is None and (outcome := verdict(s)) is not None:
                s.end(outcome)
                ended += 1
        return ended

    def revoke_api_key(self, key_id: str) -> None:
        """An API key stopped being usable: end its sessions (4403)."""
        # Remembered for a while: a session authenticated before the revocation may still be
        # connecting upstream, and must not slip through once it registers.
        now = time.perf_counter()
        self._revoked_at = self._recent(self._revoked_at, now)
        self._revoked_at[key_id] = now
        for s in list(self._by_key.get(key_id, ())):
            s.end(KEY_REVOKED)

    def revoke_token(self, jti: str) -> int:
        """A JWT id was revoked (`authproxy revoke --jti`): end its sessions (4403); how many.

        Revocations are rare, so this walks the sessions instead of keeping an index per token."""
        # Remembered as key ids are: a session still connecting upstream ends when it registers.
        now = time.perf_counter()
        self._token_revoked_at = self._recent(self._token_revoked_at, now)
        self._token_revoked_at[jti] = now
        ended = 0
        for s in list(self._sessions):
            if s.identity is not None and s.identity.token_id == jti:
                s.end(TOKEN_REVOKED)
                ended += 1
        return ended

    def withdraw_signing_keys(self, provider: str, fingerprints: frozenset[str]) -> None:
        """Signing keys left a JWT provider's set: end the sessions they verified (4401)."""
        # As `revoke_api_key`: O(sessions they verified), remembered for the sessions still
        # connecting upstream.
        now = time.perf_counter()
        self._withdrawn_at = self._recent(self._withdrawn_at, now)
        ended = 0
        for fingerprint in fingerprints:
            key = (provider, fingerprint)
            self._withdrawn_at[key] = now
            for s in list(self._by_signing_key.get(key, ())):
                s.end(SIGNING_KEY_WITHDRAWN)
                ended += 1
        if ended:
            log.info(
                "websocket: closing %d session(s) verified by a withdrawn key of provider %r",
                ended,
                provider,
            )

    def _recent(self, marks: dict[_K, float], now: float) -> dict[_K, float]:
        horizon = now - self._mark_horizon_s
        return {k: t for k, t in marks.items() if t > horizon}

    def begin_drain(self) -> None:
        """SIGTERM: refuse nothing here (the pipeline does), end every session with 1001 after
        `websocket.drain_s`, and any that registers after that at once."""
        if self._drain_handle is not None or self._drained:
            return
        loop = asyncio.get_running_loop()
        self._drain_handle = loop.call_later(self._ws.drain_s, self._drain_now)

    def _drain_now(self) -> None:
        self._drain_handle = None
        self._drained = True
        if self._sessions:
            log.info("websocket: drain period over, closing %d session(s)", len(self._sessions))
        self._end_all(DRAINING)

    async def drained(self) -> None:
        """Returns once no session is registered (after `begin_drain`: by itself or at the
        drain's end)."""
        await self._all_closed.wait()

    async def stop(self, grace_s: float) -> None:
        """Shutdown: end every session, wait up to `grace_s` for them to close, then cut the
        upstream of any still open."""
        if self._drain_handle is not None:
            self._drain_handle.cancel()
            self._drain_handle = None
        self._drained = True
        self._end_all(SHUTDOWN)
        if self._sessions:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace_s)
        if self._sessions:
            log.warning(
                "websocket: %d session(s) did not close in time; aborting them", len(self._sessions)
            )
            for s in list(self._sessions):
                s.upstream.transport.abort()
        if self._wheel_timer is not None:
            self._wheel_timer.cancel()
            self._wheel_timer = None

    def _end_all(self, outcome: Outcome) -> None:
        for s in list(self._sessions):
            s.end(outcome)

    # --- upstream keepalive -------------------------------------------------------------------
    # One wheel for every session instead of a keepalive task (websockets') or a timer each: a
    # slot a second, a session in the slot of the second it began, each slot pinged once a round
    # of `ping_interval_s`. Idle feeds cost a set entry here, not a kilobyte of task.

    def _wheel_add(self, s: Session) -> None:
        if self._wheel:
            s.wheel_slot = self._wheel_at
            self._wheel[self._wheel_at].add(s)
            if self._wheel_timer is None:
                self._wheel_timer = asyncio.get_running_loop().call_later(
                    self._wheel_tick_s, self._wheel_turn
                )

    def _wheel_remove(self, s: Session) -> None:
        if s.wheel_slot is not None:
            self._wheel[s.wheel_slot].discard(s)
            s.wheel_slot = None
        if s.ping_task is not None:
            s.ping_task.cancel()

    def _wheel_turn(self) -> None:
        self._wheel_timer = None
        self._wheel_at = (self._wheel_at + 1) % len(self._wheel)
        for s in self._wheel[self._wheel_at]:
            if s.outcome is None and s.ping_task is None:
                s.ping_task = asyncio.ensure_future(self._ping(s))
        if self._sessions:
            self._wheel_timer = asyncio.get_running_loop().call_later(
                self._wheel_tick_s, self._wheel_turn
            )

    async def _ping(self, s: Session) -> None:
        """No pong within `ping_interval_s` ends the session with 1011 both ways (what websockets'
        own keepalive would do)."""
        try:
            pong = await s.upstream.ping()
            await asyncio.wait_for(pong, self._ws.ping_interval_s)
        except TimeoutError:
            s.end(UPSTREAM_PING_TIMEOUT)
        except ConnectionClosed:
            pass  # the relay sees it too and decides
        finally:
            s.ping_task = None


def _identity_key(identity: Identity | None) -> IdentityKey | None:
    return (identity.method, identity.issuer, identity.subject) if identity else None


def revocable_key(identity: Identity | None) -> str | None:
    if identity is not None and identity.method == "api_key":
        return identity.credential_id or identity.subject
    return None


def signing_key(identity: Identity | None) -> SigningKey | None:
    if (
        identity is not None
        and identity.method == "jwt"
        and identity.credential_id is not None
        and identity.signing_key is not None
    ):
        return (identity.credential_id, identity.signing_key)
    return None


def _arm_expiry(s: Session, loop: asyncio.AbstractEventLoop) -> None:
    """The session ends (4401, or 4403 for an API key) when its credential does, if it does."""
    identity = s.identity
    if identity is not None and identity.valid_until is not None:
        delay = max(identity.valid_until - time.time(), 0.0)
        s.expiry = loop.call_later(delay, s.end, credential_expired(identity))


def unindex(index: dict[_K, set[_V]], key: _K | None, s: _V) -> None:
    """Take `s` out of the group `key` names, and the group out once empty."""
    if key is not None:
        group = index.get(key)
        if group is not None:
            group.discard(s)
            if not group:
                del index[key]
