"""One tunnelled WebSocket session's state (relay/ws_registry.py keeps the sessions), compiled
with the frame relay: every relayed frame counts itself here (relay/ws_passthrough.py), and a
compiled class's fields are written in place, where an interpreted object's attributes cost a
lookup each, four a frame."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..identity import Identity
from .ws_outcomes import Outcome


class Abortable(Protocol):
    """A transport that can be cut without a closing handshake."""

    def abort(self) -> None: ...


class UpstreamHop(Protocol):
    """What the registry needs of a session's upstream connection: a ping for the keepalive, and
    its transport to cut when a shutdown's closing handshake takes too long."""

    async def ping(self) -> Awaitable[float]: ...

    @property
    def transport(self) -> Abortable: ...


class Session:
    """One tunnelled connection: who opened it, its counters, how it ended, its timers."""

    def __init__(
        self,
        identity: Identity | None,
        upstream: UpstreamHop,
        last_activity: float,  # loop time of the last message either way
        path: str = "",  # as routed: a reload judges the session again against its new route
    ) -> None:
        self.identity = identity
        self.upstream = upstream
        self.last_activity = last_activity
        # The loop's clock while an idle timeout watches the session (the registry sets it): a
        # relayed message then notes its time. Without one (the default), none asks the clock.
        self.idle_clock: Callable[[], float] | None = None
        self.path = path
        self.messages_in = 0  # client -> upstream
        self.bytes_in = 0
        self.messages_out = 0  # upstream -> client
        self.bytes_out = 0
        self.outcome: Outcome | None = None
        # The task relaying upstream -> client while the relay runs; ending the session stops it.
        self.relay: asyncio.Task[Any] | None = None
        self.expiry: asyncio.TimerHandle | None = None  # the credential's end (moved by a reauth)
        self.lifetime: asyncio.TimerHandle | None = None  # websocket.max_connection_lifetime_s
        self.idle_timer: asyncio.TimerHandle | None = None
        self.wheel_slot: int | None = None  # where the keepalive wheel holds it
        self.ping_task: asyncio.Future[None] | None = None  # only while a ping waits for its pong

    def has_ended(self) -> bool:
        """Whether its end is decided. Code that awaits between two looks asks this, not
        `outcome is None` (nor a property): mypy narrows those across an await as if nothing
        else could set them, and compiled (mypyc) the second look then fails its type check."""
        return self.outcome is not None

    def end(self, outcome: Outcome) -> None:
        """Decide how the session ends; the first decision wins."""
        if self.outcome is None:
            self.outcome = outcome
            relay = self.relay
            if relay is not None and relay is not asyncio.current_task():
                relay.cancel()
