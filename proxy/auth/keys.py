"""Verification keys: what each key may verify is decided once, when the key is loaded.

A key only ever comes from the provider's own configured source (JWKS URL, JWKS file, PEM file,
or the HS secret in the environment) — never from a token header (`jku`, `x5u`, `jwk`, `x5c`).
Every key is bound at load time to the algorithms it can serve: its type and curve decide the
family, a JWK `alg` narrows it to exactly that algorithm, a JWK `use` other than `sig` (or
`key_ops` without `verify`) disqualifies it, and the provider's allow-list bounds it all. A JWK that
cannot be used is skipped with a reason instead of failing the whole set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
MIN_RSA_BITS = 2048
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}  # RFC 7518 3.2: key >= hash size
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
MAX_JWKS_KEYS = 100

PublicKey = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey


class KeyError_(ValueError):
    """A key that cannot be used; the message says why (never contains key material)."""


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """One key and the algorithms it may verify."""

    kid: str | None
    key: PublicKey | bytes = field(repr=False)
    algorithms: frozenset[str]
    fingerprint: str  # sha256 of the public key (or of the secret's hash): change detection


@dataclass(frozen=True, slots=True)
class KeySet:
    """A provider's current keys, indexed by `kid`."""

    keys: tuple[VerifyKey, ...]
    by_kid: Mapping[str, tuple[VerifyKey, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, keys: Iterable[VerifyKey]) -> KeySet:
        keys = tuple(keys)
        by_kid: dict[str, list[VerifyKey]] = {}
        for k in keys:
            if k.kid is not None:
                by_kid.setdefault(k.kid, []).append(k)
        return cls(keys, {kid: tuple(v) for kid, v in by_kid.items()})

    def fingerprints(self) -> frozenset[str]:
        return frozenset(k.fingerprint for k in self.keys)

    def describe(self) -> str:
        parts = [f"{k.kid or '(no kid)'}: {'/'.join(sorted(k.algorithms))}" for k in self.keys]
        return ", ".join(parts) or "no keys"


def algorithms_for(key: PublicKey) -> frozenset[str]:
    """The algorithms a public key's type and curve can serve (no HS/RS confusion possible)."""
    if isinstance(key, RSAPublicKey):
        return RSA_ALGORITHMS if key.key_size >= MIN_RSA_BITS else frozenset()
    if isinstance(key, EllipticCurvePublicKey):
        alg = _EC_ALGORITHMS.get(key.curve.name)
        return frozenset({alg}) if alg else frozenset()
    if isinstance(key, Ed25519PublicKey | Ed448PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()  # type: ignore[unreachable]  # a key type PublicKey may gain later


def _fingerprint(key: PublicKey) -> str:
    der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def bind(
    key: PublicKey, kid: str | None, allowed: frozenset[str], jwk_alg: str | None = None
) -> VerifyKey:
    """Bind a public key to the algorithms it may verify, or raise `KeyError_`."""
    family = algorithms_for(key)
    if not family:
        if isinstance(key, RSAPublicKey):
            raise KeyError_(f"RSA key of {key.key_size} bits is too small (minimum {MIN_RSA_BITS})")
        raise KeyError_("unsupported key type or curve")
    if jwk_alg is not None:
        if jwk_alg not in family:
            raise KeyError_(f"'alg' {jwk_alg!r} does not fit the key type")
        family = frozenset({jwk_alg})
    usable = family & allowed
    if not usable:
        raise KeyError_(
            f"none of the provider's algorithms can use this key (key serves "
            f"{', '.join(sorted(family))})"
        )
    return VerifyKey(kid, key, usable, _fingerprint(key))


def hmac_key(secret: bytes, allowed: frozenset[str]) -> VerifyKey:
    """The shared secret of an HS* provider; too short for a configured algorithm is an error."""
    need = max(_HMAC_MIN_BYTES[a] for a in allowed)
    if len(secret) < need:
        raise KeyError_(
            f"the secret is {len(secret)} bytes; {', '.join(sorted(allowed))} needs at least {need}"
        )
    return VerifyKey(None, secret, allowed, hashlib.sha256(b"hs:" + secret).hexdigest())


def load_pem(data: bytes, allowed: frozenset[str]) -> VerifyKey:
    """A PEM public key or X.509 certificate."""
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyError_("not a PEM public key or certificate") from exc
    if not isinstance(key, PublicKey):
        raise KeyError_("unsupported key type")
    return bind(key, None, allowed)


def parse_jwk(jwk: Any, allowed: frozenset[str]) -> VerifyKey:
    """One JWK (a dict) to a bound key, or `KeyError_` saying why it is unusable."""
    if not isinstance(jwk, dict):
        raise KeyError_("not a JSON object")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise KeyError_("'kid' is not a string")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise KeyError_(f"'use' is {str(use)[:20]!r}, not 'sig'")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise KeyError_("'key_ops' does not include 'verify'")
    alg = jwk.get("alg")
    if alg is not None and not isinstance(alg, str):
        raise KeyError_("'alg' is not a string")
    if _PRIVATE_MEMBERS & jwk.keys():
        # A published private key means anyone can sign: refuse it rather than use its public half.
        raise KeyError_("contains private key material")
    kty = jwk.get("kty")
    parser: Any
    if kty == "RSA":
        parser = RSAAlgorithm.from_jwk
    elif kty == "EC":
        parser = ECAlgorithm.from_jwk
    elif kty == "OKP":
        parser = OKPAlgorithm.from_jwk
    else:
        raise KeyError_(f"unsupported 'kty' {str(kty)[:20]!r}")
    try:
        key = parser(jwk)
    except Exception as exc:  # the library raises several types for bad parameters
        raise KeyError_(f"bad {kty} parameters") from exc
    if not isinstance(key, PublicKey):
        raise KeyError_("not a public key")
    return bind(key, kid, allowed, alg)


def parse_jwks(data: bytes | str, allowed: frozenset[str]) -> tuple[KeySet, list[str]]:
    """A JWKS document to the usable keys plus one line per skipped key; `KeyError_` if garbage."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise KeyError_("not JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeyError_("not a JWK set (expected an object with a 'keys' list)")
    keys: list[VerifyKey] = []
    skipped: list[str] = []
    for i, jwk in enumerate(doc["keys"][:MAX_JWKS_KEYS]):
        try:
            keys.append(parse_jwk(jwk, allowed))
        except KeyError_ as exc:
            kid = jwk.get("kid") if isinstance(jwk, dict) else None
            name = repr(kid[:64]) if isinstance(kid, str) else f"#{i}"
            skipped.append(f"key {name}: {exc}")
    if not keys:
        raise KeyError_("no usable keys" + (f" ({'; '.join(skipped[:5])})" if skipped else ""))
    return KeySet.of(keys), skipped
