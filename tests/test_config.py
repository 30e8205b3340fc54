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
            "auth.jwt.providers[0]: at most one of jwks_url, jwks_file, public_key_file,",
        ),
        (
            {"auth": {"jwt": {"providers": [{**PROVIDER, "jwks_url": None}]}}},
            "auth.jwt.providers[0]: issuer must be https (plain http only to a loopback address)",
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


def test_a_misspelt_override_is_reported_under_its_key_naming_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[cors]\nmax_age_s = 600\n")
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={"AUTHPROXY__CORS__MAX_AGE": "60"})
    assert str(info.value) == (
        "cors.max_age: unknown key (set by the environment: AUTHPROXY__CORS__MAX_AGE)"
    )
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={"AUTHPROXY__CROS__MAX_AGE_S": "60"})
    assert (
        str(info.value) == "cros: unknown key (set by the environment: AUTHPROXY__CROS__MAX_AGE_S)"
    )
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={"AUTHPROXY__CORS__ALLOW_ORIGINS": '["https://a.test", 3]'})
    assert str(info.value).startswith("cors.allow_origins[1]: ")
    assert str(info.value).endswith("(set by the environment: AUTHPROXY__CORS__ALLOW_ORIGINS)")
    # An error in the file itself blames no variable.
    path.write_text("[cors]\nmax_age_s = 'x'\n")
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={"AUTHPROXY__CORS__ALLOW_CREDENTIALS": "true"})
    assert "environment" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("AUTHPROXY_CORS__MAX_AGE_S", "60", "AUTHPROXY__ takes two underscores"),
        ("authproxy__cors__max_age_s", "60", "write AUTHPROXY__ in capitals"),
        ("AUTHPROXY__CORS____MAX_AGE_S", "60", "malformed override name"),
        ("AUTHPROXY__CORS__ALLOW_ORIGINS", '["https://a.test"', "not a valid TOML value"),
        ("AUTHPROXY__UPSTREAM__URL", '"http://10.0.0.5', "not a valid TOML value"),
    ],
)
def test_a_malformed_override_is_an_error_not_ignored(
    tmp_path: Path, name: str, value: str, expected: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("")
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={name: value})
    assert str(info.value).startswith(f"{name}: ") and expected in str(info.value)
    assert "\n" not in str(info.value)


def test_an_ipv6_listen_address_from_the_environment_is_not_a_malformed_list(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("")
    settings = config.load(path, environ={"AUTHPROXY__SERVER__LISTEN": "[::1]:8100"})
    assert settings.server.listen == "[::1]:8100"


def test_other_authproxy_variables_are_not_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("")
    environ = {"AUTHPROXY_CONFIG": str(path), "AUTHPROXY_ARTIFACTS_DIR": "/tmp/x"}
    assert config.env_overrides(environ) == []
    config.load(path, environ=environ)
    assert config.env_overrides(
        {"AUTHPROXY__ROUTES__0__AUTH": "x", "AUTHPROXY__CORS__MAX_AGE_S": "1"}
    ) == [
        ("AUTHPROXY__CORS__MAX_AGE_S", "cors.max_age_s"),
        ("AUTHPROXY__ROUTES__0__AUTH", "routes[0].auth"),
    ]


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


# --- origins a wildcard cannot mean: the Public Suffix List ------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        "https://*.com",
        "https://*.co.uk",
        "https://*.github.io",  # the list's private section counts: anyone gets a github.io site
        "http://*.com:8080",
        "https://*.COM",
        "https://*.рф",  # an IDN TLD, as written ...
        "https://*.xn--p1ai",  # ... and as punycode
        "https://*.unlisted-tld",  # the list's default rule: an unknown TLD is a public suffix
        "https://*.amazonaws.com",  # not itself public, but s3.amazonaws.com below it is
        "https://*.kawasaki.jp",  # covered by the wildcard rule *.kawasaki.jp
        "https://*.0.1",  # would match 10.0.0.1, 127.0.0.1, ...
    ],
)
def test_a_wildcard_origin_over_a_public_suffix_is_refused_naming_the_key(origin: str) -> None:
    message = error_of({"cors": {"allow_origins": ["https://app.example.com", origin]}})
    assert message.startswith(f"cors.allow_origins: [1] {origin!r}"), message
    assert "\n" not in message


