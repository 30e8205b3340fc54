"""The WebSocket tunnel: authenticated at the handshake, relayed faithfully, closed when the
credential stops being valid.

One session is two hops: the client's (uvicorn, ASGI) and the upstream's (a `websockets` client).
Each hop negotiates its own extensions and answers its own pings; the tunnel moves whole messages
(text stays text, binary stays binary) and close codes between them. The upstream hop is not
compressed unless `websocket.upstream_compression`: it is pod-local, and with deflate one socket
read can inflate into many buffered messages before reading pauses. Backpressure is the two
libraries' own: uvicorn pauses reading the client until we took its message and `send` waits while
the client's write buffer is full; `websockets` stops reading the upstream once `queue_messages`
messages wait for us and its `send` waits on its write limit. So a slow client slows the upstream
read, and a session holds at most about `queue_messages` x `max_message_bytes` in memory.

How a session ends (`Outcome`, decided by the pure functions below, then carried out in one place):

    client closes with a code       the upstream gets the same code and reason
    client vanishes (no close)      the upstream gets 1001 "client went away"
    upstream closes with a code     the client gets the same code and reason
    upstream vanishes (no close)    the client gets 1011 "upstream went away"
    upstream message too big        websockets closes the upstream with 1009; the client gets 1009
    JWT expires (exp + leeway)      client 4401 "token expired", upstream 1001
    JWT's signing key withdrawn     client 4401 "signing key withdrawn", upstream 1001
    API key revoked / expires       client 4403 "api key revoked" / "api key expired", upstream 1001
    idle (`idle_timeout_s`)         1000 "idle timeout" to both
    `max_connection_lifetime_s`     1001 "connection lifetime exceeded" to both
    drain (SIGTERM) / shutdown      1001 "server shutting down" to both

A close frame without a status (1005) cannot be forwarded through ASGI, so it becomes 1000.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.uri import WebSocketURI, parse_uri

from ..auth import AuthService, Credentials
from ..config import Settings
from ..errors import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    CLOSE_REVOKED,
    CLOSE_TOKEN_EXPIRED,
    BadGateway,
    GatewayTimeout,
    ProxyError,
    RateLimited,
    ServiceUnavailable,
)
from ..identity import Identity
from ..routing import Route
from ..telemetry import logs
from ..telemetry.metrics import Metrics
from ..types import Message, Receive, Scope, Send
from .headers import HeaderPolicy, peer

log = logging.getLogger("authproxy.websocket")

CLOSE_NO_STATUS = 1005  # a close frame without a status; never sent
CLOSE_ABNORMAL = 1006  # no close frame at all; never sent
CLOSE_SERVICE_RESTART = 1012
# How long a closing handshake may take on either hop before we stop waiting for it.
CLOSE_TIMEOUT_S = 5.0

ClosedBy = Literal["client", "upstream", "proxy"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a session ends: who ended it, why, the close code and reason on each hop, and which
    hops we still have to tell (the one that closed first is closed already)."""

    closed_by: ClosedBy
    why: str
    client_code: int
    client_reason: str
    upstream_code: int
    upstream_reason: str
    tell_client: bool
    tell_upstream: bool

    @classmethod
    def by_proxy(
        cls, why: str, code: int, reason: str, upstream_code: int | None = None
    ) -> Outcome:
        """The proxy ends the session: the client gets `code`, the upstream `upstream_code`."""
        return cls(
            "proxy",
            why,
            code,
            reason,
            code if upstream_code is None else upstream_code,
            reason,
            True,
            True,
        )

    @classmethod
    def by_client(
        cls, why: str, code: int, reason: str, upstream_code: int, upstream_reason: str
    ) -> Outcome:
        return cls("client", why, code, reason, upstream_code, upstream_reason, False, True)

    @classmethod
    def by_upstream(
        cls, why: str, code: int, reason: str, client_code: int, client_reason: str
    ) -> Outcome:
        return cls("upstream", why, client_code, client_reason, code, reason, True, False)


