"""One `[[auth.jwt.providers]]` entry: the verification rules of one issuer, checks 3 to 5 of
`jwt` (header policy, key and signature, claims), once the token's `iss` has chosen it.

A provider reads its keys through a `KeySource` (a JWKS URL, see `jwks`; a file or the environment,
see `key_files`) and only ever the keys bound, when loaded, to the algorithm the token names.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import unicodedata
from collections.abc import Mapping
from typing import Any, Protocol

from jwt.api_jws import PyJWS
from jwt.exceptions import InvalidSignatureError, PyJWTError

from .. import grammar
from ..config import JwtProviderSettings
from ..errors import ServiceUnavailable
from ..identity import Identity
from .keys import KeySet, VerifyKey
from .rejected import Rejected

log = logging.getLogger("authproxy.auth")

# A value an upstream header can carry unambiguously: latin-1 without C0/C1 controls, NBSP or
# the soft hyphen, and no space at either edge (only U+0020, and only inside).
_SHOWN = r"\x21-\x7e\xa1-\xac\xae-\xff"
_HEADER_VALUE = re.compile(rf"[{_SHOWN}](?:[\x20{_SHOWN}]*[{_SHOWN}])?")
# Controls, Unicode spaces and line separators, format characters (ZWSP, soft hyphen, BOM, bidi).
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
_PRINTABLE_ALG = re.compile(r"[A-Za-z0-9+\-]{1,16}")
_MAX_HEADER_VALUE = 4096
_MAX_CANDIDATES = 8  # keys tried for a token without `kid`


class KeySource(Protocol):
    """A provider's key set, as the provider sees it."""

    def current(self) -> KeySet | None: ...

    async def refresh_for_unknown_kid(self) -> None: ...

    @property
    def unavailable(self) -> bool:
        """The keys are staler than `max_stale_s`: the provider's tokens get 503."""


def number_claim(claims: Mapping[str, Any], name: str) -> float | None:
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

    def __init__(self, settings: JwtProviderSettings, keys: KeySource) -> None:
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
        if self.keys.unavailable:
            # A refetch (rate-limited, single-flight) so service returns with the IdP.
            await self.keys.refresh_for_unknown_kid()
            if self.keys.unavailable:
                raise ServiceUnavailable(
                    f"the signing keys of provider {self.name!r} are older than its "
                    "max_stale_s and its JWKS endpoint is failing",
                    retry_after_s=max(1, int(self.settings.jwks_min_refresh_s)),
                    details={"reason": "jwks_unavailable", "provider": self.name},
                )
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
        exp = number_claim(claims, "exp")
        if exp is None:
            raise Rejected("missing_exp", "token has no 'exp' claim")
        nbf = number_claim(claims, "nbf")
        iat = number_claim(claims, "iat")
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
            scopes=self.scopes_from(claims),
            issuer=s.issuer,
            expires_at=exp,
            leeway_s=leeway,
            credential_id=self.name,
            signing_key=signing_key,
            claim_headers=self.headers_from(claims),
            claims=claims,
            token_id=jti if isinstance(jti := claims.get("jti"), str) else None,
        )

    def scopes_from(self, claims: Mapping[str, Any]) -> frozenset[str]:
        """The scopes a token's claims (or an introspection answer) grant."""
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
            return frozenset(i for i in items if isinstance(i, str) and grammar.scope_token(i))
        return frozenset()

    def headers_from(self, claims: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        """The `claim_headers` values of these claims (a deceptive value refuses the token)."""
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
