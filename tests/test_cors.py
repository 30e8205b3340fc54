"""Unit tests of proxy.cors: origin matching and every header decision, without a server."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.config import CorsSettings, from_dict
from proxy.cors import Cors, CorsPolicy, CorsRefused
from proxy.errors import ConfigError, Forbidden
from proxy.telemetry.metrics import Metrics

Headers = list[tuple[bytes, bytes]]

APP = "https://app.example.com"
EVIL = "https://evil.test"


def make(metrics: Metrics | None = None, rule: str = "global", **settings: Any) -> CorsPolicy:
    return CorsPolicy(CorsSettings(**settings), rule=rule, metrics=metrics or Metrics())


def values(headers: Headers, name: str) -> list[str]:
    return [v.decode("latin-1") for k, v in headers if k.decode().lower() == name.lower()]


def one(headers: Headers, name: str) -> str | None:
    found = values(headers, name)
    assert len(found) <= 1, f"{name} appears {len(found)} times: {found}"
    return found[0] if found else None


def refusals(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("authproxy_cors_refusals_total", {"reason": reason})
    return value or 0.0


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def cors_log() -> Iterator[list[logging.LogRecord]]:
    # Our own handler on the logger itself: authproxy's logging setup turns propagation off.
    log = logging.getLogger("authproxy.cors")
    handler, level = Records(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


# --- origin matching ---------------------------------------------------------------------------

MATCHING = [
    # (configured allow_origins, incoming Origin, allowed)
    ([APP], APP, True),
    ([APP], "https://other.example.com", False),
    ([APP + "/"], APP, True),  # a trailing slash in the config is dropped
    ([APP], APP + "/", False),  # a serialised origin never ends in '/': the header is malformed
    (["https://APP.Example.COM"], APP, True),
    (["HTTPS://app.example.com"], APP, True),
    ([APP], "https://APP.EXAMPLE.COM", True),
    (["http://x.test:80"], "http://x.test", True),
    (["http://x.test"], "http://x.test:80", True),
    (["https://x.test:443"], "https://x.test", True),
    (["https://x.test"], "https://x.test:443", True),
    (["http://x.test"], "http://x.test:8080", False),
    (["http://x.test:443"], "http://x.test", False),  # 443 is only https's default
    (["http://localhost:5173"], "http://localhost:5173", True),
    (["http://localhost:5173"], "http://localhost:5174", False),
    ([APP], "http://app.example.com", False),
    (["https://bücher.example"], "https://xn--bcher-kva.example", True),
    (["https://BÜCHER.example"], "https://xn--bcher-kva.example", True),
    (["https://xn--bcher-kva.example"], "https://xn--bcher-kva.example", True),
    (["https://bücher.example"], "https://bücher.example", False),  # browsers send punycode
    (["http://[::1]:5173"], "http://[::1]:5173", True),
    (["http://[::1]:5173"], "http://[0:0::1]:5173", True),
    ([APP], "https://user@app.example.com", False),
    ([APP], "https://user:pw@app.example.com", False),
    ([APP], "https://app.example.com@evil.test", False),
    ([APP], APP + "/path", False),
    ([APP], APP + "?q=1", False),
    ([APP], APP + "#f", False),
    ([APP], " " + APP, False),
    ([APP], APP + " ", False),
    ([APP], APP + "\n", False),
    ([APP], "https://app .example.com", False),
    ([APP], APP + ":99999", False),
    ([APP], APP + ":0", False),
    ([APP], APP + ":", False),
    ([APP], APP + ":abc", False),
    ([APP], "ftp://app.example.com", False),
    ([APP], "app.example.com", False),
    ([APP], "", False),
    ([APP], "null", False),
    ([APP, "null"], "null", True),
    ([APP, "null"], "NULL", False),
    (["*"], "null", True),
    (["*"], EVIL, True),
    ([], APP, False),
    # wildcards: any depth of subdomain, same scheme and port, never the domain itself
    (["https://*.example.com"], "https://a.example.com", True),
    (["https://*.example.com"], "https://a.b.example.com", True),
    (["https://*.example.com"], "https://A.Example.com", True),
    (["https://*.example.com"], "https://a.example.com:443", True),
    (["https://*.example.com"], "https://example.com", False),
    (["https://*.example.com"], "https://example.com.evil.com", False),
    (["https://*.example.com"], "https://a.example.com.evil.com", False),
    (["https://*.example.com"], "https://aexample.com", False),
    (["https://*.example.com"], "https://.example.com", False),
    (["https://*.example.com"], "https://a..example.com", False),
    (["https://*.example.com"], "http://a.example.com", False),
    (["https://*.example.com"], "https://a.example.com:8443", False),
    (["https://*.example.com"], "https://evil.test/.example.com", False),
    (["https://*.example.com"], "https://evil.test?.example.com", False),
    (["https://*.example.com:8443"], "https://a.example.com:8443", True),
    (["https://*.example.com:8443"], "https://a.example.com", False),
    (["https://*.bücher.example"], "https://a.xn--bcher-kva.example", True),
]


@pytest.mark.parametrize(
    ("configured", "origin", "allowed"), MATCHING, ids=[f"{c}-{o!r}" for c, o, _ in MATCHING]
)
def test_origin_is_allowed_exactly_when_it_matches_a_configured_origin(
    configured: list[str], origin: str, allowed: bool
) -> None:
    assert make(allow_origins=configured).origin_allowed(origin) is allowed


@pytest.mark.parametrize(
    "bad", ["https://a b.example", "https://app.example.com:99999", "https://exa_mple.com:x"]
)
def test_an_origin_the_policy_cannot_parse_is_a_config_error_naming_the_key(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make(allow_origins=[APP, bad])
    assert caught.value.key == "cors.allow_origins[1]"


@pytest.mark.parametrize("wildcard", ["https://*.com", "https://*.co.uk", "https://*.github.io"])
def test_a_policy_never_echoes_every_site_under_a_public_suffix(wildcard: str) -> None:
    # Config refuses these; a policy built from unvalidated settings must refuse them too.
    settings = CorsSettings.model_construct(allow_origins=(APP, wildcard), allow_credentials=True)
    with pytest.raises(ConfigError, match="public suffix") as caught:
        CorsPolicy(settings, rule="global", metrics=Metrics())
    assert caught.value.key == "cors.allow_origins[1]"


def test_a_route_origin_error_names_the_routes_key() -> None:
    settings = from_dict(
        {
            "routes": [
                {"path": "/a/*", "auth": "public"},
                {
                    "path": "/b/*",
                    "auth": "public",
                    "cors": {"allow_origins": ["https://x.test:70000"]},
                },
            ]
        }
    )
    with pytest.raises(ConfigError, match=r"^routes\[1\]\.cors\.allow_origins\[0\]: "):
        Cors(settings, Metrics())


# --- preflight ---------------------------------------------------------------------------------

CREDENTIALED: dict[str, Any] = dict(
    allow_origins=[APP, "https://*.example.org"],
    allow_credentials=True,
    allow_methods=["GET", "POST", "PUT"],
    allow_headers=["Authorization", "X-Request-ID"],
    expose_headers=["X-Total-Count", "X-Request-ID"],
    max_age_s=600,
)


def test_an_allowed_preflight_answers_with_exactly_the_configured_headers() -> None:
    headers = make(**CREDENTIALED).preflight(APP, "PUT", "authorization,content-type", False)
    assert sorted(headers) == sorted(
        [
            (b"access-control-allow-origin", APP.encode()),
            (b"access-control-allow-credentials", b"true"),
            (b"access-control-allow-methods", b"GET, POST, PUT"),
            (
                b"access-control-allow-headers",
                b"accept, accept-language, content-language, content-type, "
                b"authorization, x-request-id",
            ),
            (b"access-control-max-age", b"600"),
            (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
        ]
    )


def test_a_preflight_echoes_the_origin_never_star_with_credentials() -> None:
    headers = make(**CREDENTIALED).preflight("https://a.b.example.org", "GET", None, False)
    assert one(headers, "access-control-allow-origin") == "https://a.b.example.org"
    assert one(headers, "access-control-allow-credentials") == "true"


def test_a_credential_less_star_preflight_answers_star_without_credentials() -> None:
    headers = make(allow_origins=["*"]).preflight(EVIL, "GET", None, False)
    assert one(headers, "access-control-allow-origin") == "*"
    assert one(headers, "access-control-allow-credentials") is None


def test_allow_methods_star_echoes_the_requested_method() -> None:
    policy = make(allow_origins=[APP], allow_credentials=True, allow_methods=["*"])
    headers = policy.preflight(APP, "PURGE", None, False)
    assert one(headers, "access-control-allow-methods") == "PURGE"


@pytest.mark.parametrize(
    ("method", "reason_method"), [("PURGE", "PURGE"), ("patch", "patch"), ("GE T", "GE T")]
)
def test_a_method_not_in_allow_methods_is_refused_by_name(
    method: str, reason_method: str, cors_log: list[logging.LogRecord]
) -> None:
    # Methods compare case-sensitively, as browsers compare them with Access-Control-Allow-Methods.
    metrics = Metrics()
    with pytest.raises(CorsRefused) as caught:
        make(metrics, allow_origins=[APP], allow_methods=["GET", "PATCH"]).preflight(
            APP, method, None, False
        )
    assert caught.value.message == f"method {reason_method!r} is not allowed"
    assert caught.value.status == 403 and isinstance(caught.value, Forbidden)
    assert caught.value.details == {"origin": APP, "reason": "method", "method": method}
    assert refusals(metrics, "method") == 1
    assert len(cors_log) == 1


def test_a_requested_header_not_in_allow_headers_is_refused_by_name() -> None:
    metrics = Metrics()
    policy = make(metrics, **CREDENTIALED)
    with pytest.raises(CorsRefused) as caught:
        policy.preflight(APP, "GET", "authorization,x-foo", False)
    assert caught.value.message == "header 'x-foo' is not allowed"
    assert caught.value.details["reason"] == "header"
    assert refusals(metrics, "header") == 1


@pytest.mark.parametrize(
    "requested",
    [
        "Authorization",
        "authorization, x-request-id",
        "content-type",
        "accept,accept-language",
        "Content-Language",
        " x-request-id , ",
        "",
    ],
)
def test_listed_and_safelisted_headers_pass_in_any_case(requested: str) -> None:
    headers = make(**CREDENTIALED).preflight(APP, "GET", requested, False)
    assert one(headers, "access-control-allow-origin") == APP


def test_allow_headers_star_echoes_the_requested_headers_normalised() -> None:
    policy = make(allow_origins=[APP], allow_credentials=True, allow_headers=["*"])
    headers = policy.preflight(APP, "POST", "X-Custom, authorization,content-type", False)
    # Echoed, not "*": with credentials browsers read "*" literally, and never for Authorization.
    assert one(headers, "access-control-allow-headers") == "x-custom, authorization, content-type"


def test_allow_headers_star_sends_no_allow_headers_when_none_were_requested() -> None:
    policy = make(allow_origins=[APP], allow_headers=["*"])
    assert one(policy.preflight(APP, "GET", None, False), "access-control-allow-headers") is None


def test_allow_headers_star_still_refuses_a_requested_name_that_is_not_a_header_name() -> None:
    policy = make(allow_origins=[APP], allow_headers=["*"])
    with pytest.raises(CorsRefused, match=r"header 'x\(y' is not allowed"):
        policy.preflight(APP, "GET", "x(y", False)


@pytest.mark.parametrize(
    ("origin", "reason"),
    [
        (EVIL, "origin"),
        ("https://user@app.example.com", "origin_malformed"),
        ("null", "origin_malformed"),
    ],
)
def test_a_preflight_from_a_refused_origin_raises_with_the_origin_named(
    origin: str, reason: str
) -> None:
    metrics = Metrics()
    with pytest.raises(CorsRefused) as caught:
        make(metrics, **CREDENTIALED).preflight(origin, "GET", None, False)
    assert caught.value.message == f"origin {origin!r} is not allowed"
    assert caught.value.details == {"origin": origin, "reason": reason}
    assert caught.value.headers == {}  # nothing that renders as a CORS header
    assert refusals(metrics, reason) == 1


def test_the_origin_is_judged_before_the_method() -> None:
    with pytest.raises(CorsRefused) as caught:
        make(**CREDENTIALED).preflight(EVIL, "PURGE", "x-foo", False)
    assert caught.value.details["reason"] == "origin"


def test_a_private_network_preflight_is_answered_when_enabled() -> None:
    policy = make(allow_origins=[APP], allow_private_network=True)
    headers = policy.preflight(APP, "GET", None, True)
    assert one(headers, "access-control-allow-private-network") == "true"
    assert "Access-Control-Request-Private-Network" in (one(headers, "vary") or "")


def test_private_network_is_only_allowed_when_it_was_requested() -> None:
    policy = make(allow_origins=[APP], allow_private_network=True)
    assert (
        one(policy.preflight(APP, "GET", None, False), "access-control-allow-private-network")
        is None
    )


def test_a_private_network_preflight_is_refused_when_disabled() -> None:
    metrics = Metrics()
    policy = make(metrics, allow_origins=[APP], allow_private_network=False)
    with pytest.raises(CorsRefused, match="private network access is not allowed"):
        policy.preflight(APP, "GET", None, True)
    assert refusals(metrics, "private_network") == 1
    # the same preflight without the PNA request passes, and does not vary on it
    headers = policy.preflight(APP, "GET", None, False)
    assert "Private-Network" not in (one(headers, "vary") or "")


@pytest.mark.parametrize("max_age", [0, 7200])
def test_max_age_is_sent_as_configured(max_age: int) -> None:
    headers = make(allow_origins=[APP], max_age_s=max_age).preflight(APP, "GET", None, False)
    assert one(headers, "access-control-max-age") == str(max_age)


# --- actual responses --------------------------------------------------------------------------

UPSTREAM: Headers = [
    (b"content-type", b"application/json"),
    (b"access-control-allow-origin", b"*"),
    (b"Access-Control-Allow-Credentials", b"false"),
    (b"access-control-expose-headers", b"X-Secret"),
    (b"access-control-max-age", b"86400"),
    (b"x-total-count", b"3"),
]


def test_an_allowed_origin_gets_echo_credentials_expose_and_vary() -> None:
    headers = make(**CREDENTIALED).response_headers(APP, [(b"content-type", b"text/plain")])
    assert headers == [
        (b"content-type", b"text/plain"),
        (b"access-control-allow-origin", APP.encode()),
        (b"access-control-allow-credentials", b"true"),
        (b"access-control-expose-headers", b"X-Total-Count, X-Request-ID"),
        (b"vary", b"Origin"),
    ]


def test_upstream_access_control_headers_are_removed_and_ours_never_duplicated() -> None:
    headers = make(**CREDENTIALED).response_headers(APP, UPSTREAM)
    assert values(headers, "access-control-allow-origin") == [APP]
    assert values(headers, "access-control-allow-credentials") == ["true"]
    assert values(headers, "access-control-expose-headers") == ["X-Total-Count, X-Request-ID"]
    assert values(headers, "access-control-max-age") == []
    assert values(headers, "content-type") == ["application/json"]
    assert values(headers, "x-total-count") == ["3"]


@pytest.mark.parametrize("origin", [EVIL, "https://user@app.example.com", None])
def test_a_disallowed_or_absent_origin_gets_no_cors_headers_but_vary_origin(
    origin: str | None,
) -> None:
    headers = make(**CREDENTIALED).response_headers(origin, UPSTREAM)
    assert [k for k, _ in headers if k.lower().startswith(b"access-control-")] == []
    assert one(headers, "vary") == "Origin"


def test_a_policy_without_expose_headers_sends_none() -> None:
    headers = make(allow_origins=[APP]).response_headers(APP, UPSTREAM)
    assert one(headers, "access-control-expose-headers") is None
    assert one(headers, "access-control-allow-credentials") is None
    assert one(headers, "access-control-allow-origin") == APP


VARY = [
    ([b"Accept-Encoding"], "Accept-Encoding, Origin"),
    ([b"Accept-Encoding", b"accept-encoding, Cookie"], "Accept-Encoding, Cookie, Origin"),
    ([b"origin"], "origin"),
    ([b"Accept, Origin"], "Accept, Origin"),
    ([b"*"], "*"),
    ([b"Accept", b"*"], "*"),
    ([b""], "Origin"),
]


@pytest.mark.parametrize(("upstream", "expected"), VARY, ids=[repr(u) for u, _ in VARY])
@pytest.mark.parametrize("origin", [APP, EVIL, None])
def test_vary_origin_is_merged_into_one_vary_header_without_duplicate_tokens(
    upstream: list[bytes], expected: str, origin: str | None
) -> None:
    given = [(b"vary", v) for v in upstream] + [(b"etag", b'"1"')]
    headers = make(**CREDENTIALED).response_headers(origin, given)
    assert values(headers, "vary") == [expected]
    assert one(headers, "etag") == '"1"'


def test_a_credential_less_star_policy_answers_star_to_everyone_and_leaves_vary_alone() -> None:
    policy = make(allow_origins=["*"], expose_headers=["X-Total-Count"])
    for origin in (EVIL, None, "null"):
        headers = policy.response_headers(origin, UPSTREAM + [(b"vary", b"Accept-Encoding")])
        assert values(headers, "access-control-allow-origin") == ["*"]
        assert values(headers, "access-control-expose-headers") == ["X-Total-Count"]
        assert values(headers, "access-control-allow-credentials") == []
        assert values(headers, "vary") == ["Accept-Encoding"]


def test_an_allowed_origin_does_not_leak_into_the_next_response() -> None:
    policy = make(**CREDENTIALED)
    policy.response_headers(APP, [])
    assert one(policy.response_headers(EVIL, []), "access-control-allow-origin") is None


# --- refusing actual requests and WebSocket handshakes -----------------------------------------


def test_a_disallowed_origin_is_refused_before_the_upstream(
    cors_log: list[logging.LogRecord],
) -> None:
    metrics = Metrics()
    with pytest.raises(CorsRefused) as caught:
        make(metrics, **CREDENTIALED).refuse_actual(EVIL, same_origin=False)
    assert caught.value.message == "origin 'https://evil.test' is not allowed"
    assert refusals(metrics, "origin") == 1
    assert len(cors_log) == 1


@pytest.mark.parametrize(
    ("origin", "same_origin", "reject"),
    [
        (APP, False, True),
        ("https://x.example.org", False, True),
        (EVIL, True, True),
        (EVIL, False, False),
    ],
)
def test_allowed_same_origin_or_unenforced_requests_pass(
    origin: str, same_origin: bool, reject: bool
) -> None:
    metrics = Metrics()
    policy = make(metrics, **CREDENTIALED, reject_disallowed_origins=reject)
    policy.refuse_actual(origin, same_origin=same_origin)
    assert sum(refusals(metrics, r) for r in ("origin", "origin_malformed")) == 0


def test_a_websocket_from_a_disallowed_origin_is_refused_even_when_requests_are_not() -> None:
    policy = make(**CREDENTIALED, reject_disallowed_origins=False)
    policy.refuse_actual(EVIL, same_origin=False)
    with pytest.raises(CorsRefused):
        policy.refuse_websocket(EVIL, same_origin=False)
    policy.refuse_websocket(EVIL, same_origin=True)
    policy.refuse_websocket(APP, same_origin=False)


# --- the refusal log line ----------------------------------------------------------------------

WHY = [
    (EVIL, "not in allow_origins"),
    ("http://app.example.com", "https://app.example.com differs in scheme or port"),
    ("https://app.example.com:8443", "differs in scheme or port"),
    ("https://example.org", "https://*.example.org matches subdomains only"),
    ("http://a.example.org", "https://*.example.org differs in scheme or port"),
    ("https://u@app.example.com", "carries userinfo"),
    ("https://app.example.com/", "path, query or fragment"),
    ("https://app.example.com:99999", "bad port"),
    ("ftp://app.example.com", "scheme 'ftp'"),
    ("null", "'null' is allowed only when listed literally"),
]


@pytest.mark.parametrize(("origin", "why"), WHY, ids=[o for o, _ in WHY])
def test_a_refusal_logs_one_line_naming_origin_rule_and_why(
    origin: str, why: str, cors_log: list[logging.LogRecord]
) -> None:
    with pytest.raises(CorsRefused):
        make(rule="routes[3] /public/*", **CREDENTIALED).refuse_actual(origin, same_origin=False)
    [record] = cors_log
    line = record.getMessage()
    assert repr(origin) in line and "routes[3] /public/*" in line and why in line, line
    assert record.levelno == logging.INFO
    assert record.fields["origin"] == origin  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("level", "expected"), [("debug", logging.DEBUG), ("warning", logging.WARNING)]
)
def test_refusals_log_at_the_configured_level(
    level: str, expected: int, cors_log: list[logging.LogRecord]
) -> None:
    with pytest.raises(CorsRefused):
        make(**CREDENTIALED, log_refusals=level).refuse_actual(EVIL, same_origin=False)
    assert [r.levelno for r in cors_log] == [expected]


def test_log_refusals_off_logs_nothing_but_still_counts(cors_log: list[logging.LogRecord]) -> None:
    metrics = Metrics()
    with pytest.raises(CorsRefused):
        make(metrics, **CREDENTIALED, log_refusals="off").refuse_actual(EVIL, same_origin=False)
    assert cors_log == []
    assert refusals(metrics, "origin") == 1


def test_a_huge_origin_is_clipped_in_the_log_and_the_error() -> None:
    origin = "https://" + "a" * 5000 + ".test"
    with pytest.raises(CorsRefused) as caught:
        make(**CREDENTIALED).refuse_actual(origin, same_origin=False)
    assert len(caught.value.message) < 300
    assert len(caught.value.details["origin"]) < 300


# --- global policy and per-route overrides ------------------------------------------------------


def test_a_route_with_its_own_cors_table_uses_it_and_others_fall_back_to_global() -> None:
    settings = from_dict(
        {
            "cors": {"allow_origins": [APP], "allow_credentials": True, "max_age_s": 60},
            "routes": [
                {
                    "path": "/public/*",
                    "auth": "public",
                    "cors": {"allow_origins": ["*"], "allow_credentials": False},
                },
                {"path": "/api/*", "auth": "public"},
            ],
        }
    )
    cors = Cors(settings, Metrics())
    public, api = cors.policy(0), cors.policy(1)
    assert api is cors.policy(None) is cors.global_policy
    assert public.rule == "routes[0] /public/*" and api.rule == "global"
    assert public.origin_allowed(EVIL) and not api.origin_allowed(EVIL)
    assert one(public.response_headers(EVIL, []), "access-control-allow-origin") == "*"
    assert one(api.response_headers(EVIL, []), "access-control-allow-origin") is None
    # keys the route does not set are inherited from the global table
    assert one(public.preflight(EVIL, "GET", None, False), "access-control-max-age") == "60"


def test_a_star_policy_with_credentials_cannot_be_built() -> None:
    settings = CorsSettings.model_construct(allow_origins=("*",), allow_credentials=True)
    with pytest.raises(ConfigError):
        CorsPolicy(settings, rule="global")