TOKEN_EXPIRED = Outcome.by_proxy(
    "token_expired", CLOSE_TOKEN_EXPIRED, "token expired", CLOSE_GOING_AWAY
)
# The key that verified the session's token left its provider's set (JWKS refresh, key file
# reload): like an expiry, the client reconnects with a fresh token, signed by a current key.
SIGNING_KEY_WITHDRAWN = Outcome.by_proxy(
    "signing_key_withdrawn", CLOSE_TOKEN_EXPIRED, "signing key withdrawn", CLOSE_GOING_AWAY
)
KEY_REVOKED = Outcome.by_proxy(
    "api_key_revoked", CLOSE_REVOKED, "api key revoked", CLOSE_GOING_AWAY
)
KEY_EXPIRED = Outcome.by_proxy(
    "api_key_expired", CLOSE_REVOKED, "api key expired", CLOSE_GOING_AWAY
)
IDLE = Outcome.by_proxy("idle_timeout", CLOSE_NORMAL, "idle timeout")
LIFETIME = Outcome.by_proxy("lifetime_exceeded", CLOSE_GOING_AWAY, "connection lifetime exceeded")
DRAINING = Outcome.by_proxy("draining", CLOSE_GOING_AWAY, "server shutting down")
SHUTDOWN = Outcome.by_proxy("shutdown", CLOSE_GOING_AWAY, "server shutting down")
INTERNAL = Outcome.by_proxy("internal_error", CLOSE_INTERNAL_ERROR, "internal error")
SERVER_STOPPED = Outcome(
    "proxy",
    "server_stopped",
    CLOSE_SERVICE_RESTART,
    "",
    CLOSE_GOING_AWAY,
    "server shutting down",
    False,
    True,
)
UPSTREAM_PING_TIMEOUT = Outcome.by_proxy(
    "upstream_ping_timeout", CLOSE_INTERNAL_ERROR, "upstream keepalive ping timeout"
)
CLIENT_GONE = Outcome.by_client(
    "client_gone", CLOSE_ABNORMAL, "", CLOSE_GOING_AWAY, "client went away"
)


# --- decisions (no I/O) --------------------------------------------------------------------------


def client_left(message: Mapping[str, Any]) -> Outcome:
    """The client hop ended (`websocket.disconnect`): what the upstream is told."""
    code = int(message.get("code", CLOSE_NO_STATUS))
    if "reason" not in message:
        # uvicorn reports a lost connection without a reason key (a close frame always has
        # one), and its own shutdown, which has already sent the client 1012, the same way.
        return SERVER_STOPPED if code == CLOSE_SERVICE_RESTART else CLIENT_GONE
    reason = str(message.get("reason") or "")
    if code == CLOSE_NO_STATUS:
        return Outcome.by_client("client_closed", code, "", CLOSE_NORMAL, "")
    return Outcome.by_client("client_closed", code, reason, code, reason)


def upstream_left(exc: ConnectionClosed) -> Outcome:
    """The upstream hop ended (`recv` or `send` raised): what the client is told."""
    rcvd, sent = exc.rcvd, exc.sent
    if rcvd is None and sent is None:
        return Outcome.by_upstream(
            "upstream_gone", CLOSE_ABNORMAL, "", CLOSE_INTERNAL_ERROR, "upstream went away"
        )
    if rcvd is not None and (sent is None or exc.rcvd_then_sent):
        code = CLOSE_NORMAL if rcvd.code == CLOSE_NO_STATUS else rcvd.code
        return Outcome.by_upstream("upstream_closed", rcvd.code, rcvd.reason, code, rcvd.reason)
    # websockets closed the upstream itself (message too big 1009, bad UTF-8 1007, protocol
    # error 1002, keepalive timeout 1011): the client gets the same verdict.
    assert sent is not None
    code = CLOSE_INTERNAL_ERROR if sent.code == CLOSE_NO_STATUS else sent.code
    return Outcome(
        "proxy", "upstream_failed", code, sent.reason, sent.code, sent.reason, True, False
    )


