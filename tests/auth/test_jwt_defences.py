"""Every JWT defence, each with tokens minted by PyJWT and by joserfc."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.auth import AuthService
from proxy.auth.keys import algorithms_for
from proxy.errors import ConfigError, Unauthorized
from proxy.identity import Identity

from .conftest import MakeService
from .support import (
    ISS,
    MINTERS,
    bearer_headers,
    claims,
    ec_key,
    make_settings,
    mint_joserfc,
    mint_pyjwt,
    provider,
    public_jwk,
    public_pem,
    route,
    rsa_key,
)

JWT_ROUTE = route(["jwt"])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], sign: Any = None) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(sig)}"


async def accept(service: AuthService, token: str, r: Any = JWT_ROUTE) -> Identity:
    identity = await service.authenticate(
        r, service.extract(bearer_headers(token), b"", websocket=False)
    )
    assert identity is not None
    return identity


async def refuse(service: AuthService, token: str, r: Any = JWT_ROUTE) -> Unauthorized:
    with pytest.raises(Unauthorized) as info:
        await service.authenticate(r, service.extract(bearer_headers(token), b"", websocket=False))
    exc = info.value
    assert token not in exc.message and token not in json.dumps(exc.details)
    assert exc.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    return exc


def reason(exc: Unauthorized) -> str:
    return str(exc.details["reason"])


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(
        json.dumps(
            {
                "keys": [
                    public_jwk(rsa_key(), "k1"),
                    public_jwk(ec_key("P-256"), "ec1"),
                    public_jwk(rsa_key("enc"), "enc1", use="enc"),
                    public_jwk(rsa_key("rs384"), "rs384", alg="RS384"),
                ]
            }
        )
    )
    return path


@pytest.fixture
async def service(make_service: MakeService, jwks_file: Path) -> AuthService:
    return await make_service(
        make_settings(
            [
                provider(
                    jwks_file=str(jwks_file),
                    algorithms=["RS256", "RS384", "PS256", "ES256"],
                )
            ]
        )
    )


def rs256(mint: Any, **over: Any) -> str:
    headers = over.pop("headers", {"kid": "k1"})
    return str(mint(rsa_key(), "RS256", claims(**over), headers))


@pytest.mark.parametrize("mint", MINTERS)
async def test_a_good_token_is_accepted_with_its_identity(service: AuthService, mint: Any) -> None:
    identity = await accept(service, rs256(mint))
    assert identity.method == "jwt"
    assert identity.subject == "alice"
    assert identity.issuer == ISS
    assert identity.credential_id == "demo"
    assert identity.scopes == {"models:read", "models:write"}
    assert identity.expires_at is not None and identity.expires_at > time.time()


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_is_never_accepted(service: AuthService, alg: str) -> None:
    token = forge({"alg": alg, "typ": "JWT", "kid": "k1"}, claims())
    assert reason(await refuse(service, token)) in ("alg_none",)


async def test_alg_none_minted_by_pyjwt_is_refused(service: AuthService) -> None:
    token = mint_pyjwt(None, "none", claims(), {"kid": "k1"})  # type: ignore[arg-type]
    assert reason(await refuse(service, token)) == "alg_none"


async def test_hs256_signed_with_the_rsa_public_key_pem_is_refused(service: AuthService) -> None:
    pem = public_pem(rsa_key())
    for header in ({"alg": "HS256", "typ": "JWT", "kid": "k1"}, {"alg": "HS256"}):
        token = forge(header, claims(), lambda m: hmac.new(pem, m, hashlib.sha256).digest())
        exc = await refuse(service, token)
        assert reason(exc) == "alg_not_allowed"
        assert "'HS256' not allowed for provider 'demo'" in exc.message


def test_an_rsa_key_can_never_serve_an_hmac_algorithm() -> None:
    algs = algorithms_for(rsa_key().public_key())
    assert algs and not {a for a in algs if a.startswith("HS")}
    assert algorithms_for(ec_key("P-256").public_key()) == {"ES256"}
    assert algorithms_for(ec_key("P-384").public_key()) == {"ES384"}


def test_a_provider_mixing_hs_and_rs_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        make_settings([provider(jwks_url="http://127.0.0.1:1/jwks", algorithms=["RS256", "HS256"])])
    assert info.value.key == "auth.jwt.providers[0].algorithms"
    assert "mix" in info.value.message


@pytest.mark.parametrize("mint", MINTERS)
async def test_the_key_type_must_fit_the_algorithm(service: AuthService, mint: Any) -> None:
    # An RS256 header naming the EC key: the EC key cannot verify RS256, whatever signed it.
    token = mint(rsa_key(), "RS256", claims(), {"kid": "ec1"})
    assert reason(await refuse(service, token)) == "key_mismatch"
    # ES256 header naming the RSA key.
    token = mint(ec_key("P-256"), "ES256", claims(), {"kid": "k1"})
    assert reason(await refuse(service, token)) == "key_mismatch"


@pytest.mark.parametrize("mint", MINTERS)
async def test_a_jwk_with_use_enc_is_not_used(service: AuthService, mint: Any) -> None:
    token = mint(rsa_key("enc"), "RS256", claims(), {"kid": "enc1"})
    assert reason(await refuse(service, token)) == "unknown_kid"


@pytest.mark.parametrize("mint", MINTERS)
async def test_a_jwk_alg_binds_the_key_to_that_algorithm(service: AuthService, mint: Any) -> None:
    assert (
        await accept(service, mint(rsa_key("rs384"), "RS384", claims(), {"kid": "rs384"}))
    ).subject == "alice"
    for alg in ("RS256", "PS256"):
        token = mint(rsa_key("rs384"), alg, claims(), {"kid": "rs384"})
        assert reason(await refuse(service, token)) == "key_mismatch"


@pytest.mark.parametrize("mint", MINTERS)
@pytest.mark.parametrize("kid", [None, "k1", "attacker"])
async def test_keys_embedded_or_linked_in_the_header_are_never_used(
    service: AuthService, mint: Any, kid: str | None
) -> None:
    attacker = rsa_key("attacker")
    headers: dict[str, Any] = {
        "jwk": public_jwk(attacker, kid=None),
        "jku": "http://127.0.0.1:9/jwks.json",
        "x5u": "http://127.0.0.1:9/cert.pem",
        "x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"],
    }
    if kid:
        headers["kid"] = kid
    token = mint(attacker, "RS256", claims(sub="admin"), headers)
    expected = "unknown_kid" if kid == "attacker" else "bad_signature"
    assert reason(await refuse(service, token)) == expected


async def test_an_unknown_crit_header_is_refused(service: AuthService) -> None:
    token = mint_pyjwt(
        rsa_key(),
        "RS256",
        claims(),
        {"kid": "k1", "crit": ["http://example.com/ext"], "http://example.com/ext": True},
    )
    assert reason(await refuse(service, token)) == "crit"
    token = forge({"alg": "RS256", "kid": "k1", "crit": ["exp"], "exp": 1}, claims())
    assert reason(await refuse(service, token)) == "crit"


@pytest.mark.parametrize("mint", MINTERS)
@pytest.mark.parametrize("cty", ["JWT", "jwt", "application/JWT"])
async def test_a_nested_jwt_is_refused(service: AuthService, mint: Any, cty: str) -> None:
    token = mint(rsa_key(), "RS256", claims(), {"kid": "k1", "cty": cty})
    assert reason(await refuse(service, token)) == "nested_jwt"


@pytest.mark.parametrize("mint", MINTERS)
async def test_an_oversized_token_is_refused_before_parsing(
    service: AuthService, mint: Any
) -> None:
    token = rs256(mint, padding="x" * 9000)
    assert len(token) > 8192
    assert reason(await refuse(service, token)) == "token_too_large"
    # Not even base64: still "too large", so nothing was parsed.
    assert reason(await refuse(service, "a" * 8193)) == "token_too_large"


@pytest.mark.parametrize("mint", MINTERS)
async def test_expiry_not_before_and_issued_at_use_the_leeway(
    service: AuthService, mint: Any
) -> None:
    now = int(time.time())
    assert reason(await refuse(service, rs256(mint, exp=now - 100))) == "token_expired"
    await accept(service, rs256(mint, exp=now - 10))  # within 30 s of leeway
    assert reason(await refuse(service, rs256(mint, nbf=now + 100))) == "not_yet_valid"
    await accept(service, rs256(mint, nbf=now + 10))
    assert reason(await refuse(service, rs256(mint, iat=now + 100))) == "issued_in_future"
    await accept(service, rs256(mint, iat=now + 10))


async def test_an_expired_token_says_so_precisely(service: AuthService) -> None:
    exc = await refuse(service, rs256(mint_pyjwt, exp=int(time.time()) - 100))
    assert exc.message == "token expired"
    assert 'error_description="token expired"' in exc.headers["WWW-Authenticate"]


@pytest.mark.parametrize("mint", MINTERS)
async def test_the_audience_must_be_one_of_ours(service: AuthService, mint: Any) -> None:
    exc = await refuse(service, rs256(mint, aud="someone-else"))
    assert reason(exc) == "wrong_audience" and exc.message == "audience not accepted"
    await accept(service, rs256(mint, aud=["someone-else", "other"]))
    assert reason(await refuse(service, rs256(mint, aud=None))) == "missing_aud"


@pytest.mark.parametrize("mint", MINTERS)
@pytest.mark.parametrize("iss", [ISS + "/", ISS.upper(), "https://evil.example", ""])
async def test_the_issuer_must_match_exactly(service: AuthService, mint: Any, iss: str) -> None:
    assert reason(await refuse(service, rs256(mint, iss=iss))) == "unknown_issuer"


async def test_a_token_without_issuer_is_refused(service: AuthService) -> None:
    assert reason(await refuse(service, rs256(mint_pyjwt, iss=None))) == "missing_issuer"


@pytest.mark.parametrize("mint", MINTERS)
async def test_a_token_without_exp_is_refused(service: AuthService, mint: Any) -> None:
    assert reason(await refuse(service, rs256(mint, exp=None))) == "missing_exp"


def rs256_raw(payload_json: str) -> str:
    """Sign a payload given as literal JSON text (for values PyJWT would not serialise)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    header = b64(json.dumps({"alg": "RS256", "kid": "k1"}).encode())
    signing_input = f"{header}.{b64(payload_json.encode())}"
    sig = rsa_key().sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(sig)}"


