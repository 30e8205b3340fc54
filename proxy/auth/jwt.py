"""JWT verification on PyJWT: the unverified `iss` picks the provider, then that provider only.

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
A verified token is cached (LRU keyed by its SHA-256) until its `exp`, so a busy client's repeated
token costs one dictionary lookup.

The identity names the key that verified it (`signing_key`, the key's fingerprint). When a refresh
or a reload yields a set without a key, that key is withdrawn: its cached verdicts are dropped and
subscribers (the WebSocket tunnel) hear the provider and the withdrawn fingerprints. Only a set
that was fetched and parsed counts; a failed fetch keeps the last good keys and withdraws nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import os
import re
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from jwt.api_jws import PyJWS
from jwt.exceptions import InvalidSignatureError, PyJWTError

from ..config import JwtProviderSettings, JwtSettings
from ..errors import ConfigError, ServiceUnavailable
from ..identity import Identity
from ..telemetry.metrics import Metrics
from .jwks import JwksCache, KeySource, StaticKeys
from .keys import KeyError_, KeySet, VerifyKey, hmac_key, load_pem, parse_jwks
from .rejected import Rejected

log = logging.getLogger("authproxy.auth")

# (provider name, fingerprints of the keys that left its set)
WithdrawalCallback = Callable[[str, frozenset[str]], None]

_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 scope-token
# A value an upstream header can carry unambiguously: latin-1 without C0/C1 controls, NBSP or
# the soft hyphen, and no space at either edge (only U+0020, and only inside).
_SHOWN = r"\x21-\x7e\xa1-\xac\xae-\xff"
_HEADER_VALUE = re.compile(rf"[{_SHOWN}](?:[\x20{_SHOWN}]*[{_SHOWN}])?")
# Controls, Unicode spaces and line separators, format characters (ZWSP, soft hyphen, BOM, bidi).
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
_PRINTABLE_ALG = re.compile(r"[A-Za-z0-9+\-]{1,16}")
_MAX_HEADER_VALUE = 4096
_MAX_CANDIDATES = 8  # keys tried for a token without `kid`


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


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Rejected("malformed_claim", f"claim '{name}' is not a number")
    try:
        number = float(value)
    except OverflowError:
        raise Rejected("malformed_claim", f"claim '{name}' is out of range") from None
    if not math.isfinite(number):
        raise Rejected("malformed_claim", f"claim '{name}' is not a finite number")
    return number


def header_safe(value: str) -> bool:
    """Can `value` be sent as an HTTP header value without CR/LF/NUL tricks or re-encoding?"""
    return len(value) <= _MAX_HEADER_VALUE and bool(_HEADER_VALUE.fullmatch(value))


def deceptive(value: str) -> bool:
    """Does `value` hold what an upstream may strip, split on or not show?

    `"admin\u00a0"` is `"admin"` after Python's `strip()`, U+0085 ends a line for
    `str.splitlines()`, a zero-width space hides in a log: such a value names someone else.
    """
    return value != value.strip(" ") or any(
        c != " " and unicodedata.category(c) in _INVISIBLE_CATEGORIES for c in value
    )


def _typ_equal(a: str, b: str) -> bool:
    # RFC 7515 4.1.9: "application/" may be omitted; media types compare case-insensitively.
    def norm(v: str) -> str:
        v = v.strip().lower()
        return v[len("application/") :] if v.startswith("application/") else v

    return norm(a) == norm(b)


class Provider:
    """One `[[auth.jwt.providers]]` entry: its header policy, keys and claim checks."""

    def __init__(self, index: int, settings: JwtProviderSettings, keys: KeySource) -> None:
        self.index = index
        self.settings = settings
        self.name = settings.name
        self.keys = keys
        self.algorithms = frozenset(settings.algorithms)
        self._audiences = frozenset(settings.audiences)
        self._jws = PyJWS(
            algorithms=list(settings.algorithms),
            options={"verify_signature": True, "enforce_minimum_key_length": True},
        )
        self._scope_claims = (
            (settings.scope_claim,) if settings.scope_claim else ("scope", "scp", "scopes")
        )
        self._claim_headers = tuple(settings.claim_headers.items())

    # -- 3. header ---------------------------------------------------------------------------

    def check_header(self, header: Mapping[str, Any]) -> str:
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise Rejected("malformed", "malformed token (no 'alg' header)")
        if alg.lower() == "none":
            raise Rejected("alg_none", "unsigned tokens (alg 'none') are never accepted")
        if alg not in self.algorithms:
            shown = repr(alg) if _PRINTABLE_ALG.fullmatch(alg) else "(unprintable)"
            raise Rejected(
                "alg_not_allowed", f"algorithm {shown} not allowed for provider {self.name!r}"
            )
        if "crit" in header:
            raise Rejected("crit", "critical header parameters ('crit') are not supported")
        if "b64" in header or "zip" in header:
            raise Rejected("unsupported_header", "unsupported header parameter ('b64' or 'zip')")
        cty = header.get("cty")
        if cty is not None and (not isinstance(cty, str) or _typ_equal(cty, "jwt")):
            raise Rejected("nested_jwt", "nested tokens (cty 'JWT') are not accepted")
        if self.settings.typ is not None:
            typ = header.get("typ")
            if not isinstance(typ, str) or not _typ_equal(typ, self.settings.typ):
                raise Rejected("typ", f"token type ('typ') must be {self.settings.typ!r}")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Rejected("malformed", "malformed token ('kid' is not a string)")
        return alg

    # -- 4. key and signature ----------------------------------------------------------------

    def _candidates(
        self, keys: KeySet | None, kid: str | None, alg: str
    ) -> tuple[list[VerifyKey], bool]:
        """Keys that may verify this token, and whether the kid (if any) is known at all."""
        if keys is None:
            return [], False
        if kid is not None:
            named = keys.by_kid.get(kid, ())
            return [k for k in named if alg in k.algorithms], bool(named)
        return [k for k in keys.keys if alg in k.algorithms][:_MAX_CANDIDATES], True

    async def verify(self, raw: bytes, header: Mapping[str, Any]) -> Identity:
        alg = self.check_header(header)
        kid: str | None = header.get("kid")
        candidates, known = self._candidates(self.keys.current(), kid, alg)
        if not candidates and not known:
            await self.keys.refresh_for_unknown_kid()
            candidates, known = self._candidates(self.keys.current(), kid, alg)
        if self.keys.current() is None:
            raise ServiceUnavailable(
                f"signing keys for provider {self.name!r} are not available yet",
                retry_after_s=5,
                details={"reason": "keys_unavailable", "provider": self.name},
            )
        if not candidates:
            if not known:
                raise Rejected(
                    "unknown_kid", f"no key of provider {self.name!r} matches the token's 'kid'"
                )
            which = "the key named by the token" if kid is not None else "no key"
            raise Rejected(
                "key_mismatch",
                f"{which} of provider {self.name!r} can verify {alg!r}"
                if kid is None
                else f"{which} of provider {self.name!r} cannot verify {alg!r}",
            )
        payload: bytes | None = None
        signing_key = ""
        for key in candidates:
            try:
                decoded = self._jws.decode_complete(raw, key=key.key, algorithms=[alg])
            except InvalidSignatureError:
                continue
            except (PyJWTError, ValueError, TypeError) as exc:
                raise Rejected("malformed", "malformed token") from exc
            payload, signing_key = decoded["payload"], key.fingerprint
            break
        if payload is None:
            raise Rejected("bad_signature", "signature verification failed")
        try:
            claims = json.loads(payload)
        except (ValueError, RecursionError):
            raise Rejected("malformed", "malformed token (payload is not JSON)") from None
        if not isinstance(claims, dict):
            raise Rejected("malformed", "malformed token (payload is not a JSON object)")
        return self.check_claims(claims, time.time(), signing_key)

    # -- 5. claims ---------------------------------------------------------------------------

    def check_claims(
        self, claims: Mapping[str, Any], now: float, signing_key: str | None = None
    ) -> Identity:
        s = self.settings
        leeway = float(s.leeway_s)
        exp = _number(claims, "exp")
        if exp is None:
            raise Rejected("missing_exp", "token has no 'exp' claim")
        nbf = _number(claims, "nbf")
        iat = _number(claims, "iat")
        if now >= exp + leeway:
            raise Rejected("token_expired", "token expired")
        if nbf is not None and nbf > now + leeway:
            raise Rejected("not_yet_valid", "token not yet valid ('nbf' is in the future)")
        if iat is not None and iat > now + leeway:
            raise Rejected("issued_in_future", "token issued in the future ('iat')")
        if claims.get("iss") != s.issuer:
            raise Rejected("wrong_issuer", "issuer not accepted")
        aud = claims.get("aud")
        if aud is None:
            raise Rejected("missing_aud", "token has no 'aud' claim")
        auds = [aud] if isinstance(aud, str) else aud
        if not isinstance(auds, list) or not all(isinstance(a, str) for a in auds):
            raise Rejected("malformed_claim", "claim 'aud' is not a string or list of strings")
        if not self._audiences.intersection(auds):
            raise Rejected("wrong_audience", "audience not accepted")
        for claim in s.required_claims:
            if claims.get(claim) is None:
                raise Rejected("missing_claim", f"missing required claim {claim!r}")
        if s.max_lifetime_s is not None:
            if iat is None:
                raise Rejected("missing_claim", "missing required claim 'iat' (max_lifetime_s)")
            if exp - iat > s.max_lifetime_s:
                raise Rejected("lifetime_too_long", f"token lifetime exceeds {s.max_lifetime_s} s")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise Rejected("missing_sub", "token has no 'sub' claim")
        if not header_safe(sub):
            raise Rejected("malformed_claim", "claim 'sub' cannot be sent as a header value")
        return Identity(
            method="jwt",
            subject=sub,
            scopes=self._scopes(claims),
            issuer=s.issuer,
            expires_at=exp,
            credential_id=self.name,
            signing_key=signing_key,
            claim_headers=self._headers(claims),
        )

    def _scopes(self, claims: Mapping[str, Any]) -> frozenset[str]:
        for name in self._scope_claims:
            value = claims.get(name)
            if value is None:
                continue
            if isinstance(value, str):
                items: list[Any] = value.split(" ")
            elif isinstance(value, list):
                items = value
            else:
                raise Rejected("malformed_claim", f"claim {name!r} is not a string or list")
            # Anything that is not a scope-token cannot match a configured scope: drop it.
            return frozenset(i for i in items if isinstance(i, str) and _SCOPE.fullmatch(i))
        return frozenset()

    def _headers(self, claims: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        out = []
        for header, claim in self._claim_headers:
            value = claims.get(claim)
            if isinstance(value, str) and header_safe(value):
                out.append((header, value))
            elif isinstance(value, str) and deceptive(value):
                # Dropping it would let the upstream fall back to a default; refuse the token.
                raise Rejected(
                    "malformed_claim",
                    f"claim {claim!r} (sent as {header}) holds a control or invisible character",
                )
            elif value is not None:
                log.debug(
                    "provider %r: claim %r not sent as %s (not a safe string)",
                    self.name,
                    claim,
                    header,
                )
        return tuple(out)


def _static_keys(index: int, p: JwtProviderSettings) -> KeySet:
    """Keys from the environment or a file; problems are `ConfigError`s naming the key."""
    allowed = frozenset(p.algorithms)
    prefix = f"auth.jwt.providers[{index}]"
    if p.secret_env is not None:
        secret = os.environ.get(p.secret_env)
        if not secret:
            raise ConfigError(
                f"{prefix}.secret_env", f"environment variable {p.secret_env!r} is not set or empty"
            )
        try:
            return KeySet.of([hmac_key(secret.encode("utf-8"), allowed)])
        except KeyError_ as exc:
            raise ConfigError(f"{prefix}.secret_env", str(exc)) from None
    path = p.public_key_file or p.jwks_file
    key = f"{prefix}.{'public_key_file' if p.public_key_file else 'jwks_file'}"
    assert path is not None
    try:
        with open(path, "rb") as f:
            data = f.read(4 * 1024 * 1024)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    try:
        if p.public_key_file:
            return KeySet.of([load_pem(data, allowed)])
        keys, skipped = parse_jwks(data, allowed)
    except KeyError_ as exc:
        raise ConfigError(key, f"{path}: {exc}") from None
    for line in skipped:
        log.warning("provider %r: %s: skipped %s", p.name, path, line)
    return keys


class JwtVerifier:
    """All providers, the issuer index and the verified-token cache."""

    def __init__(
        self, settings: JwtSettings, metrics: Metrics, session: aiohttp.ClientSession
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._max_bytes = settings.max_token_bytes
        self._cache_size = settings.cache_size
        self._cache: OrderedDict[bytes, tuple[Identity, float]] = OrderedDict()
        self._subscribers: dict[int, WithdrawalCallback] = {}
        self._next_subscriber = 0
        self.providers: list[Provider] = []
        self.jwks: list[JwksCache] = []
        for i, p in enumerate(settings.providers):
            source: KeySource
            if p.jwks_url is not None:
                cache = JwksCache(p, session, metrics, on_change=self._keys_changed(p.name))
                self.jwks.append(cache)
                source = cache
            else:
                source = StaticKeys(_static_keys(i, p))
            self.providers.append(Provider(i, p, source))
        self._by_issuer = {p.settings.issuer: p for p in self.providers}

    @property
    def ready(self) -> bool:
        return all(c.ready for c in self.jwks)

    async def start(self) -> None:
        await asyncio.gather(*(c.start() for c in self.jwks))

    async def stop(self) -> None:
        for c in self.jwks:
            await c.stop()

    def reload_files(self) -> None:
        """Re-read `jwks_file` / `public_key_file` keys (SIGHUP); a bad file keeps the old keys."""
        for provider in self.providers:
            if not isinstance(provider.keys, StaticKeys) or provider.settings.secret_env:
                continue
            try:
                keys = _static_keys(provider.index, provider.settings)
            except ConfigError as exc:
                log.error("provider %r: keeping the old keys: %s", provider.name, exc)
                continue
            old = provider.keys.keys
            provider.keys.keys = keys
            self._keys_changed(provider.name)(old, keys)

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
        self.purge(name, withdrawn)
        for callback in list(self._subscribers.values()):
            try:
                callback(name, withdrawn)
            except Exception:  # one broken subscriber must not stop a key refresh
                log.exception("provider %r: key withdrawal callback failed", name)

    def purge(self, provider: str | None = None, keys: frozenset[str] | None = None) -> None:
        """Forget cached verdicts: all, a provider's, or those its `keys` verified."""
        if provider is None:
            self._cache.clear()
            return
        for k in [
            k
            for k, (ident, _) in self._cache.items()
            if ident.credential_id == provider and (keys is None or ident.signing_key in keys)
        ]:
            del self._cache[k]

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
        now = time.time()
        if self._cache_size:
            hit = self._cache.get(digest)
            if hit is not None:
                if now < hit[1]:
                    self._cache.move_to_end(digest)
                    self._metrics.jwt_cache.labels("hit").inc()
                    return hit[0]
                del self._cache[digest]
            self._metrics.jwt_cache.labels("miss").inc()
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
        exp = identity.expires_at
        if self._cache_size and exp is not None and time.time() < exp:
            self._cache[digest] = (identity, exp)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return identity
