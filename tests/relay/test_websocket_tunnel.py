"""The WebSocket tunnel through a real sidecar to a real upstream (tests/support/ws_upstream.py):
what each side receives, and how each side is closed.

Every test runs twice (`client_compression`): with the client offering permessage-deflate, as
browsers do, the client hop compresses and messages take the message relay; without it, neither
hop compresses and whole data frames pass as they arrived (relay/ws_passthrough.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import resource
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import psutil
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support.servers import Process, Sidecar, start_sidecar, start_upstream
from tests.support.ws_upstream import seq_message

SECRET = "tunnel-test-secret-of-at-least-32-bytes!"
ISSUER = "https://issuer.test"
ALLOWED_ORIGIN = "http://allowed.test"
KEEP_KEY, KEEP_KEY_ID = "keep-key-0123456789", "keeper"
REVOKE_KEY, REVOKE_KEY_ID = "revoke-key-0123456789", "revokee"
EXPIRE_KEY, EXPIRE_KEY_ID = "expire-key-0123456789", "expiree"
MAX_MESSAGE = 1024 * 1024

CONFIG = f"""
[cors]
allow_origins = ["{ALLOWED_ORIGIN}"]

[[auth.jwt.providers]]
name = "test"
issuer = "{ISSUER}"
audiences = ["webplus"]
secret_env = "TUNNEL_TEST_SECRET"
algorithms = ["HS256"]
leeway_s = 0

[auth.api_keys]
keys_file = "KEYS_FILE"
watch_interval_s = 0

[websocket]
max_message_bytes = {MAX_MESSAGE}
queue_messages = 8
drain_s = 1.0
{{websocket_extra}}

[[routes]]
path = "/ws/*"
auth = ["jwt", "api_key"]

[[routes]]
path = "/open/*"
auth = "public"
"""


def key_record(key_id: str, key: str, extra: str = "") -> str:
    return (
        f'[[keys]]\nid = "{key_id}"\nsha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n'
        f"{extra}\n"
    )


def token(sub: str = "alice", ttl: float = 300, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": "webplus", "sub": sub, "iat": now, "exp": now + ttl, **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


def bearer(sub: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub)}"}


Stack = tuple[Sidecar, Process]


def make_stack(tmp_path: Path, websocket_extra: str = "") -> Stack:
    upstream = start_upstream("tests.support.ws_upstream:app", tmp_path)
    keys = tmp_path / "keys.toml"
    keys.write_text(key_record(KEEP_KEY_ID, KEEP_KEY) + key_record(REVOKE_KEY_ID, REVOKE_KEY))
    body = CONFIG.replace("KEYS_FILE", str(keys)).format(websocket_extra=websocket_extra)
    sidecar = start_sidecar(tmp_path, upstream.port, body, env={"TUNNEL_TEST_SECRET": SECRET})
    return sidecar, upstream


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    sidecar, upstream = make_stack(tmp_path_factory.mktemp("tunnel"))
    yield sidecar, upstream
    sidecar.stop()
    upstream.stop()


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """A sidecar and upstream of the test's own, for tests that kill or limit them."""
    started: list[Stack] = []

    def make(websocket_extra: str = "") -> Stack:
        started.append(make_stack(tmp_path, websocket_extra))
        return started[-1]

    yield make
    for sidecar, upstream in started:
        sidecar.stop()
        upstream.stop()


def stats(upstream: Process) -> dict[str, Any]:
    result: dict[str, Any] = httpx.get(f"http://127.0.0.1:{upstream.port}/stats").json()
    return result


def ws_log_lines(sidecar: Sidecar) -> list[dict[str, Any]]:
    lines = []
    for line in sidecar.output().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("message") == "websocket":
                lines.append(record)
    return lines


# What `open_ws` offers unless a test says: set by `client_compression` for each run.
CLIENT_COMPRESSION: list[str | None] = ["deflate"]


