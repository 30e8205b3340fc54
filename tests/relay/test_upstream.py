"""The upstream client against scripted upstreams on real loopback sockets: framing, keep-alive,
the one re-send of a request whose pooled connection was dead, timeouts, and hostile answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from proxy import config
from proxy.auth import consumed_headers
from proxy.errors import ProxyError
from proxy.relay.headers import HeaderPolicy
from proxy.relay.http import Exchange, Forwarder, UpstreamAborted
from proxy.relay.upstream import UpstreamPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Upstream:
    """A TCP server whose handler is told the connection's number (1, 2, ...)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        body = b""
        lower = head.lower()
        if b"content-length:" in lower:
            n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
            body = await reader.readexactly(n)
        elif b"transfer-encoding: chunked" in lower:
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        self.requests.append(head + body)
        return head + body


@asynccontextmanager
async def upstream(handler: Handler) -> AsyncIterator[Upstream]:
    up = Upstream(handler)
    server = await asyncio.start_server(up._serve, "127.0.0.1", 0)
    up.port = server.sockets[0].getsockname()[1]
    try:
        yield up
    finally:
        server.close()


@asynccontextmanager
async def forwarder(
    up: Upstream, preserve_host: bool = False, **upstream: Any
) -> AsyncIterator[Forwarder]:
    settings = config.from_dict({"upstream": {"url": f"http://127.0.0.1:{up.port}", **upstream}})
    headers = HeaderPolicy(settings, credential_headers=consumed_headers(settings.auth))
    fw = Forwarder(settings.server.max_body_bytes, headers, preserve_host=preserve_host)
    fw.pool = UpstreamPool(settings.upstream, asyncio.get_running_loop())
    try:
        yield fw
    finally:
        await fw.pool.close()


async def call(
    fw: Forwarder,
    method: str = "GET",
    body: list[bytes] | None = None,
    content_length: int | None = None,
    endless: bool = False,
) -> tuple[list[dict[str, Any]], Exchange]:
    chunks = list(body or [b""])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": endless or bool(chunks)}
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers: list[tuple[bytes, bytes]] = []  # the framing is the forwarder's own
    exchange = Exchange()
    await fw.forward(
        {"type": "http", "method": method},
        receive,
        send,
        raw_path=b"/x",
        query=b"",
        headers=headers,
        content_length=content_length,
        response_headers=lambda h: h,
        exchange=exchange,
    )
    return sent, exchange


def body_of(sent: list[dict[str, Any]]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


async def test_a_kept_alive_connection_carries_the_next_request() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            await up.read_request(r)
            w.write(OK)

    async with upstream(handler) as up, forwarder(up) as fw:
        for _ in range(3):
            sent, _ = await call(fw)
            assert sent[0]["status"] == 200 and body_of(sent) == b"ok"
        assert up.connections == 1


async def test_the_head_names_the_upstream_host_and_frames_a_body() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        w.write(OK)

    async with upstream(handler) as up, forwarder(up) as fw:
        await call(fw, "POST", [b"hello"])
        request = up.requests[0]
        assert request.startswith(b"POST /x HTTP/1.1\r\n")
        assert f"host: 127.0.0.1:{up.port}\r\n".encode() in request
        assert b"content-length: 5\r\n" in request and request.endswith(b"\r\n\r\nhello")


async def test_a_streamed_body_without_length_goes_chunked_and_arrives_whole() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        w.write(OK)

    async with upstream(handler) as up, forwarder(up) as fw:
        sent, exchange = await call(fw, "PUT", [b"ab", b"cd", b"", b"ef"])
        assert sent[0]["status"] == 200
        assert b"transfer-encoding: chunked" in up.requests[0]
        assert up.requests[0].endswith(b"\r\n\r\nabcdef")
        assert exchange.bytes_in == 6


async def test_a_post_without_body_says_content_length_zero() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        w.write(OK)

    async with upstream(handler) as up, forwarder(up) as fw:
        await call(fw, "POST")
        await call(fw, "GET")
        assert b"content-length: 0" in up.requests[0]
        assert b"content-length" not in up.requests[1]


async def _dead_after_first(up: Upstream, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await up.read_request(r)
    w.write(OK)
    await w.drain()
    await up.read_request(r)  # the second request on this connection: closed unanswered


def _first_connection_dies_after_one_answer(up: Callable[[], Upstream]) -> Handler:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        if n == 1:
            await _dead_after_first(up(), r, w)
        else:
            await up().read_request(r)
            w.write(OK)

    return handler


async def test_a_get_on_a_pooled_connection_found_dead_is_sent_once_more() -> None:
    handler = _first_connection_dies_after_one_answer(lambda: up)
    async with upstream(handler) as up, forwarder(up) as fw:
        await call(fw)
        sent, _ = await call(fw)
        assert sent[0]["status"] == 200 and up.connections == 2


async def test_a_post_on_a_pooled_connection_found_dead_is_not_sent_twice() -> None:
    handler = _first_connection_dies_after_one_answer(lambda: up)
    async with upstream(handler) as up, forwarder(up) as fw:
        await call(fw)
        with pytest.raises(ProxyError) as caught:
            await call(fw, "POST", [b"once"])
        assert caught.value.status == 502
        assert caught.value.details["reason"] == "upstream_disconnected"
        assert up.connections == 1


async def test_a_head_answer_ends_with_its_head_and_keeps_the_connection() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            head = await up.read_request(r)
            if head.startswith(b"HEAD"):
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
            else:
                w.write(OK)

    async with upstream(handler) as up, forwarder(up) as fw:
        sent, _ = await asyncio.wait_for(call(fw, "HEAD"), 5)
        assert sent[0]["status"] == 200 and body_of(sent) == b""
        sent, _ = await call(fw)
        assert body_of(sent) == b"ok" and up.connections == 1


async def test_interim_answers_are_not_relayed() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        w.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + OK)

    async with upstream(handler) as up, forwarder(up) as fw:
        sent, _ = await call(fw)
        assert sent[0]["status"] == 200 and body_of(sent) == b"ok"
        assert (b"link", b"</a>") not in sent[0]["headers"]


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx-evil: a\x01b\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
    ids=["101-without-upgrade", "control-byte-in-header", "two-lengths", "garbage"],
)
async def test_an_invalid_answer_is_a_502(answer: bytes) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        w.write(answer)
        await asyncio.sleep(5)

    async with upstream(handler) as up, forwarder(up) as fw:
        with pytest.raises(ProxyError) as caught:
            await asyncio.wait_for(call(fw), 5)
        assert caught.value.status == 502
        assert caught.value.details["reason"] == "upstream_error"


