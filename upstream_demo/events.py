"""Live model events: a topic pub/sub bus and the simulator that moves models between states."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from upstream_demo.store import NEXT_STATUS, Model, ModelStore, Status, utc_now_iso

ALL_MODELS_TOPIC = "models"


def model_topic(model_id: str) -> str:
    return f"model:{model_id}"


@dataclass(frozen=True, slots=True)
class ModelEvent:
    """A change of one model, published to `models` and `model:<id>`."""

    model_id: str
    status: str
    details: dict[str, Any]
    timestamp: str = field(default_factory=utc_now_iso)

    @property
    def topics(self) -> tuple[str, str]:
        return (ALL_MODELS_TOPIC, model_topic(self.model_id))

    def message(self) -> dict[str, Any]:
        """The WebSocket message body, without the per-connection `seq`."""
        return {
            "type": "model_update",
            "model_id": self.model_id,
            "status": self.status,
            "details": self.details,
            "timestamp": self.timestamp,
        }


class Subscription:
    """One listener: its topics and a bounded queue of matching events.

    A listener too slow to keep up loses events rather than growing memory; the loss is counted so
    the WebSocket session can skip sequence numbers and the client sees the gap.
    """

    def __init__(self, maxsize: int = 256) -> None:
        self.topics: set[str] = set()
        self.queue: asyncio.Queue[ModelEvent] = asyncio.Queue(maxsize)
        self.dropped = 0

    def offer(self, event: ModelEvent) -> None:
        if self.topics.isdisjoint(event.topics):
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped


class EventBus:
    """Fans every published event out to the subscriptions whose topics match."""

    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()

    def subscribe(self, maxsize: int = 256) -> Subscription:
        subscription = Subscription(maxsize)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    def publish(self, event: ModelEvent) -> None:
        for subscription in list(self._subscriptions):
            subscription.offer(event)


class ModelSimulator:
    """Drives model state: a periodic random step, and start/stop requests from the REST API.

    A requested start goes `stopped -> starting` at once and `starting -> running` after
    `transition_s`; stop mirrors it through `stopping`.
    """

    def __init__(
        self,
        store: ModelStore,
        bus: EventBus,
        *,
        interval_s: float = 3.0,
        transition_s: float = 1.5,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._bus = bus
        self.interval_s = interval_s
        self.transition_s = transition_s
        self._rng = rng or random.Random()
        self._timers: set[asyncio.TimerHandle] = set()

    # -- publishing ---------------------------------------------------------------------------

    def publish(
        self, model: Model, *, source: str, status: str | None = None, **details: Any
    ) -> ModelEvent:
        body: dict[str, Any] = {
            "name": model.name,
            "source": source,
            "replicas": model.replicas,
            **details,
        }
        if model.status == "running" and status is None:
            body["metrics"] = {
                "gpu_utilization": round(self._rng.uniform(0.35, 0.95), 2),
                "requests_per_second": round(self._rng.uniform(2.0, 40.0), 1),
                "p50_latency_ms": self._rng.randint(40, 220),
            }
        event = ModelEvent(model.id, status or model.status, body)
        self._bus.publish(event)
        return event

    def _move(self, model_id: str, to: Status, *, source: str) -> Model | None:
        before = self._store.get(model_id)
        if before is None or before.status == to:
            return before
        after = self._store.set_status(model_id, to)
        if after is not None:
            self.publish(after, source=source, previous_status=before.status)
        return after

    # -- the simulator ------------------------------------------------------------------------

    def step(self, model_id: str | None = None) -> Model | None:
        """Advance one model (a random one unless named) to its next status."""
        ids = self._store.ids()
        if model_id is None:
            if not ids:
                return None
            model_id = self._rng.choice(ids)
        model = self._store.get(model_id)
        if model is None:
            return None
        return self._move(model_id, NEXT_STATUS[model.status], source="simulator")

    async def run(self) -> None:
        """Step forever, once every `interval_s` seconds."""
        while True:
            await asyncio.sleep(self.interval_s)
            self.step()

    # -- requested transitions ----------------------------------------------------------------

    def start(self, model_id: str) -> Model | None:
        """Begin starting a model; a model already starting or running is left as it is."""
        return self._request(model_id, via="starting", to="running", done=("starting", "running"))

    def stop(self, model_id: str) -> Model | None:
        """Begin stopping a model; a model already stopping or stopped is left as it is."""
        return self._request(model_id, via="stopping", to="stopped", done=("stopping", "stopped"))

    def _request(
        self, model_id: str, *, via: Status, to: Status, done: Iterable[str]
    ) -> Model | None:
        model = self._store.get(model_id)
        if model is None or model.status in done:
            return model
        moved = self._move(model_id, via, source="api")
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def finish() -> None:
            self._timers.discard(handle)
            current = self._store.get(model_id)
            # Someone (the simulator, another request) may have moved it meanwhile.
            if current is not None and current.status == via:
                self._move(model_id, to, source="api")

        handle = loop.call_later(self.transition_s, finish)
        self._timers.add(handle)
        return moved

    def close(self) -> None:
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
