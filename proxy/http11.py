"""The listeners' HTTP/1.1 server protocol: httptools' parser, and the ASGI app called with only
what a request needs in between.

uvicorn still runs the listeners (sockets, signals, the lifespan, graceful shutdown) and the
WebSocket protocol an upgrade is handed to; this protocol replaces its httptools one, which cost
a third of the sidecar's time per proxied request. What it does differently:

- one timer per connection, not two timer calls per request: it closes a request head that is not
  complete within `server.header_timeout_s` (uvicorn has no such limit) and an idle keep-alive
  connection after `timeout_keep_alive`, and is re-armed only when it would fire too late;
- a response's head waits for its body within the loop iteration, so a small answer is one
  `write` (one system call, one TCP segment); a head whose body does not follow goes out on the
  next iteration (a Server-Sent Events stream gets its head at once);
- the response head is checked for line breaks and control bytes with one scan, not two regular
  expressions per header;
- a request's body is handed over without copies, and `receive` waits on a future made only
  when there is nothing to hand over;
- a small answer that ends while other requests are in flight is written at the end of the
  loop's round of callbacks, with the others finished in that round (outbox.py);
- a keep-alive connection's requests run one after another in one task, which waits on a future
  between them, rather than in a task each (`HttpProtocol._serve`).

The limits it keeps on the request (uvicorn sets none of them): a head larger than
`server.max_header_bytes` closes the connection with a 400; the fields of a chunked body's trailer
section never join the request's headers (a trailer read as a header could be an API key or a
second Host); an absolute-form target must name the Host (uvicorn drops its authority, see
`authority.py`). Every refusal is the sidecar's JSON error.
"""

from __future__ import annotations

import asyncio
import functools
import http
import logging
import urllib.parse
from collections import deque
from typing import Any, cast

import httptools
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl

from .authority import absolute_form_problem
from .errors import BadRequest, InternalError, render
from .ids import new_request_id
from .outbox import MAX_WAITING_BYTES, outbox_of
from .types import BODY_FOLLOWS

log = logging.getLogger("uvicorn.error")  # written as authproxy.server (telemetry/logs.py)

