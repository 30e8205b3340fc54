"""Small writes of one loop round, made together at its end.

On loopback, most of a `write` is the kernel handing the bytes to the reader and waking it up: on
the 2-core VM of BENCHMARKS.md, waking a peer that sleeps costs more than the rest of the system
call (`sock_def_readable`, with interrupts held off while the other core is signalled). Written
one by one, each with a request's Python work before it, every answer wakes its client again;
written back to back, the first wakes it and the others find it awake. At 32 connections that
was 14% less CPU a request and 15% more requests a second (JWT route, interleaved A/B).

Who waits here, and when:

- a whole, small answer on a kept-alive client connection, while other requests are in flight
  (http11.py). Alone on the loop, it goes at once: nothing to join, and no added latency at one
  connection;
- a small write toward the upstream, when this round already has writes waiting (relay/upstream.py).

Every other write, and every close, on a connection that may have bytes waiting here first writes
what waits (`flush`): a connection's bytes keep their order, and a close never drops an answer.
A connection closed by the peer meanwhile is skipped: nobody is left to read it.
"""

from __future__ import annotations

import asyncio
import logging
import weakref

log = logging.getLogger("authproxy.server")

# The most a write may be to wait here: bigger ones are a body being streamed, whose flow control
# (pause_writing, drain) must see the bytes in the transport's buffer.
MAX_WAITING_BYTES = 16 * 1024


class Outbox:
    """One loop's writes waiting for the end of its current round of callbacks."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[tuple[asyncio.Transport, bytes]] = []
        self.scheduled = False  # a round's end is awaited (writes wait, or did this round)
        # HTTP requests being answered on this loop (http11.py counts them; a WebSocket session
        # is none: hours open, it must not make every answer wait).
        self.requests = 0

    def add(self, transport: asyncio.Transport, data: bytes) -> None:
        self.pending.append((transport, data))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._round_over)

    def _round_over(self) -> None:
        self.scheduled = False
        self.flush()

    def flush(self) -> None:
        """Write what waits, now (nothing to do, the usual case, is one test)."""
        pending = self.pending
        if pending:
            self.pending = []
            for transport, data in pending:
                if transport.is_closing():
                    continue
                try:
                    transport.write(data)
                except Exception as exc:  # that connection is broken: the others still get theirs
                    log.debug("a waiting write failed: %r", exc)
                    transport.abort()


_OUTBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Outbox] = (
    weakref.WeakKeyDictionary()
)


def outbox_of(loop: asyncio.AbstractEventLoop) -> Outbox:
    """The loop's outbox: the writes of all its connections wait together."""
    outbox = _OUTBOXES.get(loop)
    if outbox is None:
        outbox = _OUTBOXES[loop] = Outbox(loop)
    return outbox
