"""Configuration: one-line errors naming the key, environment overrides, immutability."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import pytest

from proxy import config
from proxy.errors import ConfigError

PROVIDER = {
    "name": "demo",
    "issuer": "http://idp",
    "audiences": ["webplus"],
    "jwks_url": "http://idp/jwks.json",
    "algorithms": ["RS256"],
}


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config.from_dict(data)
    return str(info.value)


def test_the_repository_config_is_valid() -> None:
    settings = config.load(Path(__file__).parents[1] / "config.toml", environ={})
    assert settings.routes[0].public
    assert settings.cors.allow_credentials


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {
                "routes": [
                    {"path": "/a", "auth": "public"},
                    {"path": "/b", "auth": "public"},
                    {"path": "/c", "auth": ["jtw"]},
                ]
            },
            "routes[2].auth: unknown method 'jtw' (known: public, jwt, api_key)",
        ),
        ({"server": {"listn": "x"}}, "server.listn: unknown key"),
        ({"surver": {}}, "surver: unknown key"),
        (
            {"server": {"trusted_proxies": ["10.0.0.0/33"]}},
            "server.trusted_proxies: [0] is not a CIDR: '10.0.0.0/33'",
        ),
        (
            {"upstream": {"url": "ftp://x"}},
            "upstream.url: expected an http:// or https:// URL, got 'ftp://x'",
        ),
        ({"server": {"listen": "nowhere"}}, "server.listen: expected 'host:port', got 'nowhere'"),
        ({"cors": {"max_age_s": "soon"}}, "cors.max_age_s: "),
        ({"routes": [{"path": "/x"}]}, "routes[0].auth: required key is missing"),
        (
            {"routes": [{"path": "/x", "auth": ["jwt"]}]},
            "routes[0].auth: uses 'jwt' but no [[auth.jwt.providers]]",
        ),
        ({"routes": [{"path": "/a*b", "auth": "public"}]}, "routes[0].path: '*' is only allowed"),
        (
            {"routes": [{"path": "/a", "auth": "public", "scopes": ["x"]}]},
            "routes[0]: a public route cannot require scopes",
        ),
        (
            {"auth": {"jwt": {"providers": [{**PROVIDER, "algorithms": ["RS256", "HS256"]}]}}},
            "auth.jwt.providers[0].algorithms: a provider may not mix HS*",
        ),
        (
            {"auth": {"jwt": {"providers": [{**PROVIDER, "algorithms": ["none"]}]}}},
            "auth.jwt.providers[0].algorithms: 'none' is never accepted",
        ),
        (
            {"auth": {"jwt": {"providers": [{**PROVIDER, "public_key_file": "k.pem"}]}}},
            "auth.jwt.providers[0]: exactly one of jwks_url, jwks_file, public_key_file,",
        ),
        (
            {"auth": {"api_keys": {"keys": [{"id": "a", "sha256": "abc"}]}}},
            "auth.api_keys.keys[0].sha256: expected 64 hex digits",
        ),
        (
            {
                "auth": {
                    "api_keys": {
                        "keys": [{"id": "a", "sha256": "a" * 64, "expires": "2027-01-01T00:00:00"}]
                    }
                }
            },
            "auth.api_keys.keys[0].expires: needs a time zone offset",
        ),
        (
            {"cors": {"allow_origins": ["*"], "allow_credentials": True}},
            "cors: allow_origins = ['*'] cannot be combined with allow_credentials = true",
        ),
        (
            {
                "auth": {"token_cookie": "at"},
                "routes": [{"path": "/p/*", "auth": "public", "cors": {"allow_origins": ["*"]}}],
            },
            "auth.token_cookie: cannot be used while a cors table allows origin '*'",
        ),
        (
            {"auth": {"api_keys": {"keys": [{"id": "bot\nx", "sha256": "a" * 64}]}}},
            "auth.api_keys.keys[0].id: 'bot\\nx': printable ASCII without spaces",
        ),
        (
            {"cors": {"allow_origins": ["https://a.example.com/path"]}},
            "cors.allow_origins: [0] 'https://a.example.com/path' is not an origin",
        ),
    ],
)
def test_bad_config_is_one_line_naming_the_key(data: dict[str, Any], expected: str) -> None:
    message = error_of(data)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_environment_overrides_any_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[cors]\nmax_age_s = 600\n[[routes]]\npath = "/x"\nauth = "public"\n')
    settings = config.load(
        path,
        environ={
            "AUTHPROXY__CORS__MAX_AGE_S": "60",
            "AUTHPROXY__CORS__ALLOW_ORIGINS": '["https://app.example.com"]',
            "AUTHPROXY__UPSTREAM__URL": "http://10.0.0.5:8080",
            "AUTHPROXY__ROUTES__0__PATH": "/y",
        },
    )
    assert settings.cors.max_age_s == 60
    assert settings.cors.allow_origins == ("https://app.example.com",)
    assert settings.upstream.url == "http://10.0.0.5:8080"
    assert settings.routes[0].path == "/y"


def test_a_bad_override_names_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("")
    with pytest.raises(ConfigError, match="AUTHPROXY__ROUTES__3__PATH: no list item"):
        config.load(path, environ={"AUTHPROXY__ROUTES": "[]", "AUTHPROXY__ROUTES__3__PATH": "/"})
    with pytest.raises(ConfigError, match=r"cors.max_age_s: .*'soon'"):
        config.load(path, environ={"AUTHPROXY__CORS__MAX_AGE_S": "soon"})


def test_missing_file_and_bad_toml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        config.load(tmp_path / "nope.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad, environ={})


def test_config_path_defaults_to_the_environment_then_the_working_directory() -> None:
    assert (
        config.default_path({"AUTHPROXY_CONFIG": "/etc/authproxy/config.toml"})
        == "/etc/authproxy/config.toml"
    )
    assert config.default_path({}) == "config.toml"


def test_settings_are_immutable() -> None:
    settings = config.from_dict({})
    with pytest.raises(pydantic.ValidationError):
        settings.server.max_body_bytes = 1  # type: ignore[misc]


def test_a_route_cors_table_inherits_the_global_keys_it_does_not_set() -> None:
    settings = config.from_dict(
        {
            "cors": {
                "allow_origins": ["https://app.example.com"],
                "allow_credentials": True,
                "max_age_s": 42,
            },
            "routes": [
                {
                    "path": "/public/*",
                    "auth": "public",
                    "cors": {"allow_origins": ["*"], "allow_credentials": False},
                }
            ],
        }
    )
    route_cors = settings.routes[0].cors
    assert route_cors is not None
    assert route_cors.allow_origins == ("*",) and not route_cors.allow_credentials
    assert route_cors.max_age_s == 42


def test_api_key_expiry_accepts_toml_datetimes_and_rfc3339_strings(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "[[auth.api_keys.keys]]\nid = 'a'\nsha256 = '" + "a" * 64 + "'\n"
        "expires = 2027-01-01T00:00:00Z\n"
        "[[auth.api_keys.keys]]\nid = 'b'\nsha256 = '" + "b" * 64 + "'\n"
        "expires = '2027-01-01T01:00:00+01:00'\n"
    )
    keys = config.load(path, environ={}).auth.api_keys.keys
    assert keys[0].expires == keys[1].expires
