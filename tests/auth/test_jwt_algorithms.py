"""Each supported algorithm accepts good tokens from both JOSE libraries, and only its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import Unauthorized

from .conftest import MakeService
from .support import (
    HS_SECRET,
    MINTERS,
    bearer_headers,
    claims,
    ec_key,
    ed_key,
    make_settings,
    provider,
    public_jwk,
    route,
    rsa_key,
)

CASES: list[tuple[str, Any]] = [
    ("RS256", lambda: rsa_key()),
    ("PS256", lambda: rsa_key()),
    ("ES256", lambda: ec_key("P-256")),
    ("ES384", lambda: ec_key("P-384")),
    ("EdDSA", lambda: ed_key()),
]


@pytest.mark.parametrize("mint", MINTERS)
@pytest.mark.parametrize(("alg", "key"), CASES, ids=[c[0] for c in CASES])
async def test_asymmetric_providers_accept_good_tokens(
    make_service: MakeService, tmp_path: Path, mint: Any, alg: str, key: Any
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(key(), "kid-1")]}))
    svc = await make_service(make_settings([provider(jwks_file=str(path), algorithms=[alg])]))
    token = mint(key(), alg, claims(sub=f"user-{alg}"), {"kid": "kid-1"})
    creds = svc.extract(bearer_headers(token), b"", websocket=False)
    identity = await svc.authenticate(route(["jwt"]), creds)
    assert identity is not None and identity.subject == f"user-{alg}"
    # The same key signing with an algorithm the provider does not allow is refused.
    other = {"RS256": "PS256", "PS256": "RS256"}.get(alg)
    if other:
        token = mint(key(), other, claims(), {"kid": "kid-1"})
        with pytest.raises(Unauthorized) as info:
            await svc.authenticate(
                route(["jwt"]), svc.extract(bearer_headers(token), b"", websocket=False)
            )
        assert info.value.details["reason"] == "alg_not_allowed"


@pytest.mark.parametrize("mint", MINTERS)
async def test_hs256_provider_accepts_tokens_signed_with_the_shared_secret(
    make_service: MakeService, hs_env: str, mint: Any
) -> None:
    svc = await make_service(make_settings([provider(secret_env=hs_env, algorithms=["HS256"])]))
    token = mint(HS_SECRET, "HS256", claims())
    identity = await svc.authenticate(
        route(["jwt"]), svc.extract(bearer_headers(token), b"", websocket=False)
    )
    assert identity is not None and identity.subject == "alice"
    forged = mint("t" * 64, "HS256", claims())
    with pytest.raises(Unauthorized) as info:
        await svc.authenticate(
            route(["jwt"]), svc.extract(bearer_headers(forged), b"", websocket=False)
        )
    assert info.value.details["reason"] == "bad_signature"


async def test_two_providers_are_selected_by_issuer(
    make_service: MakeService, tmp_path: Path, hs_env: str
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(rsa_key(), "k1")]}))
    svc = await make_service(
        make_settings(
            [
                provider(jwks_file=str(path)),
                provider(
                    name="internal",
                    issuer="https://internal.test",
                    secret_env=hs_env,
                    algorithms=["HS256"],
                ),
            ]
        )
    )
    r = route(["jwt"])
    hs = MINTERS[0](HS_SECRET, "HS256", claims(iss="https://internal.test"))
    ident = await svc.authenticate(r, svc.extract(bearer_headers(hs), b"", websocket=False))
    assert ident is not None and ident.credential_id == "internal"
    # An HS token claiming the RSA provider's issuer is judged by that provider only.
    hs_as_demo = MINTERS[0](HS_SECRET, "HS256", claims())
    with pytest.raises(Unauthorized) as info:
        await svc.authenticate(r, svc.extract(bearer_headers(hs_as_demo), b"", websocket=False))
    assert info.value.details["reason"] == "alg_not_allowed"
