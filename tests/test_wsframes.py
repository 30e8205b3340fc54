"""The frame splitter (proxy/wsframes.py): whichever way the bytes are cut, every byte reaches the
relay or the parser exactly once and in order; the relay gets exactly the whole, unfragmented,
uncompressed data frames within the size limit, and only while the hop is ready; a frame the relay
declines, and everything it is not given, reaches the parser."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.wsframes import FAST_MAX, FrameSink, FrameSplitter, utf8_valid


@dataclass(frozen=True)
class F:
    """One frame on the wire, and what the splitter must do with it."""

    raw: bytes
    fin: bool
    rsv: int
    opcode: int
    masked: bool
    size: int


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0) -> F:
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, mask_bit | n))
    elif n < 0x10000:
        head = struct.pack("!BBH", b0, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mask_bit | 127, n)
    if masked:
        head += os.urandom(4)  # the payload stays as it is: the splitter never unmasks
    return F(head + payload, fin, rsv, opcode, masked, n)


def expected_takes(frames: list[F], *, masked: bool, limit: int) -> list[bool]:
    """Which frames a ready hop whose relay accepts everything must be given whole."""
    out, fragmented = [], False
    for f in frames:
        data = f.opcode in (1, 2)
        eligible = (
            f.fin
            and f.rsv == 0
            and data
            and not fragmented
            and f.masked == masked
            and f.size <= limit
        )
        out.append(eligible)
        if not eligible:
            if data:
                fragmented = not f.fin
            elif f.opcode == 0 and f.fin:
                fragmented = False
    return out


class Recorder(FrameSink):
    """A sink that records what it gets (an interpreted subclass of the compiled base)."""

    def __init__(self, *, ready: bool = True, accept: bool = True) -> None:
        self.is_ready = ready
        self.accept = accept
        self.events: list[tuple[str, bytes]] = []

    def ready(self) -> bool:
        return self.is_ready

    def take(self, frame: bytes, head: int, text: bool) -> bool:
        assert 2 <= head <= 14 and len(frame) >= head
        assert text == ((frame[0] & 0x0F) == 1)
        if self.accept:
            self.events.append(("take", frame))
        return self.accept

    def parse(self, data: bytes) -> None:
        assert data, "the parser is never fed nothing"
        self.events.append(("parse", data))


def run(
    stream: bytes,
    cuts: list[int],
    *,
    masked: bool = True,
    max_sizes: tuple[int | None, int | None] = (None, None),
    ready: bool = True,
    accept: bool = True,
) -> list[tuple[str, bytes]]:
    sink = Recorder(ready=ready, accept=accept)
    splitter = FrameSplitter(sink, masked=masked, max_sizes=max_sizes)
    at = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        if cut > at:
            splitter.feed(stream[at:cut])
            at = cut
    return sink.events


def parsed_between_takes(events: list[tuple[str, bytes]]) -> list[bytes]:
    runs, current = [], b""
    for kind, data in events:
        if kind == "take":
            runs.append(current)
            current = b""
        else:
            current += data
    runs.append(current)
    return runs


_payload = st.one_of(
    st.binary(max_size=200),
    st.integers(126, 70_000).map(lambda n: b"x" * n),  # 16- and 64-bit lengths, over FAST_MAX
)
_frame = st.builds(
    lambda opcode, payload, fin, masked, rsv: frame(
        opcode, payload[:125] if opcode >= 8 else payload, fin=fin, masked=masked, rsv=rsv
    ),
    opcode=st.sampled_from([0, 1, 2, 8, 9, 10]),
    payload=_payload,
    fin=st.booleans(),
    masked=st.booleans(),
    rsv=st.sampled_from([0, 0, 0, 4, 1]),
)


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(_frame, max_size=12),
    cut_points=st.lists(st.floats(0, 1), max_size=10),
    masked=st.booleans(),
    max_size=st.sampled_from([None, 100, 1 << 20]),
)
def test_every_byte_once_in_order_and_exactly_the_whole_data_frames_taken(
    frames: list[F], cut_points: list[float], masked: bool, max_size: int | None
) -> None:
    stream = b"".join(f.raw for f in frames)
    cuts = [int(p * len(stream)) for p in cut_points]
    limit = min(FAST_MAX, max_size or FAST_MAX)
    events = run(stream, cuts, masked=masked, max_sizes=(max_size, None))

    assert b"".join(data for _, data in events) == stream  # once each, in order
    takes = expected_takes(frames, masked=masked, limit=limit)
    assert [data for kind, data in events if kind == "take"] == [
        f.raw for f, taken in zip(frames, takes, strict=True) if taken
    ]
    # Between two frames taken, the parser had exactly the frames in between.
    runs, current = [], b""
    for f, taken in zip(frames, takes, strict=True):
        if taken:
            runs.append(current)
            current = b""
        else:
            current += f.raw
    runs.append(current)
    assert parsed_between_takes(events) == runs


@settings(max_examples=100, deadline=None)
@given(frames=st.lists(_frame, max_size=8), cut_points=st.lists(st.floats(0, 1), max_size=6))
def test_a_hop_not_ready_or_a_relay_declining_hands_everything_to_the_parser(
    frames: list[F], cut_points: list[float]
) -> None:
    stream = b"".join(f.raw for f in frames)
    cuts = [int(p * len(stream)) for p in cut_points]
    for ready, accept in ((False, True), (True, False)):
        events = run(stream, cuts, ready=ready, accept=accept)
        assert all(kind == "parse" for kind, _ in events)
        assert b"".join(data for _, data in events) == stream


def test_a_whole_frame_waits_for_its_last_byte_and_is_taken_as_one() -> None:
    f = frame(1, b"hello, model events", masked=True)
    events = run(f.raw, [1, 3, 9])
    assert events == [("take", f.raw)]


def test_the_limits_are_the_smaller_of_websockets_two_and_fast_max() -> None:
    big = frame(2, b"y" * 200, masked=False)
    for sizes, taken in (((100, None), False), ((None, 100), False), ((None, 300), True)):
        events = run(big.raw, [], masked=False, max_sizes=sizes)
        assert [kind for kind, _ in events] == ["take" if taken else "parse"]
    over = frame(2, b"z" * (FAST_MAX + 1), masked=False)
    events = run(over.raw, [10, 5000], masked=False)
    assert {kind for kind, _ in events} == {"parse"}  # streamed to the parser as it came


def test_a_fragmented_message_and_its_interleaved_control_frames_go_to_the_parser() -> None:
    first = frame(1, b"part one ", fin=False)
    ping = frame(9, b"p")
    last = frame(0, b"part two")
    after = frame(1, b"whole")
    stream = first.raw + ping.raw + last.raw + after.raw
    events = run(stream, [])
    assert events == [
        ("parse", first.raw),
        ("parse", ping.raw),
        ("parse", last.raw),
        ("take", after.raw),
    ]


def test_utf8_valid() -> None:
    assert utf8_valid(b"plain ascii")
    assert utf8_valid("caf\u00e9 \u2603".encode())
    assert not utf8_valid(b"\xff\xfe")
    assert not utf8_valid(b"\xed\xa0\x80")  # a surrogate: not UTF-8


def test_once_a_splitter_takes_over_the_transport_reads_into_it_directly() -> None:
    """On a real uvloop socket: the hop's transport gets a FrameFeed in the protocol's place, so a
    read reaches the (compiled) splitter without the protocol's interpreted `data_received`; the
    frames are taken whole and in order, a ping still reaches the hop's parser, and the end of the
    connection still reaches the protocol."""
    import asyncio

    import uvloop
    from websockets.protocol import Protocol, Side, State

    from proxy.wsframes import FrameFeed
    from proxy.wssplit import SplitsFrames

    class Base(asyncio.Protocol):
        def __init__(self) -> None:
            self.parsed = b""
            self.lost = asyncio.get_running_loop().create_future()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:  # the library's parser, as far as it goes
            self.parsed += data

        def connection_lost(self, exc: Exception | None) -> None:
            self.lost.set_result(exc)

    class Hop(SplitsFrames, Base):
        _MASKED = True

        def __init__(self) -> None:
            super().__init__()
            self.ws = Protocol(Side.SERVER, state=State.OPEN)

        def _ws(self) -> Protocol:
            return self.ws

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.relay_frames(sink)

    class Sink(FrameSink):
        def __init__(self) -> None:
            self.taken: list[bytes] = []
            self.hop: Hop | None = None

        def ready(self) -> bool:
            return True

        def take(self, frame: bytes, head: int, text: bool) -> bool:
            self.taken.append(frame)
            return True

        def parse(self, data: bytes) -> None:
            assert self.hop is not None
            self.hop.parse_frames(data)

    sink = Sink()
    texts = [frame(0x1, f"message {n}".encode()).raw for n in range(3)]
    ping = frame(0x9, b"p").raw

    async def main() -> None:
        hops: list[Hop] = []

        def made() -> Hop:
            hop = Hop()
            sink.hop = hop
            hops.append(hop)
            return hop

        server = await asyncio.get_running_loop().create_server(made, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(texts[0] + ping + texts[1][:3])
        await asyncio.sleep(0.05)
        writer.write(texts[1][3:] + texts[2])
        await asyncio.sleep(0.05)
        (hop,) = hops
        assert isinstance(hop.transport.get_protocol(), FrameFeed)  # type: ignore[attr-defined]
        assert sink.taken == texts and hop.parsed == ping
        writer.close()
        assert await asyncio.wait_for(hop.lost, 5) is None
        server.close()

    uvloop.run(main())