def test_a_route_wildcard_over_a_public_suffix_names_the_routes_key() -> None:
    message = error_of(
        {
            "routes": [
                {"path": "/a/*", "auth": "public"},
                {"path": "/b/*", "auth": "public", "cors": {"allow_origins": ["https://*.co.uk"]}},
            ]
        }
    )
    assert message.startswith("routes[1].cors.allow_origins: [0] 'https://*.co.uk'"), message


def test_a_public_suffix_wildcard_from_the_environment_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("")
    with pytest.raises(ConfigError, match=r"^cors\.allow_origins: \[0\] 'https://\*\.com'"):
        config.load(path, environ={"AUTHPROXY__CORS__ALLOW_ORIGINS": '["https://*.com"]'})


@pytest.mark.parametrize(
    "origin",
    [
        "https://*.example.com",
        "https://*.example.co.uk",
        "https://*.myname.github.io",
        "https://*.bücher.example",
        "https://*.corp.internal",
        "http://*.localhost:5173",  # names under localhost are loopback (RFC 6761): nobody else's
        "https://com",  # not a wildcard: exactly that origin
    ],
)
def test_a_wildcard_under_a_registrable_domain_still_works(origin: str) -> None:
    assert config.from_dict({"cors": {"allow_origins": [origin]}}).cors.allow_origins == (origin,)


def test_the_public_suffix_list_is_bundled_and_never_fetched() -> None:
    # The check must work offline, at start-up, with the list the package shipped.
    import publicsuffixlist

    assert Path(publicsuffixlist.PSLFILE).is_file()
    assert "// ===BEGIN PRIVATE DOMAINS===" in Path(publicsuffixlist.PSLFILE).read_text("utf-8")


# --- config that opens (or closes) more than it says -------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"routes": [{"path": "/a", "auth": "public", "methods": ["GET", "GTE"]}]},
            "routes[0].methods: unknown HTTP method 'GTE'",
        ),
        ({"cors": {"allow_methods": ["GET", "PSOT"]}}, "cors.allow_methods: unknown HTTP method"),
        ({"cors": {"allow_credentials": "yes"}}, "cors.allow_credentials: expected true or false"),
        ({"cors": {"allow_credentials": "true"}}, "cors.allow_credentials: expected true or false"),
        ({"cors": {"allow_private_network": 1}}, "cors.allow_private_network: expected true or"),
        ({"server": {"preserve_host": "on"}}, "server.preserve_host: expected true or false"),
        (
            {"routes": [{"path": "/a", "auth": ["jwt"], "auth_optional": "no"}]},
            "routes[0].auth_optional: expected true or false",
        ),
        (
            {"auth": {"api_keys": {"keys": [{"id": "a", "sha256": "a" * 64, "disabled": "yes"}]}}},
            "auth.api_keys.keys[0].disabled: expected true or false",
        ),
        (
            {"server": {"trusted_proxies": ["10.0.0.0/8", "10.1.2.3/16"]}},
            "server.trusted_proxies: [1] '10.1.2.3/16' has host bits set "
            "(did you mean '10.1.0.0/16'?)",
        ),
        (
            {"server": {"trusted_proxies": ["fd00::1/64"]}},
            "server.trusted_proxies: [0] 'fd00::1/64' has host bits set",
        ),
    ],
)
def test_config_that_cannot_mean_what_it_says_is_an_error(
    data: dict[str, Any], expected: str
) -> None:
    message = error_of(data)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_a_string_boolean_from_the_environment_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("")
    settings = config.load(path, environ={"AUTHPROXY__CORS__ALLOW_CREDENTIALS": "true"})
    assert settings.cors.allow_credentials is True
    with pytest.raises(ConfigError, match=r"^cors\.allow_credentials: expected true or false"):
        config.load(path, environ={"AUTHPROXY__CORS__ALLOW_CREDENTIALS": "yes"})


