"""REST forwarding: the request body streams up, the response streams back, nothing buffered whole.

Raw ASGI on purpose: Starlette's StreamingResponse watches for disconnects in a way that races with
reading the request body under uvicorn, which hangs an echo.

The common exchange (a body that arrived with its head, an answer that fits a few reads) costs one
`write` up, one wait for the head and one or two `send`s down: no task, no timeout context. Only a
streamed upload gets a task of its own, and only a streamed answer watches for a departed client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import PayloadTooLarge, ProxyError
from ..types import Message, Receive, Scope, Send
from .headers import HeaderPolicy
from .upstream import IDEMPOTENT, ClientGone, Connection, UpstreamPool

Headers = list[tuple[bytes, bytes]]

# Methods that carry no body unless they say so (aiohttp's and browsers' rule): the others get
# `Content-Length: 0` when the client sent no framing at all.
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})


class UpstreamAborted(Exception):
    """The upstream failed after the response had started: the client connection must be cut."""


__all__ = ["ClientGone", "Exchange", "Forwarder", "UpstreamAborted"]


@dataclass(slots=True)
class Exchange:
    """What the access log wants to know about one forwarded request."""

    status: int = 0
    upstream_status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    client_gone: bool = False
    response_started: bool = False


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
    ) -> None:
        self.error: BaseException | None = None
        self.done = False
        self._conn = conn
        self._receive = receive
        self._limit = limit
        self._exchange = exchange
        self._chunked = chunked
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        conn, exchange = self._conn, self._exchange
        try:
            while True:
                message = await self._receive()
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
                    return
                await conn.drain()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # Cut the upstream so the exchange waiting on it wakes; the forwarder reads `error`.
            self.error = exc
            conn.interrupt() if isinstance(exc, ClientGone) else conn.abort()

    def stop(self) -> None:
        if not self.task.done():
            self.task.cancel()


class Forwarder:
    """Sends one request to the upstream and streams the answer to the client."""

    def __init__(
        self, max_body_bytes: int, headers: HeaderPolicy, *, preserve_host: bool = False
    ) -> None:
        self._limit = max_body_bytes
        self._headers = headers
        self._preserve_host = preserve_host
        self.pool: UpstreamPool | None = None  # set by the app's lifespan

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
        if not self._preserve_host:
            parts += (b"host: ", origin.host_header, b"\r\n")
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts += (framing, b"\r\n")
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
    ) -> None:
        """Forward; raises ProxyError before the response starts, UpstreamAborted after."""
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
        # The client's Content-Length travels in `headers`; otherwise we frame the body.
        if content_length is not None:
            framing = b""
        elif streamed:
            framing = b"transfer-encoding: chunked\r\n"
            if chunk:
                chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        elif chunk or method not in _BODYLESS:
            framing = b"content-length: %d\r\n" % len(chunk)
        else:
            framing = b""
        request = self._head(method, raw_path, query, headers, framing) + chunk
        head_only = method == "HEAD"

        conn = await pool.acquire()
        upload: _Upload | None = None
        for attempt in (1, 2):
            conn.begin(head_only)
            conn.write(request)
            if streamed:
                upload = _Upload(conn, receive, limit, exchange, content_length is None)
            try:
                await conn.response_head()
                break
            except ClientGone:
                exchange.client_gone = True
                pool.release(conn, conn.end())
                return
            except ProxyError as exc:
                stale = (
                    conn.reused
                    and not conn.received
                    and exc.details.get("reason") in ("upstream_disconnected",)
                )
                pool.release(conn, conn.end())
                if upload is not None:
                    upload.stop()
                    if isinstance(upload.error, ProxyError):
                        raise upload.error from None
                    if isinstance(upload.error, ClientGone):
                        return
                if exchange.client_gone:
                    return
                if attempt == 1 and stale and not streamed and method in IDEMPOTENT:
                    # A pooled connection the upstream had closed while we were not looking.
                    conn = await pool.acquire(fresh=True)
                    continue
                raise
            except BaseException:
                if upload is not None:
                    upload.stop()
                conn.end()
                pool.release(conn, False)
                raise
        try:
            await self._stream_back(conn, send, receive, upload, response_headers, exchange)
        finally:
            reusable = conn.end()
            if upload is not None and not upload.done:
                upload.stop()
                reusable = False
            pool.release(conn, reusable and not exchange.client_gone)

    async def _stream_back(
        self,
        conn: Connection,
        send: Send,
        receive: Receive,
        upload: _Upload | None,
        response_headers: Callable[[Headers], Headers],
        exchange: Exchange,
    ) -> None:
        status = conn.status
        exchange.status = exchange.upstream_status = status
        headers = response_headers(self._headers.downstream_response(conn.headers))
        # Headers go out at once: a Server-Sent Events stream may not send a byte for a while.
        await send({"type": "http.response.start", "status": status, "headers": headers})
        exchange.response_started = True
        watcher: asyncio.Future[Message] | None = None

        def departed(_: asyncio.Future[Message]) -> None:
            conn.interrupt()

        try:
            while True:
                try:
                    chunk = await conn.read() if not conn.finished else b""
                except ClientGone:
                    exchange.client_gone = True
                    return
                except ProxyError as exc:
                    if upload is not None and isinstance(upload.error, ClientGone):
                        exchange.client_gone = True
                        return
                    raise UpstreamAborted(exc.message) from exc
                more = not conn.finished
                if chunk or not more:
                    exchange.bytes_out += len(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": more})
                if not more:
                    return
                if watcher is None and (upload is None or upload.done):
                    # uvicorn drops writes to a closed connection silently; its receive() tells.
                    # A quiet stream (SSE between events) must notice at once: it holds a pooled
                    # upstream connection.
                    watcher = asyncio.ensure_future(receive())
                    watcher.add_done_callback(departed)
        finally:
            if watcher is not None:
                # Never let a late callback interrupt the connection's next exchange.
                watcher.remove_done_callback(departed)
                if watcher.done():
                    if not watcher.cancelled():
                        watcher.exception()
                else:
                    watcher.cancel()
