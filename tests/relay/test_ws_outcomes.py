"""How a session ends and the tunnel's other decisions, without sockets: close-code mapping,
credential closes, subprotocol choice, the upstream resource, handshake errors."""

from __future__ import annotations

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus
from websockets.frames import Close
from websockets.http11 import Response
from websockets.uri import parse_uri

from proxy.errors import BadGateway, GatewayTimeout
from proxy.identity import Identity
from proxy.relay.ws_outcomes import (
    KEY_EXPIRED,
    KEY_REVOKED,
    SIGNING_KEY_WITHDRAWN,
    TOKEN_EXPIRED,
    accepted_subprotocol,
    client_left,
    connect_error,
    credential_expired,
    upstream_left,
    upstream_uri,
)

# --- the client hop ends -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason"), [(1000, ""), (1001, "tab closed"), (4000, "bye"), (4999, "x" * 120)]
)
def test_a_client_close_is_passed_upstream_unchanged(code: int, reason: str) -> None:
    o = client_left({"type": "websocket.disconnect", "code": code, "reason": reason})
    assert (o.closed_by, o.tell_client, o.tell_upstream) == ("client", False, True)
    assert (o.upstream_code, o.upstream_reason) == (code, reason)
    assert (o.client_code, o.client_reason) == (code, reason)


def test_a_client_close_without_a_status_becomes_1000_upstream() -> None:
    o = client_left({"type": "websocket.disconnect", "code": 1005, "reason": ""})
    assert (o.client_code, o.upstream_code) == (1005, 1000)


def test_a_client_that_vanished_gets_the_upstream_closed_with_1001() -> None:
    # uvicorn's connection_lost reports 1005 (after the handshake) without a reason key.
    o = client_left({"type": "websocket.disconnect", "code": 1005})
    assert (o.closed_by, o.why, o.client_code) == ("client", "client_gone", 1006)
    assert (o.upstream_code, o.upstream_reason, o.tell_upstream) == (1001, "client went away", True)


def test_uvicorns_own_shutdown_closes_the_upstream_with_1001() -> None:
    # uvicorn has sent the client 1012 already and reports it without a reason key.
    o = client_left({"type": "websocket.disconnect", "code": 1012})
    assert (o.closed_by, o.client_code, o.tell_client) == ("proxy", 1012, False)
    assert (o.upstream_code, o.upstream_reason) == (1001, "server shutting down")


def test_an_oversized_client_message_is_reported_upstream_as_1009() -> None:
    o = client_left({"type": "websocket.disconnect", "code": 1009, "reason": "too big"})
    assert o.upstream_code == 1009


# --- the upstream hop ends -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason"),
    [(1000, ""), (1001, "restart"), (4001, "nope"), (4403, "forbidden by upstream")],
)
def test_an_upstream_close_is_passed_to_the_client_unchanged(code: int, reason: str) -> None:
    exc = ConnectionClosedOK(Close(code, reason), Close(code, reason), rcvd_then_sent=True)
    o = upstream_left(exc)
    assert (o.closed_by, o.tell_client, o.tell_upstream) == ("upstream", True, False)
    assert (o.client_code, o.client_reason) == (code, reason)


def test_an_upstream_close_without_a_status_becomes_1000_for_the_client() -> None:
    o = upstream_left(ConnectionClosedOK(Close(1005, ""), Close(1005, ""), rcvd_then_sent=True))
    assert o.client_code == 1000


def test_an_upstream_that_vanished_closes_the_client_with_1011() -> None:
    o = upstream_left(ConnectionClosedError(None, None))
    assert (o.why, o.client_code, o.upstream_code, o.tell_client) == (
        "upstream_gone",
        1011,
        1006,
        True,
    )


@pytest.mark.parametrize("code", [1009, 1007, 1002, 1011])
def test_a_close_websockets_started_on_the_upstream_is_told_to_the_client(code: int) -> None:
    # e.g. max_size exceeded: websockets sends 1009 to the upstream, which echoes it.
    exc = ConnectionClosedError(Close(code, "echo"), Close(code, "why"), rcvd_then_sent=False)
    o = upstream_left(exc)
    assert (o.closed_by, o.client_code, o.client_reason, o.tell_upstream) == (
        "proxy",
        code,
        "why",
        False,
    )
    lost = upstream_left(ConnectionClosedError(None, Close(code, "why")))
    assert lost.client_code == code


def test_credential_closes_use_the_documented_codes() -> None:
    assert (TOKEN_EXPIRED.client_code, TOKEN_EXPIRED.client_reason) == (4401, "token expired")
    assert (KEY_REVOKED.client_code, KEY_REVOKED.upstream_code) == (4403, 1001)
    assert TOKEN_EXPIRED.upstream_code == 1001


def test_an_expired_jwt_closes_with_4401_and_an_expired_api_key_with_4403() -> None:
    assert credential_expired(Identity("jwt", "alice", expires_at=1.0)) is TOKEN_EXPIRED
    assert credential_expired(Identity("api_key", "ci", expires_at=1.0)) is KEY_EXPIRED
    assert (KEY_EXPIRED.client_code, KEY_EXPIRED.client_reason) == (4403, "api key expired")
    assert KEY_EXPIRED.upstream_code == 1001


# --- the handshake -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "forwarded", "chosen", "accepted"),
    [
        (["chat", "bearer.t"], ["chat"], "chat", "chat"),
        (["chat"], ["chat"], None, None),
        (["bearer.t"], [], None, "bearer.t"),
        ([], [], None, None),
    ],
)
def test_the_client_is_accepted_with_the_upstreams_subprotocol(
    offered: list[str], forwarded: list[str], chosen: str | None, accepted: str | None
) -> None:
    assert accepted_subprotocol(offered, forwarded, chosen) == accepted


def test_the_upstream_resource_keeps_path_and_query_bytes_exactly() -> None:
    base = parse_uri("ws://127.0.0.1:9000")
    uri = upstream_uri(base, b"/ws/a;b=c/%E2%9C%93", b"x=%41&y=1+2&z")
    assert uri.resource_name == "/ws/a;b=c/%E2%9C%93?x=%41&y=1+2&z"
    assert (uri.host, uri.port) == ("127.0.0.1", 9000)
    assert upstream_uri(base, b"/ws", b"").resource_name == "/ws"


def test_a_preserved_host_replaces_the_uri_host_for_the_host_header_only() -> None:
    base = parse_uri("ws://127.0.0.1:9000")
    assert (
        upstream_uri(base, b"/", b"", "app.example.com:8443").host,
        upstream_uri(base, b"/", b"", "app.example.com:8443").port,
    ) == ("app.example.com", 8443)
    assert upstream_uri(base, b"/", b"", "app.example.com").port == 80


def test_handshake_failures_become_502_or_504() -> None:
    assert isinstance(connect_error(ConnectionRefusedError()), BadGateway)
    assert isinstance(connect_error(TimeoutError()), GatewayTimeout)
    refused = connect_error(InvalidStatus(Response(403, "Forbidden", Headers(), b"")))
    assert isinstance(refused, BadGateway)
    assert refused.details == {"reason": "upstream_refused", "upstream_status": 403}


def test_a_withdrawn_signing_key_closes_like_an_expired_token() -> None:
    o = SIGNING_KEY_WITHDRAWN
    assert (o.client_code, o.client_reason) == (4401, "signing key withdrawn")
    assert (o.upstream_code, o.upstream_reason) == (1001, "signing key withdrawn")
    assert o.why == "signing_key_withdrawn"