@pytest.fixture(autouse=True, params=["deflate", None], ids=["deflate", "frames"])
def client_compression(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The client's offer: permessage-deflate (the message relay), or nothing (whole frames)."""
    CLIENT_COMPRESSION[0] = request.param
    yield request.param
    CLIENT_COMPRESSION[0] = "deflate"


def open_ws(
    sidecar: Sidecar, path: str = "/ws/echo", headers: dict[str, str] | None = None, **kwargs: Any
) -> connect:
    kwargs.setdefault("compression", CLIENT_COMPRESSION[0])
    return connect(
        sidecar.ws_url + path,
        additional_headers=headers,
        open_timeout=5,
        max_size=None,
        ping_interval=None,
        **kwargs,
    )


async def close_of(ws: ClientConnection, timeout: float = 10) -> tuple[int, str]:
    """Read until the connection closes; the close code and reason the client received."""
    async with asyncio.timeout(timeout):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, "closed without a close frame"
            return exc.rcvd.code, exc.rcvd.reason


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def info(ws: ClientConnection) -> dict[str, Any]:
    await ws.send("!info")
    report: dict[str, Any] = json.loads(await ws.recv())
    return report


# --- relay ---------------------------------------------------------------------------------------


async def test_ten_thousand_mixed_messages_each_way_arrive_complete_and_in_order(
    stack: Stack,
) -> None:
    sidecar, _ = stack
    n = 10_000
    async with open_ws(sidecar, headers=bearer()) as ws:
        await ws.send("!expect")

        async def write() -> None:
            for i in range(n):
                await ws.send(seq_message(i))

        async def read() -> list[str | bytes]:
            got: list[str | bytes] = []
            while len(got) < n:
                got.append(await ws.recv())
            return got

        await ws.send(f"!stream {n}")
        _, got = await asyncio.gather(write(), read())
        assert [type(m) for m in got] == [type(seq_message(i)) for i in range(n)]
        mismatches = [i for i, m in enumerate(got) if m != seq_message(i)]
        assert mismatches == []
        await ws.send("!report")
        report = json.loads(await ws.recv())
        assert report == {"received": n, "errors": 0, "first_error": None}


async def test_upstream_gets_exact_path_cleaned_query_and_identity_but_no_credentials(
    stack: Stack,
) -> None:
    sidecar, _ = stack
    tok = token("carol")
    path = f"/ws/a,b=c/%E2%9C%93?x=%41&token={tok}&y=1+2&api_key=nope&z"
    async with open_ws(
        sidecar,
        path,
        origin=ALLOWED_ORIGIN,
        headers={"X-Auth-Subject": "mallory", "X-Request-ID": "req-tunnel-1"},
    ) as ws:
        assert ws.response is not None
        assert ws.response.headers["X-Request-ID"] == "req-tunnel-1"
        report = await info(ws)
    assert report["raw_path"] == "/ws/a,b=c/%E2%9C%93"
    assert report["query"] == "x=%41&y=1+2&z"
    headers: dict[str, list[str]] = {}
    for k, v in report["headers"]:
        headers.setdefault(k.lower(), []).append(v)
    assert headers["x-auth-subject"] == ["carol"]
    assert headers["x-auth-method"] == ["jwt"]
    assert headers["x-request-id"] == ["req-tunnel-1"]
    assert headers["origin"] == [ALLOWED_ORIGIN]
    assert len(headers["host"]) == 1
    assert "authorization" not in headers
    assert tok not in json.dumps(report)


async def test_subprotocols_are_negotiated_end_to_end_without_the_bearer_entry(
    stack: Stack,
) -> None:
    sidecar, _ = stack
    tok = token("dave")
    async with open_ws(sidecar, subprotocols=["chat.v2", f"bearer.{tok}", "chat.v1"]) as ws:
        assert ws.subprotocol == "chat.v2"
        report = await info(ws)
    assert report["subprotocols"] == ["chat.v2", "chat.v1"]
    assert tok not in json.dumps(report)


async def test_subprotocols_are_negotiated_with_a_header_token(stack: Stack) -> None:
    sidecar, _ = stack
    async with open_ws(sidecar, headers=bearer(), subprotocols=["chat.v1", "chat.v2"]) as ws:
        assert ws.subprotocol == "chat.v1"
        assert (await info(ws))["subprotocols"] == ["chat.v1", "chat.v2"]
    async with open_ws(
        sidecar, "/ws/echo?subprotocol=none", headers=bearer(), subprotocols=["chat.v1"]
    ) as ws:
        assert ws.subprotocol is None


async def test_a_bearer_entry_offered_alone_is_echoed_and_nothing_is_offered_upstream(
    stack: Stack, client_compression: str | None
) -> None:
    sidecar, _ = stack
    subject = f"erin-{client_compression}"  # this run's line, not the other run's
    entry = f"bearer.{token(subject)}"
    async with open_ws(sidecar, subprotocols=[entry]) as ws:
        assert ws.subprotocol == entry  # browsers fail a handshake that selects nothing
        assert (await info(ws))["subprotocols"] == []
    # ...and the echoed entry (a credential) stays out of the session's log line.
    await wait_for(lambda: any(r.get("subject") == subject for r in ws_log_lines(sidecar)))
    assert entry.split(".")[-1] not in sidecar.output()


async def test_compression_is_negotiated_per_hop_and_never_copied_across(
    stack: Stack, own_stack: Callable[..., Stack]
) -> None:
    # The client hop compresses, the upstream's does not; then the other way round. Neither way
    # can whole frames pass (the message relay runs), whatever `client_compression` says.
    sidecar, _ = stack
    async with open_ws(sidecar, headers=bearer(), compression="deflate") as ws:
        assert ws.response is not None
        assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
        report = await info(ws)
    assert "sec-websocket-extensions" not in {k.lower() for k, _ in report["headers"]}

    compressed, _ = own_stack("upstream_compression = true")
    async with open_ws(compressed, headers=bearer(), compression=None) as ws:
        assert ws.response is not None
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        report = await info(ws)
        for i in range(300):
            await ws.send(seq_message(i))
            assert await ws.recv() == seq_message(i)
    extensions = [v for k, v in report["headers"] if k.lower() == "sec-websocket-extensions"]
    assert len(extensions) == 1 and extensions[0].startswith("permessage-deflate")


# --- close codes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "reason"), [(1000, ""), (4000, "client says bye")])
async def test_the_clients_close_code_and_reason_reach_the_upstream(
    stack: Stack, code: int, reason: str
) -> None:
    sidecar, upstream = stack
    before = len(stats(upstream)["closes"])
    async with open_ws(sidecar, headers=bearer()) as ws:
        await ws.send("ping-before-close")
        assert await ws.recv() == "ping-before-close"
        await ws.close(code, reason)
    await wait_for(lambda: len(stats(upstream)["closes"]) > before)
    assert stats(upstream)["closes"][before:] == [[code, reason]]


@pytest.mark.parametrize(("code", "reason"), [(1000, ""), (4001, "upstream says bye"), (4999, "")])
async def test_the_upstreams_close_code_and_reason_reach_the_client(
    stack: Stack, code: int, reason: str
) -> None:
    sidecar, _ = stack
    async with open_ws(sidecar, headers=bearer()) as ws:
        await ws.send(f"!close {code} {reason}".rstrip())
        assert await close_of(ws) == (code, reason)


async def test_a_client_that_vanishes_gets_its_upstream_closed_with_1001(stack: Stack) -> None:
    sidecar, upstream = stack
    before = len(stats(upstream)["closes"])
    ws = await open_ws(sidecar, headers=bearer())
    await ws.send("hello")
    assert await ws.recv() == "hello"
    ws.transport.abort()  # no close frame, just gone
    await wait_for(lambda: len(stats(upstream)["closes"]) > before)
    assert stats(upstream)["closes"][before:] == [[1001, "client went away"]]


async def test_an_oversized_client_message_closes_with_1009(stack: Stack) -> None:
    sidecar, upstream = stack
    before = len(stats(upstream)["closes"])
    async with open_ws(sidecar, headers=bearer()) as ws:
        await ws.send(b"a" * MAX_MESSAGE)  # exactly the limit passes
        assert len(await ws.recv()) == MAX_MESSAGE
        await ws.send(b"a" * (MAX_MESSAGE + 1))
        code, _ = await close_of(ws)
    assert code == 1009
    await wait_for(lambda: len(stats(upstream)["closes"]) > before)
    assert stats(upstream)["closes"][before][0] == 1009


async def test_an_oversized_upstream_message_closes_the_client_with_1009(stack: Stack) -> None:
    sidecar, _ = stack
    async with open_ws(sidecar, headers=bearer()) as ws:
        await ws.send(f"!big {MAX_MESSAGE}")
        assert len(await ws.recv()) == MAX_MESSAGE
        await ws.send(f"!big {MAX_MESSAGE + 1}")
        code, _ = await close_of(ws)
    assert code == 1009


async def test_an_upstream_that_is_killed_closes_the_client_with_1011(
    own_stack: Callable[..., Stack],
) -> None:
    sidecar, upstream = own_stack()
    async with open_ws(sidecar, headers=bearer()) as ws:
        await ws.send("still there?")
        assert await ws.recv() == "still there?"
        upstream.proc.send_signal(signal.SIGKILL)
        code, _ = await close_of(ws)
    assert code == 1011


async def test_a_jwt_session_is_closed_with_4401_at_exp(stack: Stack) -> None:
    sidecar, upstream = stack
    before = len(stats(upstream)["closes"])
    exp = int(time.time()) + 2
    short = token("frank", ttl=exp - int(time.time()))
    async with open_ws(sidecar, headers={"Authorization": f"Bearer {short}"}) as ws:
        await ws.send("alive")
        assert await ws.recv() == "alive"
        code, reason = await close_of(ws)
        closed_at = time.time()
    assert (code, reason) == (4401, "token expired")
    assert exp - 0.05 <= closed_at <= exp + 1.0
    await wait_for(lambda: len(stats(upstream)["closes"]) > before)
    assert stats(upstream)["closes"][before:] == [[1001, "token expired"]]


async def test_a_revoked_api_key_closes_its_sessions_with_4403_on_sighup_reload(
    stack: Stack,
) -> None:
    sidecar, upstream = stack
    keys = Path(str(sidecar.config_path.parent / "keys.toml"))
    before = len(stats(upstream)["closes"])
    keeper = await open_ws(sidecar, "/ws/echo", headers={"X-API-Key": KEEP_KEY})
    revokee = await open_ws(sidecar, f"/ws/echo?api_key={REVOKE_KEY}")
    try:
        keys.write_text(
            key_record(KEEP_KEY_ID, KEEP_KEY)
            + key_record(REVOKE_KEY_ID, REVOKE_KEY, "disabled = true")
        )
        sidecar.process.signal(signal.SIGHUP)
        assert await close_of(revokee, timeout=5) == (4403, "api key revoked")
        await keeper.send("untouched")
        assert await keeper.recv() == "untouched"
    finally:
        keys.write_text(key_record(KEEP_KEY_ID, KEEP_KEY) + key_record(REVOKE_KEY_ID, REVOKE_KEY))
        sidecar.process.signal(signal.SIGHUP)
        await keeper.close()
    await wait_for(lambda: len(stats(upstream)["closes"]) >= before + 2)
    assert [1001, "api key revoked"] in stats(upstream)["closes"][before:]


async def test_an_api_key_session_is_closed_with_4403_when_the_key_expires(stack: Stack) -> None:
    sidecar, _ = stack
    keys = Path(str(sidecar.config_path.parent / "keys.toml"))
    expires = int(time.time()) + 2
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
    keys.write_text(
        key_record(KEEP_KEY_ID, KEEP_KEY)
        + key_record(REVOKE_KEY_ID, REVOKE_KEY)
        + key_record(EXPIRE_KEY_ID, EXPIRE_KEY, f'expires = "{stamp}"')
    )
    sidecar.process.signal(signal.SIGHUP)
    await asyncio.sleep(0.3)
    async with open_ws(sidecar, headers={"X-API-Key": EXPIRE_KEY}) as ws:
        code, _ = await close_of(ws)
        closed_at = time.time()
    assert code == 4403
    assert expires - 0.05 <= closed_at <= expires + 1.0


# --- handshake refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers", "status", "error"),
    [
        ("/ws/echo", {}, 401, "unauthorized"),
        ("/ws/echo", {"Authorization": "Bearer not-a-jwt"}, 401, "unauthorized"),
        ("/ws/echo", {"X-API-Key": "wrong-key"}, 401, "unauthorized"),
        ("/ws/echo?token=", {"Origin": "http://evil.test"}, 403, "forbidden"),
        ("/nowhere", {}, 404, "not_found"),
    ],
)
async def test_refused_handshakes_get_a_status_and_json_and_never_reach_the_upstream(
    stack: Stack, path: str, headers: dict[str, str], status: int, error: str
) -> None:
    sidecar, upstream = stack
    if headers.get("Origin"):
        headers = {**headers, **bearer()}
    before = stats(upstream)["connects"]
    with pytest.raises(InvalidStatus) as refused:
        await open_ws(sidecar, path, headers=headers)
    response = refused.value.response
    assert response.status_code == status
    body = json.loads(response.body or b"{}")
    assert body["error"] == error and body["request_id"]
    assert stats(upstream)["connects"] == before


