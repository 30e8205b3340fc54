"""What an operator reads — access lines, metrics, the server's own log lines — from a real sidecar:
every field filled in on the sidecar's own answers, series named by the route's stable name."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from proxy.auth import hash_key
from tests.support.servers import Process, Sidecar, start_sidecar

KEY = "ak_operator-signals-test-key-0001"
SECRET = "an-hs256-secret-of-enough-length-for-the-test"

BODY = f"""
[[auth.jwt.providers]]
name = "local"
issuer = "https://idp.test"
audiences = ["webplus"]
secret_env = "OPERATOR_TEST_SECRET"
algorithms = ["HS256"]

[auth.api_keys]
[[auth.api_keys.keys]]
id = "reader"
sha256 = "{hash_key(KEY)}"
scopes = ["models:read"]

[[routes]]
path = "/api/admin/*"
name = "admin-api"
auth = ["jwt", "api_key"]
scopes = ["models:write"]

[[routes]]
path = "/api/*"
auth = ["jwt", "api_key"]
"""


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, upstream: Process) -> Iterator[Sidecar]:
    s = start_sidecar(
        tmp_path_factory.mktemp("signals"),
        upstream.port,
        BODY,
        env={"OPERATOR_TEST_SECRET": SECRET},
    )
    yield s
    s.stop()


def access_line(sidecar: Sidecar, request_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in sidecar.output().splitlines():
            if request_id in line and '"authproxy.access"' in line:
                parsed: dict[str, object] = json.loads(line)
                return parsed
        time.sleep(0.05)
    raise AssertionError(f"no access line for {request_id}:\n{sidecar.output()[-2000:]}")


def test_a_refused_credential_line_names_the_method_the_reason_and_the_bytes_sent(
    sidecar: Sidecar,
) -> None:
    answer = httpx.get(
        f"{sidecar.url}/api/models",
        headers={"Authorization": "Bearer not-a-jwt", "X-Request-ID": "refused-jwt-1"},
    )
    assert answer.status_code == 401
    line = access_line(sidecar, "refused-jwt-1")
    assert line["auth_method"] == "jwt" and line["subject"] is None
    assert line["reason"] and line["error"] == "unauthorized"
    assert line["bytes_out"] == len(answer.content) > 0


def test_a_missing_scope_line_says_insufficient_scope_with_the_callers_identity(
    sidecar: Sidecar,
) -> None:
    answer = httpx.post(
        f"{sidecar.url}/api/admin/x", headers={"X-API-Key": KEY, "X-Request-ID": "scope-1"}
    )
    assert answer.status_code == 403
    line = access_line(sidecar, "scope-1")
    assert line["reason"] == "insufficient_scope"
    assert (line["auth_method"], line["subject"]) == ("api_key", "reader")
    assert line["bytes_out"] == len(answer.content) > 0
    assert line["route"] == "admin-api"


def test_a_path_no_route_matches_is_logged_with_a_reason_and_its_bytes(sidecar: Sidecar) -> None:
    answer = httpx.get(f"{sidecar.url}/elsewhere", headers={"X-Request-ID": "no-route-1"})
    assert answer.status_code == 404
    line = access_line(sidecar, "no-route-1")
    assert line["reason"] == "no_route" and line["route"] == "-"
    assert line["bytes_out"] == len(answer.content) > 0


def test_a_refused_websocket_handshake_counts_the_error_body(sidecar: Sidecar) -> None:
    with pytest.raises(Exception) as refused:  # noqa: PT011 - websockets' InvalidStatus
        with connect(
            f"{sidecar.ws_url}/api/ws",
            additional_headers={"X-API-Key": "ak_wrong-key-of-some-length", "X-Request-ID": "ws-1"},
        ):
            pass
    assert "401" in str(refused.value)
    line = access_line(sidecar, "ws-1")
    assert line["auth_method"] == "api_key" and line["status"] == 401
    assert isinstance(line["bytes_out"], int) and line["bytes_out"] > 0


def test_metrics_name_routes_by_their_stable_name_and_carry_no_created_series(
    sidecar: Sidecar,
) -> None:
    assert httpx.get(f"{sidecar.url}/api/models", headers={"X-API-Key": KEY}).status_code == 200
    metrics = httpx.get(f"{sidecar.admin_url}/metrics").text
    assert 'authproxy_requests_total{route="/api/*",status="200"}' in metrics
    assert 'route="admin-api"' in metrics
    assert "routes[" not in metrics
    assert "_created" not in metrics


def test_the_servers_own_lines_come_under_authproxy_server_with_honest_levels(
    sidecar: Sidecar,
) -> None:
    lines = [json.loads(line) for line in sidecar.output().splitlines() if line.startswith("{")]
    assert not [line for line in lines if str(line["logger"]).startswith("uvicorn")]
    started = [line for line in lines if str(line["message"]).startswith("Started server process")]
    assert started and all(
        (line["logger"], line["level"]) == ("authproxy.server", "info") for line in started
    )


def test_a_clients_malformed_request_is_not_a_warning(sidecar: Sidecar) -> None:
    with socket.create_connection(("127.0.0.1", sidecar.port)) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        s.settimeout(5)
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    deadline = time.monotonic() + 5
    while "Invalid HTTP request" not in sidecar.output():
        assert time.monotonic() < deadline, sidecar.output()[-2000:]
        time.sleep(0.05)
    line = next(json.loads(x) for x in sidecar.output().splitlines() if "Invalid HTTP request" in x)
    assert (line["logger"], line["level"]) == ("authproxy.server", "info")


@pytest.mark.parametrize("first, second", [("SIGTERM", "SIGINT"), ("SIGINT", "SIGTERM")])
def test_a_stop_told_twice_at_once_still_drains_and_shuts_the_app_down(
    tmp_path: Path, upstream: Process, first: str, second: str
) -> None:
    # Ctrl-C reaches the whole process group while a supervisor (make run's stack, an init
    # system) sends its own SIGTERM: uvicorn read the second signal as a person's second Ctrl-C
    # and exited without the lifespan's shutdown, logging an error.
    s = start_sidecar(tmp_path, upstream.port, BODY, env={"OPERATOR_TEST_SECRET": SECRET})
    try:
        s.process.signal(getattr(signal, first))
        time.sleep(0.05)  # the second arrives while the first stop is under way
        s.process.signal(getattr(signal, second))
        assert s.process.proc.wait(15) == 0
        out = s.output()
        assert "Application shutdown complete" in out
        assert "Exception in 'lifespan'" not in out and '"level":"error"' not in out
    finally:
        s.stop()
