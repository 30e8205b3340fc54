"""Streamed responses outlive no credential: an SSE stream ends with `event: auth_expired` (or
`auth_revoked`) and the JSON error, then closes; any other streamed body is cut."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from proxy.auth.apikeys import hash_key
from tests.support.servers import Process, Sidecar, start_sidecar, start_upstream

SECRET = "streams-secret-streams-secret-streams!"
ADMIN_TOKEN = "admin-token-admin-token-0123"
KEY = "ak_streams_test_key_0123456789abcdef"
ENV = {"STREAMS_SECRET": SECRET, "STREAMS_ADMIN": ADMIN_TOKEN}

BODY = f"""
[[auth.jwt.providers]]
name = "t"
issuer = "https://idp.test"
audiences = ["api"]
secret_env = "STREAMS_SECRET"
algorithms = ["HS256"]
leeway_s = 0
[auth.api_keys]
header = "X-API-Key"
[[auth.api_keys.keys]]
id = "streamer"
sha256 = "{hash_key(KEY)}"
[[routes]]
path = "/*"
auth = ["jwt", "api_key"]
"""


def token(lifetime: float) -> str:
    now = time.time()
    claims = {"iss": "https://idp.test", "aud": "api", "sub": "sam", "iat": int(now)}
    claims["exp"] = now + lifetime
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Process]:
    process = start_upstream("tests.support.upstreams:app", tmp_path)
    yield process
    process.stop()


def start(tmp_path: Path, upstream: Process) -> Sidecar:
    env = {**ENV, "AUTHPROXY__ADMIN__TOKEN_ENV": "STREAMS_ADMIN"}  # POST /revocations
    return start_sidecar(tmp_path, upstream.port, BODY, env=env)


def events(
    sidecar: Sidecar, path: str, headers: dict[str, str]
) -> tuple[list[dict[str, Any]], float]:
    """The SSE events received (event type and data), and when the stream ended."""
    found: list[dict[str, Any]] = []
    with httpx.stream("GET", sidecar.url + path, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        current: dict[str, Any] = {"event": "message", "data": []}
        for line in r.iter_lines():
            if line == "":
                if current["data"]:
                    found.append({"event": current["event"], "data": "\n".join(current["data"])})
                current = {"event": "message", "data": []}
            elif line.startswith("event: "):
                current["event"] = line[7:]
            elif line.startswith("data: "):
                current["data"].append(line[6:])
    return found, time.time()


def access_lines(sidecar: Sidecar) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in sidecar.output().splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("message") == "request"]


def test_an_sse_stream_ends_with_auth_expired_within_a_second_of_expiry(
    tmp_path: Path, upstream: Process
) -> None:
    sidecar = start(tmp_path, upstream)
    try:
        bearer = token(2.0)
        expires = jwt.decode(bearer, options={"verify_signature": False})["exp"]
        found, ended = events(sidecar, "/sse?n=40&delay=0.1", {"Authorization": f"Bearer {bearer}"})
        assert 5 <= len(found) < 40  # upstream events flowed until the token expired
        assert all(e["event"] == "message" for e in found[:-1])
        last = found[-1]
        assert last["event"] == "auth_expired"
        error = json.loads(last["data"])
        assert error["error"] == "unauthorized" and error["details"]["reason"] == "token_expired"
        assert error["request_id"]
        assert expires <= ended < expires + 1.0
        time.sleep(0.2)
        line = access_lines(sidecar)[-1]
        assert line["end"] == "auth_expired" and line["status"] == 200
    finally:
        sidecar.stop()


def test_an_event_in_flight_is_finished_before_the_closing_event(
    tmp_path: Path, upstream: Process
) -> None:
    sidecar = start(tmp_path, upstream)
    try:
        # Each event arrives in two writes 0.3 s apart: expiry lands inside events as often as
        # not, and every event the client sees must still be whole.
        found, _ = events(
            sidecar,
            "/sse-split?n=6&delay=0.3",
            {"Authorization": f"Bearer {token(1.45)}"},
        )
        assert found[-1]["event"] == "auth_expired"
        assert [e["data"] for e in found[:-1]] == [str(i) for i in range(len(found) - 1)]
    finally:
        sidecar.stop()


def test_an_event_whose_blank_line_comes_in_its_own_write_still_gets_the_closing_event(
    tmp_path: Path, upstream: Process
) -> None:
    sidecar = start(tmp_path, upstream)
    try:
        found, _ = events(
            sidecar,
            "/sse-split?n=6&delay=0.3&split=line",  # "data: i\n" then "\n": line-flushed
            {"Authorization": f"Bearer {token(1.45)}"},
        )
        assert found[-1]["event"] == "auth_expired"
        assert [e["data"] for e in found[:-1]] == [str(i) for i in range(len(found) - 1)]
    finally:
        sidecar.stop()


def test_a_revoked_key_ends_its_stream_with_auth_revoked(tmp_path: Path, upstream: Process) -> None:
    sidecar = start(tmp_path, upstream)
    try:
        result: dict[str, Any] = {}

        def listen() -> None:
            result["events"], result["ended"] = events(
                sidecar, "/sse?n=40&delay=0.1", {"X-API-Key": KEY}
            )

        thread = threading.Thread(target=listen)
        thread.start()
        time.sleep(0.8)
        revoked_at = time.time()
        answer = httpx.post(
            sidecar.admin_url + "/revocations",
            json={"key_id": "streamer"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert answer.status_code < 300, answer.text
        thread.join(10)
        last = result["events"][-1]
        assert last["event"] == "auth_revoked"
        assert json.loads(last["data"])["details"]["reason"] == "revoked"
        assert result["ended"] - revoked_at < 1.0
        assert httpx.get(sidecar.url + "/sse?n=1", headers={"X-API-Key": KEY}).status_code == 401
    finally:
        sidecar.stop()


def test_a_revocation_made_while_the_answer_is_on_its_way_ends_the_stream_at_once(
    tmp_path: Path, upstream: Process
) -> None:
    sidecar = start(tmp_path, upstream)
    try:
        result: dict[str, Any] = {}

        def listen() -> None:
            result["events"], result["ended"] = events(
                sidecar, "/sse?n=40&delay=0.1&wait=1.5", {"X-API-Key": KEY}
            )

        thread = threading.Thread(target=listen)
        thread.start()
        time.sleep(0.5)  # the request is admitted and waits for the upstream's head
        answer = httpx.post(
            sidecar.admin_url + "/revocations",
            json={"key_id": "streamer"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert answer.status_code < 300, answer.text
        thread.join(10)
        assert [e["event"] for e in result["events"]] == ["auth_revoked"]  # nothing else
    finally:
        sidecar.stop()


def test_a_key_removed_by_a_reload_ends_its_stream(tmp_path: Path, upstream: Process) -> None:
    sidecar = start(tmp_path, upstream)
    try:
        result: dict[str, Any] = {}

        def listen() -> None:
            result["events"], _ = events(sidecar, "/sse?n=40&delay=0.1", {"X-API-Key": KEY})

        thread = threading.Thread(target=listen)
        thread.start()
        time.sleep(0.8)
        text = sidecar.config_path.read_text()
        sidecar.config_path.write_text(text.replace('id = "streamer"', 'id = "other"'))
        sidecar.process.signal(signal.SIGHUP)
        thread.join(10)
        assert result["events"][-1]["event"] == "auth_revoked"
    finally:
        sidecar.stop()


def test_a_body_that_is_not_sse_is_cut_at_expiry(tmp_path: Path, upstream: Process) -> None:
    sidecar = start(tmp_path, upstream)
    try:
        received = 0
        with pytest.raises(httpx.RemoteProtocolError):
            with httpx.stream(
                "GET",
                sidecar.url + "/drip?n=30&delay=0.1",
                headers={"Authorization": f"Bearer {token(1.5)}"},
                timeout=30,
            ) as r:
                for chunk in r.iter_bytes():
                    received += len(chunk)
        assert 500 <= received < 3000  # some of it, never all of it
        time.sleep(0.2)
        line = access_lines(sidecar)[-1]
        assert line["end"] == "auth_expired" and line["error"] == "auth_expired"
    finally:
        sidecar.stop()


def test_a_short_answer_is_not_bound_and_an_unexpiring_key_streams_to_the_end(
    tmp_path: Path, upstream: Process
) -> None:
    sidecar = start(tmp_path, upstream)
    try:
        found, _ = events(sidecar, "/sse?n=5&delay=0.05", {"X-API-Key": KEY})
        assert [e["data"] for e in found] == ["0", "1", "2", "3", "4"]
    finally:
        sidecar.stop()
