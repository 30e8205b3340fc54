"""The tunnel's direct relay under uvicorn (messages framed and written from each connection's
`data_received`, not through ASGI and a task): what an ASGI upstream cannot send, from a
websockets upstream in this process (a greeting before the client speaks, fragmented messages,
invalid UTF-8), through a real sidecar to a real client; how the tunnel finds a direct client;
the frames it writes upstream itself; the protocol's lean queue and flag."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from proxy.relay.tunnel import _client_frame, _Masks, direct_client
from proxy.wsprotocol import Flag, Inbox, LeanWebSocketProtocol
from tests.relay.test_websocket_tunnel import (  # noqa: F401 (a fixture: every test runs both ways)
    bearer,
    client_compression,
    close_of,
    open_ws,
    ws_log_lines,
)
from tests.support.servers import Sidecar, start_sidecar
from tests.test_library_hooks import FakeTransport

SECRET = "tunnel-test-secret-of-at-least-32-bytes!"
CONFIG = """
[[auth.jwt.providers]]
name = "test"
issuer = "https://issuer.test"
audiences = ["webplus"]
secret_env = "TUNNEL_TEST_SECRET"
algorithms = ["HS256"]
leeway_s = 0

[[routes]]
path = "/ws/*"
auth = ["jwt"]
"""

Handler = Callable[[ServerConnection], Any]


class RecordingServer(ServerConnection):
    """The upstream's connection, keeping every byte it receives (`wire`)."""

    wire: list[bytes]

    def connection_made(self, transport: Any) -> None:
        self.wire = []
        WIRES.append(self.wire)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.wire.append(data)
        super().data_received(data)


WIRES: list[list[bytes]] = []  # each upstream connection's bytes, in order of connection


class _Tap:
    """A transport that keeps what is written through it."""

    def __init__(self, transport: Any, written: list[bytes]) -> None:
        self._transport = transport
        self._written = written

    def write(self, data: bytes) -> None:
        self._written.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class RecordingClient(ClientConnection):
    """A client connection keeping every byte it writes (`sent`)."""

    def connection_made(self, transport: Any) -> None:
        self.sent: list[bytes] = []
        super().connection_made(transport)
        self.transport = _Tap(transport, self.sent)  # type: ignore[assignment]


class Upstream:
    """A websockets server whose behaviour each test sets (`handler`); what it received."""

    def __init__(self) -> None:
        self.handler: Handler | None = None
        self.received: list[str | bytes] = []

    async def __call__(self, ws: ServerConnection) -> None:
        assert self.handler is not None
        await self.handler(ws)


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[tuple[Sidecar, Upstream]]:
    upstream = Upstream()
    async with serve(
        upstream, "127.0.0.1", 0, compression=None, create_connection=RecordingServer
    ) as server:
        port = server.sockets[0].getsockname()[1]
        sidecar = await asyncio.to_thread(
            start_sidecar, tmp_path, port, CONFIG, env={"TUNNEL_TEST_SECRET": SECRET}
        )
        try:
            yield sidecar, upstream
        finally:
            await asyncio.to_thread(sidecar.stop)


async def test_an_upstream_that_speaks_first_is_heard_before_anything_else(
    relay: tuple[Sidecar, Upstream],
) -> None:
    # Its greeting may arrive while the sidecar is still accepting the client: queued, then
    # relayed first when the direct relay starts.
    sidecar, upstream = relay

    async def greet(ws: ServerConnection) -> None:
        await ws.send("welcome")
        await ws.send(b"\x00binary welcome")
        async for message in ws:
            await ws.send(message)

    upstream.handler = greet
    async with open_ws(sidecar, headers=bearer()) as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "welcome"
        assert await asyncio.wait_for(ws.recv(), 5) == b"\x00binary welcome"
        await ws.send("ping")
        assert await ws.recv() == "ping"


async def test_fragmented_messages_cross_whole_both_ways(
    relay: tuple[Sidecar, Upstream],
) -> None:
    sidecar, upstream = relay

    async def fragments(ws: ServerConnection) -> None:
        upstream.received.append(await ws.recv())
        upstream.received.append(await ws.recv())
        await ws.send(["frag", "mented ", "tëxt"])
        await ws.send([b"\x01", b"\x02\x03", b"\x04"])
        await ws.send("after")
        await ws.wait_closed()

    upstream.handler = fragments
    async with open_ws(sidecar, headers=bearer()) as ws:
        await ws.send(["client ", "fragments ", "é"])
        await ws.send([b"\xff", b"\xfe"])
        assert await asyncio.wait_for(ws.recv(), 5) == "fragmented tëxt"
        assert await ws.recv() == b"\x01\x02\x03\x04"
        assert await ws.recv() == "after"
    assert upstream.received == ["client fragments é", b"\xff\xfe"]


