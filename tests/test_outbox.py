"""proxy/outbox.py: writes of one loop round, made together at its end, on real loopback sockets."""

from __future__ import annotations

import asyncio

from proxy.outbox import Outbox, outbox_of


class Collect(asyncio.Protocol):
    """The reading end: what arrived on one accepted connection."""

    def __init__(self, arrived: list[bytearray]) -> None:
        self.data = bytearray()
        arrived.append(self.data)

    def data_received(self, data: bytes) -> None:
        self.data += data


async def pairs(n: int) -> tuple[list[asyncio.Transport], list[bytearray], asyncio.Server]:
    """`n` client transports to a loopback server; `arrived[i]` fills with what the i-th sent."""
    loop = asyncio.get_running_loop()
    arrived: list[bytearray] = []
    server = await loop.create_server(lambda: Collect(arrived), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transports = []
    for _ in range(n):
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        transports.append(transport)
        while len(arrived) < len(transports):  # accepted in order: one at a time
            await asyncio.sleep(0.001)
    return transports, arrived, server


async def arrive(arrived: list[bytearray], expected: list[bytes]) -> None:
    for _ in range(500):
        if [bytes(a) for a in arrived] == expected:
            return
        await asyncio.sleep(0.002)
    assert [bytes(a) for a in arrived] == expected


async def test_writes_of_a_round_reach_their_connections_in_order_at_its_end() -> None:
    (a, b), arrived, server = await pairs(2)
    outbox = outbox_of(asyncio.get_running_loop())
    outbox.add(a, b"a1 ")
    outbox.add(b, b"b1 ")
    outbox.add(a, b"a2")
    assert outbox.scheduled and len(outbox.pending) == 3  # nothing written yet
    await asyncio.sleep(0)  # the round ends
    assert not outbox.pending and not outbox.scheduled
    await arrive(arrived, [b"a1 a2", b"b1 "])
    a.close()
    b.close()
    server.close()


async def test_a_flush_writes_at_once_and_the_round_end_then_has_nothing_left() -> None:
    (a,), arrived, server = await pairs(1)
    outbox = outbox_of(asyncio.get_running_loop())
    outbox.add(a, b"first ")
    outbox.flush()  # what a write or close on a connection does before its own
    a.write(b"second")
    await asyncio.sleep(0)
    await arrive(arrived, [b"first second"])
    a.close()
    server.close()


async def test_a_connection_closed_meanwhile_is_skipped_and_the_others_written() -> None:
    (a, b), arrived, server = await pairs(2)
    outbox = outbox_of(asyncio.get_running_loop())
    outbox.add(a, b"lost")
    outbox.add(b, b"kept")
    a.abort()  # its reader left: nobody to write to
    await asyncio.sleep(0)
    await arrive(arrived, [b"", b"kept"])
    b.close()
    server.close()


async def test_each_loop_has_its_own_outbox() -> None:
    loop = asyncio.get_running_loop()
    assert outbox_of(loop) is outbox_of(loop)
    other = asyncio.new_event_loop()
    try:
        theirs = outbox_of(other)
        assert isinstance(theirs, Outbox) and theirs is not outbox_of(loop)
        assert theirs.loop is other
    finally:
        other.close()


class Broken:
    """A transport whose write fails (no real socket fails on demand)."""

    def __init__(self) -> None:
        self.aborted = False

    def is_closing(self) -> bool:
        return self.aborted

    def write(self, data: bytes) -> None:
        raise RuntimeError("broken")

    def abort(self) -> None:
        self.aborted = True


async def test_a_write_that_fails_aborts_its_connection_and_the_others_are_written() -> None:
    (a,), arrived, server = await pairs(1)
    outbox = outbox_of(asyncio.get_running_loop())
    broken = Broken()
    outbox.add(broken, b"lost")  # type: ignore[arg-type]
    outbox.add(a, b"kept")
    await asyncio.sleep(0)
    assert broken.aborted and not outbox.pending
    await arrive(arrived, [b"kept"])
    a.close()
    server.close()
