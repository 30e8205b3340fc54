"""uvicorn's own lines, as the sidecar writes them: under `authproxy.server`, at levels that mean
what they say, and redacted like every library line."""

from __future__ import annotations

import io
import json
import logging
import pathlib
import sys
from collections.abc import Iterator

import pytest
import uvicorn
import websockets

from proxy.telemetry import logs

NAMES = ("authproxy", "uvicorn", "uvicorn.error", "websockets", "asyncio", "aiohttp")


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    saved = {
        n: (lg.handlers[:], lg.propagate, lg.level, lg.filters[:])
        for n in NAMES
        for lg in [logging.getLogger(n)]
    }
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    logs.configure("info", flush_interval_s=0)
    yield stream
    for n, (handlers, propagate, level, filters) in saved.items():
        lg = logging.getLogger(n)
        lg.handlers[:], lg.propagate, lg.level, lg.filters[:] = handlers, propagate, level, filters


def written(stream: io.StringIO) -> list[dict[str, object]]:
    handler = logging.getLogger("uvicorn.error").handlers[0]
    assert isinstance(handler, logs.JsonLinesHandler) and handler.drain()
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_uvicorns_lines_are_written_as_the_sidecars_server(configured: io.StringIO) -> None:
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    [line] = written(configured)
    assert (line["logger"], line["level"]) == ("authproxy.server", "info")
    assert line["message"] == "Started server process [42]"


def test_per_connection_chatter_is_debug_and_client_junk_is_info(configured: io.StringIO) -> None:
    uvicorn_error = logging.getLogger("uvicorn.error")
    uvicorn_error.info("connection open")
    uvicorn_error.info("connection closed")
    uvicorn_error.warning("Invalid HTTP request received.")
    uvicorn_error.error("Cancel %s running task(s), timeout graceful shutdown exceeded", 2)
    lines = written(configured)
    assert [(x["message"], x["level"]) for x in lines] == [
        ("Invalid HTTP request received.", "info"),
        ("Cancel 2 running task(s), timeout graceful shutdown exceeded", "error"),
    ]


def test_a_renamed_line_is_still_redacted(configured: io.StringIO) -> None:
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXZhbHVl"
    logging.getLogger("uvicorn.error").info(
        '%s - "WebSocket %s" 403', "1.2.3.4", f"/ws?token={token}"
    )
    logging.getLogger("uvicorn.error").warning("odd: Bearer %s", token)
    lines = written(configured)
    assert [x["logger"] for x in lines] == ["authproxy.server"]  # the handshake line is dropped
    assert token not in configured.getvalue() and "[redacted]" in str(lines[0]["message"])


def test_the_uvicorn_lines_we_relevel_still_exist_in_uvicorn() -> None:
    """A contract: the levels are matched by message text; a uvicorn (or the websockets library it
    hands its logger to) that rewords one fails here."""
    source = "".join(
        p.read_text()
        for package in (uvicorn, websockets)
        for p in pathlib.Path(str(package.__file__)).parent.rglob("*.py")
    )
    for message in logs._HONEST_LEVELS:
        assert f'"{message}"' in source, message