def accepted_subprotocol(
    offered: Sequence[str], forwarded: Sequence[str], chosen: str | None
) -> str | None:
    """The subprotocol we accept the client with: the upstream's choice. When the client offered
    nothing but a credential entry (`bearer.<token>`), browsers fail a handshake that selects no
    subprotocol, so that entry is echoed back (to the client that sent it, and to no log)."""
    if chosen is not None:
        return chosen
    if offered and not forwarded:
        return offered[0]
    return None


def upstream_uri(
    base: WebSocketURI, raw_path: bytes, query: bytes, host_header: str | None = None
) -> WebSocketURI:
    """The upstream resource with path and query bytes exactly as judged (websockets' own URI
    parser would drop `;params` from the path). With `host_header`, the Host websockets sends."""
    uri = dataclasses.replace(
        base, path=base.path + raw_path.decode("ascii"), query=query.decode("latin-1")
    )
    if host_header is not None:
        parts = urlsplit("//" + host_header)
        default = 443 if base.secure else 80
        try:
            port = parts.port or default
        except ValueError:
            port = default
        uri = dataclasses.replace(uri, host=parts.hostname or base.host, port=port)
    return uri


def connect_error(exc: BaseException) -> ProxyError:
    """A failed upstream handshake as the sidecar's own error."""
    if isinstance(exc, TimeoutError):
        return GatewayTimeout(
            "the upstream did not complete the WebSocket handshake in time",
            details={"reason": "connect_timeout"},
        )
    if isinstance(exc, InvalidStatus):
        return BadGateway(
            "the upstream refused the WebSocket handshake",
            details={"reason": "upstream_refused", "upstream_status": exc.response.status_code},
        )
    if isinstance(exc, InvalidHandshake):
        return BadGateway(
            "the upstream sent an invalid WebSocket handshake", details={"reason": "upstream_error"}
        )
    return BadGateway("the upstream is unreachable", details={"reason": "connect_failed"})


def utf8_len(text: str) -> int:
    # isascii() is O(1) in CPython: most messages are counted without encoding them.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


# --- the upstream hop ----------------------------------------------------------------------------


class _UpstreamConnect(connect):
    """websockets' `connect` for one hop of a proxy: the exact resource, no redirects followed
    (a 3xx from the upstream is its answer, not an instruction to us)."""

    def __init__(self, uri: WebSocketURI, base: str, **kwargs: Any) -> None:
        super().__init__(base, **kwargs)
        self.ws_uri = uri

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


# --- sessions ------------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class Session:
    """One tunnelled connection and its counters."""

    identity: Identity | None
    upstream: ClientConnection
    send: Send
    last_activity: float  # loop time of the last message either way
    messages_in: int = 0  # client -> upstream
    bytes_in: int = 0
    messages_out: int = 0  # upstream -> client
    bytes_out: int = 0
    outcome: Outcome | None = None
    # The task relaying upstream -> client while the relay runs; ending the session stops it.
    relay: asyncio.Task[Any] | None = None
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    idle_timer: asyncio.TimerHandle | None = None
    wheel_slot: int | None = None  # where the keepalive wheel holds it
    ping_task: asyncio.Future[None] | None = None  # only while a ping waits for its pong

    def end(self, outcome: Outcome) -> None:
        """Decide how the session ends; the first decision wins."""
        if self.outcome is None:
            self.outcome = outcome
            relay = self.relay
            if relay is not None and relay is not asyncio.current_task():
                relay.cancel()


IdentityKey = tuple[str, str | None, str]
SigningKey = tuple[str, str]  # (JWT provider, key fingerprint)
_K = TypeVar("_K", str, SigningKey)