async def test_an_unreachable_upstream_refuses_the_handshake_with_502(
    own_stack: Callable[..., Stack],
) -> None:
    sidecar, upstream = own_stack()
    upstream.stop()
    with pytest.raises(InvalidStatus) as refused:
        await open_ws(sidecar, headers=bearer())
    assert refused.value.response.status_code == 502
    assert json.loads(refused.value.response.body or b"{}")["error"] == "bad_gateway"


# --- logs ----------------------------------------------------------------------------------------


async def test_one_log_line_per_session_with_counters_and_no_credentials(
    stack: Stack, client_compression: str | None
) -> None:
    sidecar, _ = stack
    tok = token("grace")
    request_id = f"req-log-{client_compression}"  # this run's session, not the other run's
    async with open_ws(
        sidecar, f"/ws/echo?token={tok}&keep=1", headers={"X-Request-ID": request_id}
    ) as ws:
        for m in ("one", b"two!", "three"):
            await ws.send(m)
            await ws.recv()
        await ws.close(4002, "done")
    await wait_for(lambda: any(r.get("request_id") == request_id for r in ws_log_lines(sidecar)))
    lines = [r for r in ws_log_lines(sidecar) if r.get("request_id") == request_id]
    assert len(lines) == 1
    line = lines[0]
    assert line["subject"] == "grace" and line["auth_method"] == "jwt"
    assert line["query"] == "keep=1"
    assert (line["messages_in"], line["messages_out"]) == (3, 3)
    assert (line["bytes_in"], line["bytes_out"]) == (12, 12)
    assert (line["closed_by"], line["close_code"], line["close_reason"]) == ("client", 4002, "done")
    assert line["duration_ms"] > 0 and line["route"].endswith("/ws/*")
    assert tok not in sidecar.output()
    assert tok.split(".")[2] not in sidecar.output()