@pytest.mark.parametrize(
    "bad", ['"1900000000"', "true", "1e400", "NaN", "Infinity", "1" + "0" * 400, "[1]", "null"]
)
async def test_exp_must_be_a_finite_number(service: AuthService, bad: str) -> None:
    body = json.dumps({k: v for k, v in claims().items() if k != "exp"})
    token = rs256_raw(body[:-1] + f', "exp": {bad}}}')
    exc = await refuse(service, token)
    assert reason(exc) == ("missing_exp" if bad == "null" else "malformed_claim")
    # the same body with a good exp is accepted, so the signature path is sound
    await accept(service, rs256_raw(body[:-1] + f', "exp": {int(time.time()) + 60}}}'))


@pytest.mark.parametrize("mint", MINTERS)
async def test_a_tampered_payload_is_refused(service: AuthService, mint: Any) -> None:
    header, _, sig = rs256(mint).split(".")
    evil = b64(json.dumps(claims(sub="admin", scope="admin")).encode())
    assert reason(await refuse(service, f"{header}.{evil}.{sig}")) == "bad_signature"


@pytest.mark.parametrize("mint", MINTERS)
async def test_a_tampered_signature_is_refused(service: AuthService, mint: Any) -> None:
    header, payload, sig = rs256(mint).split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    raw[10] ^= 0x01
    assert reason(await refuse(service, f"{header}.{payload}.{b64(bytes(raw))}")) == "bad_signature"
    assert reason(await refuse(service, f"{header}.{payload}.")) == "bad_signature"


