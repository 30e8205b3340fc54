"""Header rules of the hop, without sockets."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest

from proxy import config
from proxy.identity import Identity
from proxy.relay.headers import HeaderPolicy, identity_signature, without_cookie

ALICE = Identity(method="jwt", subject="alice", scopes=frozenset({"b", "a"}), issuer="https://i")


def policy(**overrides: Any) -> HeaderPolicy:
    return HeaderPolicy(config.from_dict(overrides))


def upstream(
    p: HeaderPolicy,
    headers: list[tuple[bytes, bytes]],
    peer: str = "10.1.2.3",
    identity: Identity | None = None,
) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in p.upstream_request(
        headers, peer=peer, scheme="http", request_id="rid", identity=identity
    ):
        out.setdefault(k.decode("latin-1").lower(), []).append(v.decode("utf-8"))
    return out


def test_untrusted_peer_forwarding_headers_are_replaced() -> None:
    h = upstream(
        policy(),
        [
            (b"x-forwarded-for", b"6.6.6.6"),
            (b"x-forwarded-proto", b"https"),
            (b"host", b"app.test"),
        ],
    )
    assert h["x-forwarded-for"] == ["10.1.2.3"]
    assert h["x-forwarded-proto"] == ["http"]
    assert h["x-forwarded-host"] == ["app.test"]


def test_trusted_peer_forwarding_headers_are_extended() -> None:
    p = policy(server={"trusted_proxies": ["10.0.0.0/8"]})
    h = upstream(p, [(b"x-forwarded-for", b"1.1.1.1, 2.2.2.2"), (b"x-forwarded-proto", b"https")])
    assert h["x-forwarded-for"] == ["1.1.1.1, 2.2.2.2, 10.1.2.3"]
    assert h["x-forwarded-proto"] == ["https"]


def test_identity_replaces_anything_the_client_sent() -> None:
    h = upstream(
        policy(),
        [(b"x-auth-subject", b"admin"), (b"connection", b"x-auth-subject")],
        identity=ALICE,
    )
    assert h["x-auth-subject"] == ["alice"]
    assert h["x-auth-scopes"] == ["a b"]
    assert h["x-auth-issuer"] == ["https://i"]


def test_credentials_stay_unless_forwarding_is_configured() -> None:
    sent = [(b"authorization", b"Bearer t"), (b"x-api-key", b"k"), (b"cookie", b"a=1; at=t")]
    h = upstream(policy(auth={"token_cookie": "at"}), sent)
    assert "authorization" not in h and "x-api-key" not in h
    assert h["cookie"] == ["a=1"]
    h = upstream(policy(auth={"token_cookie": "at", "forward_credentials": True}), sent)
    assert h["authorization"] == ["Bearer t"] and h["cookie"] == ["a=1; at=t"]


@pytest.mark.parametrize(
    ("header", "name", "expected"),
    [
        (b"a=1; at=secret; b=2", b"at", b"a=1; b=2"),
        (b"at=x", b"at", b""),
        (b"att=1; at =2", b"at", b"att=1"),
        (b"a=1", b"at", b"a=1"),
    ],
)
def test_without_cookie_removes_only_that_cookie(
    header: bytes, name: bytes, expected: bytes
) -> None:
    assert without_cookie(header, name) == expected


def test_identity_signature_is_the_documented_hmac() -> None:
    message = b"rid\njwt\nalice\na b\nhttps://i"
    expected = "v1=" + hmac.new(b"s", message, hashlib.sha256).hexdigest()
    assert identity_signature(b"s", "rid", ALICE) == expected
    assert (
        identity_signature(b"s", "rid", None)
        == "v1=" + hmac.new(b"s", b"rid\n\n\n\n", hashlib.sha256).hexdigest()
    )


def test_signature_needs_its_secret_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_SECRET", raising=False)
    with pytest.raises(config.ConfigError, match="identity.secret_env"):
        policy(identity={"sign": True, "secret_env": "NO_SUCH_SECRET"})


def test_response_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    out = HeaderPolicy.downstream_response(
        [
            (b"Connection", b"X-Private"),
            (b"X-Private", b"1"),
            (b"Transfer-Encoding", b"chunked"),
            (b"X-Total-Count", b"3"),
            (b"X-Request-ID", b"upstream-id"),
        ]
    )
    assert out == [(b"x-total-count", b"3")]
