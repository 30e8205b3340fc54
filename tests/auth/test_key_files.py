"""Key files re-read on SIGHUP: a new `jwks_file` or `public_key_file` replaces the keys in use; a
file that cannot be used keeps them and says so in one log line; secrets and JWKS URLs stay put.
(What a withdrawn key does to cached tokens and subscribers: `test_key_withdrawal`.)"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.app import App
from proxy.auth import AuthService
from proxy.errors import Unauthorized
from proxy.identity import Identity

from .conftest import MakeService
from .support import (
    HS_SECRET,
    JwksServer,
    bearer_headers,
    claims,
    make_settings,
    mint_pyjwt,
    private_pem,
    provider,
    public_jwk,
    public_pem,
    route,
    rsa_key,
)

R = route(["jwt"])
OTHER_ISS = "https://other-idp.example.test"


def token(key: str, kid: str | None = None, iss: str | None = None) -> str:
    return mint_pyjwt(
        rsa_key(key), "RS256", claims(iss=iss) if iss else claims(), {"kid": kid} if kid else None
    )


def jwks(*keys: tuple[str, str]) -> str:
    return json.dumps({"keys": [public_jwk(rsa_key(name), kid) for name, kid in keys]})


async def auth(svc: AuthService, tok: str) -> Identity:
    identity = await svc.authenticate(R, svc.extract(bearer_headers(tok), b"", websocket=False))
    assert identity is not None
    return identity


async def reason_of(svc: AuthService, tok: str) -> str:
    with pytest.raises(Unauthorized) as info:
        await auth(svc, tok)
    return str(info.value.details["reason"])


def reload_lines(svc: AuthService, caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """SIGHUP's work, and every line of warning or worse it logged."""
    caplog.clear()
    with caplog.at_level(logging.INFO, "authproxy.auth"):
        svc.reload_keys()
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def withdrawals(svc: AuthService) -> list[frozenset[str]]:
    heard: list[frozenset[str]] = []
    svc.subscribe_key_withdrawals(lambda _, keys: heard.append(keys))
    return heard


