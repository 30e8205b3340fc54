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

This module is the I/O: connect upstream, accept the client, relay, close. How a session ends is
decided in `ws_outcomes`; caps, deadlines, revocations, drain and keepalive are `ws_registry`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.messages import MAX_FRAGMENTS
from websockets.exceptions import ConnectionClosed
from websockets.frames import BINARY, CONT, TEXT, CloseCode, Frame
from websockets.protocol import Event, State
from websockets.uri import WebSocketURI, parse_uri

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets without its C extension
    from websockets.utils import apply_mask

from ..config import Settings
from ..errors import CLOSE_GOING_AWAY, ProxyError
from ..identity import Identity
from ..telemetry.access import AccessLog, AccessRecord
from ..telemetry.clock import rfc3339
from ..telemetry.metrics import Metrics
from ..tls import upstream_context
from ..types import Message, Receive, Scope, Send
from ..wsframes import FrameSink
from ..wssplit import SplitsFrames
from .ws_outcomes import (
    CLIENT_GONE,
    INTERNAL,
    REAUTH_SUBJECT_CHANGED,
    SHUTDOWN,
    Outcome,
    accepted_subprotocol,
    client_left,
    connect_error,
    upstream_left,
    upstream_uri,
)
from .ws_passthrough import (
    ClientFrames,
    Counts,
    UpstreamFrames,
    count,
    may_be_reauth,
    upstream_writable,
)
from .ws_registry import SessionRegistry
from .ws_session import Session

log = logging.getLogger("authproxy.websocket")

# How long a closing handshake may take on either hop before we stop waiting for it.
CLOSE_TIMEOUT_S = 5.0

Unsubscribe = Callable[[], None]
# `subscribe(callback)` -> unsubscribe; the auth side calls `callback(key_id)` whenever an API key
# stops being usable, and `callback(provider, fingerprints)` whenever signing keys leave a JWT
# provider's set.
SubscribeRevocations = Callable[[Callable[[str], None]], Unsubscribe]
SubscribeKeyWithdrawals = Callable[[Callable[[str, frozenset[str]], None]], Unsubscribe]


@dataclass(frozen=True, slots=True)
class Handshake:
    """A WebSocket handshake the pipeline admitted, as the plain values the tunnel needs."""

    request_id: str
    route: str  # the route's name
    identity: Identity | None  # None: an anonymous route
    raw_path: bytes  # as judged, sent upstream byte for byte
    query: bytes  # the query string without credentials
    # The client's offer without credential entries (`bearer.<token>`): what the upstream gets.
    subprotocols: tuple[str, ...]
    # Consumed: the tunnel empties the list once the upstream handshake is sent, so that no frame
    # holding it keeps every header alive for the session's hours.
    upstream_headers: list[tuple[str, str]]
    # Refuses the handshake with an HTTP status and the JSON error body.
    deny: Callable[[ProxyError], Awaitable[None]]
    origin: str | None
    started: float  # perf_counter() when the request arrived
    # The request's access record (telemetry/access.py): the tunnel completes it and emits it
    # once, when the session ends or the handshake is refused here.
    record: AccessRecord = dataclasses.field(repr=False, compare=False)


def _send_now(upstream: ClientConnection, data: bytes, text: bool) -> bool:
    """One message to the upstream without websockets' `send` (an async context manager, a drain
    and a state check each): framed and written at once while the connection is open, its write
    buffer under the limit and no fragmented send in progress. False: `send` it (it waits for
    the buffer to drain, or raises the ConnectionClosed that ends the session)."""
    protocol = upstream.protocol
    if not upstream_writable(upstream, protocol):
        return False
    if protocol.extensions or protocol.writes or protocol.debug:
        if text:
            protocol.send_text(data)
        else:
            protocol.send_binary(data)
        frame = None
    else:  # the frame built here: websockets' costs a Frame, a serializer and a getrandom
        frame = _client_frame(OP_TEXT if text else OP_BINARY, data)
    try:
        if frame is None:
            upstream.send_data()
        else:
            upstream.transport.write(frame)
    except Exception as exc:  # as websockets' send: the connection is cut, the session ends
        upstream.set_connection_exc(exc)
        upstream.transport.abort()
    return True