async def test_invalid_utf8_from_the_upstream_closes_the_client_with_1007(
    relay: tuple[Sidecar, Upstream],
) -> None:
    sidecar, upstream = relay

    async def invalid(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send("fine é")
        await ws.send(b"caf\xc3", text=True)  # a text frame that is not UTF-8
        await ws.wait_closed()

    upstream.handler = invalid
    async with open_ws(sidecar, headers=bearer()) as ws:
        await ws.send("go")
        assert await ws.recv() == "fine é"
        code, _ = await close_of(ws)
    assert code == 1007
    await asyncio.sleep(0.2)
    record = ws_log_lines(sidecar)[-1]
    assert record["end"] == "upstream_failed" and record["upstream_close_code"] == 1007
    assert record["messages_out"] == 1


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_without_compression_the_upstream_gets_the_clients_frames_byte_for_byte(
    relay: tuple[Sidecar, Upstream], compression: str | None
) -> None:
    # Whole frames pass as they arrived: the same masking key and all. With the client hop
    # compressed they cannot (the message relay inflates and frames again), and do not.
    sidecar, upstream = relay

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    upstream.handler = echo
    WIRES.clear()
    messages: list[str | bytes] = ["a text message, é", b"\x00\x01 binary", "x" * 70_000]
    async with open_ws(
        sidecar, headers=bearer(), compression=compression, create_connection=RecordingClient
    ) as ws:
        assert isinstance(ws, RecordingClient)
        ws.sent.clear()  # the handshake
        for message in messages:
            await ws.send(message)
            assert await asyncio.wait_for(ws.recv(), 5) == message
        frames = list(ws.sent)
    assert len(frames) == 3 and len(WIRES) == 1
    wire = b"".join(WIRES[0])
    # The third is over FAST_MAX: it streams through websockets' parser, framed again.
    assert [frame in wire for frame in frames] == [compression is None, compression is None, False]


async def test_a_big_greeting_in_flight_when_the_relay_starts_stays_whole(
    relay: tuple[Sidecar, Upstream],
) -> None:
    # The greeting is still arriving when the session starts relaying: the splitter takes over
    # only at the end of the frame websockets' parser is in (wsframes.at_frame_boundary).
    sidecar, upstream = relay
    greeting = bytes(range(256)) * 2000  # 512 KB: many reads

    async def greet(ws: ServerConnection) -> None:
        await ws.send(greeting)
        async for message in ws:
            await ws.send(message)

    upstream.handler = greet
    for _ in range(3):
        async with open_ws(sidecar, headers=bearer()) as ws:
            assert await asyncio.wait_for(ws.recv(), 5) == greeting
            for message in ("after", b"\x00bytes", "é" * 100):
                await ws.send(message)
                assert await asyncio.wait_for(ws.recv(), 5) == message


async def test_a_text_frame_from_the_client_that_is_not_utf8_closes_it_with_1007(
    relay: tuple[Sidecar, Upstream],
) -> None:
    sidecar, upstream = relay

    async def record(ws: ServerConnection) -> None:
        async for message in ws:
            upstream.received.append(message)
            await ws.send(message)

    upstream.handler = record
    async with open_ws(sidecar, headers=bearer()) as ws:
        await ws.send("fine é")
        assert await ws.recv() == "fine é"
        await ws.send(b"caf\xc3", text=True)  # a text frame that is not UTF-8
        code, _ = await close_of(ws)
    assert code == 1007
    assert upstream.received == ["fine é"]  # the bad frame never reached it


async def test_the_tunnel_relays_directly_only_through_the_lean_protocol() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    config = uvicorn.Config(app, ws=LeanWebSocketProtocol, lifespan="off")
    config.load()
    protocol = LeanWebSocketProtocol(config=config, server_state=ServerState(), app_state={})
    assert direct_client(protocol.send) is protocol

    async def plain_send(message: Any) -> None:
        pass

    assert direct_client(plain_send) is None


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY])
def test_frames_written_past_websockets_parse_as_websockets_own(size: int, opcode: Opcode) -> None:
    payload = bytes(i % 251 for i in range(size))
    wire = _client_frame(opcode.value, payload)
    reader = StreamReader()
    reader.feed_data(wire)
    parser = Frame.parse(reader.read_exact, mask=True)  # as the upstream (a server) reads it
    try:
        next(parser)
        raise AssertionError("the frame is incomplete")
    except StopIteration as done:
        frame = done.value
    assert (frame.opcode, frame.fin, bytes(frame.data)) == (opcode, True, payload)
    assert len(reader.buffer) == 0


