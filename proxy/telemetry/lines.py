"""Access lines waiting to be handed to the log's writer thread, in batches: compiled with the
request path, which adds one line per request (telemetry/access.py).

The batch is handed on when it holds `max_bytes`, when `flush_interval_s` has passed since its
first line (0: at once), and whenever the handler (telemetry/logs.py) writes any other line or is
flushed, so that lines keep their order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class LineBatch:
    """Encoded lines (UTF-8, newline-terminated) waiting for `sink`, the writer's `put`."""

    def __init__(
        self, sink: Callable[[bytes], None], flush_interval_s: float, max_bytes: int
    ) -> None:
        self.sink = sink
        self.flush_interval_s = flush_interval_s
        self.max_bytes = max_bytes
        self.pending: list[bytes] = []
        self.size = 0
        self.timer: asyncio.TimerHandle | None = None

    def add(self, line: bytes) -> None:
        self.pending.append(line)
        self.size += len(line)
        if self.flush_interval_s <= 0 or self.size >= self.max_bytes:
            self.flush()
        elif self.timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a command, a test): nothing would fire the timer
                self.flush()
                return
            self.timer = loop.call_later(self.flush_interval_s, self.flush)

    def flush(self) -> None:
        """Hand what waits to the sink now."""
        timer = self.timer
        if timer is not None:
            timer.cancel()
            self.timer = None
        if self.pending:
            data = b"".join(self.pending)
            self.pending = []
            self.size = 0
            self.sink(data)
