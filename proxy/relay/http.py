"""REST forwarding: the request body streams up, the response streams back, nothing buffered whole.

Raw ASGI on purpose: Starlette's StreamingResponse watches for disconnects in a way that races with
reading the request body under uvicorn, which hangs an echo.

The common exchange (a body that arrived with its head, an answer that fits a few reads) costs one
`write` up, one wait for the head and one or two `send`s down: no task, no timeout context. Only a
streamed upload gets a task of its own, and only a streamed answer watches for a departed client.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from mypy_extensions import mypyc_attr

from ..config import CompressionSettings, UpstreamSettings
from ..errors import (
    BadGateway,
    GatewayTimeout,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    error_body,
)
from ..identity import Identity
from ..telemetry.metrics import Metrics
from ..types import BODY_FOLLOWS, Message, Receive, Scope, Send
from .breaker import OPEN, STATE_VALUE, CircuitBreaker
from .compress import Compression, Encoder, rewrite_headers
from .headers import HeaderPolicy
from .shedding import Admission
from .streams import AUTH_EXPIRED, AUTH_REVOKED, Stream, StreamRegistry
from .upstream import IDEMPOTENT, ClientGone, Connection, UpstreamPool

Headers = list[tuple[bytes, bytes]]

# An answer with a Content-Length up to this is read whole before its head goes to the client: an
# upstream that dies mid-body then costs a clean 502, not a cut connection. Anything longer, or
# of unknown length (a stream, Server-Sent Events), starts at once.
_WHOLE_BELOW = 64 * 1024

# Methods that carry no body unless they say so (aiohttp's and browsers' rule): the others get
# `Content-Length: 0` when the client sent no framing at all.
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})


class UpstreamAborted(Exception):
    """The upstream failed after the response had started: the client connection must be cut."""


class ClientStalled(Exception):
    """The client took no response bytes for `server.send_timeout_s`: the connection is cut."""


class AuthEnded(Exception):
    """The credential of a streamed answer expired or was revoked mid-body, and the body was not
    Server-Sent Events ending on an event boundary: the connection is cut (`why` says which)."""

    def __init__(self, why: str) -> None:
        super().__init__(f"the stream's credential ended: {why}")
        self.why = why


__all__ = ["AuthEnded", "ClientGone", "ClientStalled", "Exchange", "Forwarder", "UpstreamAborted"]

# An SSE stream whose credential ends mid-event gets this long to reach the event's end (where
# the closing event can be told apart from the upstream's), then it is cut.
SSE_BOUNDARY_GRACE_S = 1.0
_AUTH_END_MESSAGES = {
    AUTH_EXPIRED: ("the credential expired during the stream", "token_expired"),
    AUTH_REVOKED: ("the credential was revoked during the stream", "revoked"),
}

# A retry after a reset or a refused connection waits a random 50-100 % of this, doubled per retry
# (jitter: many sidecars retrying one restarting upstream do not arrive in step). A pooled
# connection found closed is retried at once: that is our stale state, not the upstream's trouble.
_RETRY_BASE_S = 0.025


def deadline_exceeded(timeout_s: float) -> GatewayTimeout:
    return GatewayTimeout(
        "the upstream did not finish in time",
        details={"reason": "deadline", "timeout_s": timeout_s},
    )


class _Stall:
    """Watches the client's side of one exchange, as nginx's send_timeout and client_body_timeout
    do: a client that takes no response bytes, or sends no body bytes, for that long loses the
    exchange, and the pooled upstream connection it held is freed. One timer, checked a few times
    per timeout, armed only for exchanges that stream (a small answer never waits on the client).
    """

    __slots__ = (
        "_loop",
        "_task",
        "_period",
        "_timer",
        "send_timeout",
        "body_timeout",
        "sending",
        "receiving",
        "upload_task",
        "tripped",
    )

    def __init__(self, send_timeout: float, body_timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self.send_timeout = send_timeout
        self.body_timeout = body_timeout
        self._period = max(min(send_timeout, body_timeout) / 4, 0.01)
        self.sending: float | None = None  # loop time a send to the client began, while it waits
        self.receiving: float | None = None  # loop time a wait for client body bytes began
        self.upload_task: asyncio.Future[None] | None = None
        self.tripped: str | None = None
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(self._period, self._check)

    def now(self) -> float:
        return self._loop.time()

    def _check(self) -> None:
        self._timer = None
        now = self._loop.time()
        if self.sending is not None and now - self.sending >= self.send_timeout:
            self.tripped = "send"
            if self._task is not None:
                self._task.cancel()
            return
        if self.receiving is not None and now - self.receiving >= self.body_timeout:
            self.tripped = "body"
            self.receiving = None
            if self.upload_task is not None:
                self.upload_task.cancel()
        self._timer = self._loop.call_later(self._period, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


@dataclass(slots=True, init=False)  # its own __init__: compiled (decision.Facts says why)
class Exchange:
    """What the access log wants to know about one forwarded request."""

    status: int
    upstream_status: int | None
    bytes_in: int
    bytes_out: int
    client_gone: bool
    response_started: bool
    # From the request's head written to the answer's head read (the attempt that answered).
    upstream_seconds: float | None
    # In: who the answer is for (a streamed one is bound to its credential: streams.py), and the
    # request id its closing event names. Out: why the credential ended the stream, if it did.
    identity: Identity | None
    request_id: str
    auth_end: str | None
    uploading: bool  # a streamed request body is still coming from the client

    def __init__(self, identity: Identity | None = None, request_id: str = "") -> None:
        self.status = 0
        self.upstream_status = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.client_gone = False
        self.response_started = False
        self.upstream_seconds = None
        self.identity = identity
        self.request_id = request_id
        self.auth_end = None
        self.uploading = False


def _upstream_failed(exc: Exception, exchange: Exchange) -> bool:
    """Whether a failed exchange says the upstream is struggling (what the breaker counts): not
    the sidecar's own busy pool, nor a deadline that passed while the client was still sending."""
    reason = exc.details.get("reason") if isinstance(exc, ProxyError) else None
    if reason == "pool_timeout":
        return False
    return not (reason == "deadline" and exchange.uploading)