class Tunnel:
    """Relays WebSocket sessions between clients and the upstream."""

    def __init__(
        self, settings: Settings, metrics: Metrics, auth: AuthService, headers: HeaderPolicy
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.auth = auth
        self.headers = headers
        ws = settings.websocket
        self._ws = ws
        base = settings.upstream.url
        scheme, _, rest = base.partition("://")
        self._base = ("wss" if scheme == "https" else "ws") + "://" + rest
        self._base_uri = parse_uri(self._base)
        self._base_uri = dataclasses.replace(self._base_uri, path=self._base_uri.path.rstrip("/"))
        self._connect_kwargs: dict[str, Any] = dict(
            compression="deflate" if ws.upstream_compression else None,
            open_timeout=settings.upstream.connect_timeout_s,
            close_timeout=CLOSE_TIMEOUT_S,
            # Pings on this hop come from the session's timer (`_ping`), not from a keepalive
            # task per connection that websockets would keep asleep for the session's life.
            ping_interval=None,
            ping_timeout=None,
            max_size=ws.max_message_bytes,
            max_queue=ws.queue_messages,
            user_agent_header=None,  # the client's User-Agent travels with its headers, if any
            proxy=None,
            host=self._base_uri.host,
            port=self._base_uri.port,
        )
        if self._base_uri.secure:
            self._connect_kwargs["server_hostname"] = self._base_uri.host
        leeway: dict[str, float] = {}
        for p in settings.auth.jwt.providers:
            leeway[p.name] = float(p.leeway_s)  # a JWT identity's credential_id is its provider
        self._leeway = leeway
        self._sessions: set[Session] = set()
        self._by_key: dict[str, set[Session]] = {}
        self._by_signing_key: dict[SigningKey, set[Session]] = {}
        self._admitted = 0
        self._per_identity: dict[IdentityKey, int] = {}
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self._drain_handle: asyncio.TimerHandle | None = None
        self._drained = False
        self._unsubscribe: list[Callable[[], None]] = []
        self._revoked_at: dict[str, float] = {}  # key id -> perf_counter() of its revocation
        self._withdrawn_at: dict[SigningKey, float] = {}  # likewise, for JWT signing keys
        interval = ws.ping_interval_s
        slots = max(1, round(interval)) if interval else 0
        self._wheel: list[set[Session]] = [set() for _ in range(slots)]
        self._wheel_tick_s = interval / slots if slots else 0.0
        self._wheel_at = 0
        self._wheel_timer: asyncio.TimerHandle | None = None

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Called from the app's lifespan startup."""
        self._unsubscribe = [
            self.auth.subscribe_revocations(self._revoked),
            self.auth.subscribe_key_withdrawals(self._keys_withdrawn),
        ]

    async def stop(self) -> None:
        """Called from the app's lifespan shutdown: every session is closed by now."""
        if self._drain_handle is not None:
            self._drain_handle.cancel()
            self._drain_handle = None
        self._drained = True
        self._end_all(SHUTDOWN)
        if self._sessions:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), CLOSE_TIMEOUT_S + 1)
        if self._sessions:
            log.warning(
                "websocket: %d session(s) did not close in time; aborting them", len(self._sessions)
            )
            for s in list(self._sessions):
                s.upstream.transport.abort()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        if self._wheel_timer is not None:
            self._wheel_timer.cancel()
            self._wheel_timer = None

    def begin_drain(self) -> None:
        """SIGTERM: refuse nothing here (the pipeline does), close sessions with 1001 after
        `websocket.drain_s`."""
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
        """After `begin_drain`: returns once no session is open, by itself or at the drain's end."""
        await self._all_closed.wait()

    def _end_all(self, outcome: Outcome) -> None:
        for s in list(self._sessions):
            s.end(outcome)

    def _revoked(self, key_id: str) -> None:
        # Remembered for a while: a session authenticated before the revocation may still be
        # connecting upstream, and must not slip through once it registers.
        now = time.perf_counter()
        self._revoked_at = self._recent(self._revoked_at, now)
        self._revoked_at[key_id] = now
        for s in list(self._by_key.get(key_id, ())):
            s.end(KEY_REVOKED)

    def _keys_withdrawn(self, provider: str, fingerprints: frozenset[str]) -> None:
        # As `_revoked`, for the JWT signing keys that left a provider's set: O(sessions they
        # verified), remembered for the sessions still connecting upstream.
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
        """The marks younger than the longest a session can take from authentication to
        registration (the upstream handshake), with a margin."""
        horizon = now - self.settings.upstream.connect_timeout_s - 60
        return {k: t for k, t in marks.items() if t > horizon}

    # --- admission --------------------------------------------------------------------------------

    def _admit(self, key: IdentityKey | None) -> ProxyError | None:
        ws = self._ws
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

    def _release(self, key: IdentityKey | None) -> None:
        self._admitted -= 1
        if key is not None:
            left = self._per_identity.get(key, 1) - 1
            if left > 0:
                self._per_identity[key] = left
            else:
                self._per_identity.pop(key, None)

    # --- one session ------------------------------------------------------------------------------

    async def run(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        request_id: str,
        route: Route,
        identity: Identity | None,
        credentials: Credentials,
        raw_path: bytes,
        upstream_headers: list[tuple[str, str]],
        deny: Callable[[ProxyError], Awaitable[None]],
        origin: str | None,
        started: float,
    ) -> None:
        """Connect upstream, accept the client, relay until either side closes."""
        record: dict[str, Any] = {
            "request_id": request_id,
            "route": route.name,
            "path": raw_path.decode("latin-1"),
            "query": credentials.clean_query.decode("latin-1"),
            "auth_method": identity.method if identity else None,
            "subject": identity.subject if identity else None,
            "origin": origin,
            "client": peer(scope),
        }
        key = (identity.method, identity.issuer, identity.subject) if identity else None
        refusal = self._admit(key)
        if refusal is not None:
            await self._refuse(deny, refusal, record, started)
            return
        try:
            try:
                upstream = await self._connect(raw_path, credentials, upstream_headers)
                # Consumed: the caller's frame would keep every header alive for hours.
                upstream_headers.clear()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._refuse(deny, connect_error(exc), record, started)
                return
            await self._serve(
                scope,
                receive,
                send,
                upstream,
                request_id,
                route,
                identity,
                credentials,
                record,
                started,
            )
        finally:
            self._release(key)

    async def _connect(
        self, raw_path: bytes, credentials: Credentials, upstream_headers: list[tuple[str, str]]
    ) -> ClientConnection:
        host_header = None
        headers = upstream_headers
        if any(name.lower() == "host" for name, _ in upstream_headers):
            # `preserve_host`: websockets writes Host from the URI; it must not appear twice.
            host_header = next(v for n, v in upstream_headers if n.lower() == "host")
            headers = [(n, v) for n, v in upstream_headers if n.lower() != "host"]
        uri = upstream_uri(self._base_uri, raw_path, credentials.clean_query, host_header)
        subprotocols = list(credentials.subprotocols) or None
        return await _UpstreamConnect(
            uri,
            self._base,
            additional_headers=headers,
            subprotocols=subprotocols,
            **self._connect_kwargs,
        )

    async def _refuse(
        self,
        deny: Callable[[ProxyError], Awaitable[None]],
        exc: ProxyError,
        record: dict[str, Any],
        started: float,
    ) -> None:
        with contextlib.suppress(OSError):  # the client may have left while we waited
            await deny(exc)
        reason = exc.details.get("reason", exc.code)
        if exc.status >= 500:
            self.metrics.upstream_errors.labels(reason).inc()
        self.metrics.requests.labels(record["route"], str(exc.status)).inc()
        self._write_log(
            {
                **record,
                "status": exc.status,
                "error": exc.code,
                "reason": reason,
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            }
        )

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        upstream: ClientConnection,
        request_id: str,
        route: Route,
        identity: Identity | None,
        credentials: Credentials,
        record: dict[str, Any],
        started: float,
    ) -> None:
        subprotocol = accepted_subprotocol(
            scope.get("subprotocols") or (), credentials.subprotocols, upstream.subprotocol
        )
        try:
            await send(
                {
                    "type": "websocket.accept",
                    "subprotocol": subprotocol,
                    "headers": [(b"x-request-id", request_id.encode())],
                }
            )
        except OSError:
            # The client left while we were reaching the upstream.
            await upstream.close(CLOSE_GOING_AWAY, "client went away")
            self._finish(record, started, None, CLIENT_GONE, route)
            return
        except BaseException:
            upstream.transport.abort()  # cancelled (shutdown) before the session existed
            raise
        # The request we sent is never read again: let its headers go. (Not `response`: websockets
        # takes the first event after a None response for the handshake's answer.)
        upstream.request = None
        loop = asyncio.get_running_loop()
        s = Session(identity, upstream, send, loop.time())
        self._register(s, started)
        self._schedule(s, loop)
        try:
            await self._relay(s, receive)
            assert s.outcome is not None
            await self._close(s)
        finally:
            self._unregister(s)
            if s.outcome is None:  # cancelled: nobody decided
                s.end(SHUTDOWN)
                s.upstream.transport.abort()
            # The upstream's choice, never the echoed entry: that may be `bearer.<token>`.
            self._finish(record, started, s, s.outcome, route, subprotocol=upstream.subprotocol)

    def _register(self, s: Session, started: float) -> None:
        self._sessions.add(s)
        self._wheel_add(s)
        self._all_closed.clear()
        key_id = _revocable_key(s.identity)
        if key_id is not None:
            self._by_key.setdefault(key_id, set()).add(s)
            if self._revoked_at.get(key_id, float("-inf")) >= started:
                s.end(KEY_REVOKED)
        signing_key = _signing_key(s.identity)
        if signing_key is not None:
            self._by_signing_key.setdefault(signing_key, set()).add(s)
            if self._withdrawn_at.get(signing_key, float("-inf")) >= started:
                s.end(SIGNING_KEY_WITHDRAWN)
        self.metrics.websockets_open.inc()
        if self._drained:
            s.end(DRAINING)

    def _unregister(self, s: Session) -> None:
        for timer in s.timers:
            timer.cancel()
        if s.idle_timer is not None:
            s.idle_timer.cancel()
        self._wheel_remove(s)
        self._sessions.discard(s)
        _unindex(self._by_key, _revocable_key(s.identity), s)
        _unindex(self._by_signing_key, _signing_key(s.identity), s)
        self.metrics.websockets_open.dec()
        if not self._sessions:
            self._all_closed.set()

    def _schedule(self, s: Session, loop: asyncio.AbstractEventLoop) -> None:
        """Timers instead of polling: one per deadline the session has."""
        ws = self._ws
        identity = s.identity
        if identity is not None and identity.expires_at is not None:
            if identity.method == "jwt":
                leeway = self._leeway.get(identity.credential_id or "", 0.0)
                outcome = TOKEN_EXPIRED
            else:
                leeway, outcome = 0.0, KEY_EXPIRED
            delay = identity.expires_at + leeway - time.time()
            s.timers.append(loop.call_later(max(delay, 0.0), s.end, outcome))
        if ws.max_connection_lifetime_s:
            s.timers.append(loop.call_later(ws.max_connection_lifetime_s, s.end, LIFETIME))
        if ws.idle_timeout_s:
            s.idle_timer = loop.call_later(ws.idle_timeout_s, self._idle_check, s, loop)

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

    def _idle_check(self, s: Session, loop: asyncio.AbstractEventLoop) -> None:
        # Messages only touch `last_activity`; the timer re-arms itself for the remainder.
        remaining = s.last_activity + self._ws.idle_timeout_s - loop.time()
        if remaining <= 0:
            s.idle_timer = None
            s.end(IDLE)
        else:
            s.idle_timer = loop.call_later(remaining, self._idle_check, s, loop)

    async def _relay(self, s: Session, receive: Receive) -> None:
        """Client -> upstream in a task of its own, upstream -> client in this one.

        One task fewer per session than a task each way plus a waiter: idle sessions are what a
        model-event feed mostly is, and each task is a kilobyte. Whatever ends the session (either
        direction, a timer, a revocation) cancels this task through `Session.end`; that one
        cancellation is taken back here, any other (shutdown) goes on.
        """
        if s.outcome is not None:
            return  # ended before it began (revoked or draining at registration)
        task = asyncio.current_task()
        up = asyncio.create_task(self._client_to_upstream(s, receive))
        s.relay = task
        try:
            await self._upstream_to_client(s)
        except asyncio.CancelledError:
            if task is None or s.outcome is None or task.uncancel() > 0:
                raise
        finally:
            s.relay = None
            up.cancel()
            await asyncio.gather(up, return_exceptions=True)

    async def _client_to_upstream(self, s: Session, receive: Receive) -> None:
        upstream = s.upstream
        loop = asyncio.get_running_loop()
        try:
            while True:
                message: Message = await receive()
                if message["type"] == "websocket.receive":
                    text = message.get("text")
                    if text is not None:
                        await upstream.send(text)
                        s.bytes_in += utf8_len(text)
                    else:
                        data = message.get("bytes") or b""
                        await upstream.send(data)
                        s.bytes_in += len(data)
                    s.messages_in += 1
                    s.last_activity = loop.time()
                elif message["type"] == "websocket.disconnect":
                    s.end(client_left(message))
                    return
        except ConnectionClosed as exc:
            s.end(upstream_left(exc))
        except Exception:
            log.exception("websocket: relaying to the upstream failed")
            s.end(INTERNAL)

    async def _upstream_to_client(self, s: Session) -> None:
        upstream, send = s.upstream, s.send
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await upstream.recv()
                if isinstance(data, str):
                    await send({"type": "websocket.send", "text": data})
                    s.bytes_out += utf8_len(data)
                else:
                    await send({"type": "websocket.send", "bytes": data})
                    s.bytes_out += len(data)
                s.messages_out += 1
                s.last_activity = loop.time()
        except ConnectionClosed as exc:
            s.end(upstream_left(exc))
        except OSError:  # uvicorn's ClientDisconnected: the client is gone mid-send
            s.end(CLIENT_GONE)
        except Exception:
            log.exception("websocket: relaying to the client failed")
            s.end(INTERNAL)

    async def _close(self, s: Session) -> None:
        """Carry out the outcome on both hops."""
        o = s.outcome
        assert o is not None
        if o.tell_client:
            try:
                await asyncio.wait_for(
                    s.send(
                        {
                            "type": "websocket.close",
                            "code": o.client_code,
                            "reason": o.client_reason,
                        }
                    ),
                    CLOSE_TIMEOUT_S,
                )
            except (OSError, TimeoutError, RuntimeError):
                pass  # the client is gone or stuck; uvicorn owns its transport from here
        if o.tell_upstream:
            await s.upstream.close(o.upstream_code, o.upstream_reason)

    def _finish(
        self,
        record: dict[str, Any],
        started: float,
        s: Session | None,
        outcome: Outcome | None,
        route: Route,
        **extra: Any,
    ) -> None:
        assert outcome is not None
        self.metrics.websocket_closes.labels(str(outcome.client_code)).inc()
        self.metrics.requests.labels(route.name, "101").inc()
        fields = {
            **record,
            "status": 101,
            **extra,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "messages_in": s.messages_in if s else 0,
            "bytes_in": s.bytes_in if s else 0,
            "messages_out": s.messages_out if s else 0,
            "bytes_out": s.bytes_out if s else 0,
            "closed_by": outcome.closed_by,
            "end": outcome.why,
            "close_code": outcome.client_code,
            "close_reason": outcome.client_reason,
            "upstream_close_code": outcome.upstream_code,
            "upstream_close_reason": outcome.upstream_reason,
        }
        self._write_log(fields)

    def _write_log(self, fields: dict[str, Any]) -> None:
        if self.settings.logging.access_log:
            logs.access("websocket", fields)


def _revocable_key(identity: Identity | None) -> str | None:
    if identity is not None and identity.method == "api_key":
        return identity.credential_id or identity.subject
    return None


def _signing_key(identity: Identity | None) -> SigningKey | None:
    if (
        identity is not None
        and identity.method == "jwt"
        and identity.credential_id is not None
        and identity.signing_key is not None
    ):
        return (identity.credential_id, identity.signing_key)
    return None


def _unindex(index: dict[_K, set[Session]], key: _K | None, s: Session) -> None:
    if key is not None:
        group = index.get(key)
        if group is not None:
            group.discard(s)
            if not group:
                del index[key]
