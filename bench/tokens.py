"""Key material and credentials for one bench run, generated at start so nothing secret is stored.

The RS256 key is published as a JWKS file (with a `kid`, as an identity provider would publish it)
for the sidecar and as a PEM file for the nginx `auth_request` service; both verify the same token.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

RS_ISSUER = "https://idp.bench/rs"
HS_ISSUER = "https://idp.bench/hs"
AUDIENCE = "bench"
HS_SECRET = "bench-secret-bench-secret-bench-secret!"
HS_SECRET_ENV = "BENCH_HS_SECRET"
API_KEY = "ak_bench_key"
KID = "bench-rs-1"


@dataclass(frozen=True)
class Credentials:
    """What the clients send and where the servers find the keys to check it."""

    rs_token: str
    hs_token: str
    api_key: str
    api_key_sha256: str
    jwks_file: Path
    public_pem: Path


def make(directory: Path) -> Credentials:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key()
    jwk = json.loads(RSAAlgorithm.to_jwk(public))
    jwk.update({"kid": KID, "alg": "RS256", "use": "sig"})
    jwks_file = directory / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [jwk]}))
    public_pem = directory / "rs256-public.pem"
    public_pem.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    now = int(time.time())
    # Valid for the whole run: the sidecar's verified-token cache keeps it, which is the point
    # (a client reuses its access token for minutes).
    claims = {"sub": "bench", "aud": AUDIENCE, "iat": now, "exp": now + 3600, "scope": "x:read"}
    return Credentials(
        rs_token=jwt.encode(
            {**claims, "iss": RS_ISSUER}, private, algorithm="RS256", headers={"kid": KID}
        ),
        hs_token=jwt.encode({**claims, "iss": HS_ISSUER}, HS_SECRET, algorithm="HS256"),
        api_key=API_KEY,
        api_key_sha256=hashlib.sha256(API_KEY.encode()).hexdigest(),
        jwks_file=jwks_file,
        public_pem=public_pem,
    )