def test_registered_methods_and_single_addresses_are_accepted() -> None:
    settings = config.from_dict(
        {
            "server": {"trusted_proxies": ["10.0.0.0/8", "192.0.2.7", "fd00::/8"]},
            "cors": {"allow_methods": ["get", "QUERY", "*"]},
            "routes": [{"path": "/dav/*", "auth": "public", "methods": ["PROPFIND", "get"]}],
        }
    )
    assert settings.routes[0].methods == ("PROPFIND", "GET")


def warnings_of(data: dict[str, Any]) -> list[str]:
    return config.warnings(config.from_dict(data))


KEY = {"id": "bot", "sha256": "a" * 64}


def test_the_repository_config_has_no_warnings() -> None:
    settings = config.load(Path(__file__).parents[1] / "config.toml", environ={})
    assert config.warnings(settings) == []


def test_no_routes_at_all_is_a_warning() -> None:
    assert warnings_of({}) == ["routes: none configured: every request gets 404"]


def test_a_duplicate_route_is_a_warning_naming_both() -> None:
    found = warnings_of(
        {
            "routes": [
                {"path": "/api/*", "auth": "public"},
                {"path": "/api/*", "auth": ["api_key"]},
            ],
            "auth": {"api_keys": {"keys": [KEY]}},
        }
    )
    assert found == ["routes[1]: never matches: routes[0] (/api/*) matches every request it would"]


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        ({"path": "*"}, {"path": "/api/x"}),
        ({"path": "/*"}, {"path": "/api/*"}),
        ({"path": "/api/*"}, {"path": "/api/models"}),
        ({"path": "/api/*"}, {"path": "/api/"}),
        ({"path": "/x"}, {"path": "/x", "methods": ["POST"]}),
        ({"path": "/x", "methods": ["GET", "POST"]}, {"path": "/x", "methods": ["POST"]}),
        # GET matches HEAD too
        ({"path": "/x", "methods": ["GET"]}, {"path": "/x", "methods": ["HEAD"]}),
    ],
)
def test_a_route_shadowed_by_an_earlier_one_is_a_warning(
    earlier: dict[str, Any], later: dict[str, Any]
) -> None:
    found = warnings_of({"routes": [{**earlier, "auth": "public"}, {**later, "auth": "public"}]})
    assert len(found) == 1 and found[0].startswith("routes[1]: never matches: routes[0]"), found


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        ({"path": "/api/*"}, {"path": "/api"}),
        ({"path": "/api/x"}, {"path": "/api/*"}),
        ({"path": "/x", "methods": ["POST"]}, {"path": "/x"}),
        ({"path": "/x", "methods": ["POST"]}, {"path": "/x", "methods": ["GET"]}),
        ({"path": "/api/*", "methods": ["GET"]}, {"path": "/api/x", "methods": ["GET", "PUT"]}),
    ],
)
def test_a_route_that_can_still_match_is_no_warning(
    earlier: dict[str, Any], later: dict[str, Any]
) -> None:
    routes = [{**earlier, "auth": "public"}, {**later, "auth": "public"}]
    assert warnings_of({"routes": routes}) == []


def test_api_key_auth_without_any_key_is_a_warning() -> None:
    routes = [{"path": "/api/*", "auth": ["jwt", "api_key"]}]
    providers = [{**PROVIDER}]
    found = warnings_of({"routes": routes, "auth": {"jwt": {"providers": providers}}})
    assert found == [
        "routes[0].auth: 'api_key' is listed but no API key is configured "
        "(auth.api_keys.keys, auth.api_keys.keys_file)"
    ]
    with_keys = {"routes": routes, "auth": {"jwt": {"providers": providers}, "api_keys": {}}}
    with_keys["auth"]["api_keys"] = {"keys": [KEY]}
    assert warnings_of(with_keys) == []
    with_keys["auth"]["api_keys"] = {"keys_file": "keys.toml"}
    assert warnings_of(with_keys) == []


