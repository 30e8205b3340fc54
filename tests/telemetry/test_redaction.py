"""No credential reaches the log, whatever a library's line says or however it is worded."""

from __future__ import annotations

import io
import json
import logging

import pytest

from proxy.telemetry import logs

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNlY3JldA"


@pytest.mark.parametrize(
    "message",
    [
        f'%s - "WebSocket /ws?token={TOKEN}" [accepted]',  # uvicorn's wording today
        f"websocket handshake for /ws?x=1&access_token={TOKEN} done",  # a reworded one
        f"GET /api?a=1;api_key={TOKEN} HTTP/1.1",
        f"Authorization: Bearer {TOKEN}",
        f"bad request line: b'GET /x?TOKEN={TOKEN}&id_token[]={TOKEN} HTTP/1.1'",
        f"Sec-WebSocket-Protocol: bearer.{TOKEN}",
        f"X-API-Key: {TOKEN}",
        f'{{"access_token": "{TOKEN}"}}',
        f"/x,jwt={TOKEN}",
        f"a token went by: {TOKEN}",
        f"Authorization: Basic {TOKEN}",
    ],
)
def test_a_library_line_carrying_a_credential_is_written_redacted(message: str) -> None:
    stream = io.StringIO()
    handler = logs.JsonLinesHandler(stream, flush_interval_s=0)
    logger = logging.getLogger("uvicorn.error.redaction-test")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    args = ("127.0.0.1:5000",) if "%s" in message else ()
    logger.debug(message, *args)
    assert handler.drain()
    written = stream.getvalue()
    assert TOKEN not in written and TOKEN.split(".")[2] not in written
    assert "[redacted]" in json.loads(written)["message"]


def test_ordinary_lines_are_left_as_they_are() -> None:
    for text in (
        "Started server process [42]",
        "GET /api/models?limit=10&page=2",
        "x = 1",
        "signal=15 exit code=0",
        "status_code=200 sessions=4",
        "design=v2 author=bob",
        "uses basic auth",
        "keepalive=5 keys=3",
    ):
        assert logs.redact(text) == text
