"""The demo identity provider: demo users, signed access tokens, refresh tokens and a rotating JWKS.

Time comes from an injectable clock so tests can move through rotations and grace periods without
sleeping. Keys rotate lazily: every operation first brings the key ring up to date with the clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

Clock = Callable[[], float]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

SUPPORTED_ALGORITHMS = ("RS256", "ES256")


class AuthError(Exception):
    """Credentials or a refresh token were refused; the message is safe to show."""


@dataclass(frozen=True, slots=True)
class DemoUser:
    """A built-in account; `alg` is the algorithm its access tokens are signed with."""

    username: str
    password: str
    name: str
    scopes: tuple[str, ...]
    alg: str

    def to_json(self) -> dict[str, Any]:
        return {
            "sub": self.username,
            "email": self.username,
            "name": self.name,
            "scopes": list(self.scopes),
            "alg": self.alg,
        }


DEMO_USERS: tuple[DemoUser, ...] = (
    DemoUser("admin@example.com", "admin", "Ada Admin", ("models:read", "models:write"), "RS256"),
    DemoUser("viewer@example.com", "viewer", "Vic Viewer", ("models:read",), "ES256"),
)


def _thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint, used as the `kid`."""
    members = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One key pair; `retired_at` is set once a newer key has taken over signing."""

    kid: str
    alg: str
    private_key: PrivateKey
    public_jwk: dict[str, Any]
    created_at: float
    retired_at: float | None = None

    @classmethod
    def generate(cls, alg: str, now: float) -> SigningKey:
        private_key: PrivateKey
        if alg == "RS256":
            private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        elif alg == "ES256":
            private_key = ec.generate_private_key(ec.SECP256R1())
            jwk = ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        else:
            raise ValueError(f"unsupported signing algorithm {alg!r}")
        kid = _thumbprint(jwk)
        return cls(kid, alg, private_key, {**jwk, "kid": kid, "use": "sig", "alg": alg}, now)


class KeyRing:
    """The signing key per algorithm plus recently retired keys still published for verification.

    Every `rotation_s` seconds a fresh key pair per algorithm becomes the signing key; the previous
    public key stays in the JWKS for `grace_s` seconds so tokens it signed keep verifying,
    then goes.
    """

    def __init__(
        self,
        *,
        algorithms: Iterable[str] = SUPPORTED_ALGORITHMS,
        rotation_s: float = 3600.0,
        grace_s: float = 600.0,
        clock: Clock = time.time,
    ) -> None:
        self.rotation_s = rotation_s
        self.grace_s = grace_s
        self._clock = clock
        now = clock()
        self._current: dict[str, SigningKey] = {
            alg: SigningKey.generate(alg, now) for alg in algorithms
        }
        self._retired: list[SigningKey] = []

    def maintain(self) -> None:
        """Rotate keys that are due and drop retired keys past their grace period."""
        now = self._clock()
        for alg, key in list(self._current.items()):
            if now - key.created_at >= self.rotation_s:
                self._retired.append(replace(key, retired_at=now))
                self._current[alg] = SigningKey.generate(alg, now)
        self._retired = [k for k in self._retired if now - (k.retired_at or now) < self.grace_s]

    def rotate(self) -> None:
        """Rotate every algorithm's key now, whatever its age."""
        now = self._clock()
        for alg, key in list(self._current.items()):
            self._retired.append(replace(key, retired_at=now))
            self._current[alg] = SigningKey.generate(alg, now)
        self.maintain()

    def signing_key(self, alg: str) -> SigningKey:
        self.maintain()
        return self._current[alg]

    def jwks(self) -> dict[str, Any]:
        self.maintain()
        keys = [k.public_jwk for k in self._current.values()]
        keys += [k.public_jwk for k in reversed(self._retired)]
        return {"keys": keys}


@dataclass(frozen=True, slots=True)
class _RefreshGrant:
    username: str
    expires_at: float


class IdentityProvider:
    """Logs demo users in, issues access and refresh tokens, and rotates refresh tokens on use."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str = "webplus",
        token_ttl_s: int = 300,
        refresh_ttl_s: int = 86400,
        keyring: KeyRing | None = None,
        users: Iterable[DemoUser] = DEMO_USERS,
        clock: Clock = time.time,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.token_ttl_s = token_ttl_s
        self.refresh_ttl_s = refresh_ttl_s
        self._clock = clock
        self.keyring = keyring or KeyRing(grace_s=2.0 * token_ttl_s, clock=clock)
        self._users = {u.username: u for u in users}
        self._refresh: dict[str, _RefreshGrant] = {}

    def user(self, username: str) -> DemoUser | None:
        return self._users.get(username)

    def login(self, username: str, password: str) -> dict[str, Any]:
        user = self._users.get(username)
        # Compare even for unknown users so timing does not reveal which usernames exist.
        expected = user.password if user else secrets.token_hex(8)
        if not hmac.compare_digest(password.encode(), expected.encode()) or user is None:
            raise AuthError("invalid username or password")
        return self._grant(user)

    def refresh(self, refresh_token: str) -> dict[str, Any]:
        # One use only: the presented token is consumed whatever happens next.
        grant = self._refresh.pop(refresh_token, None)
        if grant is None or grant.expires_at <= self._clock():
            raise AuthError("refresh token is invalid, expired or already used")
        user = self._users.get(grant.username)
        if user is None:
            raise AuthError("refresh token is invalid, expired or already used")
        return self._grant(user)

    def issue_access_token(self, user: DemoUser) -> str:
        now = int(self._clock())
        key = self.keyring.signing_key(user.alg)
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": user.username,
            "email": user.username,
            "name": user.name,
            "scope": " ".join(user.scopes),
            "iat": now,
            "nbf": now,
            "exp": now + self.token_ttl_s,
            "jti": secrets.token_urlsafe(16),
        }
        headers = {"kid": key.kid, "typ": "at+jwt"}
        return jwt.encode(claims, key.private_key, algorithm=key.alg, headers=headers)

    def _grant(self, user: DemoUser) -> dict[str, Any]:
        now = self._clock()
        self._refresh = {t: g for t, g in self._refresh.items() if g.expires_at > now}
        refresh_token = secrets.token_urlsafe(32)
        self._refresh[refresh_token] = _RefreshGrant(user.username, now + self.refresh_ttl_s)
        return {
            "access_token": self.issue_access_token(user),
            "refresh_token": refresh_token,
            "token_type": "Bearer",
            "expires_in": self.token_ttl_s,
            "refresh_expires_in": self.refresh_ttl_s,
            "scope": " ".join(user.scopes),
            "user": user.to_json(),
        }

    def openid_configuration(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}/.well-known/jwks.json",
            "token_endpoint": f"{self.issuer}/auth/login",
            "id_token_signing_alg_values_supported": list(SUPPORTED_ALGORITHMS),
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "scopes_supported": ["models:read", "models:write"],
        }