async def test_a_body_ended_by_the_close_is_complete_and_the_connection_not_kept() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")

    async with upstream(handler) as up, forwarder(up) as fw:
        sent, _ = await call(fw)
        assert body_of(sent) == b"all of it" and sent[-1]["more_body"] is False
        await call(fw)
        assert up.connections == 2


async def test_a_body_cut_short_aborts_the_response() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        # Longer than what is read whole first: the head is relayed at once, then the cut.
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\nonly this")

    async with upstream(handler) as up, forwarder(up) as fw:
        with pytest.raises(UpstreamAborted):
            await call(fw)


async def test_a_silent_upstream_is_a_504_after_read_timeout() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        await asyncio.sleep(10)

    async with upstream(handler) as up, forwarder(up, read_timeout_s=0.3) as fw:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ProxyError) as caught:
            await call(fw)
        assert caught.value.status == 504 and caught.value.details["reason"] == "read_timeout"
        assert loop.time() - started < 3


async def test_a_trickling_upstream_is_not_cut_while_bytes_keep_coming() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(5):
            await asyncio.sleep(0.15)
            w.write(b"1\r\nx\r\n")
        w.write(b"0\r\n\r\n")

    async with upstream(handler) as up, forwarder(up, read_timeout_s=0.4) as fw:
        sent, _ = await call(fw)
        assert body_of(sent) == b"xxxxx"


async def test_a_full_pool_makes_the_next_request_wait_then_504() -> None:
    release = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            await up.read_request(r)
            await release.wait()
            w.write(OK)

    async with (
        upstream(handler) as up,
        forwarder(up, max_connections=1, connect_timeout_s=0.3) as fw,
    ):
        first = asyncio.ensure_future(call(fw))
        await asyncio.sleep(0.1)
        with pytest.raises(ProxyError) as caught:
            await call(fw)
        assert caught.value.status == 504 and caught.value.details["reason"] == "pool_timeout"
        release.set()
        sent, _ = await first
        assert sent[0]["status"] == 200
        sent, _ = await call(fw)  # the slot came back
        assert sent[0]["status"] == 200 and up.connections == 1


async def test_a_waiting_request_gets_the_connection_released_before_its_deadline() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            await up.read_request(r)
            await asyncio.sleep(0.1)
            w.write(OK)

    async with upstream(handler) as up, forwarder(up, max_connections=1) as fw:
        results = await asyncio.gather(*(call(fw) for _ in range(4)))
        assert [sent[0]["status"] for sent, _ in results] == [200] * 4
        assert up.connections == 1


async def test_an_idle_connection_older_than_keepalive_is_not_reused() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            await up.read_request(r)
            w.write(OK)

    async with upstream(handler) as up, forwarder(up, keepalive_s=0.1) as fw:
        await call(fw)
        await asyncio.sleep(0.25)
        await call(fw)
        assert up.connections == 2


