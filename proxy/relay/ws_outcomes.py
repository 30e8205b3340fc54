"""How a WebSocket session ends, and the other decisions of the tunnel that need no socket.

How a session ends (an `Outcome`, decided by the functions below or named here, then carried out
in one place, `Tunnel._close`):

    client closes with a code       the upstream gets the same code and reason
    client vanishes (no close)      the upstream gets 1001 "client went away"
    upstream closes with a code     the client gets the same code and reason
    upstream vanishes (no close)    the client gets 1011 "upstream went away"
    upstream message too big        websockets closes the upstream with 1009; the client gets 1009
    JWT expires (exp + leeway)      client 4401 "token expired", upstream 1001
    JWT's signing key withdrawn     client 4401 "signing key withdrawn", upstream 1001
    API key revoked / expires       client 4403 "api key revoked" / "api key expired", upstream 1001
    JWT revoked (`revoke --jti`)    client 4403 "token revoked", upstream 1001
    idle (`idle_timeout_s`)         1000 "idle timeout" to both
    `max_connection_lifetime_s`     1001 "connection lifetime exceeded" to both
    drain (SIGTERM) / shutdown      1001 "server shutting down" to both

A close frame without a status (1005) cannot be forwarded through ASGI, so it becomes 1000.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.uri import WebSocketURI

from ..errors import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    CLOSE_REVOKED,
    CLOSE_TOKEN_EXPIRED,
    BadGateway,
    GatewayTimeout,
    ProxyError,
)
from ..identity import Identity
from .upstream import connect_failed

CLOSE_NO_STATUS = 1005  # a close frame without a status; never sent
CLOSE_ABNORMAL = 1006  # no close frame at all; never sent
CLOSE_SERVICE_RESTART = 1012

ClosedBy = Literal["client", "upstream", "proxy"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a session ends: who ended it, why, the close code and reason on each hop, and which
    hops we still have to tell (the one that closed first is closed already)."""

    closed_by: ClosedBy
    why: str
    client_code: int
    client_reason: str
    upstream_code: int
    upstream_reason: str
    tell_client: bool
    tell_upstream: bool
    # The upstream answers nothing (a missed keepalive pong): it is sent its close frame but
    # not waited for, since a peer deaf to pings is deaf to a closing handshake too.
    upstream_deaf: bool = False

    @classmethod
    def by_proxy(
        cls, why: str, code: int, reason: str, upstream_code: int | None = None
    ) -> Outcome:
        """The proxy ends the session: the client gets `code`, the upstream `upstream_code`."""
        return cls(
            "proxy",
            why,
            code,
            reason,
            code if upstream_code is None else upstream_code,
            reason,
            True,
            True,
        )

    @classmethod
    def by_client(
        cls, why: str, code: int, reason: str, upstream_code: int, upstream_reason: str
    ) -> Outcome:
        """The client closed (or vanished): only the upstream is still to be told."""
        return cls("client", why, code, reason, upstream_code, upstream_reason, False, True)

    @classmethod
    def by_upstream(
        cls, why: str, code: int, reason: str, client_code: int, client_reason: str
    ) -> Outcome:
        """The upstream closed (or vanished): only the client is still to be told."""
        return cls("upstream", why, client_code, client_reason, code, reason, True, False)


TOKEN_EXPIRED = Outcome.by_proxy(
    "token_expired", CLOSE_TOKEN_EXPIRED, "token expired", CLOSE_GOING_AWAY
)
# The key that verified the session's token left its provider's set (JWKS refresh, key file
# reload): like an expiry, the client reconnects with a fresh token, signed by a current key.
SIGNING_KEY_WITHDRAWN = Outcome.by_proxy(
    "signing_key_withdrawn", CLOSE_TOKEN_EXPIRED, "signing key withdrawn", CLOSE_GOING_AWAY
)
KEY_REVOKED = Outcome.by_proxy(
    "api_key_revoked", CLOSE_REVOKED, "api key revoked", CLOSE_GOING_AWAY
)
TOKEN_REVOKED = Outcome.by_proxy("token_revoked", CLOSE_REVOKED, "token revoked", CLOSE_GOING_AWAY)
KEY_EXPIRED = Outcome.by_proxy(
    "api_key_expired", CLOSE_REVOKED, "api key expired", CLOSE_GOING_AWAY
)
# A reload (SIGHUP) changed the policy so that the session's route no longer admits it.
POLICY_CHANGED = Outcome.by_proxy(
    "policy_changed", CLOSE_REVOKED, "no longer allowed by the reloaded policy", CLOSE_GOING_AWAY
)
# ...or no longer trusts the token's provider as it was (removed, another issuer or audience).
PROVIDER_CHANGED = Outcome.by_proxy(
    "provider_changed", CLOSE_TOKEN_EXPIRED, "token provider changed", CLOSE_GOING_AWAY
)
# In-band re-authentication with a token of another subject: a session never changes hands.
REAUTH_SUBJECT_CHANGED = Outcome.by_proxy(
    "reauth_subject_changed", CLOSE_REVOKED, "reauth with another subject", CLOSE_GOING_AWAY
)
IDLE = Outcome.by_proxy("idle_timeout", CLOSE_NORMAL, "idle timeout")
LIFETIME = Outcome.by_proxy("lifetime_exceeded", CLOSE_GOING_AWAY, "connection lifetime exceeded")
DRAINING = Outcome.by_proxy("draining", CLOSE_GOING_AWAY, "server shutting down")
SHUTDOWN = Outcome.by_proxy("shutdown", CLOSE_GOING_AWAY, "server shutting down")
INTERNAL = Outcome.by_proxy("internal_error", CLOSE_INTERNAL_ERROR, "internal error")
SERVER_STOPPED = Outcome(
    "proxy",
    "server_stopped",
    CLOSE_SERVICE_RESTART,
    "",
    CLOSE_GOING_AWAY,
    "server shutting down",
    False,
    True,
)
UPSTREAM_PING_TIMEOUT = dataclasses.replace(
    Outcome.by_proxy(
        "upstream_ping_timeout", CLOSE_INTERNAL_ERROR, "upstream keepalive ping timeout"
    ),
    upstream_deaf=True,
)
CLIENT_GONE = Outcome.by_client(
    "client_gone", CLOSE_ABNORMAL, "", CLOSE_GOING_AWAY, "client went away"
)


