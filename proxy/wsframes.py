"""A hop's inbound WebSocket bytes split at frame boundaries, so that a whole data frame can be
relayed as it arrived: past both hops' WebSocket parsers, not unmasked, not framed again.

A client's frame is masked, and an upstream takes masked frames; an upstream's frame is not, and a
client takes unmasked frames. So when neither hop compresses, a whole, unfragmented text or binary
frame means the same on the other hop byte for byte. Relaying it as it is costs a look at its head
(and for text, a UTF-8 check), where parsing it into a message and framing that again costs
websockets' parser and serializer, a mask, and an ASGI message's worth of calls.

Everything else goes to the hop's own parser, in order, as before: control frames (pings, pongs,
closes, so both closing handshakes and the keepalive are websockets' as ever), fragments and what
follows them until the message ends, compressed frames (RSV1), frames with any other reserved bit
or the wrong masking (which the parser refuses), frames over `max_size` (refused there with 1009)
or over `FAST_MAX` (a whole frame waits in memory before it is relayed; a bigger one streams into
the parser), and every frame the hop is not `ready` to relay (a message queued for ASGI `receive`
ahead of it, or the session ending). A frame the relay declines (`take` returns False: a buffer
is full, it may be a re-authentication, it is not valid UTF-8) goes to the parser as well.
"""

from __future__ import annotations

from typing import Any, Final

from mypy_extensions import mypyc_attr

# The biggest frame relayed whole: it waits in memory until its last byte has arrived.
FAST_MAX: Final = 64 * 1024

# Final: compiled, each is a constant in the code, not a look-up in the module's dict a frame.
OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
_FIN: Final = 0x80
_MASKED: Final = 0x80


def utf8_valid(data: bytes) -> bool:
    """Whether a text payload is valid UTF-8 (isascii is a quick yes for most)."""
    if data.isascii():
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def at_frame_boundary(protocol: Any) -> bool:
    """Whether websockets' parser of `protocol` (a sans-I/O `Protocol`) waits for the first byte
    of a frame: only from there can a splitter take over the bytes. Each round of its parser
    begins with `yield from reader.at_eof()`, which suspends only when nothing is buffered; in a
    frame it waits in `read_exact` instead, with the header maybe taken and the buffer maybe
    empty; before the handshake's end, in its HTTP parser. (tests/test_library_hooks.py fails
    if websockets changes this.)"""
    waiting: Any = protocol.parser
    while True:  # to the innermost generator (a server's and a client's parse wrap the base's)
        inner = getattr(waiting, "gi_yieldfrom", None)
        if inner is None:
            break
        waiting = inner
    return getattr(waiting, "__name__", "") == "at_eof"


def splitter_at_boundary(sink: FrameSink, protocol: Any, *, masked: bool) -> FrameSplitter | None:
    """A splitter of `protocol`'s bytes (websockets' sans-I/O protocol of a hop) to `sink`, or
    None while its parser is inside a frame (ask again after the next bytes)."""
    if not at_frame_boundary(protocol):
        return None
    limits = (protocol.max_message_size, protocol.max_fragment_size)
    return FrameSplitter(sink, masked=masked, max_sizes=limits)


@mypyc_attr(allow_interpreted_subclasses=True)
class FrameSink:
    """Where a hop's split frames go (relay/ws_passthrough.py has the tunnel's two)."""

    def ready(self) -> bool:
        """Whether whole data frames may be relayed now."""
        return False

    def take(self, frame: bytes, head: int, text: bool) -> bool:
        """A whole data frame (`head`: its header's length): True when relayed; False hands it to
        the parser."""
        return False

    def parse(self, data: bytes) -> None:
        """Bytes for the hop's own parser, in order: whole frames, or the start of one whose rest
        follows in the next call. Every sink has a parser behind it: none may drop bytes."""
        raise NotImplementedError


class FrameFeed:
    """A hop's protocol as its transport sees it once a splitter has its bytes for good: each read
    goes straight to the splitter (compiled) instead of through the protocol's `data_received`,
    an interpreted method of the library's class (wssplit.py), and the rest of the protocol's
    callbacks to the protocol itself. uvloop binds `data_received` once, when the protocol is set
    (`transport.set_protocol`): this object is set in the protocol's place."""

    def __init__(self, protocol: Any, splitter: FrameSplitter) -> None:
        self.protocol = protocol
        self.splitter = splitter

    def data_received(self, data: bytes) -> None:
        self.splitter.feed(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self.protocol.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()


class FrameSplitter:
    """One hop's inbound bytes, at frame boundaries: whole data frames to the sink's `take`, the
    rest to its `parse`. `masked`: the frames this hop receives are masked (the client's hop)."""

    def __init__(
        self, sink: FrameSink, *, masked: bool, max_sizes: tuple[int | None, int | None]
    ) -> None:
        self.sink = sink
        self._pending = b""  # the start of a frame whose head or body is not all in yet
        self._parse_left = 0  # bytes of a frame the parser has begun and not yet had in full
        self._fragmented = False  # the parser is inside a fragmented message
        self._masked = masked
        # websockets' (max_message_size, max_fragment_size): a bigger frame is the parser's to
        # refuse.
        self._max = min([FAST_MAX, *(limit for limit in max_sizes if limit is not None)])

    def feed(self, data: bytes) -> None:
        sink = self.sink
        if self._pending:
            data = self._pending + data
            self._pending = b""
        end = len(data)
        pos = 0
        while pos < end:
            left = self._parse_left
            if left:
                n = min(left, end - pos)
                self._parse_left = left - n
                sink.parse(data if n == end else data[pos : pos + n])
                pos += n
                continue
            available = end - pos
            if available < 2:
                self._pending = data[pos:]
                return
            b0 = data[pos]
            b1 = data[pos + 1]
            size = b1 & 0x7F
            head = 2 if size < 126 else 4 if size == 126 else 10  # 16- or 64-bit length
            if available < head:
                self._pending = data[pos:]
                return
            if head > 2:
                size = int.from_bytes(data[pos + 2 : pos + head], "big")
            if b1 & _MASKED:
                head += 4
            total = head + size
            opcode = b0 & 0x0F
            if (
                (b0 & 0xF0) == _FIN  # whole, no reserved bit (not compressed)
                and (opcode == OP_TEXT or opcode == OP_BINARY)
                and not self._fragmented
                and ((b1 & _MASKED) != 0) == self._masked
                and size <= self._max
                and sink.ready()
            ):
                if available < total:
                    self._pending = data[pos:]
                    return
                frame = data if total == end else data[pos : pos + total]
                pos += total
                if not sink.take(frame, head, opcode == OP_TEXT):
                    sink.parse(frame)
                continue
            # The parser's: follow where it is in a fragmented message.
            if opcode == OP_TEXT or opcode == OP_BINARY:
                self._fragmented = not (b0 & _FIN)
            elif opcode == OP_CONT and b0 & _FIN:
                self._fragmented = False
            n = min(total, available)
            self._parse_left = total - n
            sink.parse(data if n == end else data[pos : pos + n])
            pos += n
