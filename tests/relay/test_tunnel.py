"""The tunnel as the pipeline and the app use it: one `Handshake` in, an ASGI session out; the
revocations and withdrawals it is subscribed to; refusals through the handshake's `deny`. The
upstream is a real websockets server on loopback, the client side a pair of ASGI callables."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from proxy.config import from_dict
from proxy.errors import BadGateway, ProxyError, ServiceUnavailable
from proxy.identity import Identity
from proxy.relay.tunnel import Handshake, Tunnel, Unsubscribe, utf8_len
from proxy.relay.ws_outcomes import KEY_REVOKED, SIGNING_KEY_WITHDRAWN
from proxy.relay.ws_session import Session
from proxy.telemetry.access import AccessRecord
from proxy.telemetry.metrics import Metrics
from proxy.types import Message


class Subscriptions:
    """What the auth side offers the tunnel: subscribe a callback, get an unsubscribe."""

    def __init__(self) -> None:
        self.revocations: list[Callable[[str], None]] = []
        self.withdrawals: list[Callable[[str, frozenset[str]], None]] = []

    def subscribe_revocations(self, callback: Callable[[str], None]) -> Unsubscribe:
        self.revocations.append(callback)
        return lambda: self.revocations.remove(callback)

    def subscribe_key_withdrawals(
        self, callback: Callable[[str, frozenset[str]], None]
    ) -> Unsubscribe:
        self.withdrawals.append(callback)
        return lambda: self.withdrawals.remove(callback)


def tunnel(
    upstream_url: str = "http://127.0.0.1:9", subs: Subscriptions | None = None, **websocket: Any
) -> Tunnel:
    settings = from_dict(
        {"upstream": {"url": upstream_url, "connect_timeout_s": 2}, "websocket": websocket}
    )
    subs = subs or Subscriptions()
    return Tunnel(
        settings,
        Metrics(),
        subscribe_revocations=subs.subscribe_revocations,
        subscribe_key_withdrawals=subs.subscribe_key_withdrawals,
    )


class Client:
    """The client hop as ASGI hands it to the tunnel: what it sends, what it was sent, and the
    refusal it got (the pipeline's `deny`)."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.sent: list[Message] = []
        self.received = asyncio.Event()
        self.denied: list[ProxyError] = []

    async def receive(self) -> Message:
        return await self.inbox.get()

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        if message["type"] == "websocket.send":
            self.received.set()

    async def deny(self, exc: ProxyError) -> None:
        self.denied.append(exc)

    def handshake(self, **over: Any) -> Handshake:
        values: dict[str, Any] = {
            "request_id": "req-1",
            "route": "ws",
            "identity": None,
            "raw_path": b"/ws/a;b",
            "query": b"x=1",
            "subprotocols": (),
            "upstream_headers": [("x-request-id", "req-1")],
            "deny": self.deny,
            "origin": None,
            "started": time.perf_counter(),
            "record": AccessRecord(request_id="req-1", method="GET", path="/ws/a;b", route="ws"),
        }
        values.update(over)
        return Handshake(**values)


SCOPE: dict[str, Any] = {"type": "websocket", "subprotocols": [], "client": ("127.0.0.1", 5000)}


class Echo:
    """An upstream that echoes, and remembers each resource, subprotocol and close it saw."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.closes: list[tuple[int | None, str | None]] = []
        self.server: Server | None = None

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.paths.append(ws.request.path)
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass
        self.closes.append((ws.close_code, ws.close_reason))

    @property
    def url(self) -> str:
        assert self.server is not None
        port = next(iter(self.server.sockets)).getsockname()[1]
        return f"http://127.0.0.1:{port}"


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    upstream = Echo()
    async with serve(upstream.handler, "127.0.0.1", 0) as server:
        upstream.server = server
        yield upstream


def test_text_is_counted_in_utf8_bytes() -> None:
    assert utf8_len("abc") == 3
    assert utf8_len("✓") == 3


async def test_a_session_relays_both_ways_and_passes_the_clients_close_upstream(
    echo: Echo,
) -> None:
    t = tunnel(echo.url)
    await t.start()
    client = Client()
    h = client.handshake()
    await client.inbox.put({"type": "websocket.receive", "text": "hi ✓"})
    session = asyncio.create_task(t.run(SCOPE, client.receive, client.send, h))
    await asyncio.wait_for(client.received.wait(), 5)
    await client.inbox.put({"type": "websocket.disconnect", "code": 4000, "reason": "bye"})
    await asyncio.wait_for(session, 5)
    accept, message = client.sent
    assert accept["type"] == "websocket.accept"
    assert accept["headers"] == [(b"x-request-id", b"req-1")]
    assert message == {"type": "websocket.send", "text": "hi ✓"}
    assert echo.paths == ["/ws/a;b?x=1"]  # exactly as judged
    assert h.upstream_headers == []  # consumed once the upstream handshake was sent
    assert len(t.sessions) == 0 and t.sessions.admitted == 0
    async with asyncio.timeout(5):
        while not echo.closes:
            await asyncio.sleep(0.01)
    assert echo.closes == [(4000, "bye")]
    await t.stop()


async def test_a_handshake_over_capacity_is_denied_without_reaching_the_upstream() -> None:
    t = tunnel(max_connections=1)
    assert t.sessions.admit(None) is None  # the one slot is taken
    client = Client()
    await t.run(SCOPE, client.receive, client.send, client.handshake())
    [refusal] = client.denied
    assert isinstance(refusal, ServiceUnavailable)
    assert refusal.details["reason"] == "websocket_capacity"
    assert client.sent == [] and t.sessions.admitted == 1
    requests = t.metrics.registry.get_sample_value(
        "authproxy_requests_total", {"route": "ws", "status": "503"}
    )
    assert requests == 1


async def test_an_unreachable_upstream_is_denied_with_502_and_gives_its_slot_back() -> None:
    t = tunnel("http://127.0.0.1:9")  # discard: nothing listens
    client = Client()
    identity = Identity("api_key", "k1", credential_id="k1")
    await t.run(SCOPE, client.receive, client.send, client.handshake(identity=identity))
    [refusal] = client.denied
    assert isinstance(refusal, BadGateway)
    assert refusal.details["reason"] in ("connect_failed", "connect_timeout")
    assert t.sessions.admitted == 0 and t.sessions.admitted_for(identity) == 0


async def test_revocations_and_withdrawals_reach_the_sessions_until_the_tunnel_stops() -> None:
    subs = Subscriptions()
    t = tunnel(subs=subs)
    await t.start()
    assert len(subs.revocations) == 1 and len(subs.withdrawals) == 1
    loop = asyncio.get_running_loop()
    key = Session(Identity("api_key", "k1", credential_id="k1"), FakeHop(), loop.time())
    jwt = Session(
        Identity("jwt", "a", credential_id="idp", signing_key="fp-old"), FakeHop(), loop.time()
    )
    for s in (key, jwt):
        t.sessions.register(s, time.perf_counter())
    subs.revocations[0]("k1")
    subs.withdrawals[0]("idp", frozenset({"fp-old"}))
    assert key.outcome is KEY_REVOKED and jwt.outcome is SIGNING_KEY_WITHDRAWN
    for s in (key, jwt):
        t.sessions.unregister(s)
    await t.stop()
    assert subs.revocations == [] and subs.withdrawals == []


class FakeHop:
    async def ping(self) -> asyncio.Future[float]:
        pong: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        pong.set_result(0.0)
        return pong

    @property
    def transport(self) -> FakeHop:
        return self

    def abort(self) -> None:
        pass
