"""Limits on the request head that uvicorn's httptools protocol does not set itself.

httptools buffers a request head of any size, and uvicorn has no timeout for a head that never
ends: a few connections sending endless header lines (or one line every few seconds) would grow
memory without bound or hold connections forever. This protocol counts the head's bytes as they
arrive and closes the connection past `server.max_header_bytes`, and closes a connection whose
head is not complete within `server.header_timeout_s`.

Two more things uvicorn passes to the app that the sidecar must not judge: the fields of a chunked
body's trailer section (uvicorn appends them to the very list the scope carries as its headers, so
a trailer that arrives with the head would be read as a request header: an API key, a second Host),
which are dropped here; and the authority of an absolute-form request target, which uvicorn drops
while keeping the Host, so such a target is refused unless it names the Host (`authority.py`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .authority import absolute_form_problem
from .errors import BadRequest, render
from .ids import new_request_id

# Writes at most this big wait to be joined with the next one; bigger ones go out at once.
_CORK_BYTES = 16 * 1024


class CorkedTransport:
    """The client transport, with writes made in one loop iteration joined into one.

    uvicorn writes a response's head and its body with two `write` calls: two system calls and
    two TCP segments for every small answer. Here the first write waits until the loop's next
    iteration and any write before then goes out with it. Everything else is the transport's.
    """

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: bytes | None = None

    def write(self, data: bytes) -> None:
        pending = self._pending
        if pending is not None:
            self._pending = None
            if len(data) > _CORK_BYTES:
                self._transport.write(pending)
                self._transport.write(data)
            else:
                self._transport.write(pending + data)
        elif len(data) > _CORK_BYTES or not data:
            self._transport.write(data)
        else:
            self._pending = bytes(data)
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        pending = self._pending
        if pending is not None:
            self._pending = None
            self._transport.write(pending)

    def writelines(self, lines: Any) -> None:
        self.flush()
        self._transport.writelines(lines)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def is_closing(self) -> bool:  # asked on every response: not through __getattr__
        return self._transport.is_closing()

    def uncork(self) -> asyncio.Transport:
        """What is pending, written; the transport itself, for a protocol that needs no corking
        (an upgraded WebSocket: a frame is one write already)."""
        self.flush()
        return self._transport

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._pending or b"")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Refused(Exception):
    """Raised from a parser callback to stop httptools; `send_400_response` then answers."""


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a byte budget and a deadline for each request head, and
    nothing but the header section as the request's headers."""

    max_head_bytes = 64 * 1024
    head_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._head_started = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: BadRequest | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        corked = CorkedTransport(transport, self.loop)
        super().connection_made(corked)  # type: ignore[arg-type]
        self._start_head_timer()  # a connection that never sends a byte is a head that never ends

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_head_bytes:
            self._refuse()

    def handle_websocket_upgrade(self) -> None:
        # The connection is the WebSocket protocol's from here: the head timer would keep this
        # protocol (and its parser) alive for up to header_timeout_s per socket.
        self._stop_head_timer()
        super().handle_websocket_upgrade()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._start_head_timer()  # usually the connection's timer is still armed: no timer op

    def on_header(self, name: bytes, value: bytes) -> None:
        # httptools reports trailer fields through the same callback once the head is over; they
        # are dropped: nothing judges or forwards them (the body is re-framed upstream anyway).
        if self._in_head:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        # The timer stays armed: it finds no head in progress when it fires, and a keep-alive
        # request that follows reuses it (one timer a connection, not two timer calls a request).
        url = self.url
        if url[:1] != b"/" and url != b"*":
            problem = absolute_form_problem(url, [v for n, v in self.headers if n == b"host"])
            if problem is not None:
                self._refusal = BadRequest(problem, details={"reason": "invalid_host"})
                raise _Refused  # httptools stops; uvicorn answers through send_400_response
        super().on_headers_complete()

    def _start_head_timer(self) -> None:
        self._head_started = now = self.loop.time()
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(now + self.head_timeout_s, self._head_check)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_check(self) -> None:
        """The connection's head timer: closes a head still arriving `head_timeout_s` after it
        began; re-armed for the rest of a head that began later; idle without a head."""
        self._head_timer = None
        if not self._in_head:
            return
        deadline = self._head_started + self.head_timeout_s
        if self.loop.time() < deadline:
            self._head_timer = self.loop.call_at(deadline, self._head_check)
        elif not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own answer to a request it cannot parse is plain text; ours are JSON.
        refusal, self._refusal = self._refusal, None
        self._answer(
            refusal
            or BadRequest(
                f"the request is not valid HTTP/1.1 ({msg})",
                details={"reason": "malformed_request"},
            )
        )

    def _refuse(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        self._answer(
            BadRequest(
                "the request headers are larger than the limit",
                details={"reason": "headers_too_large", "limit_bytes": self.max_head_bytes},
            )
        )

    def _answer(self, error: BadRequest) -> None:
        """The JSON error, then the connection closes: the parser cannot go on after it."""
        if self.transport.is_closing():
            return
        _, headers, body = render(error, new_request_id())
        head = b"HTTP/1.1 400 Bad Request\r\n" + b"".join(
            name + b": " + value + b"\r\n" for name, value in headers
        )
        self.transport.write(head + b"connection: close\r\n\r\n" + body)
        self.transport.close()


def bounded_head_protocol(max_head_bytes: int, head_timeout_s: float) -> type[HttpToolsProtocol]:
    """The protocol class with these limits, for uvicorn's `http=` setting."""
    return type(
        "BoundedHeadProtocol",
        (BoundedHeadProtocol,),
        {"max_head_bytes": max_head_bytes, "head_timeout_s": head_timeout_s},
    )