async def test_an_unreachable_upstream_is_connect_failed() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    up = Upstream(lambda r, w, n: asyncio.sleep(0))
    up.port = port
    async with forwarder(up) as fw:
        with pytest.raises(ProxyError) as caught:
            await call(fw)
        assert caught.value.status == 502 and caught.value.details["reason"] == "connect_failed"


async def test_an_answer_before_the_upload_ends_is_relayed_and_the_connection_dropped() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig")
        await asyncio.sleep(1)

    async with upstream(handler) as up, forwarder(up) as fw:
        pool = fw.pool
        assert pool is not None
        sent, _ = await asyncio.wait_for(
            call(fw, "POST", [b"a" * 10, b"b" * 10], content_length=10_000, endless=True), 5
        )
        assert sent[0]["status"] == 413 and body_of(sent) == b"big"
        assert pool.idle == 0


async def test_a_short_answer_cut_before_its_end_is_a_clean_502_not_a_cut_connection() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
        await w.drain()
        await asyncio.sleep(0.1)
        w.write(b"only half")  # and the upstream dies

    async with upstream(handler) as up, forwarder(up) as fw:
        with pytest.raises(ProxyError) as caught:
            await call(fw)
        assert caught.value.status == 502


async def test_a_long_answer_starts_before_its_body_has_arrived() -> None:
    release = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000)
        await release.wait()
        w.write(b"x" * 99000)

    async with upstream(handler) as up, forwarder(up) as fw:
        sent: list[dict[str, Any]] = []
        task = asyncio.ensure_future(call(fw))
        for _ in range(50):
            await asyncio.sleep(0.02)
            if task.done():
                break
        assert not task.done()  # waiting for the rest of the body, the head already relayed
        release.set()
        sent, _ = await task
        assert sent[0]["status"] == 200 and len(body_of(sent)) == 100000


async def test_a_client_pausing_its_upload_is_not_taken_for_a_silent_upstream() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)  # answers only once the whole body is in
        w.write(OK)

    async with upstream(handler) as up, forwarder(up, read_timeout_s=0.3) as fw:
        chunks = [b"a" * 10, b"b" * 10]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if len(chunks) == 1:
                await asyncio.sleep(0.8)  # the client thinks, well past read_timeout_s
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await fw.forward(
            {"type": "http", "method": "PUT"},
            receive,
            send,
            raw_path=b"/x",
            query=b"",
            headers=[],
            content_length=20,
            response_headers=lambda h: h,
            exchange=Exchange(),
        )
        assert sent[0]["status"] == 200
        assert up.requests[0].endswith(b"a" * 10 + b"b" * 10)


async def test_a_client_leaving_before_the_first_event_frees_the_connection_at_once() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await up.read_request(r)
        w.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        await asyncio.sleep(10)  # no event for a long while

    async with upstream(handler) as up, forwarder(up) as fw:
        pool = fw.pool
        assert pool is not None
        messages = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(0.2)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            pass

        exchange = Exchange()
        await asyncio.wait_for(
            fw.forward(
                {"type": "http", "method": "GET"},
                receive,
                send,
                raw_path=b"/sse",
                query=b"",
                headers=[],
                content_length=None,
                response_headers=lambda h: h,
                exchange=exchange,
            ),
            3,
        )
        assert exchange.client_gone and pool.size == 0


async def test_with_preserve_host_a_request_without_host_still_names_one() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            await up.read_request(r)
            w.write(OK)

    async with upstream(handler) as up, forwarder(up, preserve_host=True) as fw:
        await call(fw)  # an HTTP/1.0 client sent no Host: the upstream's own goes
        assert f"host: 127.0.0.1:{up.port}\r\n".encode() in up.requests[0]


async def test_a_request_joins_writes_waiting_for_the_round_and_a_close_sends_them_first() -> None:
    from proxy.outbox import outbox_of

    arrived = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:  # until our close
            await up.read_request(r)
            arrived.set()

    async with upstream(handler) as up, forwarder(up) as fw:
        conn = await fw.pool.acquire()
        assert conn.transport is not None
        outbox = outbox_of(asyncio.get_running_loop())
        request = b"GET /a HTTP/1.1\r\nhost: up\r\ncontent-length: 0\r\n\r\n"
        conn.write(request)  # no round is writing: at once
        assert not outbox.pending
        await asyncio.wait_for(arrived.wait(), 5)
        arrived.clear()
        outbox.add(conn.transport, b"")  # this round has a write waiting (an answer's, say)
        conn.write(request.replace(b"/a", b"/b"))
        assert outbox.pending[-1] == (conn.transport, request.replace(b"/a", b"/b"))
        conn.close()  # writes what waits first: a close never drops it
        assert not outbox.pending
        await asyncio.wait_for(arrived.wait(), 5)
    assert [r.split(b" ")[1] for r in up.requests] == [b"/a", b"/b"]