# A request body buffered past this pauses reading from the client until the app takes it.
_HIGH_WATER = 64 * 1024
# A response head waits to be joined with a body write up to this size; a bigger body goes alone.
_CORK_BYTES = 16 * 1024
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Control bytes, HTAB (allowed in values) aside. A response head holds none but its own CR LF
# line ends, one pair per line: removing them all takes away exactly two bytes per line, and a CR,
# LF or other control byte inside a name or value makes it more (one pass over the head).
_CONTROLS = bytes(range(0x00, 0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)


_STATUS_LINES = {status: _status_line(status) for status in range(100, 600)}


class _Refused(Exception):
    """Raised from a parser callback to stop httptools; `data_received` then answers."""


class Cycle:
    """One request and its response: the ASGI `receive` and `send` the app is called with."""

    __slots__ = (
        "scope",
        "conn",
        "transport",
        "chunks",
        "buffered",
        "body_done",
        "final_given",
        "waiter",
        "disconnected",
        "keep_alive",
        "expect_continue",
        "started",
        "complete",
        "chunked",
        "remaining",
        "head",
        "head_only",
    )

    def __init__(
        self, scope: dict[str, Any], conn: HttpProtocol, keep_alive: bool, expect_continue: bool
    ) -> None:
        self.scope = scope
        self.conn = conn
        self.transport = conn.transport
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.body_done = False  # the parser has the whole body
        self.final_given = False  # receive() returned the body's last part
        self.waiter: asyncio.Future[None] | None = None
        self.disconnected = False
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.started = False
        self.complete = False
        self.chunked: bool | None = None
        self.remaining = 0
        self.head: bytes | None = None  # a response head waiting for its body
        self.head_only = scope["method"] == "HEAD"

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def failed(self, exc: BaseException) -> None:
        """The app raised `exc`. The pipeline answers its own failures; what reaches here after
        the response began means "cut the connection" (an upstream that died mid-body): never a
        truncated answer passed off as whole. Re-raises what is not an `Exception`."""
        if not self.started:
            log.error("Exception in ASGI application", exc_info=exc)
            await self._send_500()
        else:
            log.debug("the response was cut: %r", exc)
            self.head = None
            self.conn.close()
            if not isinstance(exc, Exception):
                raise exc

    async def returned(self, result: object) -> None:
        """The app returned without raising: an answer it left unfinished is made good."""
        if result is not None:
            log.error("ASGI callable should return None, but returned %r.", result)
            self.conn.close()
        elif not self.started and not self.disconnected:
            log.error("ASGI callable returned without starting response.")
            await self._send_500()
        elif not self.complete and not self.disconnected:
            log.error("ASGI callable returned without completing response.")
            self.conn.close()

    async def _send_500(self) -> None:
        self.keep_alive = False
        status, headers, body = render(
            InternalError("the sidecar failed on this request"), new_request_id()
        )
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    async def receive(self) -> dict[str, Any]:
        if self.expect_continue:
            self.expect_continue = False
            if not self.transport.is_closing():
                self.conn.write(_CONTINUE)
        if not self.chunks and (not self.body_done or self.final_given):
            if not self.disconnected and not self.complete:
                conn = self.conn
                if conn.reading_paused and conn.cycle is self:
                    # (Not while a pipelined request waits behind this one: reading stays paused
                    # until its turn, or a client could queue requests without bound.)
                    conn.resume_reading()
                self.waiter = waiter = conn.loop.create_future()
                try:
                    await waiter
                finally:
                    self.waiter = None
        if self.disconnected or self.complete:
            return {"type": "http.disconnect"}
        chunks = self.chunks
        if len(chunks) == 1:
            body = chunks[0]
            chunks.clear()
        elif chunks:
            body = b"".join(chunks)
            chunks.clear()
        else:
            body = b""
        self.buffered = 0
        if self.conn.reading_paused and self.conn.cycle is self:
            self.conn.resume_reading()
        more = not self.body_done
        self.final_given = not more
        return {"type": "http.request", "body": body, "more_body": more}

    async def send(self, message: dict[str, Any]) -> None:
        conn = self.conn
        if conn.writing_paused and not self.disconnected:
            await conn.drain()
        if self.disconnected:
            return
        if not self.started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"expected http.response.start, got {message['type']!r}")
            self.started = True
            self.expect_continue = False
            self._start(message["status"], message.get("headers", ()))
            if not message.get(BODY_FOLLOWS):
                conn.loop.call_soon(self._flush_head)
            return
        if self.complete:
            raise RuntimeError(f"{message['type']!r} sent after the response completed")
        if message["type"] != "http.response.body":
            raise RuntimeError(f"expected http.response.body, got {message['type']!r}")
        self._body(message.get("body", b""), message.get("more_body", False))

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """A whole answer at once: `send`'s start (with `BODY_FOLLOWS`) and its one, last body
        message, without the two awaits and their messages (relay/http.py's small answer, found
        as `send.__self__`). False, having done nothing, when `send` must do it: the answer has
        begun, the client is gone, or writing waits for it to read."""
        if self.started or self.disconnected or self.conn.writing_paused:
            return False
        self.started = True
        self.expect_continue = False
        self._start(status, headers)
        self._body(body, False)
        return True

    def _body(self, body: bytes, more: bool) -> None:
        conn = self.conn
        if self.head_only:
            self.remaining = 0
            data = b""
        elif self.chunked:
            data = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            if not more:
                data += b"0\r\n\r\n"
        else:
            if len(body) > self.remaining:
                raise RuntimeError("Response content longer than Content-Length")
            self.remaining -= len(body)
            data = body
        head = self.head
        if head is not None:
            self.head = None
            if len(data) <= _CORK_BYTES:
                data = head + data
            else:
                conn.write(head)
        if data:
            if (
                not more
                and self.keep_alive
                and len(data) <= MAX_WAITING_BYTES
                and conn.outbox.requests > 1  # other requests in flight (outbox.py)
            ):
                conn.outbox.add(self.transport, data)
            else:
                conn.write(data)
        if not more:
            if self.remaining:
                raise RuntimeError("Response content shorter than Content-Length")
            self.complete = True
            self.wake()
            if not self.keep_alive:
                conn.close()
            conn.response_complete(self)

    def _start(self, status: int, headers: Any) -> None:
        parts: list[bytes] = [_STATUS_LINES.get(status) or _status_line(status)]
        closing = False
        lines = 1
        fields: list[Any] = headers if type(headers) is list else list(headers)
        for field in fields:  # (pairs: tuples or lists)
            name: bytes = field[0]
            value: bytes = field[1]
            if not name.islower():  # (no copy for the usual, already lower-case name)
                name = name.lower()
            size = len(name)
            if size == 14 and name == b"content-length":
                if self.chunked is None:
                    self.remaining = int(value)
                    self.chunked = False
            elif size == 17 and name == b"transfer-encoding":
                if value.lower() == b"chunked":
                    self.remaining = 0
                    self.chunked = True
            elif size == 10 and name == b"connection":
                if b"close" in [t.strip() for t in value.lower().split(b",")]:
                    self.keep_alive = False
                    closing = True
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
            lines += 1
        if not self.keep_alive and not closing:
            parts.append(b"connection: close\r\n")
            lines += 1
        if self.chunked is None and not self.head_only and status not in (204, 304):
            self.chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
            lines += 1
        parts.append(b"\r\n")
        head = b"".join(parts)
        # A CR or LF inside a name or value would start a header (or a body) of its own.
        if len(head) - len(head.translate(None, _CONTROLS)) != 2 * (lines + 1):
            raise RuntimeError("Invalid HTTP header name or value.")
        self.head = head

    def _flush_head(self) -> None:
        head = self.head
        if head is not None:
            self.head = None
            if not self.disconnected and not self.transport.is_closing():
                self.conn.write(head)