def _is_event_stream(headers: Headers) -> bool:
    """An SSE answer the sidecar can add an event to: `text/event-stream`, not encoded (bytes
    appended to a gzip stream would be garbage to the client; such a stream is cut instead)."""
    event_stream = False
    for name, value in headers:
        if name == b"content-type":
            event_stream = value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
        elif name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            return False
    return event_stream


def _ends_event(tail: bytes) -> bool:
    """Whether SSE bytes ending in `tail` end on an event boundary (a blank line: two line ends
    in a row, each CRLF, LF or CR)."""
    return tail.replace(b"\r\n", b"\n").replace(b"\r", b"\n").endswith(b"\n\n")


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        "the request body is larger than the limit", details={"limit_bytes": limit}
    )


class _Upload:
    """The rest of a streamed request body, relayed by a task while the answer comes back."""

    def __init__(
        self,
        conn: Connection,
        receive: Receive,
        limit: int,
        exchange: Exchange,
        chunked: bool,
        stall: _Stall,
    ) -> None:
        self.error: BaseException | None = None
        self.done = False
        self._conn = conn
        self._receive = receive
        self._limit = limit
        self._exchange = exchange
        self._chunked = chunked
        self._stall = stall
        exchange.uploading = True
        self.task = asyncio.ensure_future(self._run())
        stall.upload_task = self.task

    async def _run(self) -> None:
        conn, exchange, stall = self._conn, self._exchange, self._stall
        try:
            while True:
                stall.receiving = stall.now()
                conn.awaiting_client = True  # the client's silence is not the upstream's
                message = await self._receive()
                conn.awaiting_client = False
                stall.receiving = None
                if message["type"] == "http.disconnect":
                    exchange.client_gone = True
                    raise ClientGone()
                chunk: bytes = message.get("body", b"")
                exchange.bytes_in += len(chunk)
                if exchange.bytes_in > self._limit:
                    raise _too_large(self._limit)
                more = message.get("more_body", False)
                if chunk:
                    conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self._chunked else chunk)
                if not more:
                    if self._chunked:
                        conn.write(b"0\r\n\r\n")
                    await conn.drain()
                    self.done = True
                    exchange.uploading = False
                    return
                await conn.drain()
        except asyncio.CancelledError:
            if stall.tripped != "body":
                raise
            self.error = RequestTimeout(
                "the client stopped sending the request body",
                details={"reason": "client_body_timeout", "timeout_s": stall.body_timeout},
            )
            conn.abort()
        except BaseException as exc:
            # Cut the upstream so the exchange waiting on it wakes; the forwarder reads `error`.
            self.error = exc
            conn.interrupt() if isinstance(exc, ClientGone) else conn.abort()

    def stop(self) -> None:
        if not self.task.done():
            self.task.cancel()


