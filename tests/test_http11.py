"""The listeners' HTTP/1.1 protocol (`proxy/http11.py`) driven byte by byte, without sockets, and
the contract it holds with uvicorn (which creates it and the WebSocket protocol it hands
upgrades to)."""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from proxy.http11 import HttpProtocol, http_protocol

# --- the contract: how uvicorn creates the protocol, and what it reads of it ---------------------


def test_uvicorn_creates_the_http_protocol_with_the_arguments_we_take() -> None:
    source = inspect.getsource(uvicorn.Server.startup)
    assert "config.http_protocol_class(" in source
    for keyword in ("config=config", "server_state=self.server_state", "app_state=", "_loop="):
        assert keyword in source
    # Called as uvicorn calls it, the listener's limits filled in by http_protocol().
    factory = http_protocol(1234, 2.5)
    config = uvicorn.Config(_no_content, http=factory, lifespan="off", log_config=None, ws="none")
    loop = asyncio.new_event_loop()
    try:
        protocol = factory(config=config, server_state=ServerState(), app_state={}, _loop=loop)
    finally:
        loop.close()
    assert isinstance(protocol, HttpProtocol) and protocol.loop is loop
    assert (protocol.max_head_bytes, protocol.head_timeout_s) == (1234, 2.5)


def test_uvicorn_shuts_connections_down_through_the_server_state() -> None:
    shutdown = inspect.getsource(uvicorn.Server._wait_tasks_to_complete) + inspect.getsource(
        uvicorn.Server.shutdown
    )
    assert "connection.shutdown()" in shutdown and "self.server_state.connections" in shutdown
    assert "self.server_state.tasks" in shutdown
    state = ServerState()
    assert isinstance(state.connections, set) and isinstance(state.tasks, set)
    assert state.total_requests == 0


def test_uvicorns_websocket_protocol_takes_what_an_upgrade_hands_it() -> None:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    params = inspect.signature(WebSocketsSansIOProtocol).parameters
    assert {"config", "server_state", "app_state"} <= set(params)
    assert inspect.isfunction(WebSocketsSansIOProtocol.data_received)


# --- the protocol driven without sockets ---------------------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.writes: list[bytes] = []
        self.closed = False
        self.paused = False
        self.protocol: Any = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol


