"""The `/ws` protocol against a real uvicorn server, and the pieces behind it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from upstream_demo.app import create_app
from upstream_demo.events import EventBus, ModelEvent, ModelSimulator
from upstream_demo.protocol import (
    Ping,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    choose_subprotocol,
    parse_client_message,
)
from upstream_demo.store import ModelStore

ServeApp = Callable[..., AbstractAsyncContextManager[str]]


@pytest.fixture
async def server(serve_app: ServeApp) -> AsyncIterator[str]:
    """A backend whose simulator is off, so every event comes from the test's own requests."""
    app = create_app(event_interval=0, heartbeat_s=0.3, transition_s=0.05, token_delay_s=0.02)
    async with serve_app(app) as address:
        yield address


async def recv(ws: ClientConnection, timeout: float = 2.0) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    message: dict[str, Any] = json.loads(raw)
    return message


async def recv_type(ws: ClientConnection, kind: str, timeout: float = 2.0) -> dict[str, Any]:
    """The next message of `kind`, skipping heartbeats."""
    async with asyncio.timeout(timeout):
        while True:
            message = await recv(ws)
            if message["type"] == kind:
                return message


async def request(address: str, method: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://{address}") as http:
        return await http.request(method, path)


async def test_subscribe_is_acknowledged_with_every_current_topic_and_a_seq(server: str) -> None:
    async with connect(f"ws://{server}/ws") as ws:
        await ws.send(json.dumps({"type": "subscribe", "topics": ["model:llama2"]}))
        first = await recv(ws)
        assert first == {
            "type": "subscribed",
            "topics": ["model:llama2"],
            "added": ["model:llama2"],
            "seq": 1,
        }
        await ws.send(json.dumps({"type": "subscribe", "topics": ["models", "model:llama2"]}))
        second = await recv(ws)
        assert second["topics"] == ["model:llama2", "models"]
        assert second["added"] == ["models"]
        assert second["seq"] == 2


async def test_rest_start_delivers_model_updates_with_consecutive_seq(server: str) -> None:
    async with connect(f"ws://{server}/ws") as ws:
        await ws.send(json.dumps({"type": "subscribe", "topics": ["models"]}))
        ack = await recv_type(ws, "subscribed")
        response = await request(server, "POST", "/api/models/phi-3/start")
        assert response.status_code == 200
        starting = await recv_type(ws, "model_update")
        running = await recv_type(ws, "model_update")
    assert (starting["model_id"], starting["status"]) == ("phi-3", "starting")
    assert (running["model_id"], running["status"]) == ("phi-3", "running")
    assert starting["details"]["previous_status"] == "stopped"
    assert starting["timestamp"].endswith("Z")
    assert ack["seq"] < starting["seq"] < running["seq"]


async def test_a_model_topic_receives_only_that_models_updates(server: str) -> None:
    async with connect(f"ws://{server}/ws") as ws:
        await ws.send(json.dumps({"type": "subscribe", "topics": ["model:phi-3"]}))
        await recv_type(ws, "subscribed")
        await request(server, "POST", "/api/models/mistral-7b/start")
        await request(server, "POST", "/api/models/phi-3/start")
        updates = [await recv_type(ws, "model_update") for _ in range(2)]
    assert [(u["model_id"], u["status"]) for u in updates] == [
        ("phi-3", "starting"),
        ("phi-3", "running"),
    ]


async def test_unsubscribe_stops_delivery(server: str) -> None:
    async with connect(f"ws://{server}/ws") as ws:
        await ws.send(json.dumps({"type": "subscribe", "topics": ["models", "model:phi-3"]}))
        await recv_type(ws, "subscribed")
        await ws.send(json.dumps({"type": "unsubscribe", "topics": ["models", "model:phi-3"]}))
        ack = await recv_type(ws, "unsubscribed")
        assert ack["topics"] == []
        assert sorted(ack["removed"]) == ["model:phi-3", "models"]
        await request(server, "POST", "/api/models/phi-3/start")
        await asyncio.sleep(0.2)
        await ws.send(json.dumps({"type": "ping"}))
        # Nothing but heartbeats arrived before the pong.
        assert (await recv_type(ws, "pong"))["type"] == "pong"


async def test_ping_is_answered_with_pong_echoing_the_id(server: str) -> None:
    async with connect(f"ws://{server}/ws") as ws:
        await ws.send(json.dumps({"type": "ping", "id": 7}))
        pong = await recv(ws)
    assert pong["type"] == "pong"
    assert pong["id"] == 7
    assert pong["seq"] == 1


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "bad_json"),
        ("[1, 2]", "bad_message"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "subscribe", "topics": ["weather"]}', "bad_topics"),
        ('{"type": "subscribe", "topics": "models"}', "bad_topics"),
        ('{"type": "subscribe", "topics": []}', "bad_topics"),
        ('{"type": "unsubscribe"}', "bad_topics"),
    ],
)
async def test_a_bad_message_gets_an_error_and_the_connection_stays_open(
    server: str, frame: str, code: str
) -> None:
    async with connect(f"ws://{server}/ws") as ws:
        await ws.send(frame)
        error = await recv(ws)
        assert error["type"] == "error"
        assert error["code"] == code
        assert error["message"]
        assert error["seq"] == 1
        await ws.send(json.dumps({"type": "ping"}))
        pong = await recv_type(ws, "pong")
        assert pong["seq"] == 2


