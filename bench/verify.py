"""Token verification cost: a signature check vs. the verified-token cache, per algorithm.

Prints a Markdown table. In-process (no HTTP), so it measures only the auth stage.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import aiohttp
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from proxy import config
from proxy.auth import AuthService
from proxy.telemetry.metrics import Metrics

ISSUER = "https://idp.bench"
SECRET = "bench-secret-bench-secret-bench-secret!"


def _keys(tmp: Path) -> dict[str, tuple[object, str]]:
    out: dict[str, tuple[object, str]] = {}
    for alg, key in (
        ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", ec.generate_private_key(ec.SECP256R1())),
        ("EdDSA", ed25519.Ed25519PrivateKey.generate()),
    ):
        pem = tmp / f"{alg}.pem"
        pem.write_bytes(
            key.public_key().public_bytes(  # type: ignore[union-attr]
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        out[alg] = (key, str(pem))
    return out


async def measure(
    alg: str, signing_key: object, source: dict[str, str], cache_size: int, n: int
) -> float:
    settings = config.from_dict(
        {
            "auth": {
                "jwt": {
                    "cache_size": cache_size,
                    "providers": [
                        {
                            "name": alg,
                            "issuer": ISSUER,
                            "audiences": ["bench"],
                            "algorithms": [alg],
                            **source,
                        }
                    ],
                }
            },
            "routes": [{"path": "/*", "auth": ["jwt"]}],
        }
    )
    now = int(time.time())
    tokens = [
        jwt.encode(
            {
                "sub": f"u{i}",
                "iss": ISSUER,
                "aud": "bench",
                "exp": now + 3600,
                "iat": now,
                "jti": str(i),
            },
            signing_key,
            algorithm=alg,
        )  # type: ignore[arg-type]
        for i in range(1 if cache_size else n)
    ]
    async with aiohttp.ClientSession() as session:
        auth = AuthService(settings, Metrics(), session)
        await auth.start()
        route = settings.routes[0]
        creds = [
            auth.extract([(b"authorization", f"Bearer {t}".encode())], b"", websocket=False)
            for t in tokens
        ]
        await auth.authenticate(route, creds[0])  # warm
        started = time.perf_counter()
        for i in range(n):
            identity = await auth.authenticate(route, creds[i % len(creds)])
            assert identity is not None
        elapsed = time.perf_counter() - started
        await auth.stop()
    return elapsed / n * 1e6


async def main() -> None:
    os.environ["BENCH_VERIFY_SECRET"] = SECRET
    tmp = Path(tempfile.mkdtemp(prefix="authproxy-verify-"))
    keys = _keys(tmp)
    cases: list[tuple[str, object, dict[str, str]]] = [
        ("HS256", SECRET, {"secret_env": "BENCH_VERIFY_SECRET"}),
        *((alg, key, {"public_key_file": pem}) for alg, (key, pem) in keys.items()),
    ]
    print("| algorithm | signature checked, µs/token | cached, µs/token | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for alg, key, source in cases:
        uncached = await measure(alg, key, source, cache_size=0, n=2000)
        cached = await measure(alg, key, source, cache_size=10_000, n=20000)
        print(f"| {alg} | {uncached:.1f} | {cached:.1f} | {uncached / cached:.0f}x |")


if __name__ == "__main__":
    asyncio.run(main())