async def _no_content(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def connect(
    app: Any = _no_content,
    *,
    keep_alive_s: float = 5.0,
    head_timeout_s: float = 10.0,
    state: ServerState | None = None,
) -> tuple[HttpProtocol, FakeTransport]:
    """A connection to a fresh server (or to `state`'s, beside its other connections)."""
    cls = http_protocol(64 * 1024, head_timeout_s)
    config = uvicorn.Config(
        app, http=cls, lifespan="off", log_config=None, ws="none", timeout_keep_alive=keep_alive_s
    )
    protocol = cls(config=config, server_state=state or ServerState(), app_state={})
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def settle(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def serve(data: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """Feed `data` to a fresh protocol; the scopes the app saw and the bytes written back."""
    scopes: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope)
        await _no_content(scope, receive, send)

    protocol, transport = connect(app)
    protocol.data_received(data)
    await settle()
    protocol.connection_lost(None)
    return scopes, bytes(transport.written)


def status_of(written: bytes) -> int:
    return int(written.split(b" ", 2)[1])


async def test_trailer_fields_never_join_the_request_headers() -> None:
    scopes, written = await serve(
        b"POST /x HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-API-Key: secret\r\nHost: evil.test\r\n\r\n"
    )
    assert status_of(written) == 204
    assert scopes[0]["headers"] == [(b"host", b"app.test"), (b"transfer-encoding", b"chunked")]


async def test_the_next_pipelined_request_still_gets_its_own_headers() -> None:
    scopes, _ = await serve(
        b"POST /a HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\nX-Trailer: 1\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: app.test\r\nX-Second: 2\r\n\r\n"
    )
    assert [s["path"] for s in scopes] == ["/a", "/b"]
    assert (b"x-second", b"2") in scopes[1]["headers"]
    assert all(name != b"x-trailer" for s in scopes for name, _ in s["headers"])


@pytest.mark.parametrize(
    "target",
    [
        b"http://evil.test/x",
        b"http://user@app.test/x",
        b"ftp://app.test/x",
        b"http://app.test?x=1",
        b"CONNECT app.test:443",
    ],
)
async def test_an_absolute_form_target_must_name_the_host(target: bytes) -> None:
    method, _, target = target.rpartition(b" ")
    request = (method or b"GET") + b" " + target + b" HTTP/1.1\r\nHost: app.test\r\n\r\n"
    scopes, written = await serve(request)
    assert scopes == []
    assert status_of(written) == 400
    body = json.loads(written.partition(b"\r\n\r\n")[2])
    assert body["error"] == "bad_request" and body["details"]["reason"] == "invalid_host"


async def test_an_absolute_form_target_naming_the_host_is_served_by_its_path() -> None:
    scopes, written = await serve(
        b"GET HTTPS://App.Test:8443/x/y?q=1 HTTP/1.1\r\nHost: app.test:8443\r\n\r\n"
    )
    assert status_of(written) == 204
    assert (scopes[0]["raw_path"], scopes[0]["query_string"]) == (b"/x/y", b"q=1")


# --- responses -----------------------------------------------------------------------------------


def answering(
    body: bytes, headers: list[tuple[bytes, bytes]] | None = None, *, read: bool = True
) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        while read and (await receive()).get("more_body"):
            pass
        h = [(b"content-length", str(len(body)).encode())] if headers is None else headers
        await send({"type": "http.response.start", "status": 200, "headers": h})
        await send({"type": "http.response.body", "body": body})

    return app


GET = b"GET /x HTTP/1.1\r\nHost: app.test\r\n\r\n"


async def test_a_small_answer_is_one_write_of_head_and_body() -> None:
    protocol, transport = connect(answering(b"hello"))
    protocol.data_received(GET)
    assert len(protocol.tasks) == 1  # what uvicorn's graceful shutdown waits for
    await settle()
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]
    assert not transport.closed  # keep-alive
    assert not protocol.tasks


async def test_a_head_whose_body_does_not_follow_goes_out_on_the_next_iteration() -> None:
    later = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await later.wait()  # an event stream with nothing to say yet
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": False})

    protocol, transport = connect(app)
    protocol.data_received(GET)
    await settle()
    assert bytes(transport.written) == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    later.set()
    await settle()
    assert bytes(transport.written).endswith(b"9\r\ndata: 1\n\n\r\n0\r\n\r\n")


@pytest.mark.parametrize(
    "header",
    [
        (b"x-evil", b"a\r\nset-cookie: session=attacker"),
        (b"x-evil", b"a\nb"),
        (b"x-evil", b"a\rb"),
        (b"x-evil", b"a\x00b"),
        (b"x-evil", b"a\x7fb"),
        (b"x-evil\r\nset-cookie", b"x"),
        (b"x-evil\n", b"x"),
    ],
)
async def test_a_line_break_or_control_byte_in_a_response_header_never_reaches_the_client(
    header: tuple[bytes, bytes],
) -> None:
    protocol, transport = connect(answering(b"", [header, (b"content-length", b"0")]))
    protocol.data_received(GET)
    await settle()
    assert b"set-cookie" not in bytes(transport.written) and b"x-evil" not in transport.written
    assert transport.closed


async def test_a_head_request_gets_the_head_alone() -> None:
    protocol, transport = connect(answering(b"hello"))
    protocol.data_received(b"HEAD /x HTTP/1.1\r\nHost: app.test\r\n\r\n")
    await settle()
    assert bytes(transport.written) == b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


async def test_an_http_1_0_client_gets_its_answer_then_the_close() -> None:
    protocol, transport = connect(answering(b"hi"))
    protocol.data_received(b"GET /x HTTP/1.0\r\n\r\n")
    await settle()
    assert b"connection: close\r\n" in transport.written and transport.written.endswith(b"hi")
    assert transport.closed


async def test_an_answer_shorter_than_its_length_cuts_the_connection() -> None:
    protocol, transport = connect(answering(b"hi", [(b"content-length", b"5")]))
    protocol.data_received(GET)
    await settle()
    assert transport.closed


async def test_a_failing_app_gets_the_json_500_before_it_answered() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise ValueError("boom")

    protocol, transport = connect(app)
    protocol.data_received(GET)
    await settle()
    head, _, body = bytes(transport.written).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ") and json.loads(body)["error"] == "internal_error"
    assert transport.closed


# --- request bodies ------------------------------------------------------------------------------


async def test_expect_100_continue_is_answered_when_the_app_reads_the_body() -> None:
    got: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0)
        assert transport.written == b""  # nothing promised before the body is asked for
        message = await receive()
        got.append(message["body"])
        await answering(b"", read=False)(scope, receive, send)

    protocol, transport = connect(app)
    protocol.data_received(
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    )
    await settle(3)
    protocol.data_received(b"abc")
    await settle()
    assert transport.written.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
    assert got == [b"abc"]