OP_TEXT, OP_BINARY = 0x1, 0x2
_MASK_POOL_BYTES = 4096


class _Masks:
    """Client frames' masking keys (RFC 6455 5.3: fresh, from a strong source), 4 bytes at a time
    from one os.urandom call of 4 KiB instead of one system call a frame."""

    __slots__ = ("_pool", "_at")

    def __init__(self) -> None:
        self._pool = b""
        self._at = _MASK_POOL_BYTES

    def next(self) -> bytes:
        at = self._at
        if at >= len(self._pool):
            self._pool, at = os.urandom(_MASK_POOL_BYTES), 0
        self._at = at + 4
        return self._pool[at : at + 4]


_masks = _Masks()


def _client_frame(opcode: int, data: bytes) -> bytes:
    """One whole, masked, uncompressed client frame (what websockets' Frame.serialize makes)."""
    n = len(data)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 0x10000:
        head = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
    mask = _masks.next()
    return head + mask + apply_mask(data, mask)


def _write_failed(s: Session) -> None:
    """A relayed write to the client raised (inside `except`): logged, and the session ends."""
    log.exception("websocket: relaying to the client failed")
    s.end(INTERNAL)


def _upstream_lost(s: Session, upstream: ClientConnection) -> None:
    """The upstream connection is closed (its `connection_lost`): the session ends as a `recv`
    raising ConnectionClosed would have ended it."""
    s.end(upstream_left(upstream.close_exc))


def _reauth_label(result: str) -> str:
    return result if result in ("ok", "subject_changed") else "refused"


def utf8_len(text: str) -> int:
    """The length of `text` on the wire."""
    # isascii() is O(1) in CPython: most messages are counted without encoding them.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class DirectClient(Protocol):
    """The client hop's protocol when it can take relayed messages outside ASGI
    (`proxy.wsprotocol.LeanWebSocketProtocol`, found as `send.__self__`)."""

    relay: Callable[[bytes, bool], bool] | None

    def write_message(self, data: bytes, text: bool) -> bool: ...

    def pair(self, transport: asyncio.Transport) -> None: ...

    def unpair(self) -> None: ...

    def relay_frames(self, sink: FrameSink) -> None: ...

    def compresses(self) -> bool: ...


def direct_client(send: Send) -> DirectClient | None:
    """The protocol behind uvicorn's `send`, when it writes relayed messages itself."""
    client = getattr(send, "__self__", None)
    return client if hasattr(client, "write_message") else None


