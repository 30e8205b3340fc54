"""The request-head protocol (`proxy/limits.py`) driven byte by byte, without sockets, and the
contract it holds with uvicorn's httptools protocol."""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.limits import BoundedHeadProtocol, bounded_head_protocol

# --- the contract: what we override must still be there, with the shape we call ------------------

HOOKS = {
    "on_message_begin": ["self"],
    "on_header": ["self", "name", "value"],
    "on_headers_complete": ["self"],
    "data_received": ["self", "data"],
    "send_400_response": ["self", "msg"],
    "connection_made": ["self", "transport"],
    "connection_lost": ["self", "exc"],
}


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_uvicorn_httptools_protocol_still_has_the_hooks_we_override(hook: str) -> None:
    original = HttpToolsProtocol.__dict__.get(hook)
    assert inspect.isfunction(original), (
        f"uvicorn's HttpToolsProtocol no longer defines {hook}(): BoundedHeadProtocol in "
        "proxy/limits.py overrides it (head limits, trailers, absolute-form targets) and must be "
        "revisited for this uvicorn version"
    )
    assert list(inspect.signature(original).parameters) == HOOKS[hook]
    assert hook in BoundedHeadProtocol.__dict__


def test_uvicorn_hands_the_app_the_list_on_header_appends_to() -> None:
    # The trailer fix relies on it: whatever on_header appends after the head ends up in
    # scope["headers"], so not appending is what keeps trailers out.
    begin = inspect.getsource(HttpToolsProtocol.on_message_begin)
    header = inspect.getsource(HttpToolsProtocol.on_header)
    assert '"headers": self.headers' in begin and "self.headers = []" in begin
    assert "self.headers.append((name, value))" in header


# --- the protocol driven without sockets ---------------------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.protocol: Any = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol


async def serve(data: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """Feed `data` to a fresh protocol; the scopes the app saw and the bytes written back."""
    scopes: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope)
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    cls = bounded_head_protocol(64 * 1024, 10.0)
    config = uvicorn.Config(app, http=cls, lifespan="off", log_config=None, ws="none")
    protocol = cls(config=config, server_state=ServerState(), app_state={})
    transport = FakeTransport()
    protocol.connection_made(transport)
    protocol.data_received(data)
    for _ in range(20):
        await asyncio.sleep(0)
    protocol.connection_lost(None)
    return scopes, bytes(transport.written)


def status_of(written: bytes) -> int:
    return int(written.split(b" ", 2)[1])


async def test_trailer_fields_never_join_the_request_headers() -> None:
    scopes, written = await serve(
        b"POST /x HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-API-Key: secret\r\nHost: evil.test\r\n\r\n"
    )
    assert status_of(written) == 204
    assert scopes[0]["headers"] == [(b"host", b"app.test"), (b"transfer-encoding", b"chunked")]


async def test_the_next_pipelined_request_still_gets_its_own_headers() -> None:
    scopes, _ = await serve(
        b"POST /a HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\nX-Trailer: 1\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: app.test\r\nX-Second: 2\r\n\r\n"
    )
    assert [s["path"] for s in scopes] == ["/a", "/b"]
    assert (b"x-second", b"2") in scopes[1]["headers"]
    assert all(name != b"x-trailer" for s in scopes for name, _ in s["headers"])


@pytest.mark.parametrize(
    "target",
    [
        b"http://evil.test/x",
        b"http://user@app.test/x",
        b"ftp://app.test/x",
        b"http://app.test?x=1",
        b"CONNECT app.test:443",
    ],
)
async def test_an_absolute_form_target_must_name_the_host(target: bytes) -> None:
    method, _, target = target.rpartition(b" ")
    request = (method or b"GET") + b" " + target + b" HTTP/1.1\r\nHost: app.test\r\n\r\n"
    scopes, written = await serve(request)
    assert scopes == []
    assert status_of(written) == 400
    body = json.loads(written.partition(b"\r\n\r\n")[2])
    assert body["error"] == "bad_request" and body["details"]["reason"] == "invalid_host"


async def test_an_absolute_form_target_naming_the_host_is_served_by_its_path() -> None:
    scopes, written = await serve(
        b"GET HTTPS://App.Test:8443/x/y?q=1 HTTP/1.1\r\nHost: app.test:8443\r\n\r\n"
    )
    assert status_of(written) == 204
    assert (scopes[0]["raw_path"], scopes[0]["query_string"]) == (b"/x/y", b"q=1")
