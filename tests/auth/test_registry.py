"""The method registry: one list of methods that route validation, the extractor, the chain and
the header rules all read, so a method is added in one place."""

from __future__ import annotations

import importlib

import pydantic
import pytest

from proxy import config
from proxy.auth import consumed_headers
from proxy.auth import registry as registry_module
from proxy.auth.extractor import Extractor
from proxy.auth.method import Found, Presented, settle
from proxy.auth.registry import METHODS, locators
from proxy.config import AUTH_METHODS, AuthSettings, ConfigError, from_dict


def test_routes_accept_exactly_the_registered_method_names() -> None:
    assert tuple(m.name for m in METHODS) == AUTH_METHODS
    for name in AUTH_METHODS:
        from_dict({"routes": [{"path": "/*", "auth": [name]}], **_configured(name)})
    with pytest.raises(ConfigError, match="unknown method 'jtw'"):
        from_dict({"routes": [{"path": "/*", "auth": ["jtw"]}]})


def _configured(name: str) -> dict[str, object]:
    if name != "jwt":
        return {}
    jwt = {"name": "p", "issuer": "i", "audiences": ["a"], "jwks_url": "https://i/jwks"}
    return {"auth": {"jwt": {"providers": [{**jwt, "algorithms": ["RS256"]}]}}}


def test_the_registry_refuses_to_load_when_config_names_other_methods(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config, "AUTH_METHODS", ("jwt", "api_key", "introspection"))
    try:
        with pytest.raises(RuntimeError, match="config.AUTH_METHODS"):
            importlib.reload(registry_module)
    finally:
        monkeypatch.undo()
        importlib.reload(registry_module)


def test_the_consumed_headers_follow_the_configured_api_key_header() -> None:
    assert consumed_headers(AuthSettings()) == ("authorization", "x-api-key")
    custom = AuthSettings.model_validate({"api_keys": {"header": "X-Token"}, "token_cookie": "at"})
    # The token cookie travels in a header shared with other cookies: read, never consumed.
    assert consumed_headers(custom) == ("authorization", "x-token")


class _CertLocator:
    """A stand-in for a new method (a client certificate a trusted proxy forwards)."""

    name = "mtls"
    consumes = (b"x-client-cert",)
    also_reads: tuple[bytes, ...] = ()
    query_params: tuple[bytes, ...] = ()
    subprotocol_prefixes = ("cert.",)

    def extract(self, presented: Presented, *, websocket: bool) -> Found:
        found = [("header", v.decode("latin-1")) for _, v in presented.headers]
        found += [("subprotocol", e.removeprefix("cert.")) for e in presented.subprotocols]
        return settle(found, None, None, "two certificates")


def test_a_new_locator_gets_its_header_and_subprotocols_and_the_others_are_untouched() -> None:
    extractor = Extractor([*locators(AuthSettings()), _CertLocator()])
    c = extractor.extract(
        [
            (b"authorization", b"Bearer abc"),
            (b"x-client-cert", b"PEM"),
            (b"sec-websocket-protocol", b"chat, cert.PEM"),
        ],
        b"",
        websocket=True,
    )
    assert (c.of("mtls").value, c.of("mtls").source) == ("PEM", "header")
    assert (c.bearer, c.subprotocols) == ("abc", ("chat",))
    assert not c.of("api_key").present


def test_two_methods_cannot_claim_one_query_parameter() -> None:
    class Thief(_CertLocator):
        query_params = (b"token",)

    with pytest.raises(ValueError, match="claimed by two methods"):
        Extractor([*locators(AuthSettings()), Thief()])


@pytest.mark.parametrize("header", ["Authorization", "Cookie", "Sec-WebSocket-Protocol"])
def test_an_api_key_header_over_one_the_sidecar_reads_is_refused(header: str) -> None:
    # As Cookie it read the whole cookie (and hid the token cookie) as a key; as
    # Sec-WebSocket-Protocol it swallowed the subprotocol offer. Refused at load instead.
    with pytest.raises(pydantic.ValidationError, match="handles itself"):
        AuthSettings.model_validate({"api_keys": {"header": header}, "token_cookie": "at"})
