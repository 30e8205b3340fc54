"""uvicorn's sans-I/O WebSocket protocol, lighter for a connection that stays open for hours and
cheaper per message.

uvicorn keeps the handshake's request and response (every header, parsed) on the protocol for the
connection's whole life; they are never read again once the handshake is answered. With thousands
of idle model-event feeds open that is kilobytes a socket, so they are let go after the answer.

For the tunnel (relay/tunnel.py), three things beside ASGI, found through `send.__self__`:

- `relay` takes each whole client message as it is parsed, in `data_received`: no ASGI message,
  no queue, no task switch, no pause and resume of reading per message (a message it declines,
  say a re-authentication, goes through `receive` as uvicorn would send it);
- `write_message` frames a whole message and writes it at once, from a callback (the upstream
  connection's `data_received`): the other direction, as cheaply;
- `paired`, a transport whose reading follows this connection's writing: paused while the
  client's write buffer is over its high-water mark, resumed once it drained. That is the
  backpressure of direct writes (a slow client stops the upstream read);
- `relay_frames(sink)`: from then on, each whole data frame the client sends goes to the sink as
  it arrived, masked, before websockets' parser sees it (wsframes.py says which and why). Only
  while neither hop compresses (`compresses`).

A contract test (tests/test_library_hooks.py) fails if uvicorn renames what this relies on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.http11 import Request

from .wsframes import utf8_valid
from .wssplit import SplitsFrames


class LeanWebSocketProtocol(SplitsFrames, WebSocketsSansIOProtocol):
    """Drops the parsed handshake once the connection is accepted; writes relayed messages
    directly."""

    # Slots: new names in uvicorn's instance dict would grow it by a kilobyte.
    __slots__ = ("paired", "relay")
    _MASKED = True  # a client's frames

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The upstream transport whose reading follows our writing (None: no session relays).
        self.paired: asyncio.Transport | None = None
        # Takes a whole client message at once (text: valid UTF-8), True when it did; False
        # leaves it to ASGI `receive`, queued with reading paused until it is taken, as uvicorn
        # does. None: all go to `receive` (no session relays, or it is busy with an earlier one).
        self.relay: Callable[[bytes, bool], bool] | None = None
        # What uvicorn uses of an asyncio.Queue and an asyncio.Event, without their deques: a
        # Queue is four (with its `_finished` Event), an Event one, some 760 B each a socket.
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The scope has its headers now (and the response its answer): nothing reads the parsed
        # request's again, but websockets' handshake parser keeps the request in its frame for
        # the connection's life. Emptied in place, a kilobyte or more a socket.
        event.headers.clear()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if self.handshake_complete and getattr(self, "response", None) is not None:
            self.request = None  # type: ignore[assignment]
            self.response = None  # type: ignore[assignment]

    def _ws(self) -> Any:
        return self.conn

    def compresses(self) -> bool:
        """Whether this hop negotiated an extension (permessage-deflate)."""
        return bool(self.conn.extensions)

    def send_receive_event_to_app(self) -> None:
        relay = self.relay
        if relay is not None and not self.close_sent and self.queue.empty():
            frames = self.frames
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            text = self.curr_msg_data_type == "text"
            if (not text or utf8_valid(data)) and relay(data, text):
                self.frames = []
                return
        super().send_receive_event_to_app()  # queued for `receive` (or refused: bad UTF-8)

    def write_message(self, data: bytes, text: bool) -> bool:
        """Send one whole message now (text: `data` is valid UTF-8). False when the connection
        takes no more messages: closing, closed, or the client's close frame already in."""
        if self.close_sent or self.disconnected:
            return False
        conn = self.conn
        try:
            if text:
                conn.send_text(data)
            else:
                conn.send_binary(data)
        except InvalidState:
            return False
        self.transport.write(b"".join(conn.data_to_send()))
        return True

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.paired is not None:
            self.paired.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.paired is not None:
            self.paired.resume_reading()

    def pair(self, transport: asyncio.Transport) -> None:
        """A session relays here: `transport` reads only while we can write (paused now if our
        write buffer is already full)."""
        self.paired = transport
        if not self.writable.is_set():
            transport.pause_reading()

    def unpair(self) -> None:
        """The session is over: the upstream's reading no longer follows us (and is not left
        paused: its closing handshake needs it)."""
        paired, self.paired = self.paired, None
        if paired is not None and not self.writable.is_set():
            paired.resume_reading()


class _Waiting:
    """Futures of those waiting, in a list made only once one waits (most sockets never do)."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] | None = None

    def _waiter(self) -> asyncio.Future[None]:
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        return waiter

    def _wake(self, skip: asyncio.Future[None] | None = None) -> None:
        """The first waiter still waiting (but `skip`)."""
        for waiter in self._waiters or ():
            if waiter is not skip and not waiter.done():
                waiter.set_result(None)
                return


class Inbox(_Waiting):
    """The connection's inbound ASGI messages: what uvicorn uses of `asyncio.Queue` (put_nowait,
    get, empty), in a list. uvicorn pauses reading once a message waits, so it stays short."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        super().__init__()
        # Public for the frame relay (relay/ws_passthrough.py), which asks "empty?" without a call.
        self.items: list[Any] = []

    def put_nowait(self, item: Any) -> None:
        self.items.append(item)
        if self._waiters:
            self._wake()

    def empty(self) -> bool:
        return not self.items

    async def get(self) -> Any:
        while not self.items:
            waiter = self._waiter()
            try:
                await waiter
            except BaseException:
                # Woken and cancelled at once: the message is another getter's to take.
                if waiter.done() and not waiter.cancelled() and self.items:
                    self._wake(skip=waiter)
                raise
            finally:
                self._waiters.remove(waiter)  # type: ignore[union-attr]
        return self.items.pop(0)


class Flag(_Waiting):
    """uvicorn's `writable`: what it uses of `asyncio.Event` (set, clear, wait), set at first, and
    without a deque of waiters until one waits."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        super().__init__()
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if not self._set:
            self._set = True
            for waiter in self._waiters or ():
                if not waiter.done():
                    waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        waiter = self._waiter()
        try:
            await waiter
            return True
        finally:
            self._waiters.remove(waiter)  # type: ignore[union-attr]