async def test_a_large_body_pauses_reading_until_the_app_takes_it() -> None:
    taken: list[int] = []
    go = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await go.wait()
        more = True
        while more:
            message = await receive()
            taken.append(len(message["body"]))
            more = message["more_body"]
        await answering(b"", read=False)(scope, receive, send)

    protocol, transport = connect(app)
    size = 200 * 1024
    protocol.data_received(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
    protocol.data_received(b"x" * (100 * 1024))
    await settle()
    assert transport.paused
    go.set()
    await settle()
    assert not transport.paused
    protocol.data_received(b"x" * (100 * 1024))
    await settle()
    assert sum(taken) == size and transport.written.startswith(b"HTTP/1.1 200 OK")


async def test_receive_tells_the_app_the_client_left() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(await receive())
        seen.append(await receive())  # waits: nothing more comes but the departure

    protocol, _ = connect(app)
    protocol.data_received(GET)
    await settle()
    assert len(seen) == 1 and seen[0]["more_body"] is False
    protocol.connection_lost(None)
    await settle()
    assert seen[1] == {"type": "http.disconnect"}


# --- the connection's timer ----------------------------------------------------------------------


async def test_an_idle_keep_alive_connection_closes_after_timeout_keep_alive() -> None:
    protocol, transport = connect(answering(b"ok"), keep_alive_s=0.05)
    protocol.data_received(GET)
    await settle()
    assert not transport.closed
    await asyncio.sleep(0.15)
    assert transport.closed


async def test_a_busy_connection_is_not_closed_by_the_keep_alive_of_an_earlier_answer() -> None:
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            await release.wait()
        await answering(b"ok")(scope, receive, send)

    protocol, transport = connect(app, keep_alive_s=0.05)
    protocol.data_received(GET)
    await settle()
    protocol.data_received(b"GET /slow HTTP/1.1\r\nHost: app.test\r\n\r\n")
    await asyncio.sleep(0.15)  # the first answer's keep-alive would have passed
    assert not transport.closed
    release.set()
    await settle()
    assert transport.written.count(b"HTTP/1.1 200 OK") == 2


async def test_a_head_that_does_not_arrive_in_time_closes_the_connection() -> None:
    protocol, transport = connect(head_timeout_s=0.05)
    protocol.data_received(b"GET /x HTTP/1.1\r\nHost: app.test\r\n")  # never ends
    await asyncio.sleep(0.15)
    assert transport.closed and transport.written == b""


async def test_a_connection_that_never_sends_a_byte_is_closed_at_the_head_timeout() -> None:
    _, transport = connect(head_timeout_s=0.05)
    await asyncio.sleep(0.15)
    assert transport.closed


async def test_shutdown_closes_an_idle_connection_and_lets_a_busy_one_finish() -> None:
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await answering(b"ok")(scope, receive, send)

    idle, idle_transport = connect()
    idle.shutdown()
    assert idle_transport.closed
    busy, busy_transport = connect(app)
    busy.data_received(GET)
    await settle()
    busy.shutdown()
    assert not busy_transport.closed
    release.set()
    await settle()
    assert busy_transport.written.endswith(b"ok") and busy_transport.closed


def connect_upgradable(
    app: Any, head_timeout_s: float = 10.0
) -> tuple[HttpProtocol, FakeTransport, ServerState]:
    """A connection whose upgrades go to the sidecar's WebSocket protocol."""
    from proxy.wsprotocol import LeanWebSocketProtocol

    cls = http_protocol(64 * 1024, head_timeout_s)
    config = uvicorn.Config(app, http=cls, lifespan="off", log_config=None)
    config.ws = LeanWebSocketProtocol
    state = ServerState()
    protocol = cls(config=config, server_state=state, app_state={})
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport, state


UPGRADE = (
    b"GET /ws?x=1 HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


async def test_a_websocket_upgrade_hands_the_connection_and_its_head_to_uvicorns_protocol() -> None:
    from proxy.wsprotocol import LeanWebSocketProtocol

    scopes: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope)
        await receive()
        await send({"type": "websocket.accept"})
        await done.wait()

    protocol, transport, state = connect_upgradable(app, head_timeout_s=0.05)
    protocol.data_received(UPGRADE)
    assert isinstance(transport.protocol, LeanWebSocketProtocol)
    assert protocol not in state.connections and protocol._timer is None  # nothing holds it
    assert protocol.parser is None  # nor a reference cycle with its parser
    await asyncio.sleep(0.1)  # past the head timeout: the upgraded socket stays open
    assert not transport.closed
    assert scopes[0]["type"] == "websocket" and scopes[0]["query_string"] == b"x=1"
    # uvicorn's WebSocket protocol keeps header names as it parsed them: the head it is handed
    # is ours, lower-cased, which the Origin check (decision.py) relies on.
    names = [name for name, _ in scopes[0]["headers"]]
    assert b"host" in names and names == [name.lower() for name in names]
    assert transport.written.startswith(b"HTTP/1.1 101 ")
    done.set()
    await settle()


async def test_a_head_arriving_when_the_answer_before_it_ends_keeps_its_own_deadline() -> None:
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await answering(b"ok")(scope, receive, send)

    protocol, transport = connect(app, keep_alive_s=0.05, head_timeout_s=10.0)
    protocol.data_received(GET)
    await settle()
    protocol.data_received(b"GET /next HTTP/1.1\r\nHost: app")  # the next head, half sent
    release.set()
    await asyncio.sleep(0.15)  # past the keep-alive, well inside the head's own deadline
    assert not transport.closed


async def test_a_head_promised_its_body_waits_for_it_without_a_callback() -> None:
    from proxy.types import BODY_FOLLOWS

    async def app(scope: Any, receive: Any, send: Any) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": []}
        await send({**start, BODY_FOLLOWS: True, "headers": [(b"content-length", b"2")]})
        for _ in range(3):  # the promise is kept late here, to show nothing else wrote the head
            await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b"ok"})

    protocol, transport = connect(app)
    protocol.data_received(GET)
    await settle()
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]


