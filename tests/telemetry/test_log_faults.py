"""The access log when its stream cannot take a line (ENOSPC on a full disk, /dev/full): the
request that wrote the line is not the worse for it, and lines that cannot be written are not
kept without bound (tests/integration/test_faults.py runs a real sidecar on /dev/full)."""

from __future__ import annotations

import errno
import io
import logging
import time
from collections.abc import Iterator

import pytest

from proxy.telemetry import access, logs


class FullStream(io.StringIO):
    """A text stream whose device is full until `full` is cleared."""

    def __init__(self) -> None:
        super().__init__()
        self.full = True

    def write(self, s: str) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(s)

    def flush(self) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def full_log() -> Iterator[tuple[FullStream, logs.JsonLinesHandler]]:
    stream = FullStream()
    handler = logs.JsonLinesHandler(stream, flush_interval_s=0)
    saved = (logs.ACCESS.handlers[:], logs.ACCESS.propagate, logs.ACCESS.level)
    logs.ACCESS.handlers[:] = [handler]
    logs.ACCESS.propagate = False
    logs.ACCESS.setLevel(logging.INFO)
    try:
        yield stream, handler
    finally:
        logs.ACCESS.handlers[:], logs.ACCESS.propagate = saved[0], saved[1]
        logs.ACCESS.setLevel(saved[2])


LINE = {
    "time": "",
    "level": "info",
    "logger": logs.ACCESS_LOGGER,
    "message": "request",
    "request_id": "r1",
    "method": "GET",
    "path": "/x" * 100,
    "status": 200,
}


def test_an_access_line_that_cannot_be_written_never_raises_into_the_request(
    full_log: tuple[FullStream, logs.JsonLinesHandler],
) -> None:
    # pipeline._log runs after the response was sent: an exception there ends the request's task
    # with "Task exception was never retrieved" and a traceback on stderr, for every request.
    for _ in range(3):
        access.access_line(dict(LINE))


def test_lines_that_cannot_be_written_are_not_kept_without_bound(
    full_log: tuple[FullStream, logs.JsonLinesHandler],
) -> None:
    stream, _ = full_log
    for _ in range(30_000):  # about 10 MB of access lines
        try:
            access.access_line(dict(LINE))
        except OSError:
            pass
    stream.full = False
    logs.flush()
    # Whatever the log held on to while the device was full is written now (by whichever thread
    # writes): wait until the stream stops growing.
    size, deadline = -1, time.monotonic() + 5
    while size != len(stream.getvalue()) and time.monotonic() < deadline:
        size = len(stream.getvalue())
        time.sleep(0.3)
    # Bounded (here: by 9 MiB), not every line since the device filled up.
    assert size <= 9 << 20, f"{size} bytes were held while the device was full"