async def test_an_encrypted_or_malformed_token_is_refused(service: AuthService) -> None:
    assert reason(await refuse(service, "a.b.c.d.e")) == "malformed"
    assert reason(await refuse(service, "abc.def")) == "malformed"
    assert reason(await refuse(service, "!!!.e30.e30")) in ("malformed_credentials", "malformed")


@pytest.mark.parametrize("mint", MINTERS)
async def test_kid_is_only_a_lookup_key(service: AuthService, mint: Any) -> None:
    for kid in ("../../../../etc/passwd", "k1' OR '1'='1", "http://127.0.0.1:9/key"):
        token = mint(rsa_key(), "RS256", claims(), {"kid": kid})
        assert reason(await refuse(service, token)) == "unknown_kid"


@pytest.mark.parametrize("mint", MINTERS)
async def test_max_lifetime_and_required_claims(
    make_service: MakeService, jwks_file: Path, mint: Any
) -> None:
    svc = await make_service(
        make_settings(
            [
                provider(
                    jwks_file=str(jwks_file),
                    max_lifetime_s=600,
                    required_claims=["email"],
                )
            ]
        )
    )
    now = int(time.time())
    exc = await refuse(svc, rs256(mint, iat=now, exp=now + 3600, email="a@example.com"))
    assert reason(exc) == "lifetime_too_long"
    exc = await refuse(svc, rs256(mint, iat=None, exp=now + 60, email="a@example.com"))
    assert reason(exc) == "missing_claim" and "iat" in exc.message
    exc = await refuse(svc, rs256(mint, iat=now, exp=now + 60))
    assert reason(exc) == "missing_claim" and exc.message == "missing required claim 'email'"
    await accept(svc, rs256(mint, iat=now, exp=now + 60, email="a@example.com"))


