"""One `/ws` connection: reads commands, pushes subscribed events and heartbeats, numbers them."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from upstream_demo.events import EventBus, Subscription
from upstream_demo.protocol import (
    Ping,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    choose_subprotocol,
    parse_client_message,
)
from upstream_demo.store import utc_now_iso


class EventSession:
    """Serves one WebSocket until the client leaves or the server shuts down."""

    def __init__(self, websocket: WebSocket, bus: EventBus, *, heartbeat_s: float) -> None:
        self._ws = websocket
        self._bus = bus
        self._heartbeat_s = heartbeat_s
        self._seq = 0
        self._send_lock = asyncio.Lock()
        self._subscription: Subscription | None = None

    async def run(self) -> None:
        offered = list(self._ws.scope.get("subprotocols") or [])
        await self._ws.accept(subprotocol=choose_subprotocol(offered))
        self._subscription = self._bus.subscribe()
        tasks = [
            asyncio.create_task(self._read()),
            asyncio.create_task(self._pump(self._subscription)),
        ]
        if self._heartbeat_s > 0:
            tasks.append(asyncio.create_task(self._heartbeat()))
        try:
            # Whichever ends first (usually the reader, on disconnect) ends the session.
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._bus.unsubscribe(self._subscription)

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            dropped = self._subscription.take_dropped() if self._subscription else 0
            self._seq += 1 + dropped
            await self._ws.send_json({**message, "seq": self._seq})

    async def _read(self) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            while True:
                frame = await self._ws.receive()
                if frame["type"] == "websocket.disconnect":
                    return
                raw = frame.get("text")
                if raw is None:
                    raw = frame.get("bytes") or b""
                await self.send(self._answer(raw))

    def _answer(self, raw: str | bytes) -> dict[str, Any]:
        assert self._subscription is not None
        topics = self._subscription.topics
        try:
            command = parse_client_message(raw)
        except ProtocolError as exc:
            return exc.to_message()
        if isinstance(command, Subscribe):
            added = [t for t in command.topics if t not in topics]
            topics.update(command.topics)
            return {"type": "subscribed", "topics": sorted(topics), "added": added}
        if isinstance(command, Unsubscribe):
            removed = [t for t in command.topics if t in topics]
            topics.difference_update(command.topics)
            return {"type": "unsubscribed", "topics": sorted(topics), "removed": removed}
        assert isinstance(command, Ping)
        pong: dict[str, Any] = {"type": "pong", "timestamp": utc_now_iso()}
        if command.id is not None:
            pong["id"] = command.id
        return pong

    async def _pump(self, subscription: Subscription) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            while True:
                event = await subscription.queue.get()
                # Unsubscribed after the event was queued: do not deliver it.
                if subscription.topics.isdisjoint(event.topics):
                    continue
                await self.send(event.message())

    async def _heartbeat(self) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            while True:
                await asyncio.sleep(self._heartbeat_s)
                await self.send({"type": "heartbeat", "timestamp": utc_now_iso()})