def test_masking_keys_are_fresh_and_pooled() -> None:
    masks = _Masks()
    keys = [masks.next() for _ in range(3000)]  # three pools of 1,024
    assert all(len(k) == 4 for k in keys)
    assert len(set(keys)) > 2900  # 4 random bytes: collisions are rare, repeats would be a bug


async def test_the_inbox_is_a_fifo_whose_get_waits_and_survives_cancellation() -> None:
    inbox = Inbox()
    items = inbox.items  # the frame relay keeps this list and asks it "empty?" each frame
    assert inbox.empty()
    inbox.put_nowait(1)
    inbox.put_nowait(2)
    assert not inbox.empty()
    assert [await inbox.get(), await inbox.get()] == [1, 2]
    getter = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    getter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await getter
    later = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait(3)
    assert await asyncio.wait_for(later, 1) == 3
    # Woken and cancelled in the same turn: the message stays for the next get.
    woken = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait(4)
    woken.cancel()
    with pytest.raises(asyncio.CancelledError):
        await woken
    assert await asyncio.wait_for(inbox.get(), 1) == 4
    assert inbox.items is items  # never replaced: what is queued is always in the kept list
    # ... and with another getter waiting, that one is woken for it.
    first, second = asyncio.ensure_future(inbox.get()), asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait(5)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(second, 1) == 5


async def test_the_writable_flag_starts_set_and_wakes_its_waiters() -> None:
    flag = Flag()
    assert flag.is_set() and await flag.wait()
    flag.clear()
    waiters = [asyncio.ensure_future(flag.wait()) for _ in range(2)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    flag.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [True, True]


async def test_the_lean_protocol_keeps_the_scope_headers_and_empties_the_parsed_request() -> None:
    # websockets' handshake parser holds the parsed request for the connection's life: its
    # headers are emptied once uvicorn built the scope from them.
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        seen["scope_headers"] = list(scope["headers"])
        seen["request_headers"] = dict(protocol.request.headers)
        await send({"type": "websocket.close"})

    config = uvicorn.Config(app, ws=LeanWebSocketProtocol, lifespan="off")
    config.load()
    protocol = LeanWebSocketProtocol(config=config, server_state=ServerState(), app_state={})
    transport = FakeTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Authorization: Bearer abc\r\n"
        b"Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    for task in list(protocol.tasks):
        await asyncio.wait_for(task, 5)
    assert (b"Authorization", b"Bearer abc") in seen["scope_headers"]
    assert seen["request_headers"] == {}
    assert transport.written.startswith(b"HTTP/1.1 403")


class Reading:
    """An upstream transport as the pairing sees it: paused or reading."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")


async def test_the_upstream_reads_only_while_the_client_can_be_written() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    config = uvicorn.Config(app, ws=LeanWebSocketProtocol, lifespan="off")
    config.load()
    protocol = LeanWebSocketProtocol(config=config, server_state=ServerState(), app_state={})
    upstream = Reading()
    protocol.pair(upstream)  # type: ignore[arg-type]
    assert upstream.calls == []  # the client's buffer is not full: the upstream reads
    protocol.pause_writing()
    protocol.resume_writing()
    protocol.pause_writing()
    assert upstream.calls == ["pause", "resume", "pause"]
    protocol.unpair()  # over while paused: the upstream reads again, for its closing handshake
    assert upstream.calls[-1] == "resume"
    protocol.resume_writing()
    assert upstream.calls == ["pause", "resume", "pause", "resume"]  # unpaired: not followed
    late = Reading()
    protocol.pause_writing()
    protocol.pair(late)  # type: ignore[arg-type]
    assert late.calls == ["pause"]  # paired while the client's buffer is full


def test_a_relayed_message_counts_and_notes_its_time_only_when_watched() -> None:
    from prometheus_client import CollectorRegistry, Counter

    from proxy.relay.ws_passthrough import Counts, count
    from proxy.relay.ws_session import Session

    metrics = CollectorRegistry()
    counts = Counts(
        Counter("m", "messages", registry=metrics), Counter("b", "bytes", registry=metrics)
    )
    s = Session(None, None, 1.0)  # type: ignore[arg-type]  (no upstream is asked here)
    count(s, counts, 5, True)
    count(s, counts, 7, False)
    assert (s.messages_in, s.bytes_in, s.messages_out, s.bytes_out) == (1, 5, 1, 7)
    assert s.last_activity == 1.0  # no idle timeout: the clock is not asked
    assert metrics.get_sample_value("m_total") == 2
    assert metrics.get_sample_value("b_total") == 12
    s.idle_clock = lambda: 42.0
    count(s, counts, 1, True)
    assert s.last_activity == 42.0