async def test_a_waiting_request_does_not_resume_reading_while_a_pipelined_one_waits_its_turn() -> (
    None
):
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/x":
            await receive()
            waiting = asyncio.ensure_future(receive())  # as the forwarder watches for departure
            await release.wait()
            waiting.cancel()
        await answering(b"ok", read=False)(scope, receive, send)

    protocol, transport = connect(app)
    protocol.data_received(GET + b"GET /second HTTP/1.1\r\nHost: app.test\r\n\r\n")
    await settle()
    assert transport.paused  # the second request waits, and so does reading
    release.set()
    await settle()
    assert transport.written.count(b"HTTP/1.1 200 OK") == 2 and not transport.paused


async def test_an_answer_cut_before_its_head_went_out_closes_without_a_head() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("the upstream died")  # before the loop's next iteration

    protocol, transport = connect(app)
    protocol.data_received(GET)
    await settle()
    assert transport.closed and transport.written == b""


# --- answers written at the end of the loop round (proxy/outbox.py) -------------------------------


def holding(release: asyncio.Event) -> Any:
    """An app whose request stays in flight until `release` is set, then answers "held"."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await answering(b"held")(scope, receive, send)

    return app


async def test_an_answer_ending_while_others_are_in_flight_waits_for_the_end_of_the_round() -> None:
    state = ServerState()
    release = asyncio.Event()
    seen: dict[str, bytes] = {}

    async def quick(scope: Any, receive: Any, send: Any) -> None:
        await answering(b"quick")(scope, receive, send)
        seen["quick"] = bytes(quick_transport.written)  # right after its last send

    async def last(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await answering(b"last")(scope, receive, send)
        seen["last"] = bytes(last_transport.written)

    held, _ = connect(holding(release), state=state)
    last_conn, last_transport = connect(last, state=state)
    quick_conn, quick_transport = connect(quick, state=state)
    for conn in (held, last_conn, quick_conn):
        conn.data_received(GET)
    await settle()
    assert seen["quick"] == b""  # others were in flight: it waited for the round's end
    assert quick_transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nquick"]
    release.set()
    await settle()
    # Both woke in one round: `held` answered first, with `last` in flight (it waited); `last`
    # was then alone on the loop, and an answer alone goes at once (no latency added at c1).
    assert seen["last"] == b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlast"
    assert not state.tasks


async def test_an_open_websocket_session_does_not_make_answers_wait() -> None:
    state = ServerState()
    session = asyncio.ensure_future(asyncio.sleep(3600))  # uvicorn counts a session's task too
    state.tasks.add(session)
    seen: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await answering(b"alone")(scope, receive, send)
        seen.append(bytes(transport.written))

    protocol, transport = connect(app, state=state)
    protocol.data_received(GET)
    await settle()
    assert seen[0].endswith(b"alone")  # the only request in flight: written at once
    session.cancel()


async def test_a_close_writes_the_answer_waiting_for_the_round_first() -> None:
    state = ServerState()
    release = asyncio.Event()
    seen: list[bytes] = []

    async def quick(scope: Any, receive: Any, send: Any) -> None:
        await answering(b"quick")(scope, receive, send)
        seen.append(bytes(transport.written))
        protocol.shutdown()  # uvicorn's graceful shutdown reaches the connection, now idle

    connect(holding(release), state=state)[0].data_received(GET)
    protocol, transport = connect(quick, state=state)
    protocol.data_received(GET)
    await settle()
    assert seen == [b""]  # it had waited
    assert transport.written.endswith(b"quick") and transport.closed
    assert transport.writes[-1].endswith(b"quick")


async def test_pipelined_answers_keep_their_order_when_they_wait_for_the_round() -> None:
    state = ServerState()
    release = asyncio.Event()
    connect(holding(release), state=state)[0].data_received(GET)
    bodies = iter([b"first", b"second", b"third"])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await answering(next(bodies))(scope, receive, send)

    protocol, transport = connect(app, state=state)
    protocol.data_received(GET * 3)
    await settle(40)
    assert transport.written.count(b"HTTP/1.1 200 OK") == 3
    first, second, third = (transport.written.index(b) for b in (b"first", b"second", b"third"))
    assert first < second < third
    release.set()
    await settle()


async def test_respond_writes_what_the_two_sends_write_and_only_when_it_may() -> None:
    """`Cycle.respond` (relay/http.py's small answer, found as `send.__self__`) writes exactly
    what a start with BODY_FOLLOWS and one last body write; once an answer began, it does
    nothing and says so, and the ASGI way still works."""
    from proxy.relay.http import whole_answer
    from proxy.types import BODY_FOLLOWS

    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    results: list[bool] = []

    async def by_respond(scope: Any, receive: Any, send: Any) -> None:
        respond = whole_answer(send)
        assert respond is not None
        results.append(respond(200, list(headers), b"{}"))
        results.append(respond(200, list(headers), b"{}"))  # begun: refused, nothing written
        if not results[0]:
            await by_sends(scope, receive, send)

    async def by_sends(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": list(headers),
                    BODY_FOLLOWS: True})  # fmt: skip
        await send({"type": "http.response.body", "body": b"{}"})

    protocol, fast = connect(by_respond)
    protocol.data_received(GET)
    await settle()
    _, slow = connect(by_sends)
    _.data_received(GET)
    await settle()
    assert results == [True, False]
    assert (
        fast.writes
        == slow.writes
        == [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"]
    )
    assert not protocol.tasks and not fast.closed  # complete, kept alive

    # A client that is not reading (writing paused): the ASGI way, which waits for it.
    protocol, paused = connect(by_respond)
    protocol.pause_writing()
    results.clear()
    protocol.data_received(GET)
    await settle()
    assert results == [False, False] and paused.writes == []
    protocol.resume_writing()
    await settle()
    assert paused.writes == slow.writes and not protocol.tasks


def test_under_another_asgi_server_there_is_no_whole_answer() -> None:
    from proxy.relay.http import whole_answer

    async def plain_send(message: Any) -> None: ...

    class Server:
        async def send(self, message: Any) -> None: ...

    assert whole_answer(plain_send) is None
    assert whole_answer(Server().send) is None


# --- the connection's task: a keep-alive connection's requests run in one task -------------------


def recording(tasks: list[asyncio.Task[Any]], app: Any = None) -> Any:
    """`app` (an answer of b"ok" by default), noting the task each request runs in."""
    inner = app or answering(b"ok")

    async def record(scope: Any, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        await inner(scope, receive, send)

    return record


async def test_a_keep_alive_connections_requests_run_one_after_another_in_one_task() -> None:
    tasks: list[asyncio.Task[Any]] = []
    protocol, transport = connect(recording(tasks))
    for _ in range(3):
        protocol.data_received(GET)
        await settle()
    assert transport.written.count(b"HTTP/1.1 200 OK") == 3
    assert len(tasks) == 3 and tasks[0] is tasks[1] is tasks[2]
    # Between requests it waits, and is not what a graceful shutdown waits for.
    assert not tasks[0].done() and not protocol.tasks
    protocol.connection_lost(None)
    await settle()
    assert tasks[0].done() and tasks[0].exception() is None  # ended with the connection


async def test_the_waiting_task_is_what_a_shutdown_waits_for_only_while_it_runs_a_request() -> None:
    release = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []

    async def held(scope: Any, receive: Any, send: Any) -> None:
        if len(tasks) == 2:
            await release.wait()
        await answering(b"ok")(scope, receive, send)

    protocol, transport = connect(recording(tasks, held))
    protocol.data_received(GET)
    await settle()
    assert not protocol.tasks
    protocol.data_received(GET)
    await settle()
    assert protocol.tasks == {tasks[0]} and tasks[1] is tasks[0]
    protocol.shutdown()  # busy: the answer finishes, then the connection closes
    assert not transport.closed
    release.set()
    await settle()
    assert transport.written.count(b"HTTP/1.1 200 OK") == 2 and transport.closed
    assert not protocol.tasks and tasks[0].done()


async def test_a_head_arriving_while_the_task_finishes_the_answer_before_it_gets_its_own() -> None:
    # The answer is complete but the app still runs (an access line, a span): the next request
    # does not wait for it, and once both are over one task waits for the connection's next.
    release = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []

    async def lingering(scope: Any, receive: Any, send: Any) -> None:
        await answering(b"ok")(scope, receive, send)
        if len(tasks) == 1:
            await release.wait()

    protocol, transport = connect(recording(tasks, lingering))
    protocol.data_received(GET)
    await settle()
    protocol.data_received(GET)
    await settle()
    assert transport.written.count(b"HTTP/1.1 200 OK") == 2
    assert len(tasks) == 2 and tasks[0] is not tasks[1]
    release.set()
    await settle()
    assert tasks[1].done() != tasks[0].done()  # one of the two ended, the other waits
    protocol.data_received(GET)
    await settle()
    assert transport.written.count(b"HTTP/1.1 200 OK") == 3
    assert tasks[2] in tasks[:2] and not tasks[2].done()
    protocol.connection_lost(None)
    await settle()
    assert all(t.done() for t in tasks)


async def test_a_cancelled_waiting_task_leaves_the_next_request_a_task_of_its_own() -> None:
    tasks: list[asyncio.Task[Any]] = []
    protocol, transport = connect(recording(tasks))
    protocol.data_received(GET)
    await settle()
    tasks[0].cancel()
    await settle()
    assert tasks[0].cancelled()
    protocol.data_received(GET)
    await settle()
    assert transport.written.count(b"HTTP/1.1 200 OK") == 2 and tasks[1] is not tasks[0]


async def test_an_app_failing_after_its_answer_began_ends_the_task_with_the_connection() -> None:
    tasks: list[asyncio.Task[Any]] = []

    async def cut(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"par", "more_body": True})
        raise ConnectionError("upstream gone")

    protocol, transport = connect(recording(tasks, cut))
    protocol.data_received(GET)
    await settle()
    assert transport.closed and not transport.written.endswith(b"0\r\n\r\n")
    assert tasks[0].done() and tasks[0].exception() is None and not protocol.tasks


async def test_a_websocket_upgrade_on_a_keep_alive_connection_ends_its_waiting_task() -> None:
    from proxy.wsprotocol import LeanWebSocketProtocol

    tasks: list[asyncio.Task[Any]] = []
    done = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await recording(tasks)(scope, receive, send)
            return
        await receive()
        await send({"type": "websocket.accept"})
        await done.wait()

    protocol, transport, _ = connect_upgradable(app)
    protocol.data_received(GET)
    await settle()
    assert not tasks[0].done()
    protocol.data_received(UPGRADE)
    await settle()
    assert isinstance(transport.protocol, LeanWebSocketProtocol)
    assert tasks[0].done()  # the upgraded connection's requests are no longer its
    assert b"HTTP/1.1 101 " in transport.written
    done.set()
    await settle()
