"""`routes[].require_claims`: strings are equality, lists hold one of the values, a miss is 403
claim_mismatch; API keys carry `claims` judged the same way; explain shows the rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.auth import AuthService
from proxy.auth.apikeys import hash_key
from proxy.auth.claims import claim_holds
from proxy.config import from_dict
from proxy.errors import ConfigError, Forbidden, Unauthorized
from proxy.telemetry.metrics import Metrics

from .conftest import MakeService
from .support import claims, make_settings, mint_pyjwt, provider, public_jwk, route, rsa_key

ADMIN_KEY = "ak_" + "a" * 40
PLAIN_KEY = "ak_" + "p" * 40
RULES = {"groups": ["ml-admins", "ops"], "tenant": "acme"}


@pytest.fixture
async def svc(make_service: MakeService, tmp_path: Path) -> AuthService:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(rsa_key(), "k1")]}))
    keys = [
        {
            "id": "admin-bot",
            "sha256": hash_key(ADMIN_KEY),
            "claims": {"groups": ["ml-admins"], "tenant": "acme"},
        },
        {"id": "plain-bot", "sha256": hash_key(PLAIN_KEY), "claims": {"tenant": "acme"}},
    ]
    return await make_service(
        make_settings([provider(jwks_file=str(path))], api_keys={"keys": keys}),
        metrics=Metrics(),
    )


def jwt_with(**over: Any) -> str:
    return mint_pyjwt(rsa_key(), "RS256", claims(**over), {"kid": "k1"})


async def run(
    svc: AuthService, r: Any, *, bearer: str | None = None, key: str | None = None
) -> Any:
    h: list[tuple[bytes, bytes]] = []
    if bearer:
        h.append((b"authorization", b"Bearer " + bearer.encode()))
    if key:
        h.append((b"x-api-key", key.encode()))
    return await svc.authenticate(r, svc.extract(h, b"", websocket=False))


def test_a_string_rule_is_equality_and_a_list_rule_takes_any_of_its_values() -> None:
    assert claim_holds({"tenant": "acme"}, "tenant", "acme")
    assert not claim_holds({"tenant": "acme-evil"}, "tenant", "acme")
    assert not claim_holds({"tenant": ["acme"]}, "tenant", "acme")  # equality, not membership
    assert claim_holds({"groups": ["x", "ops"]}, "groups", ("ml-admins", "ops"))
    assert claim_holds({"groups": "ops"}, "groups", ("ml-admins", "ops"))
    assert not claim_holds({"groups": ["x", "y"]}, "groups", ("ml-admins", "ops"))
    assert not claim_holds({}, "groups", ("ml-admins",))


def test_numbers_and_booleans_never_equal_a_configured_string() -> None:
    assert not claim_holds({"tenant": 42}, "tenant", "42")
    assert not claim_holds({"admin": True}, "admin", "true")
    assert not claim_holds({"groups": [1, True, None]}, "groups", ("1", "True"))


def test_a_dotted_name_reaches_into_nested_claims_when_no_top_level_claim_has_it() -> None:
    kc = {"realm_access": {"roles": ["offline", "ml-admin"]}}
    assert claim_holds(kc, "realm_access.roles", ("ml-admin",))
    assert not claim_holds(kc, "realm_access.groups", ("ml-admin",))
    assert not claim_holds({"realm_access": "flat"}, "realm_access.roles", ("ml-admin",))
    # An exact top-level name wins over the path.
    assert claim_holds({"a.b": "x", "a": {"b": "y"}}, "a.b", "x")


async def test_a_token_whose_claims_hold_is_accepted(svc: AuthService) -> None:
    r = route(["jwt"], require_claims=RULES)
    identity = await run(svc, r, bearer=jwt_with(groups=["users", "ops"], tenant="acme"))
    assert identity.subject == "alice"


async def test_a_claim_with_the_wrong_value_is_403_claim_mismatch(svc: AuthService) -> None:
    r = route(["jwt"], require_claims=RULES)
    with pytest.raises(Forbidden) as info:
        await run(svc, r, bearer=jwt_with(groups=["ops"], tenant="globex"))
    assert info.value.status == 403 and info.value.code == "forbidden"
    assert info.value.details == {"reason": "claim_mismatch", "claim": "tenant"}
    assert "globex" not in info.value.message  # the caller's value is not echoed
    assert info.value.identity is not None and info.value.identity.subject == "alice"


async def test_a_missing_claim_is_403_claim_mismatch(svc: AuthService) -> None:
    r = route(["jwt"], require_claims=RULES)
    with pytest.raises(Forbidden) as info:
        await run(svc, r, bearer=jwt_with(tenant="acme"))
    assert info.value.details["claim"] == "groups"
    assert "missing" in info.value.message


async def test_api_keys_are_judged_by_their_configured_claims(svc: AuthService) -> None:
    r = route(["api_key"], require_claims=RULES)
    identity = await run(svc, r, key=ADMIN_KEY)
    assert identity.subject == "admin-bot"
    with pytest.raises(Forbidden) as info:
        await run(svc, r, key=PLAIN_KEY)
    assert info.value.details == {"reason": "claim_mismatch", "claim": "groups"}


async def test_an_optional_route_with_claims_refuses_the_anonymous(svc: AuthService) -> None:
    r = route(["jwt"], require_claims={"tenant": "acme"}, auth_optional=True)
    with pytest.raises(Unauthorized):
        await run(svc, r)
    assert await run(svc, route(["jwt"], auth_optional=True)) is None


async def test_claim_mismatches_are_counted(make_service: MakeService, tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(rsa_key(), "k1")]}))
    metrics = Metrics()
    svc = await make_service(make_settings([provider(jwks_file=str(path))]), metrics=metrics)
    r = route(["jwt"], require_claims={"tenant": "acme"})
    with pytest.raises(Forbidden):
        await run(svc, r, bearer=jwt_with(tenant="globex"))
    labels = {"method": "jwt", "result": "claim_mismatch"}
    assert metrics.registry.get_sample_value("authproxy_auth_total", labels) == 1.0


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"groups": []}, "routes[0].require_claims: groups: an empty list can never match"),
        ({"groups": [1]}, "routes[0].require_claims.groups"),
        ({"": "x"}, "routes[0].require_claims: '' is not a claim name"),
        ({"a..b": "x"}, "is not a claim name"),
    ],
)
def test_bad_claim_rules_are_one_line_errors_naming_the_key(
    rules: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"routes": [{"path": "/api/*", "auth": ["api_key"], "require_claims": rules}]})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_public_route_cannot_require_claims() -> None:
    with pytest.raises(ConfigError, match="a public route cannot require claims"):
        from_dict({"routes": [{"path": "/x", "auth": "public", "require_claims": {"a": "b"}}]})


def test_an_api_key_with_an_empty_claim_list_is_refused() -> None:
    key = {"id": "k", "sha256": hash_key(ADMIN_KEY), "claims": {"groups": []}}
    with pytest.raises(ConfigError, match=r"auth.api_keys.keys\[0\].claims"):
        from_dict({"auth": {"api_keys": {"keys": [key]}}})


async def test_keys_from_a_keys_file_carry_claims_too(
    make_service: MakeService, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[[keys]]\nid = "file-bot"\nsha256 = "{hash_key(ADMIN_KEY)}"\n'
        'claims = { groups = ["ops"], tenant = "acme" }\n'
    )
    svc = await make_service(make_settings(api_keys={"keys_file": str(keys)}))
    assert (await run(svc, route(["api_key"], require_claims=RULES), key=ADMIN_KEY)).subject == (
        "file-bot"
    )
    with pytest.raises(Forbidden):
        await run(svc, route(["api_key"], require_claims={"tenant": "globex"}), key=ADMIN_KEY)