class UpstreamConnection(SplitsFrames, ClientConnection):
    """websockets' client connection, whose messages go straight to the client once a session
    relays directly (`relay_to`): framed and written from `data_received`, no queue, no task
    switch. Until then (the handshake), and without a direct client, it is websockets' own."""

    # Slots: new names in websockets' instance dict would grow it by a kilobyte.
    __slots__ = ("deliver", "lost", "_fragments", "_fragments_text")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deliver: Callable[[bytes, bool], None] | None = None
        self.lost: Callable[[], None] | None = None
        self._fragments: list[bytes] | None = None
        self._fragments_text = False
        # What websockets does with it a list does as well: not a deque's 760 B a socket.
        self.drain_waiters = []  # type: ignore[assignment]

    def _ws(self) -> Any:
        return self.protocol

    def process_event(self, event: Event) -> None:
        deliver = self.deliver
        if deliver is None or not isinstance(event, Frame):
            super().process_event(event)
            return
        opcode = event.opcode
        if opcode is TEXT or opcode is BINARY:
            if event.fin:
                deliver(bytes(event.data), opcode is TEXT)
                return
            self._fragments = [bytes(event.data)]
            self._fragments_text = opcode is TEXT
        elif opcode is CONT:
            fragments = self._fragments
            if fragments is None:  # the protocol refuses a stray continuation before us
                return
            if len(fragments) >= MAX_FRAGMENTS:  # websockets' own bound on a message's frames
                self._fragments = None
                self.fail(CloseCode.MESSAGE_TOO_BIG, "too many fragments")
                return
            fragments.append(bytes(event.data))
            if event.fin:
                self._fragments = None
                deliver(b"".join(fragments), self._fragments_text)
        else:
            super().process_event(event)  # pongs

    def take_queued(self) -> None:
        """Once `deliver` is set: the frames websockets queued before, delivered in order."""
        assembler = self.recv_messages
        queued = assembler.frames.queue
        while queued:
            self.process_event(queued.popleft())
        assembler.maybe_resume()

    def fail(self, code: int, reason: str) -> None:
        """End this hop ourselves (a message websockets' `recv` would have refused): the close
        frame, then our end of the socket; the session learns it from `connection_lost`."""
        self.protocol.fail(code, reason)
        with contextlib.suppress(Exception):
            self.send_data()
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        lost = self.lost
        if lost is not None:
            self.lost = None
            lost()


class _UpstreamConnect(connect):
    """websockets' `connect` for one hop of a proxy: the exact resource, no redirects followed
    (a 3xx from the upstream is its answer, not an instruction to us)."""

    def __init__(self, uri: WebSocketURI, base: str, **kwargs: Any) -> None:
        super().__init__(base, create_connection=UpstreamConnection, **kwargs)
        self.ws_uri = uri

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