@pytest.mark.parametrize("mint", MINTERS)
async def test_typ_is_checked_when_configured(
    make_service: MakeService, jwks_file: Path, mint: Any
) -> None:
    svc = await make_service(make_settings([provider(jwks_file=str(jwks_file), typ="at+jwt")]))
    assert reason(await refuse(svc, rs256(mint, headers={"kid": "k1", "typ": "JWT"}))) == "typ"
    await accept(svc, rs256(mint, headers={"kid": "k1", "typ": "at+jwt"}))
    await accept(svc, rs256(mint, headers={"kid": "k1", "typ": "application/AT+JWT"}))


async def test_a_subject_that_is_not_a_safe_header_value_is_refused(
    service: AuthService,
) -> None:
    for sub in ("alice\r\nX-Auth-Subject: admin", "a\x00b", "\u674e", " alice", None, 7):
        exc = await refuse(service, rs256(mint_pyjwt, sub=sub))
        assert reason(exc) in ("malformed_claim", "missing_sub")


# "admin\u00a0" is "admin" to an upstream that strip()s, and NEL/C1 controls end lines in some
# parsers: refused wherever they stand, like every other control or Unicode space.
INVISIBLE = ["\u00a0", "\u0085", "\u0080", "\u009f", "\u00ad", "\u2028", "\u3000", "\u200b"]


