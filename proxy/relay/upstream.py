"""The upstream HTTP/1.1 client: an asyncio `Protocol` on httptools' response parser, a LIFO
keep-alive pool, timeouts kept by one lazily moved `call_at` timer per connection.

Why not a general client: on this hop httpx cost ~1,300 µs of CPU per request and aiohttp ~240 µs,
most of it in building requests we already hold as bytes, per-read timeout contexts and pool
bookkeeping. The sidecar speaks to one origin with requests it has already parsed and judged, so
the head is written as bytes in one `write` (joining the loop round's other writes when some
wait: outbox.py), the response head is parsed by llhttp and the body flows as the chunks the
socket delivered, with flow control both ways.

What it guarantees:
- a connection goes back to the pool only after a complete response to a completely sent
  request, with keep-alive, and nothing unread; otherwise it is closed;
- an idle connection older than `upstream.keepalive_s` is never reused (shorter than common
  upstream keep-alives, so we are not the side that races the upstream's close);
- which failures may be retried is the forwarder's business (relay/http.py, `upstream.retries`):
  the connection says whether it was reused and whether any answer byte came;
- `read_timeout_s` (or the route's own) is the longest the upstream may stay silent while we wait
  for it (not while the client is the slow side and reading is paused);
- every failure is a `ProxyError` (502/504 with a `reason`), raised to the one caller.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from dataclasses import dataclass
from ssl import SSLContext
from typing import cast
from urllib.parse import urlsplit

import httptools

from ..config import UpstreamSettings
from ..errors import BadGateway, GatewayTimeout, ProxyError
from ..outbox import MAX_WAITING_BYTES, outbox_of
from ..tls import upstream_context

# RFC 9110 9.2.2: a method whose request may be sent twice with the effect of once.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Above this many buffered response bytes the socket stops being read until the client catches up.
HIGH_WATER = 256 * 1024


def connect_timeout() -> GatewayTimeout:
    return GatewayTimeout(
        "the upstream did not accept the connection in time",
        details={"reason": "connect_timeout"},
    )


def pool_timeout() -> GatewayTimeout:
    """Every pooled connection stayed busy for connect_timeout_s: the sidecar's own capacity
    (`upstream.max_connections`), not a failure of the upstream (the breaker ignores it)."""
    return GatewayTimeout(
        "no upstream connection became free in time", details={"reason": "pool_timeout"}
    )


def read_timeout() -> GatewayTimeout:
    return GatewayTimeout("the upstream did not answer in time", details={"reason": "read_timeout"})


def connect_failed() -> BadGateway:
    return BadGateway("the upstream is unreachable", details={"reason": "connect_failed"})


def disconnected() -> BadGateway:
    return BadGateway(
        "the upstream closed the connection", details={"reason": "upstream_disconnected"}
    )


def invalid_response(why: str) -> BadGateway:
    return BadGateway(
        "the upstream sent an invalid response", details={"reason": "upstream_error", "why": why}
    )


class _Unasked(Exception):
    """Bytes after the complete answer: raised inside the parser to stop it."""


class ClientGone(Exception):
    """The client disconnected before the exchange finished."""


def url_prefix(url: str) -> bytes:
    """The upstream URL's path, put before every request path (and signed as part of it)."""
    return urlsplit(url).path.rstrip("/").encode()


@dataclass(frozen=True, slots=True)
class Origin:
    """Where the pool connects, decided once from `upstream.url`."""

    host: str
    port: int
    ssl: ssl.SSLContext | None
    host_header: bytes  # the Host the upstream sees unless server.preserve_host
    prefix: bytes  # the URL's path, put before every request path

    @classmethod
    def parse(cls, url: str, context: SSLContext | None = None) -> Origin:
        """`context`: the TLS context of an https URL (tls.upstream_context), None for http."""
        parts = urlsplit(url)
        https = parts.scheme == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if https else 80)
        if https and context is None:
            raise ValueError("an https upstream needs its TLS context (tls.upstream_context)")
        shown = f"[{host}]" if ":" in host else host
        if parts.port is not None and parts.port != (443 if https else 80):
            shown += f":{parts.port}"
        return cls(host, port, context, shown.encode("idna"), url_prefix(url))