class ReauthRefused(Exception):
    """A re-authentication frame's token is not accepted; `reason` goes back to the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Judges a re-authentication token as the session's route (its path) would: the new identity, or
# ReauthRefused.
Reauthenticate = Callable[[str, str], Awaitable[Identity]]
REAUTH_TYPE = "authproxy.reauth"
_REAUTH_MAX_CHARS = 64 * 1024  # a token and its envelope; a longer frame is the upstream's


class Tunnel:
    """Relays WebSocket sessions between clients and the upstream."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        subscribe_revocations: SubscribeRevocations,
        subscribe_key_withdrawals: SubscribeKeyWithdrawals,
        access: AccessLog | None = None,
        reauthenticate: Reauthenticate | None = None,
    ) -> None:
        self.metrics = metrics
        self._counts_in = Counts(
            metrics.websocket_messages.labels("in"), metrics.websocket_bytes.labels("in")
        )
        self._counts_out = Counts(
            metrics.websocket_messages.labels("out"), metrics.websocket_bytes.labels("out")
        )
        # `websocket.reauth`: None (off) costs a text frame one attribute test.
        self.reauthenticate = reauthenticate if settings.websocket.reauth else None
        self.access = access or AccessLog(metrics, log_lines=settings.logging.access_log)
        self._subscribe_revocations = subscribe_revocations
        self._subscribe_key_withdrawals = subscribe_key_withdrawals
        self._unsubscribe: list[Unsubscribe] = []
        ws = settings.websocket
        self.sessions = SessionRegistry(ws, handshake_timeout_s=settings.upstream.connect_timeout_s)
        base = settings.upstream.url
        scheme, _, rest = base.partition("://")
        self._base = ("wss" if scheme == "https" else "ws") + "://" + rest
        self._base_uri = parse_uri(self._base)
        self._base_uri = dataclasses.replace(self._base_uri, path=self._base_uri.path.rstrip("/"))
        self._connect_kwargs: dict[str, Any] = dict(
            compression="deflate" if ws.upstream_compression else None,
            open_timeout=settings.upstream.connect_timeout_s,
            close_timeout=CLOSE_TIMEOUT_S,
            # Pings on this hop come from the registry's keepalive wheel, not from a keepalive
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
            self._connect_kwargs["ssl"] = upstream_context(settings.upstream)

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Called from the app's lifespan startup."""
        self._unsubscribe = [
            self._subscribe_revocations(self.sessions.revoke_api_key),
            self._subscribe_key_withdrawals(self.sessions.withdraw_signing_keys),
        ]

    def resubscribe(
        self,
        subscribe_revocations: SubscribeRevocations,
        subscribe_key_withdrawals: SubscribeKeyWithdrawals,
    ) -> None:
        """A reload put another auth service in place: its revocations and withdrawals end
        sessions from now on (every open session included), the old one's no longer."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._subscribe_revocations = subscribe_revocations
        self._subscribe_key_withdrawals = subscribe_key_withdrawals
        self._unsubscribe = [
            subscribe_revocations(self.sessions.revoke_api_key),
            subscribe_key_withdrawals(self.sessions.withdraw_signing_keys),
        ]

    async def stop(self) -> None:
        """Called from the app's lifespan shutdown: every session is closed by now."""
        # A close may wait for the client (CLOSE_TIMEOUT_S), then for the upstream's closing
        # handshake (websockets' close_timeout, the same): time for both before aborting.
        await self.sessions.stop(2 * CLOSE_TIMEOUT_S + 1)
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []

    def begin_drain(self) -> None:
        """SIGTERM: refuse nothing here (the pipeline does), close sessions with 1001 after
        `websocket.drain_s`."""
        self.sessions.begin_drain()

    async def drained(self) -> None:
        """After `begin_drain`: returns once no session is open, by itself or at the drain's end."""
        await self.sessions.drained()

    # --- one session ------------------------------------------------------------------------------

    async def run(self, scope: Scope, receive: Receive, send: Send, handshake: Handshake) -> None:
        """Connect upstream, accept the client, relay until either side closes."""
        h = handshake
        identity = h.identity
        refusal = self.sessions.admit(identity)
        if refusal is not None:
            await self._refuse(h, refusal)
            return
        try:
            try:
                upstream = await self._connect(h)
                # Consumed: the caller's frame would keep every header alive for hours.
                h.upstream_headers.clear()
            except Exception as exc:
                await self._refuse(h, connect_error(exc))
                return
            await self._serve(scope, receive, send, upstream, h)
        finally:
            self.sessions.release(identity)

    async def _connect(self, h: Handshake) -> UpstreamConnection:
        host_header = None
        headers = h.upstream_headers
        if any(name.lower() == "host" for name, _ in headers):
            # `preserve_host`: websockets writes Host from the URI; it must not appear twice.
            host_header = next(v for n, v in headers if n.lower() == "host")
            headers = [(n, v) for n, v in headers if n.lower() != "host"]
        uri = upstream_uri(self._base_uri, h.raw_path, h.query, host_header)
        subprotocols = list(h.subprotocols) or None
        return await _UpstreamConnect(  # type: ignore[return-value]
            uri,
            self._base,
            additional_headers=headers,
            subprotocols=subprotocols,
            **self._connect_kwargs,
        )

    async def _refuse(self, h: Handshake, exc: ProxyError) -> None:
        with contextlib.suppress(OSError):  # the client may have left while we waited
            await h.deny(exc)
        self._finish(h, exc)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        upstream: UpstreamConnection,
        h: Handshake,
    ) -> None:
        subprotocol = accepted_subprotocol(
            scope.get("subprotocols") or (), h.subprotocols, upstream.subprotocol
        )
        try:
            await send(
                {
                    "type": "websocket.accept",
                    "subprotocol": subprotocol,
                    "headers": [(b"x-request-id", h.request_id.encode())],
                }
            )
        except OSError:
            # The client left while we were reaching the upstream.
            await upstream.close(CLOSE_GOING_AWAY, "client went away")
            self._finish(h, CLIENT_GONE)
            return
        except BaseException:
            upstream.transport.abort()  # cancelled (shutdown) before the session existed
            raise
        # The handshake's headers are never read again, and a session may live for hours: a
        # JWT in them is a kilobyte a socket. The list is uvicorn's scope's, emptied in place so
        # every holder (the scope, the request's facts) lets go of it.
        headers = scope.get("headers")
        if isinstance(headers, list):
            headers.clear()
        # The request we sent is never read again: let its headers go. (Not `response`: websockets
        # takes the first event after a None response for the handshake's answer. Its headers are
        # emptied in place instead: websockets' parser keeps the response in its frame for the
        # connection's life, and what it negotiated is read on the protocol.)
        upstream.request = None
        if upstream.response is not None:
            upstream.response.headers.clear()
        s = Session(h.identity, upstream, asyncio.get_running_loop().time(), h.record.path)
        self.sessions.register(s, h.started)
        self.metrics.websockets_open.inc()
        try:
            client = direct_client(send)
            if client is not None:
                await self._relay_direct(s, upstream, client, receive, send)
            else:
                await self._relay(s, upstream, send, receive)
            await self._close(s, upstream, send)
        except BaseException:
            # Cancelled from outside (shutdown) with the outcome already decided but the closing
            # handshake not done: the upstream socket must not stay open behind us.
            upstream.transport.abort()
            raise
        finally:
            self.sessions.unregister(s)
            self.metrics.websockets_open.dec()
            if s.outcome is None:  # cancelled: nobody decided
                s.end(SHUTDOWN)
                upstream.transport.abort()
            assert s.outcome is not None
            # The upstream's choice, never the echoed entry: that may be `bearer.<token>`.
            self._finish(h, s.outcome, s, subprotocol=upstream.subprotocol)

    async def _relay(
        self, s: Session, upstream: ClientConnection, send: Send, receive: Receive
    ) -> None:
        """Client -> upstream in a task of its own, upstream -> client in this one.

        One task fewer per session than a task each way plus a waiter: idle sessions are what a
        model-event feed mostly is, and each task is a kilobyte. Whatever ends the session (either
        direction, a timer, a revocation) cancels this task through `Session.end`; that one
        cancellation is taken back here, any other (shutdown) goes on.
        """
        if s.has_ended():
            return  # ended before it began (revoked or draining at registration)
        task = asyncio.current_task()
        up = asyncio.create_task(self._client_to_upstream(s, upstream, receive, send))
        s.relay = task
        try:
            await self._upstream_to_client(s, upstream, send)
        except asyncio.CancelledError:
            if task is None or not s.has_ended() or task.uncancel() > 0:
                raise
        finally:
            s.relay = None
            up.cancel()
            await asyncio.gather(up, return_exceptions=True)

    async def _relay_direct(
        self,
        s: Session,
        upstream: UpstreamConnection,
        client: DirectClient,
        receive: Receive,
        send: Send,
    ) -> None:
        """One task a session: client -> upstream here, upstream -> client in the upstream's
        `data_received` (`_deliver`), with the upstream's reading paused while the client's
        write buffer is full. Whatever ends the session cancels this task through `Session.end`
        (the upstream's end too, from its `connection_lost`); that cancellation is taken back
        here, any other (shutdown) goes on."""
        if s.has_ended():
            return  # ended before it began (revoked or draining at registration)
        task = asyncio.current_task()
        s.relay = task
        client.pair(upstream.transport)
        upstream.deliver = functools.partial(self._deliver, s, client, upstream)
        upstream.lost = functools.partial(_upstream_lost, s, upstream)
        # Neither hop compresses: a whole data frame means the same on both, and is relayed as
        # it arrived (proxy/wsframes.py). What the splitters decline takes the way above.
        frames: tuple[ClientFrames, UpstreamFrames] | None = None
        if not client.compresses() and not upstream.protocol.extensions:
            frames = (
                ClientFrames(client, upstream, s, self._counts_in, self.reauthenticate is not None),
                UpstreamFrames(
                    client, upstream, s, self._counts_out, functools.partial(_write_failed, s)
                ),
            )
            client.relay_frames(frames[0])
            upstream.relay_frames(frames[1])
        try:
            upstream.take_queued()  # what arrived while the client was being accepted
            if upstream.protocol.state is State.CLOSED and upstream.lost is not None:
                upstream.lost()  # gone before we listened
            if not s.has_ended():
                forward = functools.partial(self._forward, s, upstream)
                await self._client_to_upstream(s, upstream, receive, send, client, forward)
        except asyncio.CancelledError:
            if task is None or not s.has_ended() or task.uncancel() > 0:
                raise
        finally:
            s.relay = None
            upstream.deliver = None
            upstream.lost = None
            client.relay = None
            if frames is not None:
                for sink in frames:
                    sink.stop()
            client.unpair()

    def _deliver(
        self,
        s: Session,
        client: DirectClient,
        upstream: UpstreamConnection,
        data: bytes,
        text: bool,
    ) -> None:
        """One upstream message, to the client at once (called from the upstream's
        `data_received`)."""
        if s.has_ended():
            return  # decided: nothing more is relayed
        if text and not data.isascii():
            try:
                data.decode()
            except UnicodeDecodeError as exc:  # what websockets' `recv` refuses
                upstream.set_connection_exc(exc)
                upstream.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
                return
        try:
            if not client.write_message(data, text):
                return  # the client is leaving: its disconnect ends the session
        except Exception:
            _write_failed(s)
            return
        count(s, self._counts_out, len(data), False)

    def _forward(self, s: Session, upstream: ClientConnection, data: bytes, text: bool) -> bool:
        """One client message, to the upstream at once (called from the client's
        `data_received`): True when it is taken; False sends it through `receive`, where the
        relay task waits for the upstream's buffer to drain, judges a re-authentication, or meets
        the upstream's ConnectionClosed."""
        if s.has_ended():
            return True  # decided: nothing more is relayed
        if text and self.reauthenticate is not None and may_be_reauth(data):
            return False
        try:
            if not _send_now(upstream, data, text):
                return False
        except Exception:
            log.exception("websocket: relaying to the upstream failed")
            s.end(INTERNAL)
            return True
        count(s, self._counts_in, len(data), True)
        return True

    async def _client_to_upstream(
        self,
        s: Session,
        upstream: ClientConnection,
        receive: Receive,
        send: Send,
        client: DirectClient | None = None,
        forward: Callable[[bytes, bool], bool] | None = None,
    ) -> None:
        """Client -> upstream through ASGI `receive`. With a direct client, only what `forward`
        declined comes this way: while one such message is handled, the others queue behind it."""
        loop = asyncio.get_running_loop()
        try:
            while not s.has_ended():  # decided here (a reauth of another subject): stop
                if client is not None:
                    client.relay = forward
                message: Message = await receive()
                if client is not None:
                    client.relay = None
                if message["type"] == "websocket.receive":
                    text = message.get("text")
                    if text is not None:
                        data = text.encode()
                        if (
                            self.reauthenticate is not None
                            and may_be_reauth(data)
                            and await self._reauth(s, text, send)
                        ):
                            s.last_activity = loop.time()
                            continue
                        if not _send_now(upstream, data, True):
                            await upstream.send(data, text=True)
                    else:
                        data = message.get("bytes") or b""
                        if not _send_now(upstream, data, False):
                            await upstream.send(data)
                    count(s, self._counts_in, len(data), True)
                elif message["type"] == "websocket.disconnect":
                    s.end(client_left(message))
                    return
        except ConnectionClosed as exc:
            s.end(upstream_left(exc))
        except Exception:
            log.exception("websocket: relaying to the upstream failed")
            s.end(INTERNAL)

    async def _reauth(self, s: Session, text: str, send: Send) -> bool:
        """A client frame that may be a re-authentication: True when it was (and is consumed:
        the upstream never sees it), False to forward it as the upstream's own message."""
        try:
            frame = json.loads(text)
        except ValueError:
            return False
        if not isinstance(frame, dict) or frame.get("type") != REAUTH_TYPE:
            return False
        assert self.reauthenticate is not None
        token = frame.get("token")
        result = "ok"
        try:
            if len(text) > _REAUTH_MAX_CHARS:
                raise ReauthRefused("too_large")  # still the sidecar's: never forwarded
            if not isinstance(token, str) or not token:
                raise ReauthRefused("malformed")
            if s.identity is None or s.identity.method == "api_key":
                raise ReauthRefused("not_a_token_session")
            identity = await self.reauthenticate(token, s.path)
            if (identity.subject, identity.issuer) != (s.identity.subject, s.identity.issuer):
                result = "subject_changed"
                s.end(REAUTH_SUBJECT_CHANGED)
                return True
            if s.has_ended():
                return True  # ended while the token was being checked
            self.sessions.reauthenticated(s, identity)
            expires = identity.expires_at
            reply: dict[str, Any] = {
                "type": "authproxy.reauth_ok",
                "expires_at": rfc3339(expires) if expires is not None else None,
            }
        except ReauthRefused as exc:
            result = exc.reason
            reply = {"type": "authproxy.reauth_failed", "reason": exc.reason}
        finally:
            self.metrics.websocket_reauths.labels(_reauth_label(result)).inc()
        await send({"type": "websocket.send", "text": json.dumps(reply)})
        return True

    async def _upstream_to_client(self, s: Session, upstream: ClientConnection, send: Send) -> None:
        try:
            while True:
                data = await upstream.recv()
                if isinstance(data, str):
                    await send({"type": "websocket.send", "text": data})
                    size = utf8_len(data)
                else:
                    await send({"type": "websocket.send", "bytes": data})
                    size = len(data)
                count(s, self._counts_out, size, False)
        except ConnectionClosed as exc:
            s.end(upstream_left(exc))
        except OSError:  # uvicorn's ClientDisconnected: the client is gone mid-send
            s.end(CLIENT_GONE)
        except Exception:
            log.exception("websocket: relaying to the client failed")
            s.end(INTERNAL)

    async def _close(self, s: Session, upstream: ClientConnection, send: Send) -> None:
        """Carry out the outcome on both hops."""
        o = s.outcome
        assert o is not None
        if o.tell_client:
            try:
                await asyncio.wait_for(
                    send(
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
        if not o.tell_upstream:
            return
        if o.upstream_deaf and upstream.protocol.state is State.OPEN:
            # Its close frame, then our end of the socket: a closing handshake would only wait
            # out CLOSE_TIMEOUT_S for an answer that is not coming.
            upstream.protocol.fail(o.upstream_code, o.upstream_reason)
            upstream.send_data()
            upstream.transport.close()
            return
        await upstream.close(o.upstream_code, o.upstream_reason)

    def _finish(
        self,
        h: Handshake,
        end: Outcome | ProxyError,
        s: Session | None = None,
        **extra: Any,
    ) -> None:
        """Complete the session's access record, however it ended (refused at the handshake or
        closed), and emit it: the one place a session is logged and counted."""
        record = h.record
        if isinstance(end, ProxyError):
            record.status = end.status
            record.error = end.code
            record.reason = end.details.get("reason", end.code)
            self.access.emit(record)
            return
        self.metrics.websocket_closes.labels(str(end.client_code)).inc()
        record.status = 101
        if s is not None:
            record.bytes_in, record.bytes_out = s.bytes_in, s.bytes_out
        record.extra.update(
            extra,
            messages_in=s.messages_in if s else 0,
            messages_out=s.messages_out if s else 0,
            closed_by=end.closed_by,
            end=end.why,
            close_code=end.client_code,
            close_reason=end.client_reason,
            upstream_close_code=end.upstream_code,
            upstream_close_reason=end.upstream_reason,
        )
        self.access.emit(record)