# --- limits --------------------------------------------------------------------------------------


async def test_caps_refuse_with_429_per_identity_and_503_in_total(
    own_stack: Callable[..., Stack],
) -> None:
    sidecar, upstream = own_stack("max_connections = 3\nmax_connections_per_identity = 2")
    a1 = await open_ws(sidecar, headers=bearer("a"))
    a2 = await open_ws(sidecar, headers=bearer("a"))
    with pytest.raises(InvalidStatus) as per_identity:
        await open_ws(sidecar, headers=bearer("a"))
    assert per_identity.value.response.status_code == 429
    b1 = await open_ws(sidecar, headers=bearer("b"))
    with pytest.raises(InvalidStatus) as total:
        await open_ws(sidecar, headers=bearer("c"))
    assert total.value.response.status_code == 503
    assert total.value.response.headers["Retry-After"]
    assert stats(upstream)["connects"] == 3
    await a1.close()
    await wait_for(lambda: stats(upstream)["closes"] != [])
    async with open_ws(sidecar, headers=bearer("a")) as again:
        await again.send("room again")
        assert await again.recv() == "room again"
    for ws in (a2, b1):
        await ws.close()


async def test_idle_sessions_close_with_1000_and_old_ones_with_1001(
    own_stack: Callable[..., Stack],
) -> None:
    sidecar, upstream = own_stack("idle_timeout_s = 0.6\nmax_connection_lifetime_s = 2.5")
    async with (
        open_ws(sidecar, headers=bearer()) as chatty,
        open_ws(sidecar, headers=bearer()) as quiet,
    ):
        opened = time.monotonic()
        for _ in range(4):  # activity keeps the idle timer away
            await asyncio.sleep(0.3)
            await chatty.send("tick")
            assert await chatty.recv() == "tick"
            await quiet.send("tick")
            assert await quiet.recv() == "tick"
        last = time.monotonic()

        async def keep_talking() -> None:
            with pytest.raises(ConnectionClosed):
                while True:
                    await chatty.send("tick")
                    await asyncio.sleep(0.2)

        talker = asyncio.create_task(keep_talking())
        assert await close_of(quiet) == (1000, "idle timeout")
        assert 0.55 <= time.monotonic() - last <= 1.0
        assert await close_of(chatty) == (1001, "connection lifetime exceeded")
        assert 2.3 <= time.monotonic() - opened <= 3.5
        await talker
    await wait_for(lambda: len(stats(upstream)["closes"]) == 2)
    assert sorted(map(tuple, stats(upstream)["closes"])) == [
        (1000, "idle timeout"),
        (1001, "connection lifetime exceeded"),
    ]