async def test_a_new_jwks_file_replaces_the_old_keys(
    make_service: MakeService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(jwks(("old", "k1")))
    svc = await make_service(make_settings([provider(jwks_file=str(path))]))
    old, new = token("old", "k1"), token("new", "k2")
    assert (await auth(svc, old)).subject == "alice"
    assert await reason_of(svc, new) == "unknown_kid"  # a file is never re-read on its own
    heard = withdrawals(svc)
    path.write_text(jwks(("new", "k2")))
    lines = reload_lines(svc, caplog)
    assert (await auth(svc, new)).subject == "alice"
    assert await reason_of(svc, old) == "unknown_kid"
    assert len(heard) == 1
    assert [r.getMessage() for r in lines] == [
        "provider 'demo': 1 signing key(s) withdrawn (k1); tokens they verified are refused "
        "and their WebSocket sessions closed"
    ]


async def test_a_jwks_file_that_gains_a_key_keeps_the_others(
    make_service: MakeService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(jwks(("old", "k1")))
    svc = await make_service(make_settings([provider(jwks_file=str(path))]))
    heard = withdrawals(svc)
    path.write_text(jwks(("old", "k1"), ("new", "k2")))
    assert reload_lines(svc, caplog) == []
    assert (await auth(svc, token("old", "k1"))).subject == "alice"
    assert (await auth(svc, token("new", "k2"))).subject == "alice"
    assert heard == []


def _private_jwk(path: Path) -> None:
    path.write_text(json.dumps({"keys": [{**public_jwk(rsa_key("old"), "k1"), "d": "AAAA"}]}))


JWKS_BREAKAGES: dict[str, Callable[[Path], None]] = {
    "not JSON": lambda p: p.write_text("{ half a file"),
    "not a JWK set": lambda p: p.write_text('{"kty": "RSA"}'),
    "no usable key": _private_jwk,
    "removed": lambda p: p.unlink(),
    "a directory": lambda p: (p.unlink(), p.mkdir()),
}


@pytest.mark.parametrize("breakage", list(JWKS_BREAKAGES))
async def test_a_broken_jwks_file_keeps_the_keys_and_logs_one_line(
    make_service: MakeService, tmp_path: Path, caplog: pytest.LogCaptureFixture, breakage: str
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(jwks(("old", "k1")))
    svc = await make_service(make_settings([provider(jwks_file=str(path))]))
    old = token("old", "k1")
    await auth(svc, old)
    heard = withdrawals(svc)
    JWKS_BREAKAGES[breakage](path)
    lines = reload_lines(svc, caplog)
    assert [r.levelno for r in lines] == [logging.ERROR]
    message = lines[0].getMessage()
    assert message.startswith("provider 'demo': keeping the old keys: ")
    assert "auth.jwt.providers[0].jwks_file" in message and str(path) in message
    assert (await auth(svc, old)).subject == "alice" and heard == []
    # The next good file is taken as usual.
    if path.is_dir():
        path.rmdir()
    path.write_text(jwks(("new", "k2")))
    assert [r.levelno for r in reload_lines(svc, caplog)] == [logging.WARNING]  # k1 withdrawn
    assert (await auth(svc, token("new", "k2"))).subject == "alice"
    assert await reason_of(svc, old) == "unknown_kid"


def _small_rsa(path: Path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path.write_bytes(public_pem(small))


PEM_BREAKAGES: dict[str, Callable[[Path], None]] = {
    "not PEM": lambda p: p.write_text("-----BEGIN PUBLIC KEY-----\nnope\n"),
    "a private key": lambda p: p.write_bytes(private_pem(rsa_key("new"))),
    "a key too small": _small_rsa,
    "removed": lambda p: p.unlink(),
}


@pytest.mark.parametrize("breakage", list(PEM_BREAKAGES))
async def test_a_broken_public_key_file_keeps_the_key_and_logs_one_line(
    make_service: MakeService, tmp_path: Path, caplog: pytest.LogCaptureFixture, breakage: str
) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(public_pem(rsa_key("old")))
    svc = await make_service(make_settings([provider(public_key_file=str(path))]))
    old = token("old")
    await auth(svc, old)
    heard = withdrawals(svc)
    PEM_BREAKAGES[breakage](path)
    lines = reload_lines(svc, caplog)
    assert [r.levelno for r in lines] == [logging.ERROR]
    message = lines[0].getMessage()
    assert message.startswith("provider 'demo': keeping the old keys: ")
    assert "auth.jwt.providers[0].public_key_file" in message
    assert (await auth(svc, old)).subject == "alice" and heard == []
    path.write_bytes(public_pem(rsa_key("new")))
    reload_lines(svc, caplog)
    assert (await auth(svc, token("new"))).subject == "alice"
    assert await reason_of(svc, old) == "bad_signature"


async def test_a_reload_reads_every_file_provider_and_one_broken_file_spoils_only_its_own(
    make_service: MakeService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    jwks_path, pem_path = tmp_path / "jwks.json", tmp_path / "key.pem"
    jwks_path.write_text(jwks(("old", "k1")))
    pem_path.write_bytes(public_pem(rsa_key("pem-old")))
    svc = await make_service(
        make_settings(
            [
                provider(jwks_file=str(jwks_path)),
                provider(name="pem", issuer=OTHER_ISS, public_key_file=str(pem_path)),
            ]
        )
    )
    jwks_path.write_text("garbage")
    pem_path.write_bytes(public_pem(rsa_key("pem-new")))
    lines = reload_lines(svc, caplog)
    assert [r.getMessage().split(":")[0] for r in lines] == [
        "provider 'demo'",  # keeping the old keys
        "provider 'pem'",  # its old key withdrawn
    ]
    assert (await auth(svc, token("old", "k1"))).subject == "alice"
    assert (await auth(svc, token("pem-new", iss=OTHER_ISS))).subject == "alice"
    assert await reason_of(svc, token("pem-old", iss=OTHER_ISS)) == "bad_signature"


async def test_sighup_leaves_an_environment_secret_and_a_jwks_url_alone(
    make_service: MakeService,
    jwks_server: JwksServer,
    hs_env: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    jwks_server.keys = [public_jwk(rsa_key("idp"), "k1")]
    svc = await make_service(
        make_settings(
            [
                provider(name="hs", algorithms=["HS256"], secret_env=hs_env),
                provider(name="idp", issuer=OTHER_ISS, jwks_url=jwks_server.url),
            ]
        )
    )
    fetches = jwks_server.fetches
    monkeypatch.setenv(hs_env, "n" * 64)
    assert reload_lines(svc, caplog) == []
    # The secret a running process was started with stays: a reload reads files only.
    assert (await auth(svc, mint_pyjwt(HS_SECRET, "HS256", claims()))).subject == "alice"
    assert await reason_of(svc, mint_pyjwt("n" * 64, "HS256", claims())) == "bad_signature"
    assert jwks_server.fetches == fetches  # JWKS URLs refresh on their own schedule


async def test_a_sighup_to_the_process_reloads_the_key_files(tmp_path: Path) -> None:
    jwks_path, pem_path = tmp_path / "jwks.json", tmp_path / "key.pem"
    jwks_path.write_text(jwks(("old", "k1")))
    pem_path.write_bytes(public_pem(rsa_key("pem-old")))
    settings = make_settings(
        [
            provider(jwks_file=str(jwks_path)),
            provider(name="pem", issuer=OTHER_ISS, public_key_file=str(pem_path)),
        ]
    )
    app = App(settings)
    await app.startup()
    try:
        assert app.auth is not None
        svc = app.auth
        # SIGHUP's default action ends the process: send it only with the app's handler in place.
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        jwks_path.write_text(jwks(("new", "k2")))
        pem_path.write_bytes(public_pem(rsa_key("pem-new")))
        signal.raise_signal(signal.SIGHUP)
        for _ in range(200):  # the handler runs on the loop, soon after the signal
            await asyncio.sleep(0.01)
            if await _accepts(svc, token("new", "k2")):
                break
        assert (await auth(svc, token("new", "k2"))).subject == "alice"
        assert (await auth(svc, token("pem-new", iss=OTHER_ISS))).subject == "alice"
        assert await reason_of(svc, token("old", "k1")) == "unknown_kid"
        assert await reason_of(svc, token("pem-old", iss=OTHER_ISS)) == "bad_signature"
    finally:
        await app.shutdown()


async def _accepts(svc: AuthService, tok: str) -> bool:
    try:
        await auth(svc, tok)
    except Unauthorized:
        return False
    return True