@pytest.mark.parametrize("char", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
async def test_a_subject_with_unicode_space_or_c1_control_is_refused(
    service: AuthService, char: str
) -> None:
    for sub in (f"admin{char}", f"{char}admin", f"ad{char}min"):
        exc = await refuse(service, rs256(mint_pyjwt, sub=sub))
        assert reason(exc) == "malformed_claim"


@pytest.mark.parametrize("char", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
async def test_a_claim_header_value_with_unicode_space_or_c1_control_is_refused(
    make_service: MakeService, jwks_file: Path, char: str
) -> None:
    svc = await make_service(
        make_settings([provider(jwks_file=str(jwks_file), claim_headers={"X-User-Org": "org"})])
    )
    for org in (f"acme{char}", f"ac{char}me"):
        exc = await refuse(svc, rs256(mint_pyjwt, org=org))
        assert reason(exc) == "malformed_claim"


async def test_latin1_letters_and_inner_spaces_are_still_accepted(service: AuthService) -> None:
    for sub in ("José", "Ada Lovelace", "user@example.com"):
        assert (await accept(service, rs256(mint_pyjwt, sub=sub))).subject == sub


async def test_scopes_come_from_scope_scp_or_scopes_and_junk_is_dropped(
    service: AuthService,
) -> None:
    ident = await accept(service, rs256(mint_pyjwt, scope="a b\nc  d"))
    assert ident.scopes == {"a", "d"}
    ident = await accept(service, rs256(mint_pyjwt, scope=None, scp=["x", "y", 3, "bad\r\n"]))
    assert ident.scopes == {"x", "y"}
    ident = await accept(service, rs256(mint_pyjwt, scope=None, scopes=["z"]))
    assert ident.scopes == {"z"}
    assert reason(await refuse(service, rs256(mint_pyjwt, scope={"a": 1}))) == "malformed_claim"


async def test_custom_scope_claim_and_claim_headers(
    make_service: MakeService, jwks_file: Path
) -> None:
    svc = await make_service(
        make_settings(
            [
                provider(
                    jwks_file=str(jwks_file),
                    scope_claim="permissions",
                    claim_headers={
                        "X-User-Email": "email",
                        "X-User-Org": "org",
                        "X-User-Role": "role",
                    },
                )
            ]
        )
    )
    ident = await accept(
        svc,
        rs256(mint_pyjwt, permissions=["p:1"], email="a@example.com", org="Zürich", role=["admin"]),
    )
    assert ident.scopes == {"p:1"}
    # A value that is not a string is not sent; one that is a string must be safe to send.
    assert ident.claim_headers == (("X-User-Email", "a@example.com"), ("X-User-Org", "Zürich"))
    exc = await refuse(svc, rs256(mint_pyjwt, email="a@example.com", org="evil\r\nX-Auth: x"))
    assert reason(exc) == "malformed_claim" and "X-User-Org" in exc.message


async def test_a_missing_hs_secret_is_a_config_error_naming_the_key(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AUTHPROXY_NOPE", raising=False)
    settings = make_settings([provider(secret_env="AUTHPROXY_NOPE", algorithms=["HS256"])])
    with pytest.raises(ConfigError) as info:
        await make_service(settings)
    assert info.value.key == "auth.jwt.providers[0].secret_env"
    monkeypatch.setenv("AUTHPROXY_NOPE", "short")
    with pytest.raises(ConfigError) as info:
        await make_service(settings)
    assert "at least 32" in info.value.message and "short" not in info.value.message


async def test_unusable_keys_in_a_jwks_file_are_skipped_not_fatal(
    make_service: MakeService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    private = public_jwk(rsa_key("leaked"), "leaked")
    private["d"] = "AQAB"
    from cryptography.hazmat.primitives.asymmetric import rsa as _rsa

    small = _rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / "jwks.json"
    path.write_text(
        json.dumps(
            {
                "keys": [
                    private,
                    public_jwk(small, "small"),
                    {"kty": "RSA", "kid": "broken", "n": "!!", "e": 1},
                    {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
                    "not-an-object",
                    public_jwk(rsa_key(), "k1"),
                ]
            }
        )
    )
    with caplog.at_level(logging.WARNING, "authproxy.auth"):
        svc = await make_service(make_settings([provider(jwks_file=str(path))]))
    assert "private key material" in caplog.text and "too small" in caplog.text
    await accept(svc, rs256(mint_pyjwt))
    token = mint_pyjwt(rsa_key("leaked"), "RS256", claims(), {"kid": "leaked"})
    assert reason(await refuse(svc, token)) == "unknown_kid"


async def test_a_public_key_file_provider(make_service: MakeService, tmp_path: Path) -> None:
    pem = tmp_path / "key.pem"
    pem.write_bytes(public_pem(rsa_key()))
    svc = await make_service(make_settings([provider(public_key_file=str(pem))]))
    for mint in (mint_pyjwt, mint_joserfc):
        await accept(svc, mint(rsa_key(), "RS256", claims()))
        token = mint(rsa_key("attacker"), "RS256", claims())
        assert reason(await refuse(svc, token)) == "bad_signature"


async def test_a_private_key_file_is_a_config_error(
    make_service: MakeService, tmp_path: Path
) -> None:
    from .support import private_pem

    pem = tmp_path / "key.pem"
    pem.write_bytes(private_pem(rsa_key()))
    with pytest.raises(ConfigError) as info:
        await make_service(make_settings([provider(public_key_file=str(pem))]))
    assert info.value.key == "auth.jwt.providers[0].public_key_file"
    assert "BEGIN" not in str(info.value)


async def test_tokens_never_reach_the_log(
    service: AuthService, caplog: pytest.LogCaptureFixture
) -> None:
    good = rs256(mint_pyjwt)
    bad = rs256(mint_pyjwt, exp=1)
    with caplog.at_level(logging.DEBUG):
        await accept(service, good)
        await refuse(service, bad)
    for token in (good, bad):
        assert token not in caplog.text
        assert token.split(".")[2] not in caplog.text