async def test_sigterm_closes_sessions_with_1001_after_the_drain_period(
    own_stack: Callable[..., Stack],
) -> None:
    sidecar, upstream = own_stack()
    async with open_ws(sidecar, headers=bearer()) as ws:
        await ws.send("before")
        assert await ws.recv() == "before"
        sidecar.process.signal(signal.SIGTERM)
        signalled = time.monotonic()
        await asyncio.sleep(0.5)
        await ws.send("during the drain")  # still relayed while draining
        assert await ws.recv() == "during the drain"
        assert await close_of(ws) == (1001, "server shutting down")
        assert 0.9 <= time.monotonic() - signalled <= 3
    await wait_for(lambda: stats(upstream)["closes"] != [])
    assert stats(upstream)["closes"] == [[1001, "server shutting down"]]
    # uvicorn re-raises the signal it captured once it has shut down.
    assert sidecar.process.proc.wait(10) in (0, -signal.SIGTERM)


@pytest.mark.slow
async def test_a_slow_reader_with_a_fast_writer_keeps_the_sidecars_memory_bounded(
    stack: Stack,
) -> None:
    sidecar, _ = stack
    sidecar_process = psutil.Process(sidecar.process.proc.pid)
    count, size = 1024, 64 * 1024  # 64 MiB pushed at a client that does not read
    async with open_ws(sidecar, headers=bearer(), max_queue=2, compression=None) as ws:
        await ws.send("warm")
        await ws.recv()
        baseline = sidecar_process.memory_info().rss
        await ws.send(f"!flood {count} {size}")
        peak = baseline
        for _ in range(20):  # 2 s of not reading
            await asyncio.sleep(0.1)
            peak = max(peak, sidecar_process.memory_info().rss)
        received = 0
        while received < count:
            message = await ws.recv()
            assert len(message) == size
            received += 1
            if received % 200 == 0:
                peak = max(peak, sidecar_process.memory_info().rss)
    growth = (peak - baseline) / 2**20
    assert growth < 16, f"sidecar RSS grew by {growth:.1f} MiB for 64 MiB relayed"