class Connection(asyncio.Protocol):
    """One upstream connection; carries one exchange at a time (no pipelining)."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self._outbox = outbox_of(pool.loop)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        # The exchange in progress.
        self._parser: httptools.HttpResponseParser | None = None
        self._spare: httptools.HttpResponseParser | None = None  # reusable after a clean answer
        self._head_only = False
        self._head: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._length_known = False
        self.expected_length: int | None = None  # the answer's Content-Length, when it has one
        self._interim = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self.done = False
        self.keep_alive = False
        self.error: ProxyError | None = None
        self.received = False
        self.client_gone = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self.awaiting_client = False  # an upload waits for the client's next body bytes
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0.0
        self._read_timeout = pool.read_timeout  # this exchange's (a route may set its own)

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self.done:
            # Bytes nobody asked for (on an idle connection, or after the response): the
            # connection's framing cannot be trusted any more.
            self.keep_alive = False
            self.close()
            return
        self.received = True
        self._last = self._loop.time()
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(invalid_response("an upgrade nobody asked for"))
        except httptools.HttpParserError as exc:
            self._fail(invalid_response(str(exc)[:120]))

    def eof_received(self) -> bool:
        return False  # close; connection_lost says what it meant

    def connection_lost(self, exc: Exception | None) -> None:
        self._spare = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.closed:
            self.closed = True
            self._pool.forget(self)
        if self._parser is not None and not self.done and self.error is None:
            if self.status and not self._length_known and not self._interim:
                # A body delimited by the connection's end (RFC 9112 6.3 point 8): complete.
                self.done = True
                self.keep_alive = False
                self._wake()
            else:
                self._fail(disconnected())
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # --- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            # A second answer (or garbage) right behind the first in the same read: nothing of
            # it may reach this client or the next one. Raising stops the parser here.
            raise _Unasked()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.status:
            return  # a chunked body's trailer fields: this hop's business, never headers
        name = name.lower()
        if name == b"content-length":
            self._length_known = True
            if value.isdigit():
                self.expected_length = int(value)
        elif name == b"transfer-encoding":
            self._length_known = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if status < 100:
            self._fail(invalid_response(f"status {status} is not in 100-599"))
            return
        if status < 200:
            if status == 101:
                self._fail(invalid_response("101 Switching Protocols to a request without Upgrade"))
                return
            # Interim answers (100 Continue, 103 Early Hints) are this hop's business only.
            self._interim = True
            self.headers = []
            self._length_known = False
            return
        if status > 599:
            self._fail(invalid_response(f"status {status} is not in 100-599"))
            return
        self.status = status
        if self._head_only or status == 204 or status == 304:
            self._length_known = True  # no body follows, whatever the headers say
        if self._head_only:
            # httptools cannot be told the request was HEAD; the response ends with its head.
            self.done = True
            self.keep_alive = self._parser.should_keep_alive()
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.done:  # a body to a HEAD request: dropped, and the framing is not to be trusted
            self.keep_alive = False
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.done:
            return
        assert self._parser is not None
        self.done = True
        self.keep_alive = self._parser.should_keep_alive()
        self._wake()

    # --- the exchange -------------------------------------------------------------------------

    def begin(self, head_only: bool, read_timeout: float | None = None) -> None:
        """Get ready for a new response; make sure the read timer runs."""
        # llhttp is ready for the next message after a complete one: the parser of the last
        # clean exchange is reused (making one costs a few µs), any other is replaced.
        parser, self._spare = self._spare, None
        self._parser = parser or httptools.HttpResponseParser(self)
        self._head_only = head_only
        self._head = self._loop.create_future()
        self.status = 0
        self.headers = []
        self._length_known = False
        self.expected_length = None
        self._interim = False
        self.done = False
        self.keep_alive = False
        self.error = None
        self.received = False
        self.client_gone = False
        self.awaiting_client = False
        self._last = self._loop.time()
        timeout = self._read_timeout = read_timeout or self._pool.read_timeout
        timer = self._timer
        if timer is None or timer.when() > self._last + timeout:
            # One timer per connection, moved on lazily (see _check_timer): not one per request
            # (re-armed only when this exchange's timeout is shorter than the armed one's).
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(self._last + timeout, self._check_timer)

    def end(self) -> bool:
        """The exchange is over; True when the connection may carry another."""
        reusable = (
            self.done
            and self.keep_alive
            and self.error is None
            and not self._chunks
            and not self.closed
            and not self._read_paused
        )
        if reusable and not self._head_only:
            self._spare = self._parser
        self._parser = None
        self._head = None
        self._chunks.clear()
        self._buffered = 0
        return reusable

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        outbox = self._outbox
        if outbox.scheduled and len(data) <= MAX_WAITING_BYTES:
            outbox.add(self.transport, data)  # joins the writes of this round (outbox.py)
        else:
            outbox.flush()  # what waits goes first: the connection's bytes keep their order
            self.transport.write(data)
        self._last = self._loop.time()

    async def drain(self) -> None:
        """Wait while the socket's write buffer is above its high-water mark."""
        if self._write_paused and not self.closed:
            self._drain = self._loop.create_future()
            await self._drain
            self._drain = None
        if self.error is not None:
            raise self.error
        if self.closed:
            raise disconnected()

    async def response_head(self) -> None:
        """Wait for the status line and headers (or the exchange's failure)."""
        head = self._head
        assert head is not None
        if not head.done():
            await head
        if self.error is not None:
            raise self.error
        if self.client_gone:
            raise ClientGone()

    def take(self) -> bytes:
        """Every body byte buffered now (possibly none)."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self._last = self._loop.time()
            self.transport.resume_reading()
        return data

    @property
    def finished(self) -> bool:
        """The whole response has been taken."""
        return self.done and not self._chunks

    async def read(self) -> bytes:
        """The next body bytes; b"" once the body is complete."""
        while True:
            if self._chunks:
                return self.take()
            if self.error is not None:
                raise self.error
            if self.client_gone:
                raise ClientGone()
            if self.done:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def interrupt(self) -> None:
        """The client went away: wake whoever waits for the upstream."""
        self.client_gone = True
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        self._wake()

    def close(self) -> None:
        if self.transport is not None:
            self._outbox.flush()  # what this connection was sent goes before its close
            self.transport.close()
        if not self.closed:
            self.closed = True
            self._pool.forget(self)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        if not self.closed:
            self.closed = True
            self._pool.forget(self)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: ProxyError) -> None:
        if self.error is None and not self.done:
            self.error = error
        self.keep_alive = False
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        self._wake()
        self.abort()

    def _check_timer(self) -> None:
        # Fires at most read_timeout after the last upstream activity it knows of; re-armed only
        # while an exchange waits on the upstream. Cheaper than a timeout per read or request.
        self._timer = None
        if self._parser is None or self.done or self.error is not None or self.closed:
            return
        now = self._loop.time()
        if self._read_paused or self.awaiting_client:
            # The client is the slow side (not reading, or not yet sending the rest of its
            # body): send_timeout and client_body_timeout are its business.
            self._last = now
        elif now - self._last >= self._read_timeout:
            self._fail(read_timeout())
            return
        self._timer = self._loop.call_at(self._last + self._read_timeout, self._check_timer)


class UpstreamPool:
    """Keep-alive connections to the one upstream; LIFO, so the warmest connection is reused."""

    def __init__(self, settings: UpstreamSettings, loop: asyncio.AbstractEventLoop) -> None:
        self.origin = Origin.parse(settings.url, upstream_context(settings))
        self.loop = loop
        self.read_timeout = settings.read_timeout_s
        self.connect_timeout = settings.connect_timeout_s
        self.keepalive_s = settings.keepalive_s
        self.max_connections = settings.max_connections
        self._idle: list[Connection] = []
        self._open: set[Connection] = set()
        self._connecting = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closing = False

    @property
    def size(self) -> int:
        return len(self._open) + self._connecting

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def acquire(self, *, fresh: bool = False) -> Connection:
        """A connection for one exchange: the most recently used idle one, or a new one."""
        if not fresh:
            now = self.loop.time()
            idle = self._idle
            while idle:
                conn = idle.pop()
                if conn.closed or now - conn.idle_since > self.keepalive_s:
                    conn.close()
                    continue
                conn.reused = True
                return conn
        deadline = self.loop.time() + self.connect_timeout
        while self.size >= self.max_connections:
            if self._idle:
                # Over the cap because of idle ones (a fresh connection was asked for).
                self._idle.pop(0).close()
                continue
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise pool_timeout()
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except BaseException as exc:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then timed out or cancelled: pass the slot on
                if isinstance(exc, TimeoutError):
                    raise pool_timeout() from None
                raise
            if not fresh and self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    conn.reused = True
                    return conn
        return await self._connect(deadline)

    async def _connect(self, deadline: float) -> Connection:
        origin = self.origin
        self._connecting += 1
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await self.loop.create_connection(
                    lambda: Connection(self),
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl else None,
                )
        except BaseException as exc:
            self._connecting -= 1
            self._wake_one()  # the slot this attempt held is free again
            if isinstance(exc, TimeoutError):
                raise connect_timeout() from None
            if isinstance(exc, OSError | ssl.SSLError):
                raise connect_failed() from None
            raise
        self._connecting -= 1  # counted in _open from here
        if self._closing:
            conn.close()
            raise disconnected()
        self._open.add(conn)
        return conn

    def release(self, conn: Connection, reusable: bool) -> None:
        """The exchange on `conn` is over: keep it for the next one, or close it."""
        if reusable and not conn.closed and not self._closing:
            conn.idle_since = self.loop.time()
            self._idle.append(conn)
            self._wake_one()
        elif conn.done and conn.error is None:
            conn.close()  # a complete answer without keep-alive: a clean close
        else:
            conn.abort()  # unfinished: nothing of it may be read as the next answer

    def forget(self, conn: Connection) -> None:
        """Called once by a connection that closed."""
        self._open.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        """Close every connection (the in-flight exchanges fail with 502)."""
        self._closing = True
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