class HttpProtocol(asyncio.Protocol):
    """One client connection: requests parsed by httptools, each run as an ASGI task."""

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        max_head_bytes: int = 64 * 1024,
        head_timeout_s: float = 10.0,
    ) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.max_head_bytes = max_head_bytes
        self.head_timeout_s = head_timeout_s
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.ws_protocol_class = config.ws_protocol_class
        self.keep_alive_s = float(config.timeout_keep_alive)
        self.server_state = server_state
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.outbox = outbox_of(self.loop)
        self.app_state = app_state
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server: tuple[str, int | None] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        self.cycle: Cycle | None = None
        self.queued: deque[Cycle] = deque()  # pipelined requests, oldest on the right
        self.reading_paused = False
        self.writing_paused = False
        self._drained: asyncio.Future[None] | None = None
        # The request being parsed.
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.expect_continue = False
        self.in_head = True  # a head is arriving (or awaited: a new connection owes one)
        self.head_bytes = 0
        self.head_started = 0.0
        self.idle_since: float | None = None  # loop time the last response completed, if idle
        self._timer: asyncio.TimerHandle | None = None
        self._refusal: BadRequest | None = None
        # The connection's task, while it waits for its next request (see `_serve`).
        self._runner: asyncio.Task[None] | None = None
        self._next: asyncio.Future[Cycle | None] | None = None

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not asyncio's class
        self.connections.add(self)
        self.transport = transport
        self.server = get_local_addr(transport)
        self.client = get_remote_addr(transport)
        self.scheme = "https" if is_ssl(transport) else "http"
        self.head_started = self.loop.time()
        self._deadline(self.head_started + self.head_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self._stop_timer()
        for cycle in (self.cycle, *self.queued):
            if cycle is not None:
                if not cycle.complete:
                    cycle.disconnected = True
                cycle.wake()
        self.queued.clear()
        self._release_writers()
        self._dismiss_runner()
        if exc is None:
            self.transport.close()
        self.parser = None  # type: ignore[assignment]

    def eof_received(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        """Write now, after what waits in the outbox (a connection's bytes keep their order)."""
        self.outbox.flush()
        self.transport.write(data)

    def close(self) -> None:
        """Close after what waits in the outbox is written (a close would drop it)."""
        self.outbox.flush()
        self.transport.close()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self._release_writers()

    def _release_writers(self) -> None:
        self.writing_paused = False
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def drain(self) -> None:
        if self._drained is None:
            self._drained = self.loop.create_future()
        await asyncio.shield(self._drained)

    def pause_reading(self) -> None:
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.in_head:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._websocket_upgrade():
                self._upgrade()
                return
            log.warning("Unsupported upgrade request.")
        except httptools.HttpParserError:
            refusal, self._refusal = self._refusal, None
            if refusal is None:
                log.warning("Invalid HTTP request received.")
            self._answer(
                refusal
                or BadRequest(
                    "the request is not valid HTTP/1.1 (Invalid HTTP request received.)",
                    details={"reason": "malformed_request"},
                )
            )
            return
        if self.in_head and self.head_bytes > self.max_head_bytes:
            self.in_head = False
            self._answer(
                BadRequest(
                    "the request headers are larger than the limit",
                    details={"reason": "headers_too_large", "limit_bytes": self.max_head_bytes},
                )
            )

    # --- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.expect_continue = False
        self.in_head = True
        self.head_bytes = 0
        self.idle_since = None
        self.head_started = now = self.loop.time()
        self._deadline(now + self.head_timeout_s)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # httptools reports trailer fields through this callback too, once the head is over:
        # they are dropped (nothing judges or forwards them; the body is re-framed upstream).
        if self.in_head:
            name = name.lower()
            if name == b"expect" and value.lower() == b"100-continue":
                self.expect_continue = True
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0
        url = self.url
        parser = self.parser
        if url[:1] != b"/" and url != b"*":
            problem = absolute_form_problem(url, [v for n, v in self.headers if n == b"host"])
            if problem is not None:
                self._refusal = BadRequest(problem, details={"reason": "invalid_host"})
                raise _Refused
        if parser.should_upgrade() and self._websocket_upgrade():
            return  # data_received hands the connection to the WebSocket protocol
        http_version = parser.get_http_version()
        if url[:1] == b"/" and b"#" not in url:
            raw_path, _, query = url.partition(b"?")
        else:
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path, parsed.query or b""
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": http_version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": "",
            "method": parser.get_method().decode("ascii"),
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self.headers,
            "state": self.app_state.copy(),
        }
        keep_alive = http_version != "1.0" and parser.should_keep_alive()
        running = self.cycle
        self.cycle = cycle = Cycle(scope, self, keep_alive, self.expect_continue)
        if running is None or running.complete:
            self._start(cycle)
        else:
            # A pipelined request waits for the answer before it (and reading waits with it).
            self.pause_reading()
            self.queued.appendleft(cycle)

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if cycle is None or cycle.complete:
            return
        cycle.chunks.append(body)
        cycle.buffered += len(body)
        if cycle.buffered > _HIGH_WATER:
            self.pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if cycle is None or cycle.complete:
            return
        cycle.body_done = True
        cycle.wake()

    # --- requests and responses ------------------------------------------------------------------

    def _start(self, cycle: Cycle) -> None:
        self.outbox.requests += 1
        waiting, self._next = self._next, None
        runner = self._runner
        if waiting is not None and not waiting.done() and runner is not None:
            # The connection's task waits for this request: it runs it (see `_serve`).
            self.tasks.add(runner)
            waiting.set_result(cycle)
            return
        self.tasks.add(self.loop.create_task(self._serve(cycle)))

    async def _serve(self, cycle: Cycle | None) -> None:
        """Run `cycle`, then the connection's next requests as they come, in this one task.

        A task a request cost its creation, the copy of the context, the registration in
        asyncio's set of all tasks (interpreted Python on 3.11, twice) and its teardown; a
        keep-alive connection's task waits on a future for its next request instead. It is in
        uvicorn's `tasks` (what a graceful shutdown waits for) only while it runs a request.
        A request started while this task still finishes the one before (a pipelined request,
        or a head arriving as the answer before it ends) gets a task of its own, as before, and
        the first of the two to finish is the one that waits for the next."""
        app = self.app
        runner = asyncio.current_task()  # (this task, in `tasks` from `_start` on)
        while cycle is not None:
            # (The app is awaited here, not in a method of the cycle: a coroutine between the
            # task and the app would be one more frame to pass through at every suspension.)
            try:
                try:
                    result = await app(cycle.scope, cycle.receive, cycle.send)
                except BaseException as exc:
                    await cycle.failed(exc)
                else:
                    if result is not None or not (cycle.complete or cycle.disconnected):
                        await cycle.returned(result)
            finally:
                # What uvicorn's graceful shutdown waits for, and the outbox's count (a done
                # callback per task would cost a callback per request; a task cancelled before
                # it ever ran is only cancelled at the end of that wait, when nothing reads
                # either).
                self.tasks.discard(runner)
                self.outbox.requests -= 1
            if self._next is not None or self.parser is None or self.transport.is_closing():
                return  # another task waits already, or the connection is over
            self._runner = runner
            self._next = waiting = self.loop.create_future()
            cycle = None  # (the answered request is not kept while the connection idles)
            cycle = await waiting

    def _dismiss_runner(self) -> None:
        """The connection's waiting task ends: no request will come to it."""
        waiting, self._next = self._next, None
        self._runner = None
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    def response_complete(self, cycle: Cycle) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.resume_reading()
        if self.queued:
            self._start(self.queued.pop())
        elif cycle is self.cycle and not self.in_head:  # (a next head may be arriving)
            self.idle_since = now = self.loop.time()
            self._deadline(now + self.keep_alive_s)

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: an idle connection closes now, a busy one after its
        answer."""
        cycle = self.cycle
        if cycle is None or cycle.complete:
            self.close()
        else:
            cycle.keep_alive = False

    # --- the connection's timer ------------------------------------------------------------------

    def _deadline(self, when: float) -> None:
        """The timer fires by `when`: armed if none is, moved if it would fire later. A timer
        that fires early checks and re-arms: under load a busy connection costs no timer calls."""
        timer = self._timer
        if timer is None:
            self._timer = self.loop.call_at(when, self._check)
        elif timer.when() > when:
            timer.cancel()
            self._timer = self.loop.call_at(when, self._check)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        deadlines = []
        if self.in_head:
            deadline = self.head_started + self.head_timeout_s
            if now >= deadline:
                self.close()  # the head did not arrive in time
                return
            deadlines.append(deadline)
        if self.idle_since is not None:
            deadline = self.idle_since + self.keep_alive_s
            if now >= deadline:
                self.close()  # keep-alive over
                return
            deadlines.append(deadline)
        if deadlines:
            self._timer = self.loop.call_at(min(deadlines), self._check)

    # --- WebSocket upgrades and refusals ---------------------------------------------------------

    def _websocket_upgrade(self) -> bool:
        if self.ws_protocol_class is None:
            return False
        tokens: list[bytes] = []
        upgrade = None
        for name, value in self.headers:
            if name == b"connection":
                tokens = [t.strip() for t in value.lower().split(b",")]
            elif name == b"upgrade":
                upgrade = value.lower()
        return upgrade == b"websocket" and b"upgrade" in tokens

    def _upgrade(self) -> None:
        """The connection is the WebSocket protocol's from here (it parses the head again)."""
        self.outbox.flush()  # an answer before the upgrade goes first
        self.connections.discard(self)
        self._stop_timer()
        self._dismiss_runner()
        head = [self.parser.get_method(), b" ", self.url, b" HTTP/1.1\r\n"]
        for name, value in self.headers:
            head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        protocol = self.ws_protocol_class(
            config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        protocol.connection_made(self.transport)
        protocol.data_received(b"".join(head))
        self.transport.set_protocol(protocol)
        # The parser and this protocol refer to each other: let both go now, not at the
        # collector's next pass (an idle WebSocket should cost its own state only).
        self.parser = None  # type: ignore[assignment]
        self.headers = []

    def _answer(self, error: BadRequest) -> None:
        """The JSON error, then the connection closes: the parser cannot go on after it."""
        self._stop_timer()
        if self.transport.is_closing():
            return
        _, headers, body = render(error, new_request_id())
        head = b"HTTP/1.1 400 Bad Request\r\n" + b"".join(
            name + b": " + value + b"\r\n" for name, value in headers
        )
        self.write(head + b"connection: close\r\n\r\n" + body)
        self.close()


def http_protocol(max_head_bytes: int, head_timeout_s: float) -> type[HttpProtocol]:
    """The protocol with these limits, for uvicorn's `http=` setting (which only calls it).

    A factory, not a subclass: a Python subclass of the compiled class (mypyc) would send every
    call between its own methods through the slower interpreted path."""
    factory = functools.partial(
        HttpProtocol, max_head_bytes=max_head_bytes, head_timeout_s=head_timeout_s
    )
    return cast("type[HttpProtocol]", factory)