@pytest.mark.slow
async def test_a_thousand_concurrent_sessions_are_held_open(stack: Stack) -> None:
    sidecar, _ = stack
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(8192, hard), hard))
    n = 1000
    # Twenty callers of fifty sessions each: one caller alone stops at the per-identity cap.
    headers = [bearer(f"crowd-{i}") for i in range(20)]
    gate = asyncio.Semaphore(100)

    async def one(i: int) -> ClientConnection:
        async with gate:
            ws = await open_ws(sidecar, headers=headers[i % len(headers)])
            await ws.send(f"hello {i}")
            assert await ws.recv() == f"hello {i}"
            return ws

    sockets = await asyncio.gather(*(one(i) for i in range(n)))
    try:
        metrics = httpx.get(sidecar.admin_url + "/metrics").text
        gauge = next(
            line for line in metrics.splitlines() if line.startswith("authproxy_websockets_open ")
        )
        assert float(gauge.split()[1]) == n
        # All of them still relay, not just the last ones opened.
        for ws in (sockets[0], sockets[n // 2], sockets[-1]):
            await ws.send("still here")
            assert await ws.recv() == "still here"
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets))


# --- upstream keepalive --------------------------------------------------------------------------


async def test_an_idle_session_to_a_live_upstream_survives_many_ping_rounds(
    own_stack: Callable[..., Stack],
) -> None:
    sidecar, _ = own_stack("ping_interval_s = 0.3")
    async with open_ws(sidecar, headers=bearer()) as ws:
        await asyncio.sleep(1.5)  # five rounds of the keepalive wheel, every one answered
        await ws.send("still here")
        assert await ws.recv() == "still here"
    await wait_for(lambda: bool(ws_log_lines(sidecar)))
    assert ws_log_lines(sidecar)[-1]["end"] == "client_closed"


