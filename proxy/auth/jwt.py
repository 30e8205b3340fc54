"""The `jwt` method: bearer JWTs on PyJWT; the unverified `iss` picks the provider, then that
provider only.

Where the token comes from (`BearerLocator`): `Authorization: Bearer <jwt>` on every request. A
WebSocket handshake cannot set headers from a browser, so it may also use the `token` /
`access_token` query parameters, a `Sec-WebSocket-Protocol` entry (`bearer.<jwt>` or the Kubernetes
form `base64url.bearer.authorization.k8s.io.<base64url(jwt)>`) and, when configured, a cookie. Two
different explicit tokens are ambiguous and refused; the cookie is ambient (the browser sends it on
its own), so it only counts when no explicit token was given.

Order of checks, cheapest and most dangerous first:
  1. size (`auth.jwt.max_token_bytes`) before any parsing; three base64url segments, JSON objects;
  2. `iss` selects the provider (unknown issuer: refused, no key is even looked at);
  3. header, before the signature: `alg` in the provider's allow-list (never `none`), no `crit`,
     no `b64`/`zip`, no nested JWT (`cty: JWT`), `typ` if configured. `jku`, `x5u`, `jwk` and
     `x5c` are never read: keys come only from the provider's own source, `kid` is only a lookup
     key, and a key verifies only the algorithms it was bound to when loaded (see `keys`);
  4. the signature (PyJWT, with the key object and exactly the one algorithm);
  5. claims: `exp` required, `nbf`/`iat` with leeway, `iss` exact, `aud` any of the audiences,
     `required_claims`, `max_lifetime_s`, `sub` usable as a header value, scopes.
Steps 1 and 2 are `JwtVerifier`'s, 3 to 5 the chosen `provider.Provider`'s. A verified token is
kept in the `token_cache` until its `exp`.

The identity names the key that verified it (`signing_key`, the key's fingerprint). When a refresh
(`jwks`) or a reload (`key_files`) yields a set without a key, that key is withdrawn: its cached
verdicts are dropped and subscribers (the WebSocket tunnel) hear the provider and the withdrawn
fingerprints. Only a set that was fetched and parsed counts; a failed fetch keeps the last good
keys and withdraws nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from .. import grammar
from ..config import AuthSettings, JwtSettings, Settings
from ..errors import ServiceUnavailable
from ..identity import Identity
from ..telemetry.metrics import Metrics
from .introspection import Introspector
from .jwks import JwksCache
from .key_files import FileKeys
from .keys import KeySet
from .method import Found, MethodSpec, Presented, fingerprint, settle
from .provider import KeySource, Provider
from .rejected import Rejected
from .token_cache import TokenCache

log = logging.getLogger("authproxy.auth")

NAME = "jwt"

# (provider name, fingerprints of the keys that left its set)
WithdrawalCallback = Callable[[str, frozenset[str]], None]

_K8S_PREFIX = "base64url.bearer.authorization.k8s.io."
_BEARER_PREFIX = "bearer."


# -- where the token comes from ----------------------------------------------------------------


def _k8s_token(encoded: str) -> str | None:
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        token = raw.decode("ascii")
    except (binascii.Error, ValueError):
        return None
    return token if grammar.token68(token) else None


class BearerLocator:
    """Finds the bearer token of one request; the cookie name is prepared once."""

    name = NAME
    consumes = (b"authorization",)
    query_params = (b"token", b"access_token")
    subprotocol_prefixes = (_K8S_PREFIX, _BEARER_PREFIX)

    def __init__(self, auth: AuthSettings) -> None:
        self._cookie = auth.token_cookie
        self.also_reads: tuple[bytes, ...] = (b"cookie",) if auth.token_cookie is not None else ()

    def extract(self, presented: Presented, *, websocket: bool) -> Found:
        bearers: list[tuple[str, str]] = []
        problem: str | None = None
        note: str | None = None
        cookie: str | None = None
        for name, value in presented.headers:
            if name == b"authorization":
                if value.startswith(b"Bearer "):
                    # As the grammar reads it (the scheme, blanks, the rest), without the
                    # regular expression: the form nearly every client sends.
                    token = value[7:].decode("latin-1").strip(" \t")
                else:
                    m = grammar.authorization(value.decode("latin-1").strip(" \t"))
                    if m is None or m.group(1).lower() != "bearer":
                        note = "Authorization header is not a Bearer token"
                        continue
                    token = (m.group(2) or "").strip(" \t")
                if not token:
                    problem = "empty bearer token"
                elif not grammar.token68(token):
                    problem = "malformed bearer token"
                else:
                    bearers.append(("header", token))
            elif name == b"cookie" and websocket and cookie is None:
                cookie = self._find_cookie(value.decode("latin-1"))
        if websocket:
            for _, text in presented.query:
                if text and grammar.token68(text):
                    bearers.append(("query", text))
                elif text:
                    problem = "malformed bearer token"
        for entry in presented.subprotocols:
            if entry.startswith(_K8S_PREFIX):
                token_or_none = _k8s_token(entry[len(_K8S_PREFIX) :])
                if token_or_none is None:
                    problem = "malformed bearer token in Sec-WebSocket-Protocol"
                else:
                    bearers.append(("subprotocol", token_or_none))
            else:
                token = entry[len(_BEARER_PREFIX) :]
                if token and grammar.token68(token):
                    bearers.append(("subprotocol", token))
                else:
                    problem = "malformed bearer token in Sec-WebSocket-Protocol"
        if not bearers and cookie:
            if grammar.token68(cookie):
                bearers.append(("cookie", cookie))
            else:
                problem = "malformed bearer token in cookie"
        return settle(bearers, problem, note, "two bearer tokens")

    def _find_cookie(self, header: str) -> str | None:
        for pair in header.split(";"):
            name, sep, value = pair.strip(" \t").partition("=")
            if sep and name.strip(" \t") == self._cookie:
                value = value.strip(" \t")
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                return value
        return None


# -- checks 1 and 2, the cache and key withdrawals -----------------------------------------------


def _segment(raw: bytes, what: str) -> dict[str, Any]:
    # PyJWT re-decodes and is stricter (canonical base64); this parse only has to be safe.
    stripped = raw.rstrip(b"=")
    if len(raw) - len(stripped) > 2 or len(stripped) % 4 == 1:
        raise Rejected("malformed", f"malformed token ({what} is not base64url)")
    try:
        data = base64.b64decode(
            stripped + b"=" * (-len(stripped) % 4), altchars=b"-_", validate=True
        )
        value = json.loads(data)
    except (binascii.Error, ValueError, RecursionError):
        raise Rejected("malformed", f"malformed token ({what} is not base64url JSON)") from None
    if not isinstance(value, dict):
        raise Rejected("malformed", f"malformed token ({what} is not a JSON object)")
    return value


class JwtVerifier:
    """All providers, the issuer index, the verified-token cache and key withdrawals."""

    def __init__(
        self, settings: JwtSettings, metrics: Metrics, session: aiohttp.ClientSession
    ) -> None:
        self._max_bytes = settings.max_token_bytes
        self.cache = TokenCache(settings.cache_size, metrics)
        self._subscribers: dict[int, WithdrawalCallback] = {}
        self._next_subscriber = 0
        self.providers: list[Provider] = []
        self.jwks: list[JwksCache] = []
        self._files: list[FileKeys] = []
        for i, p in enumerate(settings.providers):
            source: KeySource
            if p.jwks_url is not None or p.discovers:
                cache = JwksCache(
                    p,
                    session,
                    metrics,
                    on_change=self._keys_changed(p.name),
                    on_unavailable=self._too_stale(p.name),
                )
                self.jwks.append(cache)
                source = cache
            else:
                files = FileKeys(i, p, on_change=self._keys_changed(p.name))
                self._files.append(files)
                source = files
            self.providers.append(Provider(p, source))
        self._by_issuer = {p.settings.issuer: p for p in self.providers}
        # Opaque bearer tokens (RFC 7662); empty: every bearer token must be a JWT.
        self.introspectors = [
            Introspector(i, provider, session, metrics, settings.cache_size)
            for i, provider in enumerate(self.providers)
            if provider.settings.introspection_url is not None
        ]

    @property
    def ready(self) -> bool:
        return all(c.ready for c in self.jwks)

    @property
    def unavailable(self) -> list[str]:
        """Providers whose keys are staler than their `max_stale_s` (their tokens get 503)."""
        return [c.provider.name for c in self.jwks if c.unavailable]

    def _too_stale(self, name: str) -> Callable[[], None]:
        def drop() -> None:
            # Cached verdicts would outlive the bound until their `exp`: they go too.
            self.cache.drop_provider(name)

        return drop

    async def start(self) -> None:
        await asyncio.gather(*(c.start() for c in self.jwks))

    async def stop(self) -> None:
        for c in self.jwks:
            await c.stop()

    def reload_files(self) -> None:
        """Re-read `jwks_file` / `public_key_file` keys (SIGHUP); a bad file keeps the old keys."""
        for files in self._files:
            files.reload()

    def subscribe_withdrawals(self, callback: WithdrawalCallback) -> Callable[[], None]:
        """`callback(provider, fingerprints)` whenever keys leave a provider's set; returns an
        unsubscribe."""
        token = self._next_subscriber
        self._next_subscriber += 1
        self._subscribers[token] = callback

        def unsubscribe() -> None:
            self._subscribers.pop(token, None)

        return unsubscribe

    def _keys_changed(self, name: str) -> Callable[[KeySet | None, KeySet], None]:
        def changed(old: KeySet | None, new: KeySet) -> None:
            # Called only with a set that was fetched (or read) and parsed: a failed fetch never
            # gets here, so an endpoint that is down withdraws nothing.
            if old is None:
                return
            withdrawn = old.fingerprints() - new.fingerprints()
            if withdrawn:
                self._withdrawn(name, old, withdrawn)

        return changed

    def _withdrawn(self, name: str, old: KeySet, withdrawn: frozenset[str]) -> None:
        # A key that disappeared may have been withdrawn because it leaked: its verdicts are not
        # honoured until their `exp`, and the sessions it opened are closed.
        kids = ", ".join(k.kid or "(no kid)" for k in old.keys if k.fingerprint in withdrawn)
        log.warning(
            "provider %r: %d signing key(s) withdrawn (%s); tokens they verified are refused "
            "and their WebSocket sessions closed",
            name,
            len(withdrawn),
            kids,
        )
        self.cache.drop(name, withdrawn)
        for callback in list(self._subscribers.values()):
            try:
                callback(name, withdrawn)
            except Exception:  # one broken subscriber must not stop a key refresh
                log.exception("provider %r: key withdrawal callback failed", name)

    def provider(self, name: str | None) -> Provider | None:
        return next((p for p in self.providers if p.name == name), None)

    def peek_provider(self, token: str) -> str | None:
        """The provider the token's unverified `iss` names (for explain), or None."""
        try:
            parts = token.encode("ascii").split(b".")
            iss = _segment(parts[1], "payload").get("iss") if len(parts) == 3 else None
        except (Rejected, UnicodeEncodeError):
            return None
        p = self._by_issuer.get(iss) if isinstance(iss, str) else None
        return p.name if p else None

    async def verify(self, token: str) -> Identity:
        if len(token) > self._max_bytes:
            raise Rejected("token_too_large", f"token is larger than {self._max_bytes} bytes")
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError:
            raise Rejected("malformed", "malformed token (not ASCII)") from None
        digest = hashlib.sha256(raw).digest()
        if self.introspectors and opaque(raw):
            return await self._introspect(token, digest)
        cached = self.cache.get(digest)
        if cached is not None:
            return cached
        parts = raw.split(b".")
        if len(parts) == 5:
            raise Rejected("malformed", "encrypted tokens (JWE) are not accepted")
        if len(parts) != 3:
            raise Rejected("malformed", "malformed token (expected three dot-separated segments)")
        header = _segment(parts[0], "header")
        payload = _segment(parts[1], "payload")
        iss = payload.get("iss")
        if not isinstance(iss, str):
            raise Rejected("missing_issuer", "token has no 'iss' claim")
        provider = self._by_issuer.get(iss)
        if provider is None:
            raise Rejected("unknown_issuer", "unknown issuer")
        identity = await provider.verify(raw, header)
        self.cache.put(digest, identity)
        return identity

    async def _introspect(self, token: str, digest: bytes) -> Identity:
        # Several introspecting providers: the first that calls the token active names it.
        refusal: Rejected | None = None
        outage: ServiceUnavailable | None = None
        for introspector in self.introspectors:
            try:
                return await introspector.check(token, digest)
            except Rejected as exc:
                refusal = exc
            except ServiceUnavailable as exc:
                outage = exc
        # One endpoint down and none active: the token may be good, so 503 rather than 401.
        if outage is not None:
            raise outage
        assert refusal is not None
        raise refusal


