"""REST forwarding: the request body streams up, the response streams back, nothing buffered whole.

Raw ASGI on purpose: Starlette's StreamingResponse watches for disconnects in a way that races with
reading the request body under uvicorn, which hangs an echo.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..errors import PayloadTooLarge, ProxyError
from ..types import Message, Receive, Scope, Send
from .headers import HeaderPolicy
from .upstream import translate, upstream_url

Headers = list[tuple[bytes, bytes]]


class UpstreamAborted(Exception):
    """The upstream failed after the response had started: the client connection must be cut."""


class ClientGone(Exception):
    """The client disconnected before the exchange finished."""


@dataclass(slots=True)
class Exchange:
    """What the access log wants to know about one forwarded request."""

    status: int = 0
    upstream_status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    client_gone: bool = False
    response_started: bool = False


class _Body:
    """The request body as an async iterator over ASGI `http.request` messages, size-limited."""

    def __init__(self, receive: Receive, first: bytes, limit: int, exchange: Exchange) -> None:
        self._receive = receive
        self._first = first
        self._limit = limit
        self._exchange = exchange
        self.too_large = False
        self.done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._first:
            yield self._first
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._exchange.client_gone = True
                raise ClientGone()
            chunk = message.get("body", b"")
            self._exchange.bytes_in += len(chunk)
            if self._exchange.bytes_in > self._limit:
                self.too_large = True
                raise PayloadTooLarge(
                    "the request body is larger than the limit",
                    details={"limit_bytes": self._limit},
                )
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                self.done = True
                return


class Forwarder:
    """Sends one request to the upstream and streams the answer to the client."""

    def __init__(self, base_url: str, max_body_bytes: int, headers: HeaderPolicy) -> None:
        self._base = base_url
        self._limit = max_body_bytes
        self._headers = headers
        self.session: aiohttp.ClientSession | None = None  # set by the app's lifespan

    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        raw_path: bytes,
        query: bytes,
        headers: list[tuple[str, str]],
        content_length: int | None,
        response_headers: Callable[[Headers], Headers],
        exchange: Exchange,
    ) -> None:
        """Forward; raises ProxyError before the response starts, UpstreamAborted after."""
        assert self.session is not None, "the app's lifespan has not started"
        if content_length is not None and content_length > self._limit:
            raise PayloadTooLarge(
                "the request body is larger than the limit", details={"limit_bytes": self._limit}
            )
        first = await receive()
        if first["type"] == "http.disconnect":
            exchange.client_gone = True
            return
        chunk: bytes = first.get("body", b"")
        exchange.bytes_in = len(chunk)
        if exchange.bytes_in > self._limit:
            raise PayloadTooLarge(
                "the request body is larger than the limit", details={"limit_bytes": self._limit}
            )
        body: _Body | None = None
        data: bytes | _Body | None
        if first.get("more_body", False):
            body = _Body(receive, chunk, self._limit, exchange)
            data = body
        else:
            data = chunk if chunk or content_length is not None else None
        url = upstream_url(self._base, raw_path, query)
        try:
            response = await self.session.request(
                scope["method"],
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                compress=None,
                auto_decompress=False,
            )
        except ProxyError:
            raise
        except ClientGone:
            return
        except Exception as exc:
            if body is not None and body.too_large:
                raise PayloadTooLarge(
                    "the request body is larger than the limit",
                    details={"limit_bytes": self._limit},
                ) from None
            if exchange.client_gone:
                return
            if isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError | OSError):
                raise translate(exc) from exc
            raise
        try:
            await self._stream_back(response, send, receive, body, response_headers, exchange)
        finally:
            if exchange.client_gone or not response.content.at_eof():
                response.close()  # an unfinished body: the connection cannot be reused
            else:
                response.release()

    async def _stream_back(
        self,
        response: aiohttp.ClientResponse,
        send: Send,
        receive: Receive,
        body: _Body | None,
        response_headers: Callable[[Headers], Headers],
        exchange: Exchange,
    ) -> None:
        exchange.status = exchange.upstream_status = response.status
        headers = response_headers(self._headers.downstream_response(response.raw_headers))
        # Headers go out at once: a Server-Sent Events stream may not send a byte for a while.
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        exchange.response_started = True
        content = response.content
        watcher: asyncio.Future[Message] | None = None
        try:
            while True:
                try:
                    if watcher is None:
                        chunk = await content.readany()
                    else:
                        # A quiet stream (SSE between events) must notice a departed client now,
                        # not at the next chunk: it holds an upstream connection from the pool.
                        read = asyncio.ensure_future(content.readany())
                        either: set[asyncio.Future[Any]] = {read, watcher}
                        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                        if not read.done():
                            read.cancel()
                            exchange.client_gone = True
                            return
                        chunk = read.result()
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    raise UpstreamAborted(translate(exc).message) from exc
                more = not content.at_eof()
                if chunk or not more:
                    exchange.bytes_out += len(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": more})
                if not more:
                    return
                if watcher is None and (body is None or body.done):
                    # uvicorn drops writes to a closed connection silently; its receive() tells.
                    watcher = asyncio.ensure_future(receive())
                if watcher is not None and watcher.done():
                    exchange.client_gone = True
                    return
        finally:
            if watcher is not None:
                if watcher.done():
                    watcher.exception() if not watcher.cancelled() else None
                else:
                    watcher.cancel()