def test_the_shadowing_warning_agrees_with_the_route_table() -> None:
    # warnings() judges routes without the routing module (config sits below it): every pair of
    # small routes, against every request that could tell them apart.
    import itertools

    from proxy.routing import RouteTable

    paths = ["*", "/*", "/a", "/a/", "/a/*", "/a/b", "/a/b/*", "/b/*"]
    method_sets = [[], ["GET"], ["HEAD"], ["POST"], ["GET", "POST"], ["HEAD", "POST"]]
    requests = [
        (path, method)
        for path in ["/", "/a", "/a/", "/a/b", "/a/b/", "/a/b/c", "/b/", "/b/x", "/c"]
        for method in ["GET", "HEAD", "POST", "PUT"]
    ]
    routes = [
        config.RouteSettings(path=p, methods=tuple(m), auth=("public",))
        for p, m in itertools.product(paths, method_sets)
    ]
    for earlier, later in itertools.product(routes, routes):
        settings = config.Settings(routes=(earlier, later))
        table = RouteTable(settings.routes)
        reachable = any(
            (hit := table.match(path, method)) is not None and hit.index == 1
            for path, method in requests
        )
        shadowed = any(w.startswith("routes[1]: never matches") for w in config.warnings(settings))
        assert shadowed is not reachable, (earlier, later)


@pytest.mark.parametrize(
    "header", ["Content-Length", "Host", "transfer_encoding", "X-Forwarded-For", "X_Auth_Subject"]
)
def test_a_claim_header_the_sidecar_handles_itself_is_refused(header: str) -> None:
    # A token's claim would otherwise become the upstream's framing, Host or client address.
    provider = {
        "name": "p",
        "issuer": "https://i",
        "audiences": ["a"],
        "secret_env": "X",
        "algorithms": ["HS256"],
        "claim_headers": {header: "sub"},
    }
    with pytest.raises(ConfigError) as caught:
        config.from_dict({"auth": {"jwt": {"providers": [provider]}}})
    assert str(caught.value).startswith("auth.jwt.providers[0].claim_headers")


@pytest.mark.parametrize("header", ["Cookie", "Sec-WebSocket-Protocol", "Authorization", "Host"])
def test_an_api_key_header_the_sidecar_handles_itself_is_refused(header: str) -> None:
    # As Cookie it would read the whole cookie (and the token cookie) as a key; as
    # Sec-WebSocket-Protocol it would swallow the subprotocol offer.
    with pytest.raises(ConfigError) as caught:
        config.from_dict({"auth": {"api_keys": {"header": header}}})
    assert str(caught.value).startswith("auth.api_keys.header")


def _routes(*routes: dict[str, Any]) -> dict[str, Any]:
    return {"routes": list(routes)}


def test_a_routes_label_is_its_name_else_its_path_never_its_position() -> None:
    api = {"path": "/api/*", "auth": "public"}
    ws = {"path": "/ws", "auth": "public", "name": "live-feed"}
    first = config.from_dict(_routes(api, ws))
    reordered = config.from_dict(_routes(ws, api))
    assert config.route_names(first.routes) == ("/api/*", "live-feed")
    assert config.route_names(reordered.routes) == ("live-feed", "/api/*")


def test_routes_sharing_a_path_are_told_apart_by_their_methods() -> None:
    settings = config.from_dict(
        _routes(
            {"path": "/api/models", "methods": ["POST"], "auth": "public"},
            {"path": "/api/models", "auth": "public"},
        )
    )
    assert config.route_names(settings.routes) == ("/api/models POST", "/api/models")
    # Twins without methods (the later one is shadowed: a warning, not an error) stay apart too.
    twins = config.from_dict(
        _routes({"path": "/x", "auth": "public"}, {"path": "/x", "auth": "public"})
    )
    assert config.route_names(twins.routes) == ("/x", "/x (2)")


def test_two_routes_with_one_name_are_a_one_line_error_naming_the_key() -> None:
    message = error_of(
        _routes(
            {"path": "/a", "auth": "public", "name": "api"},
            {"path": "/b", "auth": "public", "name": "api"},
        )
    )
    assert message == (
        "routes[1].name: 'api' is also routes[0]'s label: give each route a unique `name`"
    )
    # A name that is another route's path (its default label) is the same clash.
    clash = _routes(
        {"path": "/a", "auth": "public", "name": "/b"}, {"path": "/b", "auth": "public"}
    )
    assert error_of(clash).startswith("routes[0].name: '/b' is also routes[1]'s label")
    assert error_of(_routes({"path": "/a", "auth": "public", "name": " x"})).startswith(
        "routes[0].name: must be 1-100 printable characters"
    )
