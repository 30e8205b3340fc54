"""An identity says until when its credential is accepted: a JWT's `exp` plus its provider's
leeway (the moment verification would start refusing it), an API key's `expires`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from proxy.identity import Identity

from .conftest import MakeService
from .support import (
    bearer_headers,
    claims,
    make_settings,
    mint_pyjwt,
    provider,
    public_jwk,
    route,
    rsa_key,
)


@pytest.mark.parametrize("leeway_s", [0, 45])
async def test_a_jwt_identity_is_valid_until_exp_plus_its_providers_leeway(
    make_service: MakeService, tmp_path: Path, leeway_s: int
) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [public_jwk(rsa_key(), "k1")]}))
    service = await make_service(make_settings([provider(jwks_file=str(jwks), leeway_s=leeway_s)]))
    exp = int(time.time()) + 300
    token = mint_pyjwt(rsa_key(), "RS256", claims(exp=exp), {"kid": "k1"})
    identity = await service.authenticate(
        route(["jwt"]), service.extract(bearer_headers(token), b"", websocket=False)
    )
    assert identity is not None
    assert identity.expires_at == exp
    assert identity.valid_until == exp + leeway_s


def test_an_identity_without_expiry_is_valid_until_never() -> None:
    assert Identity("api_key", "ci").valid_until is None
    assert Identity("api_key", "ci", expires_at=1000.0).valid_until == 1000.0
