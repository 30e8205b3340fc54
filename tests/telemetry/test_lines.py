"""Access lines in batches (telemetry/lines.py) and the writer thread under them (logs._Writer):
when a batch is handed on, and that what reaches a real stream is every line, in order, as UTF-8."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from proxy.telemetry import access, logs
from proxy.telemetry.lines import LineBatch


def test_a_batch_is_handed_on_when_full_and_not_before() -> None:
    handed: list[bytes] = []
    batch = LineBatch(handed.append, flush_interval_s=60.0, max_bytes=10)
    batch.add(b"1234\n")  # no running loop: handed on at once, as nothing would fire a timer
    assert handed == [b"1234\n"]

    async def under_a_loop() -> None:
        batch.add(b"abcd\n")
        assert handed == [b"1234\n"] and batch.timer is not None  # waits, a timer set
        batch.add(b"efghij\n")  # 12 bytes >= 10: handed on, the timer cancelled
        assert handed[1:] == [b"abcd\nefghij\n"] and batch.timer is None
        batch.flush()  # nothing waits: nothing handed on
        assert len(handed) == 2

    asyncio.run(under_a_loop())


def test_a_batch_waits_no_longer_than_its_interval() -> None:
    handed: list[bytes] = []

    async def main() -> None:
        batch = LineBatch(handed.append, flush_interval_s=0.05, max_bytes=1 << 20)
        batch.add(b"one\n")
        batch.add(b"two\n")
        assert handed == []
        await asyncio.sleep(0.3)
        assert handed == [b"one\ntwo\n"] and batch.timer is None

    asyncio.run(main())


def test_the_writer_writes_through_the_binary_buffer_in_order() -> None:
    """sys.stdout is a TextIOWrapper over a buffer: lines go to the buffer as UTF-8, after any
    text already written to the wrapper itself."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii", write_through=False)
    handler = logs.JsonLinesHandler(stream, flush_interval_s=60.0)
    stream.write("before\n")  # text in the wrapper, not yet in the buffer
    handler.batch.add('{"path":"/caf\u00e9"}\n'.encode())
    handler.emit(logging.LogRecord("authproxy", logging.WARNING, "x", 1, "other", None, None))
    assert handler.drain()
    lines = raw.getvalue().decode("utf-8").splitlines()
    # An ASCII text stream would have refused the é; the bytes pass as they are.
    assert lines[0] == "before"
    assert json.loads(lines[1]) == {"path": "/café"}
    assert json.loads(lines[2])["message"] == "other"


def test_access_lines_reach_the_stream_whole_and_in_order() -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8")
    handler = logs.JsonLinesHandler(stream, flush_interval_s=0.0, max_batch_bytes=256)
    saved = (logs.ACCESS.handlers[:], logs.ACCESS.propagate, logs.ACCESS.level)
    logs.ACCESS.handlers[:] = [handler]
    logs.ACCESS.propagate = False
    logs.ACCESS.setLevel(logging.INFO)
    try:
        for n in range(200):
            access.access_line(
                {
                    "time": "",
                    "level": "info",
                    "logger": "authproxy.access",
                    "message": "request",
                    "n": n,
                    "path": "/\u2713",
                }
            )
        assert handler.drain()
        written = [json.loads(line) for line in raw.getvalue().decode().splitlines()]
        assert [line["n"] for line in written] == list(range(200))
        assert all(line["path"] == "/✓" and line["time"].endswith("Z") for line in written)
        # Disabled for INFO (the answer the logging module caches, cleared by setLevel): no line.
        logs.ACCESS.setLevel(logging.WARNING)
        access.access_line({"time": "", "level": "info", "logger": "x", "message": "request"})
        assert handler.drain() and len(raw.getvalue().decode().splitlines()) == 200
        logs.ACCESS.setLevel(logging.INFO)
        logs.ACCESS.disabled = True
        access.access_line({"time": "", "level": "info", "logger": "x", "message": "request"})
        assert handler.drain() and len(raw.getvalue().decode().splitlines()) == 200
    finally:
        logs.ACCESS.disabled = False
        logs.ACCESS.handlers[:], logs.ACCESS.propagate = saved[0], saved[1]
        logs.ACCESS.setLevel(saved[2])