def opaque(raw: bytes) -> bool:
    """Is this bearer token not a JWS (three segments, the first a base64url JSON object)? A
    JWE (five segments) is opaque to the sidecar too: only its issuer can read it."""
    parts = raw.split(b".")
    if len(parts) != 3:
        return True
    if parts[0][:3] == b"eyJ":  # base64url of '{"': a JWS header, without decoding it
        return False
    try:
        _segment(parts[0], "header")
    except Rejected:
        return True
    return False


# -- the method ------------------------------------------------------------------------------


class JwtMethod:
    """Bearer JWTs, as one method of a route's chain."""

    name = NAME
    asks_for = "a Bearer token"
    bearer_challenge = True

    def __init__(
        self, settings: Settings, metrics: Metrics, session: aiohttp.ClientSession
    ) -> None:
        self.verifier = JwtVerifier(settings.auth.jwt, metrics, session)

    @property
    def ready(self) -> bool:
        return self.verifier.ready

    def found(self, credential: Found) -> str | None:
        if credential.problem is not None:
            return f"an unusable bearer token ({credential.problem})"
        if credential.value is not None:
            return f"a bearer token from the {credential.source} ({fingerprint(credential.value)})"
        return None

    async def authenticate(self, credential: Found) -> Identity:
        if credential.value is None:
            raise Rejected("malformed_credentials", credential.problem or "no token")
        return await self.verifier.verify(credential.value)

    async def start(self) -> None:
        await self.verifier.start()

    async def stop(self) -> None:
        await self.verifier.stop()

    def reload(self) -> None:
        self.verifier.reload_files()


METHOD: MethodSpec = MethodSpec(NAME, BearerLocator, JwtMethod)