def client_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, unmasked payload) of each whole frame a client sent (short payloads only)."""
    frames, i = [], 0
    while i + 6 <= len(data):
        opcode, length = data[i] & 0x0F, data[i + 1] & 0x7F
        assert length < 126, "a control frame or a short message"
        mask, payload = data[i + 2 : i + 6], data[i + 6 : i + 6 + length]
        frames.append((opcode, bytes(b ^ mask[k % 4] for k, b in enumerate(payload))))
        i += 6 + length
    return frames


async def test_an_upstream_that_stops_answering_pings_ends_the_session_with_1011(
    tmp_path: Path,
) -> None:
    received = bytearray()
    eof = asyncio.Event()

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A complete handshake, then silence: the process is alive, the application is not. It
        # reads (the kernel would anyway) but never answers, not a ping, not a close.
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(
            hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        )
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        try:
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                while chunk := await reader.read(4096):
                    received.extend(chunk)
                eof.set()
                await asyncio.sleep(30)
        finally:
            writer.close()

    server = await asyncio.start_server(deaf, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    body = CONFIG.replace("KEYS_FILE", str(tmp_path / "none.toml")).format(
        websocket_extra="ping_interval_s = 0.4"
    )
    (tmp_path / "none.toml").write_text("")
    sidecar = start_sidecar(tmp_path, port, body, env={"TUNNEL_TEST_SECRET": SECRET})
    try:
        async with open_ws(sidecar, headers=bearer()) as ws:
            started = time.monotonic()
            code, reason = await close_of(ws, timeout=10)
            assert code == 1011 and "ping" in reason
            assert time.monotonic() - started < 5
        # An upstream that answers no ping will answer no close either: it is told (a close
        # frame, then the connection ends) without the sidecar waiting out a closing handshake.
        await asyncio.wait_for(eof.wait(), 2)
        await wait_for(lambda: bool(ws_log_lines(sidecar)), timeout=2)
        assert ws_log_lines(sidecar)[-1]["end"] == "upstream_ping_timeout"
        frames = client_frames(bytes(received))
        assert frames[-1][0] == 0x8, frames  # the last thing it got is a close frame
        assert int.from_bytes(frames[-1][1][:2], "big") == 1011
        assert {opcode for opcode, _ in frames[:-1]} == {0x9}  # before it, only pings
    finally:
        sidecar.stop()
        server.close()
        await server.wait_closed()
