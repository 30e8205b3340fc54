"""The pipeline in-process: what a bug inside the sidecar looks like from outside."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy import config
from proxy.app import App
from proxy.relay.http import Forwarder
from proxy.types import Message, Scope

SETTINGS = config.from_dict({"routes": [{"path": "/*", "auth": "public"}]})


def scope(path: str = "/x") -> Scope:
    return {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"sidecar"), (b"x-request-id", b"bug-1")],
        "scheme": "http",
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 8000),
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
    }


async def call(app: App) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope(), receive, send)
    return sent


def break_forwarding(app: App, forward: Any) -> None:
    """Make the app's forwarder run `forward` instead: a bug inside the sidecar.

    By subclass, not by assigning the method: compiled (mypyc), the pipeline calls the class's
    method and never looks at an instance attribute."""

    class Broken(Forwarder):
        async def forward(self, *args: Any, **kwargs: Any) -> None:
            await forward(*args, **kwargs)

    settings = app.settings
    app.pipeline.forwarder = Broken(
        settings.server.max_body_bytes, app.headers, upstream=settings.upstream, metrics=app.metrics
    )


async def test_an_unexpected_error_is_a_json_500_without_a_traceback() -> None:
    app = App(SETTINGS)
    await app.startup()
    try:

        async def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("secret internals")

        break_forwarding(app, broken)
        sent = await call(app)
    finally:
        await app.shutdown()
    assert sent[0]["status"] == 500
    body = json.loads(sent[1]["body"])
    assert body["error"] == "internal_error" and body["request_id"] == "bug-1"
    assert "secret internals" not in sent[1]["body"].decode()
    assert "Traceback" not in sent[1]["body"].decode()


async def test_an_error_after_the_response_started_cuts_the_connection() -> None:
    app = App(SETTINGS)
    await app.startup()
    try:

        async def half(scope: Scope, receive: Any, send: Any, **kwargs: Any) -> None:
            kwargs["exchange"].response_started = True
            await send({"type": "http.response.start", "status": 200, "headers": []})
            raise RuntimeError("mid-body")

        break_forwarding(app, half)
        with pytest.raises(RuntimeError, match="mid-body"):
            await call(app)
    finally:
        await app.shutdown()


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("OPTIONS", [(b"origin", b"x"), (b"access-control-request-method", b"GET")], True),
        ("OPTIONS", [(b"access-control-request-method", b"GET"), (b"origin", b"null")], True),
        ("OPTIONS", [(b"origin", b"x")], False),
        ("OPTIONS", [(b"access-control-request-method", b"GET")], False),
        ("OPTIONS", [], False),
        ("GET", [(b"origin", b"x"), (b"access-control-request-method", b"GET")], False),
    ],
)
def test_only_options_with_origin_and_request_method_is_a_preflight(
    method: str, headers: list[tuple[bytes, bytes]], expected: bool
) -> None:
    from proxy.pipeline import Request

    assert Request.read({"headers": headers}, method, 65536).preflight is expected


def test_two_origin_headers_are_refused_rather_than_one_picked() -> None:
    from proxy.errors import BadRequest
    from proxy.pipeline import Request

    headers = [(b"host", b"h"), (b"origin", b""), (b"origin", b"http://allowed.test")]
    with pytest.raises(BadRequest) as caught:
        Request.read({"headers": headers}, "GET", 65536)
    assert caught.value.details["reason"] == "duplicate_origin"
