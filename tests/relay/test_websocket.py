"""The tunnel's decisions, without sockets: close-code mapping, subprotocol choice, the upstream
resource, handshake errors, and admission caps."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus
from websockets.frames import Close
from websockets.http11 import Response
from websockets.uri import parse_uri

from proxy.config import from_dict
from proxy.errors import BadGateway, GatewayTimeout, RateLimited, ServiceUnavailable
from proxy.identity import Identity
from proxy.relay.headers import HeaderPolicy
from proxy.relay.websocket import (
    KEY_REVOKED,
    SIGNING_KEY_WITHDRAWN,
    TOKEN_EXPIRED,
    Session,
    Tunnel,
    accepted_subprotocol,
    client_left,
    connect_error,
    upstream_left,
    upstream_uri,
    utf8_len,
)
from proxy.telemetry.metrics import Metrics

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


def test_text_is_counted_in_utf8_bytes() -> None:
    assert utf8_len("abc") == 3
    assert utf8_len("✓") == 3


# --- admission -----------------------------------------------------------------------------------


class FakeAuth:
    def __init__(self) -> None:
        self.callbacks: list[Callable[[str], None]] = []
        self.withdrawals: list[Callable[[str, frozenset[str]], None]] = []

    def subscribe_revocations(self, callback: Callable[[str], None]) -> Callable[[], None]:
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)

    def subscribe_key_withdrawals(
        self, callback: Callable[[str, frozenset[str]], None]
    ) -> Callable[[], None]:
        self.withdrawals.append(callback)
        return lambda: self.withdrawals.remove(callback)


def tunnel(**websocket: Any) -> Tunnel:
    settings = from_dict({"websocket": websocket})
    return Tunnel(settings, Metrics(), FakeAuth(), HeaderPolicy(settings))  # type: ignore[arg-type]


def who(sub: str) -> tuple[str, str | None, str]:
    return ("jwt", "https://issuer.test", sub)


def test_the_per_identity_cap_refuses_with_429_and_the_total_cap_with_503() -> None:
    t = tunnel(max_connections=3, max_connections_per_identity=2)
    assert t._admit(who("a")) is None
    assert t._admit(who("a")) is None
    assert isinstance(t._admit(who("a")), RateLimited)
    assert t._admit(who("b")) is None
    assert isinstance(t._admit(who("c")), ServiceUnavailable)
    t._release(who("a"))
    assert t._admit(who("c")) is None
    assert t._per_identity == {who("a"): 1, who("b"): 1, who("c"): 1}


def test_anonymous_sessions_count_only_towards_the_total() -> None:
    t = tunnel(max_connections=2, max_connections_per_identity=1)
    assert t._admit(None) is None
    assert t._admit(None) is None
    assert isinstance(t._admit(None), ServiceUnavailable)


def test_by_default_one_identity_cannot_take_every_slot() -> None:
    t = tunnel()
    cap = t.settings.websocket.max_connections_per_identity
    assert 0 < cap < t.settings.websocket.max_connections
    assert all(t._admit(who("a")) is None for _ in range(cap))
    assert isinstance(t._admit(who("a")), RateLimited)
    assert t._admit(who("b")) is None


def test_zero_means_no_per_identity_cap() -> None:
    t = tunnel(max_connections_per_identity=0)
    assert all(t._admit(who("a")) is None for _ in range(100))


async def test_a_revocation_ends_only_that_keys_sessions() -> None:
    t = tunnel()
    await t.start()
    auth = t.auth
    assert isinstance(auth, FakeAuth) and len(auth.callbacks) == 1

    def session(identity: Identity) -> Session:
        s = Session(identity, None, None, 0.0)  # type: ignore[arg-type]
        t._register(s, started=time.perf_counter())
        return s

    k1 = session(Identity("api_key", "k1", credential_id="k1"))
    k2 = session(Identity("api_key", "k2", credential_id="k2"))
    jwt = session(Identity("jwt", "k1", issuer="i", credential_id="k1"))
    auth.callbacks[0]("k1")
    assert k1.outcome is KEY_REVOKED
    assert k2.outcome is None and jwt.outcome is None
    for s in (k1, k2, jwt):
        t._unregister(s)
    assert t._by_key == {}
    await t.stop()
    assert auth.callbacks == []


async def test_a_key_revoked_while_its_session_connected_upstream_is_ended_on_register() -> None:
    t = tunnel()
    await t.start()
    authenticated = time.perf_counter()
    t._revoked("k1")  # announced while the upstream handshake was under way
    late = Session(Identity("api_key", "k1", credential_id="k1"), None, None, 0.0)  # type: ignore[arg-type]
    t._register(late, started=authenticated)
    assert late.outcome is KEY_REVOKED
    fresh = Session(Identity("api_key", "k1", credential_id="k1"), None, None, 0.0)  # type: ignore[arg-type]
    t._register(fresh, started=time.perf_counter())  # authenticated after: the key is back
    assert fresh.outcome is None
    for s in (late, fresh):
        t._unregister(s)
    await t.stop()


def jwt_identity(sub: str, provider: str, key: str) -> Identity:
    return Identity(
        "jwt", sub, issuer=f"https://{provider}", credential_id=provider, signing_key=key
    )


async def test_a_withdrawn_signing_key_ends_only_the_sessions_it_verified() -> None:
    t = tunnel()
    await t.start()
    auth = t.auth
    assert isinstance(auth, FakeAuth) and len(auth.withdrawals) == 1

    def session(identity: Identity) -> Session:
        s = Session(identity, None, None, 0.0)  # type: ignore[arg-type]
        t._register(s, started=time.perf_counter())
        return s

    doomed = session(jwt_identity("a", "idp", "fp-old"))
    doomed_too = session(jwt_identity("b", "idp", "fp-old"))
    other_key = session(jwt_identity("a", "idp", "fp-new"))
    other_provider = session(jwt_identity("a", "partner", "fp-old"))  # same key, other trust
    api_key = session(Identity("api_key", "fp-old", credential_id="fp-old"))
    auth.withdrawals[0]("idp", frozenset({"fp-old", "fp-never-used"}))
    assert doomed.outcome is SIGNING_KEY_WITHDRAWN and doomed_too.outcome is SIGNING_KEY_WITHDRAWN
    assert all(s.outcome is None for s in (other_key, other_provider, api_key))
    for s in (doomed, doomed_too, other_key, other_provider, api_key):
        t._unregister(s)
    assert t._by_signing_key == {}
    await t.stop()
    assert auth.withdrawals == []


async def test_a_key_withdrawn_while_its_session_connected_upstream_is_ended_on_register() -> None:
    t = tunnel()
    await t.start()
    authenticated = time.perf_counter()
    t._keys_withdrawn("idp", frozenset({"fp-old"}))  # while the upstream handshake was under way
    late = Session(jwt_identity("a", "idp", "fp-old"), None, None, 0.0)  # type: ignore[arg-type]
    t._register(late, started=authenticated)
    assert late.outcome is SIGNING_KEY_WITHDRAWN
    fresh = Session(jwt_identity("a", "idp", "fp-old"), None, None, 0.0)  # type: ignore[arg-type]
    t._register(fresh, started=time.perf_counter())  # verified after: the key is back
    assert fresh.outcome is None
    for s in (late, fresh):
        t._unregister(s)
    await t.stop()


def test_a_withdrawn_signing_key_closes_like_an_expired_token() -> None:
    o = SIGNING_KEY_WITHDRAWN
    assert (o.client_code, o.client_reason) == (4401, "signing key withdrawn")
    assert (o.upstream_code, o.upstream_reason) == (1001, "signing key withdrawn")
    assert o.why == "signing_key_withdrawn"