async def test_a_binary_frame_is_read_as_json_text(server: str) -> None:
    async with connect(f"ws://{server}/ws") as ws:
        await ws.send(b'{"type": "ping"}')
        assert (await recv(ws))["type"] == "pong"


async def test_heartbeats_arrive_periodically_with_seq(server: str) -> None:
    async with connect(f"ws://{server}/ws") as ws:
        first = await recv_type(ws, "heartbeat", timeout=2)
        second = await recv_type(ws, "heartbeat", timeout=2)
    assert first["timestamp"].endswith("Z")
    assert second["seq"] == first["seq"] + 1


async def test_an_offered_subprotocol_is_accepted_skipping_bearer_tokens(server: str) -> None:
    async with connect(f"ws://{server}/ws", subprotocols=["bearer.abc", "demo.v1"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "demo.v1"
    async with connect(f"ws://{server}/ws") as ws:
        assert ws.subprotocol is None


async def test_the_simulator_moves_models_every_interval(serve_app: ServeApp) -> None:
    app = create_app(event_interval=0.05, heartbeat_s=0)
    async with serve_app(app) as address, connect(f"ws://{address}/ws") as ws:
        await ws.send(json.dumps({"type": "subscribe", "topics": ["models"]}))
        await recv_type(ws, "subscribed")
        updates = [await recv_type(ws, "model_update") for _ in range(3)]
    assert [u["seq"] for u in updates] == [2, 3, 4]
    assert {u["details"]["source"] for u in updates} == {"simulator"}
    for update in updates:
        assert update["status"] in {"stopped", "starting", "running", "stopping"}
        assert update["details"]["previous_status"] != update["status"]


async def test_streamed_chat_tokens_arrive_over_time(server: str) -> None:
    body = {"model": "llama2", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    arrivals: list[float] = []
    async with (
        httpx.AsyncClient(base_url=f"http://{server}") as http,
        http.stream("POST", "/api/chat/completions", json=body) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
                last = line
    assert last == "data: [DONE]"
    assert len(arrivals) > 10
    assert arrivals[-1] - arrivals[0] > 0.2  # delivered with delays, not in one piece


# -- the pieces, without sockets --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "command"),
    [
        ('{"type": "subscribe", "topics": ["models", "models"]}', Subscribe(("models",))),
        ('{"type": "unsubscribe", "topics": ["model:phi-3"]}', Unsubscribe(("model:phi-3",))),
        ('{"type": "ping"}', Ping()),
        (b'{"type": "ping", "id": "x"}', Ping("x")),
    ],
)
def test_parse_client_message_accepts_the_protocol(raw: str | bytes, command: object) -> None:
    assert parse_client_message(raw) == command


@pytest.mark.parametrize(
    "raw",
    ["", "null", '{"type": 1}', '{"type": "subscribe", "topics": ["model:"]}', "x" * 70000],
)
def test_parse_client_message_refuses_the_rest(raw: str) -> None:
    with pytest.raises(ProtocolError):
        parse_client_message(raw)


def test_choose_subprotocol_skips_bearer_entries() -> None:
    assert choose_subprotocol(["Bearer.xyz", "graphql-ws"]) == "graphql-ws"
    assert choose_subprotocol(["bearer.only"]) is None
    assert choose_subprotocol([]) is None


async def test_a_full_subscription_counts_dropped_events() -> None:
    bus = EventBus()
    subscription = bus.subscribe(maxsize=2)
    subscription.topics.add("model:a")
    for status in ("starting", "running", "stopping", "stopped"):
        bus.publish(ModelEvent("a", status, {}))
    bus.publish(ModelEvent("b", "running", {}))  # another topic: neither queued nor dropped
    assert subscription.queue.qsize() == 2
    assert subscription.take_dropped() == 2
    assert subscription.take_dropped() == 0


async def test_simulator_step_follows_the_state_cycle() -> None:
    store = ModelStore()
    simulator = ModelSimulator(store, EventBus())
    seen = [store.get("phi-3").status]  # type: ignore[union-attr]
    for _ in range(4):
        model = simulator.step("phi-3")
        assert model is not None
        seen.append(model.status)
    assert seen == ["stopped", "starting", "running", "stopping", "stopped"]
