"""Contracts with the libraries whose internals authproxy leans on: each fails loudly, naming what
changed, when an upgrade moves something we rely on (the versions are pinned in constraints.txt)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
from typing import Any

import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.asyncio.client import ClientConnection

from proxy.wsprotocol import LeanWebSocketProtocol


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_uvicorn_sansio_websocket_protocol_keeps_what_the_lean_protocol_clears() -> None:
    # LeanWebSocketProtocol drops `request`/`response` once `handshake_complete` is set by the
    # accept in `send`: those names must still be uvicorn's.
    source = inspect.getsource(WebSocketsSansIOProtocol)
    for name in ("self.request = event", "self.response = self.conn.accept(event)"):
        assert name in source, f"uvicorn no longer has {name!r}"
    assert "self.handshake_complete = True" in inspect.getsource(WebSocketsSansIOProtocol.send)


async def test_the_lean_protocol_lets_the_handshake_go_after_accepting() -> None:
    accepted = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        accepted.set()
        await receive()

    config = uvicorn.Config(app, ws=LeanWebSocketProtocol, lifespan="off")
    config.load()
    protocol = LeanWebSocketProtocol(config=config, server_state=ServerState(), app_state={})
    transport = FakeTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    key = base64.b64encode(b"0123456789abcdef")
    protocol.data_received(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await asyncio.wait_for(accepted.wait(), 5)
    expected = base64.b64encode(
        hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    )
    assert transport.written.startswith(b"HTTP/1.1 101")
    assert expected in transport.written
    assert protocol.request is None and protocol.response is None
    protocol.connection_lost(None)
    for task in list(protocol.tasks):
        await asyncio.wait_for(task, 5)


def test_websockets_client_takes_the_first_event_after_a_none_response_as_the_handshake() -> None:
    # The tunnel clears `request` on its upstream connection but never `response`, because of
    # this: if websockets stops doing it, clearing `response` too would be safe (and cheaper).
    source = inspect.getsource(ClientConnection.process_event)
    assert "if self.response is None" in source
    assert "self.request" in inspect.getsource(ClientConnection.handshake)


def test_uvicorn_still_re_raises_the_signals_it_captured_from_that_list() -> None:
    # server.DrainingServer clears `_captured_signals` after a clean drain, or the process would
    # die by the re-raised SIGTERM (or a KeyboardInterrupt traceback) with exit status != 0.
    source = inspect.getsource(uvicorn.Server.capture_signals)
    assert "self._captured_signals" in source and "signal.raise_signal" in source
    assert "_captured_signals" in inspect.getsource(uvicorn.Server.handle_exit)


def test_websockets_connect_still_dials_and_requests_what_ws_uri_names() -> None:
    # tunnel._UpstreamConnect replaces `ws_uri` after websockets parsed the base URL: the exact
    # resource (raw path and query, byte for byte) must be what the upstream is asked for.
    from websockets.asyncio.client import connect

    source = inspect.getsource(connect)
    assert "self.ws_uri = parse_uri(uri)" in source
    assert "self.factory(self.ws_uri)" in source or "create_connection(" in source
    uri_uses = source.count("self.ws_uri")
    assert uri_uses >= 3, "websockets no longer reads ws_uri where we expect"


def test_uvicorn_still_hands_each_whole_message_to_send_receive_event_to_app() -> None:
    """LeanWebSocketProtocol.send_receive_event_to_app offers each client message to the tunnel
    before uvicorn queues it: the hook and the state it reads must still be uvicorn's."""
    source = inspect.getsource(WebSocketsSansIOProtocol)
    for name in (
        "self.send_receive_event_to_app()",
        "self.frames = [event.data]",
        'self.curr_msg_data_type = "text"',
        "self.close_sent = True",
        "self.disconnected = True",
        "self.writable.clear()",
        "self.writable.set()",
        "self.queue.put_nowait",
        "self.conn.send_text(",
    ):
        assert name in source, f"uvicorn no longer has {name!r}"


def test_websockets_connection_still_has_what_the_direct_relay_uses() -> None:
    """tunnel.UpstreamConnection takes data frames in `process_event`, drains the Assembler's
    queue when the direct relay starts, and tunnel._send_now writes past `send` when it would
    not wait: every name must still be websockets'."""
    from websockets.asyncio.messages import Assembler, SimpleQueue

    source = inspect.getsource(ClientConnection.__mro__[1])  # asyncio Connection
    for name in (
        "def process_event(self, event: Event)",
        "self.recv_messages.put(event)",
        "self.send_in_progress",
        "self.paused = True",
        "def send_data(self)",
        "def set_connection_exc(self",
        "self.protocol.fail(\n                    CloseCode.INVALID_DATA",
        "TooManyFragments",
    ):
        assert name in source, f"websockets no longer has {name!r}"
    assert "self.frames: SimpleQueue[Frame]" in inspect.getsource(Assembler)
    assert "self.queue: collections.deque" in inspect.getsource(SimpleQueue)
    assert hasattr(Assembler, "maybe_resume")


def test_websockets_parser_waits_in_at_eof_between_frames_only() -> None:
    """wsframes.at_frame_boundary: a splitter takes over a hop's bytes only where websockets'
    parser waits for a frame's first byte, which it does in `reader.at_eof()`. In a frame it
    waits elsewhere, even with the header taken and nothing buffered."""
    from websockets.client import ClientProtocol
    from websockets.frames import Frame, Opcode
    from websockets.protocol import CLIENT, SERVER, Protocol, State
    from websockets.server import ServerProtocol
    from websockets.uri import parse_uri

    from proxy.wsframes import at_frame_boundary

    # Before the handshake, the server's and client's parsers wait in their HTTP parsers.
    assert not at_frame_boundary(ServerProtocol())
    client = ClientProtocol(parse_uri("ws://127.0.0.1/"))
    client.send_request(client.connect())
    assert not at_frame_boundary(client)
    for side, mask in ((SERVER, True), (CLIENT, False)):  # a server reads masked frames
        protocol = Protocol(side, state=State.OPEN)
        assert at_frame_boundary(protocol)
        wire = Frame(Opcode.TEXT, b"hello").serialize(mask=mask, extensions=[])
        head = 6 if mask else 2
        protocol.receive_data(wire[:head])  # the header (and key): taken, nothing buffered
        assert not protocol.reader.buffer
        assert not at_frame_boundary(protocol)
        protocol.receive_data(wire[head:-1])
        assert not at_frame_boundary(protocol)
        protocol.receive_data(wire[-1:])
        assert at_frame_boundary(protocol)
        assert [bytes(e.data) for e in protocol.events_received()] == [b"hello"]


def test_websockets_protocol_state_is_what_it_keeps_in_state() -> None:
    """relay/ws_passthrough.py reads `_state` where `state` would cost an interpreted property
    call on every relayed frame."""
    from websockets.protocol import Protocol, Side, State

    from proxy.relay.ws_passthrough import state_of

    protocol = Protocol(Side.CLIENT, state=State.OPEN)
    for state in State:
        protocol.state = state
        assert state_of(protocol) is protocol.state is state
    source = inspect.getsource(Protocol.state.fget)  # type: ignore[attr-defined]
    assert "return self._state" in source
