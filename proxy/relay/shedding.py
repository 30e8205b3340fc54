"""Load shedding (`upstream.max_concurrent_requests`): at most that many HTTP exchanges with the
upstream at once; a request beyond it waits for a slot at most `upstream.queue_timeout_s`, in a
queue of bounded length, then gets 503 with Retry-After. A flood costs one small future per queued
request and a quick refusal for the rest: memory stays bounded. WebSocket sessions are not counted
here (they have `websocket.max_connections`): a long-lived session must not starve short requests.
"""

from __future__ import annotations

import asyncio
import collections

from ..errors import ServiceUnavailable


class Admission:
    """A counting gate with a bounded FIFO queue; a freed slot is handed to the oldest waiter."""

    __slots__ = ("limit", "queue_timeout", "max_queued", "active", "_waiters")

    def __init__(self, limit: int, queue_timeout: float, max_queued: int) -> None:
        self.limit = limit
        self.queue_timeout = queue_timeout
        self.max_queued = max_queued or limit
        self.active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def enter(self) -> None:
        """Take a slot, waiting for one at most queue_timeout; raises the 503 otherwise."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_queued or self.queue_timeout <= 0:
            raise _shed("queue_full")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # the slot was handed over just as we gave up: pass it on
            else:
                waiter.cancel()
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            if isinstance(exc, TimeoutError):
                raise _shed("queue_timeout") from None
            raise

    def leave(self) -> None:
        """Give the slot back: to the oldest waiter still waiting, or to the pool of slots."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands; `active` stays
                return
        self.active -= 1


def _shed(why: str) -> ServiceUnavailable:
    return ServiceUnavailable(
        "the upstream is at its concurrency limit", retry_after_s=1, details={"reason": why}
    )
