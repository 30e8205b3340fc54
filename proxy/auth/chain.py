"""The ordered method chain of a route: the first method that finds its credential decides.

A method whose credential is absent is "not responsible" and the next is tried (oathkeeper's
authenticator chain). A present but invalid credential is a 401 at once — also on an
`auth_optional` route, and even if a later method would have accepted another credential: a
client that sends a bad token must hear about it rather than be served under another identity.
Nothing presented is a 401 with a bare `Bearer` challenge (RFC 6750 3.1: no error code when the
request carried no authentication), unless the route is `auth_optional`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import PUBLIC_AUTH, RouteSettings
from ..errors import BadRequest, ProxyError, Unauthorized
from ..identity import Identity
from ..telemetry.metrics import Metrics
from ..telemetry.tally import Tally
from .claims import describe, require_claims
from .extractor import Credentials
from .method import Method
from .rejected import Rejected
from .scopes import require_scopes

log = logging.getLogger("authproxy.auth")


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one method of the chain found and concluded (for `explain`)."""

    method: str
    found: str | None  # None: nothing of its kind was presented (not responsible)
    outcome: str


class Chain:
    """Runs a route's methods in order, then its scope check."""

    def __init__(self, methods: Mapping[str, Method], metrics: Metrics) -> None:
        self._methods = methods
        self._metrics = metrics
        # A route using any of these challenges with `WWW-Authenticate: Bearer` (RFC 6750).
        self._bearer = frozenset(name for name, m in methods.items() if m.bearer_challenge)
        # Metric children by (method, result): labels() per request costs more than inc().
        self._counters: dict[tuple[str, str], Tally] = {}

    def _count(self, method: str, result: str) -> None:
        counter = self._counters.get((method, result))
        if counter is None:
            counter = self._counters[(method, result)] = Tally(
                self._metrics.auth.labels(method, result)
            )
        counter.add()

    async def run(
        self, route: RouteSettings, credentials: Credentials, trace: list[Attempt] | None = None
    ) -> Identity | None:
        """The caller's identity, None when anonymous is allowed; raises 401/403 otherwise (and
        400 for a query that hides a credential behind a `;`, on every route)."""
        if credentials.query_refusal is not None:
            raise BadRequest(credentials.query_refusal, details={"reason": "credential_in_query"})
        auth = route.auth  # (a pydantic model's attributes are slow to read: once each)
        if auth == PUBLIC_AUTH:  # `route.public`, without its interpreted property
            return None
        bearer = not self._bearer.isdisjoint(auth)
        for name in auth:
            method = self._methods[name]
            credential = credentials.of(name)
            if trace is None:
                found = "" if credential.present else None
            else:
                found = method.found(credential)
            if found is None:
                if trace is not None:
                    trace.append(Attempt(name, None, "not responsible (nothing presented)"))
                continue
            try:
                identity = await method.authenticate(credential)
            except Rejected as exc:
                self._count(name, exc.reason)
                if trace is not None:
                    trace.append(Attempt(name, found, f"refused: {exc.message}"))
                reason, message = exc.client or (exc.reason, exc.message)
                if exc.client is not None:
                    # The access line carries the client's reason; this one, the precise one.
                    # No fingerprint of the credential: for a password pasted into the API key
                    # header, even a hash prefix would help to guess it.
                    log.info(
                        "%s refused: %s",
                        name,
                        exc.message,
                        extra={
                            "fields": {
                                "event": "auth_refused",
                                "method": name,
                                "reason": exc.reason,
                                **exc.log_fields,
                            }
                        },
                    )
                refused = Unauthorized(
                    message, details={"reason": reason, "method": name}, bearer=bearer
                )
                refused.auth_method = name
                raise refused from None
            except ProxyError as exc:
                exc.auth_method = name
                self._count(name, str(exc.details.get("reason", exc.code)))
                if trace is not None:
                    trace.append(Attempt(name, found, f"failed: {exc.message}"))
                raise
            if trace is not None:
                trace.append(Attempt(name, found, f"accepted: {_who(identity)}"))
            if route.scopes:
                try:
                    require_scopes(identity, route, bearer=bearer)
                except ProxyError as exc:
                    self._count(name, "insufficient_scope")
                    exc.identity = identity
                    raise
            if route.require_claims:
                try:
                    require_claims(identity, route.require_claims)
                except ProxyError as exc:
                    self._count(name, "claim_mismatch")
                    if trace is not None:
                        trace.append(Attempt("claims", describe(route.require_claims), exc.message))
                    exc.identity = identity
                    raise
                if trace is not None:
                    trace.append(Attempt("claims", describe(route.require_claims), "all hold"))
            self._count(name, "ok")
            return identity
        # Anonymous holds no scope and no claim: a route requiring either refuses it.
        if route.anonymous_ok:
            self._count("none", "anonymous")
            return None
        self._count("none", "missing_credentials")
        # SPEC: every 401 on a JWT route carries error="invalid_token". RFC 6750 3.1 would rather
        # leave the error out when nothing was presented (SHOULD NOT, not MUST NOT); clients
        # written against the contract look for it, so it stays, with a description saying why.
        raise Unauthorized(
            self._missing_message(route, credentials),
            details={"reason": "missing_credentials"},
            bearer=bearer,
        )

    def _missing_message(self, route: RouteSettings, credentials: Credentials) -> str:
        wanted = (self._methods[m].asks_for for m in route.auth)
        message = "missing credentials: send " + " or ".join(wanted)
        if credentials.problem:
            message += f" ({credentials.problem})"
        return message


def _who(identity: Identity) -> str:
    scopes = " ".join(sorted(identity.scopes)) or "(none)"
    issuer = f", issuer {identity.issuer!r}" if identity.issuer else ""
    return f"subject {identity.subject!r}{issuer}, scopes {scopes}"