def client_left(message: Mapping[str, Any]) -> Outcome:
    """The client hop ended (`websocket.disconnect`): what the upstream is told."""
    code = int(message.get("code", CLOSE_NO_STATUS))
    if "reason" not in message:
        # uvicorn reports a lost connection without a reason key (a close frame always has
        # one), and its own shutdown, which has already sent the client 1012, the same way.
        return SERVER_STOPPED if code == CLOSE_SERVICE_RESTART else CLIENT_GONE
    reason = str(message.get("reason") or "")
    if code == CLOSE_NO_STATUS:
        return Outcome.by_client("client_closed", code, "", CLOSE_NORMAL, "")
    return Outcome.by_client("client_closed", code, reason, code, reason)


def upstream_left(exc: ConnectionClosed) -> Outcome:
    """The upstream hop ended (`recv` or `send` raised): what the client is told."""
    rcvd, sent = exc.rcvd, exc.sent
    if rcvd is None and sent is None:
        return Outcome.by_upstream(
            "upstream_gone", CLOSE_ABNORMAL, "", CLOSE_INTERNAL_ERROR, "upstream went away"
        )
    if rcvd is not None and (sent is None or exc.rcvd_then_sent):
        code = CLOSE_NORMAL if rcvd.code == CLOSE_NO_STATUS else rcvd.code
        return Outcome.by_upstream("upstream_closed", rcvd.code, rcvd.reason, code, rcvd.reason)
    # websockets closed the upstream itself (message too big 1009, bad UTF-8 1007, protocol
    # error 1002, keepalive timeout 1011): the client gets the same verdict.
    assert sent is not None
    code = CLOSE_INTERNAL_ERROR if sent.code == CLOSE_NO_STATUS else sent.code
    return Outcome(
        "proxy", "upstream_failed", code, sent.reason, sent.code, sent.reason, True, False
    )


def credential_expired(identity: Identity) -> Outcome:
    """How a session ends when the credential it was opened with stops being valid."""
    # Bearer tokens (JWT or introspected) expire and are renewed: 4401; API keys: 4403.
    return KEY_EXPIRED if identity.method == "api_key" else TOKEN_EXPIRED


def accepted_subprotocol(
    offered: Sequence[str], forwarded: Sequence[str], chosen: str | None
) -> str | None:
    """The subprotocol we accept the client with: the upstream's choice. When the client offered
    nothing but a credential entry (`bearer.<token>`), browsers fail a handshake that selects no
    subprotocol, so that entry is echoed back (to the client that sent it, and to no log)."""
    if chosen is not None:
        return chosen
    if offered and not forwarded:
        return offered[0]
    return None


def upstream_uri(
    base: WebSocketURI, raw_path: bytes, query: bytes, host_header: str | None = None
) -> WebSocketURI:
    """The upstream resource with path and query bytes exactly as judged (websockets' own URI
    parser would drop `;params` from the path). With `host_header`, the Host websockets sends."""
    uri = dataclasses.replace(
        base, path=base.path + raw_path.decode("ascii"), query=query.decode("latin-1")
    )
    if host_header is not None:
        parts = urlsplit("//" + host_header)
        default = 443 if base.secure else 80
        try:
            port = parts.port or default
        except ValueError:
            port = default
        uri = dataclasses.replace(uri, host=parts.hostname or base.host, port=port)
    return uri


def connect_error(exc: BaseException) -> ProxyError:
    """A failed upstream handshake as the sidecar's own error."""
    if isinstance(exc, TimeoutError):
        return GatewayTimeout(
            "the upstream did not complete the WebSocket handshake in time",
            details={"reason": "connect_timeout"},
        )
    if isinstance(exc, InvalidStatus):
        return BadGateway(
            "the upstream refused the WebSocket handshake",
            details={"reason": "upstream_refused", "upstream_status": exc.response.status_code},
        )
    if isinstance(exc, InvalidHandshake):
        return BadGateway(
            "the upstream sent an invalid WebSocket handshake", details={"reason": "upstream_error"}
        )
    return connect_failed()
