"""RFC 7662 token introspection: bearer tokens that are not JWTs, checked by their issuer.

A provider with `introspection_url` takes the opaque bearer tokens (not three base64url JSON
segments). The sidecar POSTs `token=...&token_type_hint=access_token` with HTTP Basic client
authentication (`introspection_client_id`, the secret from `introspection_secret_env`, both
form-encoded first as RFC 6749 2.3.1 asks) over the key session, never the upstream pool.

  * `active: true` -> the identity: `sub` (else `client_id`), scopes from `scope` (or the
    provider's `scope_claim`), `claim_headers`, `exp`, and the provider's issuer. What the answer
    carries is checked as a JWT's claims would be: `exp`/`nbf` with leeway, `iss` exact and `aud`
    one of the audiences when present.
  * `active: false`, or a check above failing -> 401.
  * the endpoint down, slow, refusing our client credentials or answering garbage -> 503
    `introspection_unavailable`, never 401: an IdP outage must not sign everyone out.

Answers are cached by the token's SHA-256 (never the token) until its `exp`, at most
`introspection_cache_s`; refusals for as long (a client retrying a dead token costs the IdP
nothing). Concurrent requests with the same token share one call. The cache is bounded by
`auth.jwt.cache_size`, least recently used first out. Neither the token nor the secret is logged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import quote

import aiohttp

from ..errors import ConfigError, ServiceUnavailable
from ..identity import Identity
from ..telemetry.metrics import Metrics
from .provider import Provider, header_safe, number_claim
from .rejected import Rejected

log = logging.getLogger("authproxy.auth")

MAX_ANSWER_BYTES = 64 * 1024

# A verdict: the identity, or the (reason, message) of the refusal, and when it stops counting.
_Entry = tuple[Identity | tuple[str, str], float]


class _Unavailable(Exception):
    pass


class Introspector:
    """One provider's introspection endpoint and its verdict cache."""

    def __init__(
        self,
        index: int,
        provider: Provider,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        cache_size: int,
    ) -> None:
        s = provider.settings
        assert s.introspection_url is not None
        assert s.introspection_client_id is not None and s.introspection_secret_env is not None
        secret = os.environ.get(s.introspection_secret_env)
        if not secret:
            raise ConfigError(
                f"auth.jwt.providers[{index}].introspection_secret_env",
                f"environment variable {s.introspection_secret_env!r} is not set or empty",
            )
        pair = f"{quote(s.introspection_client_id, safe='')}:{quote(secret, safe='')}"
        self._headers = {
            "Authorization": "Basic " + base64.b64encode(pair.encode()).decode("ascii"),
            "Accept": "application/json",
            "Accept-Encoding": "identity",
        }
        self.provider = provider
        self.name = provider.name
        self.url = s.introspection_url
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=s.introspection_timeout_s)
        self._cache_s = s.introspection_cache_s
        self._size = cache_size
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[Identity | tuple[str, str]]] = {}
        self._audiences = frozenset(s.audiences)
        self._hits = metrics.introspection_cache.labels(self.name, "hit")
        self._misses = metrics.introspection_cache.labels(self.name, "miss")
        self._results = {
            r: metrics.introspections.labels(self.name, r) for r in ("active", "inactive", "error")
        }

    def __len__(self) -> int:
        return len(self._cache)

    async def check(self, token: str, digest: bytes) -> Identity:
        """The identity of an opaque token, `Rejected`, or `ServiceUnavailable`."""
        hit = self._cache.get(digest)
        if hit is not None:
            if time.time() < hit[1]:
                self._cache.move_to_end(digest)
                self._hits.inc()
                return _settle(hit[0])
            del self._cache[digest]
        self._misses.inc()
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.create_task(self._ask(token, digest))
            self._inflight[digest] = task
            task.add_done_callback(lambda _: self._inflight.pop(digest, None))
        # shield: a client that gives up must not cancel the answer the others wait for.
        return _settle(await asyncio.shield(task))

    async def _ask(self, token: str, digest: bytes) -> Identity | tuple[str, str]:
        try:
            answer = await self._post(token)
        except _Unavailable as exc:
            self._results["error"].inc()
            log.warning(
                "introspection for provider %r at %s failed (%s); its opaque tokens get 503",
                self.name,
                self.url,
                exc,
            )
            raise ServiceUnavailable(
                f"the token introspection endpoint of provider {self.name!r} is unavailable",
                retry_after_s=1,
                details={"reason": "introspection_unavailable", "provider": self.name},
            ) from None
        now = time.time()
        try:
            verdict: Identity | tuple[str, str] = self._identity(answer, now)
        except Rejected as exc:
            verdict = (exc.reason, exc.message)
        active = isinstance(verdict, Identity)
        self._results["active" if active else "inactive"].inc()
        until = now + self._cache_s
        if isinstance(verdict, Identity) and verdict.expires_at is not None:
            until = min(until, verdict.expires_at)
        if self._size and self._cache_s and until > now:
            self._cache[digest] = (verdict, until)
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return verdict

    async def _post(self, token: str) -> dict[str, Any]:
        try:
            async with self._session.post(
                self.url,
                data={"token": token, "token_type_hint": "access_token"},
                headers=self._headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                if resp.status != 200:
                    hint = (
                        " (check introspection_client_id/_secret_env)"
                        if resp.status
                        in (
                            401,
                            403,
                        )
                        else ""
                    )
                    raise _Unavailable(f"HTTP {resp.status}{hint}")
                body = await resp.content.read(MAX_ANSWER_BYTES + 1)
        except TimeoutError:
            raise _Unavailable("timed out") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise _Unavailable(f"{type(exc).__name__}: {exc}"[:200]) from None
        if len(body) > MAX_ANSWER_BYTES:
            raise _Unavailable(f"answer larger than {MAX_ANSWER_BYTES} bytes")
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):
            raise _Unavailable("answer is not JSON") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("active"), bool):
            raise _Unavailable("answer has no boolean 'active' (not RFC 7662)")
        return answer

    def _identity(self, claims: dict[str, Any], now: float) -> Identity:
        if claims["active"] is not True:
            raise Rejected("inactive_token", "token is not active (introspection)")
        s = self.provider.settings
        leeway = float(s.leeway_s)
        exp = number_claim(claims, "exp")
        nbf = number_claim(claims, "nbf")
        if exp is not None and now >= exp + leeway:
            raise Rejected("token_expired", "token expired")
        if nbf is not None and nbf > now + leeway:
            raise Rejected("not_yet_valid", "token not yet valid ('nbf' is in the future)")
        iss = claims.get("iss")
        if iss is not None and iss != s.issuer:
            raise Rejected("wrong_issuer", "issuer not accepted")
        aud = claims.get("aud")
        if aud is not None:
            auds = [aud] if isinstance(aud, str) else aud
            if not isinstance(auds, list) or not self._audiences.intersection(
                a for a in auds if isinstance(a, str)
            ):
                raise Rejected("wrong_audience", "audience not accepted")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            sub = claims.get("client_id")
        if not isinstance(sub, str) or not sub:
            raise Rejected("missing_sub", "introspection answer has no 'sub' or 'client_id'")
        if not header_safe(sub):
            raise Rejected("malformed_claim", "claim 'sub' cannot be sent as a header value")
        missing = [c for c in s.required_claims if claims.get(c) is None]  # as for a JWT
        if missing:
            raise Rejected(
                "missing_claim", f"introspection answer lacks required claim {missing[0]!r}"
            )
        iat = number_claim(claims, "iat")
        if s.max_lifetime_s is not None and exp is not None and iat is not None:
            if exp - iat > s.max_lifetime_s:
                raise Rejected("lifetime_too_long", "token lifetime exceeds max_lifetime_s")
        if exp is None:
            # An answer without `exp` vouches for now, not for ever: a session or stream opened
            # with it ends (and a new request asks again) after introspection_cache_s, which
            # is also how long the verdict is cached.
            exp = now + s.introspection_cache_s
        jti = claims.get("jti")
        return Identity(
            method="introspection",
            subject=sub,
            scopes=self.provider.scopes_from(claims),
            issuer=s.issuer,
            expires_at=exp,
            leeway_s=leeway,
            credential_id=self.name,
            claim_headers=self.provider.headers_from(claims),
            claims=claims,
            token_id=jti if isinstance(jti, str) else None,
        )


def _settle(verdict: Identity | tuple[str, str]) -> Identity:
    if isinstance(verdict, Identity):
        return verdict
    raise Rejected(*verdict)
