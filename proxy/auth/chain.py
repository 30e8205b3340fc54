"""The ordered method chain of a route: the first method that finds its credential decides.

A method whose credential is absent is "not responsible" and the next is tried (oathkeeper's
authenticator chain). A present but invalid credential is a 401 at once — also on an
`auth_optional` route, and even if a later method would have accepted another credential: a
client that sends a bad token must hear about it rather than be served under another identity.
Nothing presented is a 401 with a bare `Bearer` challenge (RFC 6750 3.1: no error code when the
request carried no authentication), unless the route is `auth_optional`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import RouteSettings
from ..errors import ProxyError, Unauthorized
from ..identity import Identity
from ..telemetry.metrics import Metrics
from .apikeys import ApiKeyStore
from .extractor import Credentials
from .jwt import JwtVerifier
from .rejected import Rejected
from .scopes import require_scopes

log = logging.getLogger("authproxy.auth")


def fingerprint(secret: str) -> str:
    """A short, safe name for a credential in logs and explain output: a SHA-256 prefix."""
    return "sha256:" + hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one method of the chain found and concluded (for `explain`)."""

    method: str
    found: str | None  # None: nothing of its kind was presented (not responsible)
    outcome: str


class Method(Protocol):
    """One authentication method."""

    name: str

    def present(self, credentials: Credentials) -> bool:
        """Is a credential of this method's kind there (usable or not)? Cheap: every request."""

    def found(self, credentials: Credentials) -> str | None:
        """A description of the credential this method is responsible for, or None (for
        `explain` and traces only: it hashes the credential)."""

    async def authenticate(self, credentials: Credentials) -> Identity:
        """The identity, or `Rejected`."""


class JwtMethod:
    """Bearer JWTs."""

    name = "jwt"

    def __init__(self, verifier: JwtVerifier) -> None:
        self.verifier = verifier

    def present(self, credentials: Credentials) -> bool:
        return credentials.bearer is not None or credentials.bearer_problem is not None

    def found(self, credentials: Credentials) -> str | None:
        if credentials.bearer_problem is not None:
            return f"an unusable bearer token ({credentials.bearer_problem})"
        if credentials.bearer is not None:
            return (
                f"a bearer token from the {credentials.bearer_source} "
                f"({fingerprint(credentials.bearer)})"
            )
        return None

    async def authenticate(self, credentials: Credentials) -> Identity:
        if credentials.bearer is None:
            raise Rejected("malformed_credentials", credentials.bearer_problem or "no token")
        return await self.verifier.verify(credentials.bearer)


class ApiKeyMethod:
    """API keys."""

    name = "api_key"

    def __init__(self, store: ApiKeyStore) -> None:
        self.store = store

    def present(self, credentials: Credentials) -> bool:
        return credentials.api_key is not None or credentials.api_key_problem is not None

    def found(self, credentials: Credentials) -> str | None:
        if credentials.api_key_problem is not None:
            return f"an unusable API key ({credentials.api_key_problem})"
        if credentials.api_key is not None:
            return (
                f"an API key from the {credentials.api_key_source} "
                f"({fingerprint(credentials.api_key)})"
            )
        return None

    async def authenticate(self, credentials: Credentials) -> Identity:
        if credentials.api_key is None:
            raise Rejected("malformed_credentials", credentials.api_key_problem or "no key")
        key = self.store.lookup(credentials.api_key)
        return Identity(
            method="api_key",
            subject=key.id,
            scopes=key.scopes,
            issuer=None,
            expires_at=key.expires_at,
            credential_id=key.id,
        )


class Chain:
    """Runs a route's methods in order, then its scope check."""

    def __init__(self, methods: dict[str, Method], metrics: Metrics, api_key_header: str) -> None:
        self._methods = methods
        self._metrics = metrics
        self._api_key_header = api_key_header
        # Metric children by (method, result): labels() per request costs more than inc().
        self._counters: dict[tuple[str, str], Any] = {}

    def _count(self, method: str, result: str) -> None:
        counter = self._counters.get((method, result))
        if counter is None:
            counter = self._counters[(method, result)] = self._metrics.auth.labels(method, result)
        counter.inc()

    async def run(
        self, route: RouteSettings, credentials: Credentials, trace: list[Attempt] | None = None
    ) -> Identity | None:
        if route.public:
            return None
        bearer = "jwt" in route.auth
        for name in route.auth:
            method = self._methods[name]
            if trace is None:
                found = "" if method.present(credentials) else None
            else:
                found = method.found(credentials)
            if found is None:
                if trace is not None:
                    trace.append(Attempt(name, None, "not responsible (nothing presented)"))
                continue
            try:
                identity = await method.authenticate(credentials)
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
                raise Unauthorized(
                    message, details={"reason": reason, "method": name}, bearer=bearer
                ) from None
            except ProxyError as exc:
                self._metrics.auth.labels(name, str(exc.details.get("reason", exc.code))).inc()
                if trace is not None:
                    trace.append(Attempt(name, found, f"failed: {exc.message}"))
                raise
            if trace is not None:
                trace.append(Attempt(name, found, f"accepted: {_who(identity)}"))
            try:
                require_scopes(identity, route)
            except ProxyError as exc:
                self._count(name, "insufficient_scope")
                exc.identity = identity
                raise
            self._count(name, "ok")
            return identity
        if route.auth_optional and not route.scopes:
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
        wanted = {"jwt": "a Bearer token", "api_key": f"an API key ({self._api_key_header})"}
        message = "missing credentials: send " + " or ".join(wanted[m] for m in route.auth)
        if credentials.problem:
            message += f" ({credentials.problem})"
        return message


def _who(identity: Identity) -> str:
    scopes = " ".join(sorted(identity.scopes)) or "(none)"
    issuer = f", issuer {identity.issuer!r}" if identity.issuer else ""
    return f"subject {identity.subject!r}{issuer}, scopes {scopes}"