def whole_answer(send: Send) -> Callable[[int, Headers, bytes], bool] | None:
    """The server's way to write a whole answer at once, if the one behind `send` has it
    (proxy/http11.py's `Cycle.respond`): two awaits and two messages fewer for a small answer.
    Under any other ASGI server, None: the answer is sent as ASGI says."""
    owner = getattr(send, "__self__", None)
    respond: Callable[[int, Headers, bytes], bool] | None = getattr(owner, "respond", None)
    return respond


# Tests subclass it to play a bug inside the sidecar: allowed of the compiled class (mypyc).
@mypyc_attr(allow_interpreted_subclasses=True)
class Forwarder:
    """Sends one request to the upstream and streams the answer to the client."""

    def __init__(
        self,
        max_body_bytes: int,
        headers: HeaderPolicy,
        *,
        preserve_host: bool = False,
        send_timeout_s: float = 60.0,
        client_body_timeout_s: float = 60.0,
        upstream: UpstreamSettings | None = None,
        metrics: Metrics | None = None,
        compression: CompressionSettings | None = None,
    ) -> None:
        self._limit = max_body_bytes
        self._headers = headers
        self._preserve_host = preserve_host
        self._send_timeout = send_timeout_s
        self._body_timeout = client_body_timeout_s
        self.pool: UpstreamPool | None = None  # set by the app's lifespan
        self.streams: StreamRegistry | None = None  # set by the app: streamed answers' credentials
        self._metrics = metrics
        upstream = upstream or UpstreamSettings()
        self._retries = upstream.retries
        # Off (None) unless configured: the request path checks one attribute.
        self.breaker: CircuitBreaker | None = None
        cb = upstream.circuit_breaker
        if cb.failure_threshold:
            self.breaker = CircuitBreaker(
                cb.failure_threshold, cb.open_s, changed=self._breaker_changed
            )
        self.compression: Compression | None = None
        if compression is not None and compression.enabled:
            self.compression = Compression(compression)
        self.admission: Admission | None = None
        if upstream.max_concurrent_requests:
            self.admission = Admission(
                upstream.max_concurrent_requests,
                upstream.queue_timeout_s,
                upstream.max_queued_requests,
            )
        self._guarded = self.breaker is not None or self.admission is not None

    def share_upstream(self, other: Forwarder) -> None:
        """A reload's new forwarder takes over the running one's upstream state: the pool, the
        breaker and the queue (their settings need a restart to change)."""
        self.pool, self.breaker, self.admission = other.pool, other.breaker, other.admission
        self.streams = other.streams

    def _breaker_changed(self, state: str) -> None:
        if self._metrics is not None:
            self._metrics.circuit_state.set(STATE_VALUE[state])
            if state == OPEN:
                self._metrics.circuit_opens.inc()

    def _shed(self, exc: ProxyError) -> None:
        if self._metrics is not None:
            self._metrics.shed.labels(exc.details.get("reason", "-")).inc()

    def _head(
        self,
        method: str,
        raw_path: bytes,
        query: bytes,
        headers: Headers,
        framing: bytes,
    ) -> bytes:
        assert self.pool is not None
        origin = self.pool.origin
        target = origin.prefix + raw_path
        if query:
            target += b"?" + query
        parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
        # server.preserve_host: the client's Host travels in `headers`; an HTTP/1.0 client may
        # have sent none, and an HTTP/1.1 request without one is invalid: ours, then.
        if not self._preserve_host or not any(name == b"host" for name, _ in headers):
            parts.append(b"host: ")
            parts.append(origin.host_header)
            parts.append(b"\r\n")
        for name, value in headers:  # (appends: a tuple of four per field cost more)
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
        parts.append(framing)
        parts.append(b"\r\n")
        return b"".join(parts)

    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        raw_path: bytes,
        query: bytes,
        headers: Headers,
        content_length: int | None,
        response_headers: Callable[[Headers], Headers],
        exchange: Exchange,
        read_timeout: float | None = None,
        timeout: float | None = None,
        verdict: Callable[[bool], None] | None = None,
        guarded: bool = False,
    ) -> None:
        """Forward; raises ProxyError before the response starts, UpstreamAborted after.

        `read_timeout` and `timeout` are the route's own (routes[].read_timeout_s, timeout_s).
        With a breaker, a concurrency cap or a deadline the exchange goes through `_guard` first
        (which calls back with `guarded`); without, this check is all they cost."""
        if not guarded and (self._guarded or timeout is not None):
            await self._guard(
                scope, receive, send, raw_path, query, headers, content_length,
                response_headers, exchange, read_timeout, timeout,
            )  # fmt: skip
            return
        pool = self.pool
        assert pool is not None, "the app's lifespan has not started"
        limit = self._limit
        if content_length is not None and content_length > limit:
            raise _too_large(limit)
        method: str = scope["method"]
        first = await receive()
        if first["type"] == "http.disconnect":
            exchange.client_gone = True
            return
        chunk: bytes = first.get("body", b"")
        exchange.bytes_in = len(chunk)
        if exchange.bytes_in > limit:
            raise _too_large(limit)
        streamed = first.get("more_body", False)
        # The framing is always ours (the header policy drops the client's Content-Length): the
        # length uvicorn holds the client to, chunked for a stream of unknown length.
        if content_length is not None:
            framing = b"content-length: %d\r\n" % content_length
        elif streamed:
            framing = b"transfer-encoding: chunked\r\n"
            if chunk:
                chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        elif chunk or method not in _BODYLESS:
            framing = b"content-length: %d\r\n" % len(chunk)
        else:
            framing = b""
        request = self._head(method, raw_path, query, headers, framing) + chunk
        chunked = streamed and content_length is None
        # Only an exchange that streams can wait on the client: it alone gets the stall timer.
        stall = _Stall(self._send_timeout, self._body_timeout) if streamed else None
        try:
            conn, upload = await self._send_request(
                method, request, chunked, stall, receive, exchange, read_timeout
            )
            if conn is None:
                return  # the client left first
            if verdict is not None:
                verdict(conn.status < 500)  # the breaker's verdict, at the answer's head
            try:
                await self._stream_back(
                    conn, scope, send, receive, upload, stall, response_headers, exchange
                )
            finally:
                reusable = conn.end()
                if upload is not None and not upload.done:
                    upload.stop()
                    reusable = False
                pool.release(conn, reusable and not exchange.client_gone)
        finally:
            if stall is not None:
                stall.stop()

    async def _guard(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        raw_path: bytes,
        query: bytes,
        headers: Headers,
        content_length: int | None,
        response_headers: Callable[[Headers], Headers],
        exchange: Exchange,
        read_timeout: float | None,
        timeout: float | None,
    ) -> None:
        """The circuit breaker, the concurrency cap and the route's deadline around one exchange."""
        breaker = self.breaker
        probe = False
        if breaker is not None:
            try:
                probe = breaker.admit()
            except ProxyError as exc:
                self._shed(exc)
                raise
        # The answer's head decides the breaker's verdict, at once: a probe that streams for
        # minutes must not hold the breaker half-open for as long.
        decided = False

        def at_head(ok: bool) -> None:
            nonlocal decided
            assert breaker is not None
            decided = True
            breaker.record(ok, probe)

        entered = False
        try:
            try:
                # The route's deadline runs from the request: a wait for a slot counts.
                async with asyncio.timeout(timeout):  # None: no deadline
                    if self.admission is not None:
                        try:
                            await self.admission.enter()
                        except ProxyError as exc:
                            self._shed(exc)
                            raise
                        entered = True
                    await self.forward(
                        scope,
                        receive,
                        send,
                        raw_path=raw_path,
                        query=query,
                        headers=headers,
                        content_length=content_length,
                        response_headers=response_headers,
                        exchange=exchange,
                        read_timeout=read_timeout,
                        verdict=at_head if breaker is not None else None,
                        guarded=True,
                    )
            except TimeoutError:
                # Only the deadline raises this here: the exchange's own timeouts are ProxyErrors.
                assert timeout is not None
                if exchange.response_started:
                    raise UpstreamAborted(f"the route's deadline of {timeout:g} s passed") from None
                raise deadline_exceeded(timeout) from None
            finally:
                if entered:
                    assert self.admission is not None
                    self.admission.leave()
        except (BadGateway, GatewayTimeout, UpstreamAborted) as exc:
            if breaker is not None and not decided and _upstream_failed(exc, exchange):
                decided = True
                breaker.record(False, probe)
            raise
        finally:
            if breaker is not None and not decided:
                breaker.abandon(probe)

    async def _send_request(
        self,
        method: str,
        request: bytes,
        chunked: bool,
        stall: _Stall | None,
        receive: Receive,
        exchange: Exchange,
        read_timeout: float | None,
    ) -> tuple[Connection | None, _Upload | None]:
        """Write the request (the rest of a streamed body from a task) and wait for the answer's
        head: the connection it came on, or None when the client left first.

        `upstream.retries` re-sends: any request whose connection could not be made at all (the
        first body chunk, the only one read yet, is in `request`), and an idempotent request whose
        body is all in `request` when its connection failed before any answer byte."""
        pool = self.pool
        assert pool is not None
        head_only = method == "HEAD"
        left = self._retries
        fresh = False
        while True:
            try:
                conn = await pool.acquire(fresh=fresh)
            except ProxyError as exc:
                if left and exc.details.get("reason") == "connect_failed":
                    left -= 1
                    await self._pause_before_retry(self._retries - left, "connect_failed")
                    continue
                raise
            upload: _Upload | None = None
            conn.begin(head_only, read_timeout)
            sent = time.perf_counter()
            conn.write(request)
            if stall is not None:
                upload = _Upload(conn, receive, self._limit, exchange, chunked, stall)
            try:
                await conn.response_head()
                exchange.upstream_seconds = time.perf_counter() - sent
                return conn, upload
            except ClientGone:
                exchange.client_gone = True
                if upload is not None:
                    upload.stop()
                pool.release(conn, conn.end())
                return None, None
            except ProxyError as exc:
                replayable = (
                    left
                    and upload is None
                    and not conn.received
                    and method in IDEMPOTENT
                    and exc.details.get("reason") == "upstream_disconnected"
                )
                stale = conn.reused
                pool.release(conn, conn.end())
                if upload is not None:
                    upload.stop()
                    if isinstance(upload.error, ProxyError):
                        raise upload.error from None  # too large, or the body stalled
                    if isinstance(upload.error, ClientGone):
                        return None, None
                if exchange.client_gone:
                    return None, None
                if replayable:
                    left -= 1
                    if stale:
                        self._count_retry("stale_connection")
                    else:
                        await self._pause_before_retry(self._retries - left, "reset")
                    fresh = True
                    continue
                raise
            except BaseException:
                if upload is not None:
                    upload.stop()
                conn.end()
                pool.release(conn, False)
                raise

    def _count_compression(self, encoder: Encoder) -> None:
        if self._metrics is not None:
            self._metrics.compression_bytes.labels("in").inc(encoder.bytes_in)
            self._metrics.compression_bytes.labels("out").inc(encoder.bytes_out)

    def _count_retry(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.retries.labels(reason).inc()

    async def _pause_before_retry(self, n: int, reason: str) -> None:
        self._count_retry(reason)
        await asyncio.sleep(_RETRY_BASE_S * (1 << (n - 1)) * random.uniform(0.5, 1.0))

    async def _end_stream(self, send: Send, exchange: Exchange, clean: bool) -> None:
        """The credential of this streamed answer ended: an SSE stream on an event boundary gets
        `event: auth_expired` (or `auth_revoked`) with the JSON error as its data, then its end;
        anything else is cut (`AuthEnded`)."""
        why = exchange.auth_end
        assert why is not None
        if not clean:
            raise AuthEnded(why)
        message, reason = _AUTH_END_MESSAGES[why]
        data = error_body("unauthorized", message, exchange.request_id, {"reason": reason})
        event = b"event: " + why.encode() + b"\ndata: " + data + b"\n\n"
        exchange.bytes_out += len(event)
        await send({"type": "http.response.body", "body": event, "more_body": False})

    async def _stream_back(
        self,
        conn: Connection,
        scope: Scope,
        send: Send,
        receive: Receive,
        upload: _Upload | None,
        stall: _Stall | None,
        response_headers: Callable[[Headers], Headers],
        exchange: Exchange,
    ) -> None:
        status = conn.status
        exchange.upstream_status = status
        if conn.done and stall is None and upload is None and self.compression is None:
            # The whole answer is in hand (the common small one): its head and body go in one
            # write, and nothing of a stream (stall timer, departure watch, credential) applies.
            body = conn.take()
            exchange.status = status
            headers = response_headers(self._headers.downstream_response(conn.headers))
            respond = whole_answer(send)
            if respond is not None and respond(status, headers, body):
                exchange.response_started = True
                exchange.bytes_out += len(body)
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": headers,
                    BODY_FOLLOWS: True,
                }
            )
            exchange.response_started = True
            exchange.bytes_out += len(body)
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        own: _Stall | None = None  # the stall timer this answer needed, if the request had none
        early = b""
        length = conn.expected_length
        if not conn.finished and length is not None and length <= _WHOLE_BELOW:
            try:
                while not conn.finished:
                    early += await conn.read()
            except ClientGone:
                exchange.client_gone = True
                return
            # A ProxyError goes up from here: nothing was sent yet, so the client gets the 502.
        exchange.status = status
        headers = response_headers(self._headers.downstream_response(conn.headers))
        encoder: Encoder | None = None
        if self.compression is not None:
            picked = self.compression.encoder(
                scope["headers"], scope["method"], status, headers, length
            )
            if picked is not None:
                encoder, coding = picked
                if self._metrics is not None:
                    self._metrics.compressed.labels(coding).inc()
                if early and conn.finished:
                    # The whole body is in hand: compressed at once, with its length.
                    early = encoder.whole(early)
                    headers = rewrite_headers(headers, coding, len(early))
                    self._count_compression(encoder)
                    encoder = None
                else:
                    headers = rewrite_headers(headers, coding, None)
        watcher: asyncio.Future[Message] | None = None

        def departed(_: asyncio.Future[Message]) -> None:
            conn.interrupt()

        binding: Stream | None = None
        grace: asyncio.TimerHandle | None = None
        sse = False
        boundary = True  # SSE: what was sent so far ends on an event boundary
        recent = b""  # SSE: the last bytes sent (a boundary may straddle two chunks)

        def credential_ended(why: str) -> None:
            nonlocal grace
            exchange.auth_end = why
            if sse and not boundary:
                grace = asyncio.get_running_loop().call_later(SSE_BOUNDARY_GRACE_S, conn.interrupt)
            else:
                conn.interrupt()

        try:
            # Headers go out at once: a Server-Sent Events stream may not send a byte for a while.
            if stall is not None:
                stall.sending = stall.now()
            start: Message = {"type": "http.response.start", "status": status, "headers": headers}
            if early and conn.finished:
                start[BODY_FOLLOWS] = True  # the whole body goes next: one write for both
            await send(start)
            exchange.response_started = True
            if self.streams is not None and exchange.identity is not None and not conn.finished:
                sse = _is_event_stream(headers)
                binding = self.streams.bind(exchange.identity, credential_ended)
            while True:
                if exchange.auth_end is not None and (boundary or not sse):
                    # The credential ended (on an SSE event boundary: the closing event can
                    # follow at once; mid-event, the grace timer or the event's end comes first).
                    await self._end_stream(send, exchange, sse)
                    return
                if stall is not None:
                    stall.sending = None
                if watcher is None and not conn.finished and (upload is None or upload.done):
                    # uvicorn drops writes to a closed connection silently; its receive() tells.
                    # A quiet stream (SSE before its first event, or between events) must notice
                    # at once: it holds a pooled upstream connection.
                    watcher = asyncio.ensure_future(receive())
                    watcher.add_done_callback(departed)
                try:
                    if early:
                        chunk, early = early, b""
                    else:
                        chunk = await conn.read() if not conn.finished else b""
                except ClientGone:
                    if exchange.auth_end is not None:
                        await self._end_stream(send, exchange, sse and boundary)
                        return
                    exchange.client_gone = True
                    return
                except ProxyError as exc:
                    if upload is not None and isinstance(upload.error, ClientGone):
                        exchange.client_gone = True
                        return
                    raise UpstreamAborted(exc.message) from exc
                more = not conn.finished
                if encoder is not None:
                    # Flushed per chunk: a streamed answer reaches the client as it comes.
                    chunk = encoder.chunk(chunk) if chunk else b""
                    if not more:
                        chunk += encoder.finish()
                        self._count_compression(encoder)
                if chunk or not more:
                    exchange.bytes_out += len(chunk)
                    if stall is not None:
                        stall.sending = stall.now()
                    await send({"type": "http.response.body", "body": chunk, "more_body": more})
                    if sse and chunk:
                        recent = (recent + chunk)[-4:]
                        boundary = _ends_event(recent)
                if not more:
                    return
                if stall is None:
                    # A streamed answer: only now can a send wait on the client (uvicorn waits
                    # for the previous write to drain at the start of the next send).
                    stall = own = _Stall(self._send_timeout, self._body_timeout)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if stall is None or stall.tripped != "send" or task is None or task.uncancel() > 0:
                raise
            raise ClientStalled(
                f"the client took no response bytes for {stall.send_timeout:g} s"
            ) from None
        finally:
            if binding is not None:
                assert self.streams is not None
                self.streams.release(binding)
            if grace is not None:
                grace.cancel()
            if own is not None:
                own.stop()
            if watcher is not None:
                # Never let a late callback interrupt the connection's next exchange.
                watcher.remove_done_callback(departed)
                if watcher.done():
                    if not watcher.cancelled():
                        watcher.exception()
                else:
                    watcher.cancel()
