"""The settings tree: `config.toml` plus `AUTHPROXY__*` overrides, validated once, immutable after.

`load(path)` is the only entry point. Every problem becomes a `ConfigError` whose message is one
line naming the key, e.g. ``routes[2].auth: unknown method 'jtw'``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
import unicodedata
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import grammar
from .errors import ConfigError
from .public_suffixes import wildcard_problem

ENV_PREFIX = "AUTHPROXY__"
AUTH_METHODS = ("jwt", "api_key")
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
# The IANA HTTP Method Registry (RFC 9110, WebDAV and its relatives, QUERY; not PRI, which is
# the HTTP/2 preface): anything else is almost always a typo ("GTE") that would never match.
HTTP_METHODS = frozenset(
    "ACL BASELINE-CONTROL BIND CHECKIN CHECKOUT CONNECT COPY DELETE GET HEAD LABEL LINK LOCK "
    "MERGE MKACTIVITY MKCALENDAR MKCOL MKREDIRECTREF MKWORKSPACE MOVE OPTIONS ORDERPATCH PATCH "
    "POST PROPFIND PROPPATCH PUT QUERY REBIND REPORT SEARCH TRACE UNBIND UNCHECKOUT UNLINK "
    "UNLOCK UPDATE UPDATEREDIRECTREF VERSION-CONTROL".split()
)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_bools(cls, value: Any, info: ValidationInfo) -> Any:
        # TOML has real booleans; pydantic would read "yes", "off", 1 or "true" (a string, or an
        # unparsed environment value) as one, so a typo could switch something on.
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and field.annotation is bool and not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value


def _http_methods(value: tuple[str, ...], *, star: bool = False) -> tuple[str, ...]:
    for m in value:
        if star and m == "*":
            continue
        if not grammar.token(m):
            raise ValueError(f"not an HTTP method: {m!r}")
        if m.upper() not in HTTP_METHODS:
            raise ValueError(f"unknown HTTP method {m!r} (not in the IANA method registry)")
    return tuple(m.upper() for m in value)


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected 'host:port', got {value!r}")
    return value


HostPort = Annotated[str, AfterValidator(_host_port)]


def _header_name(value: str) -> str:
    if value == "*":
        raise ValueError(
            "'*' is not a header name: leave forward_headers unset to forward every header"
        )
    if not grammar.token(value):
        raise ValueError(f"not a header name: {value!r}")
    return value


HeaderName = Annotated[str, AfterValidator(_header_name)]


# `require_claims` rules and API key `claims`: a claim name (a dotted path reaches into nested
# objects, e.g. Keycloak's "realm_access.roles") to a string or a non-empty list of strings.
ClaimMap = dict[str, str | tuple[str, ...]]


def _claim_map(value: ClaimMap, what: str) -> ClaimMap:
    for name, wanted in value.items():
        if not name or name.startswith(".") or name.endswith(".") or ".." in name:
            raise ValueError(f"{name!r} is not a claim name (or a dotted path of them)")
        if isinstance(wanted, tuple) and not wanted:
            raise ValueError(f"{name}: an empty list {what}")
    return value


def is_loopback(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 or ::1: the one place plain http may carry keys."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def discovery_url_problem(url: str) -> str | None:
    """Why `url` may not be used to fetch keys or discovery documents from, or None: https, or
    http to a loopback address (a test IdP), no userinfo, query or fragment."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected an https:// URL, got {url!r}"
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        return f"must be https (plain http only to a loopback address), got {url!r}"
    if parts.username is not None or parts.query or parts.fragment:
        return f"may not carry userinfo, a query or a fragment, got {url!r}"
    return None


def split_listen(value: str) -> tuple[str, int]:
    """`'127.0.0.1:8000'` -> `('127.0.0.1', 8000)`; `'[::1]:8000'` -> `('::1', 8000)`."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class ServerSettings(_Frozen):
    """The public listener."""

    listen: HostPort = "127.0.0.1:8000"
    # Processes sharing the public port; "auto": one per usable core (`workers.count`).
    workers: int | Literal["auto"] = 1
    trusted_proxies: tuple[str, ...] = ()
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=0)
    preserve_host: bool = False
    graceful_shutdown_s: float = Field(default=30.0, ge=0)
    # After SIGTERM, readiness fails at once but the listener keeps serving this long, while load
    # balancers (Kubernetes endpoints) stop sending new traffic; then the drain begins.
    shutdown_delay_s: float = Field(default=0.0, ge=0)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    header_timeout_s: float = Field(default=10.0, gt=0)
    # nginx's send_timeout and client_body_timeout: a client that takes no response bytes, or
    # sends no request bytes, for this long is cut and its upstream connection freed.
    send_timeout_s: float = Field(default=60.0, gt=0)
    client_body_timeout_s: float = Field(default=60.0, gt=0)
    # HTTPS and WSS on the public listener (PEM files; re-read on SIGHUP): both or neither.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        _pair(self.tls_cert_file, self.tls_key_file, "server.tls_cert_file", "server.tls_key_file")
        return self

    @field_validator("workers", mode="plain")
    @classmethod
    def _workers(cls, value: object) -> int | Literal["auto"]:
        if value == "auto":
            return "auto"
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        raise ValueError(f'expected an integer >= 1 or "auto", got {value!r}')

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, cidr in enumerate(value):
            try:
                network = ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"[{i}] is not a CIDR: {cidr!r}") from None
            if network.network_address != ipaddress.ip_interface(cidr).ip:
                # 10.1.2.3/16 trusts 10.1.0.0/16: sixty-five thousand addresses, not one.
                raise ValueError(
                    f"[{i}] {cidr!r} has host bits set (did you mean {str(network)!r}?)"
                )
        return value

    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(c, strict=False) for c in self.trusted_proxies)


def _pair(first: str | None, second: str | None, first_key: str, second_key: str) -> None:
    """Two keys that go together (a certificate and its key): both or neither."""
    if (first is None) != (second is None):
        present, missing = (first_key, second_key) if first is not None else (second_key, first_key)
        raise _KeyedError(present, f"is set without {missing}: give both or neither")


class AdminSettings(_Frozen):
    """The admin listener: /healthz, /readyz, /metrics."""

    listen: HostPort = "127.0.0.1:8001"
    # The environment variable holding the bearer secret of the mutating endpoints (POST
    # /revocations); unset, they answer 403 whatever the address.
    token_env: str | None = None


class CircuitBreakerSettings(_Frozen):
    """`[upstream.circuit_breaker]`: stop sending to an upstream that keeps failing."""

    # Consecutive connect failures, 5xx answers or timeouts that open the breaker (0: off).
    failure_threshold: int = Field(default=0, ge=0)
    # While open every request gets 503 at once; after this one probe request decides.
    open_s: float = Field(default=10.0, gt=0)


class UpstreamSettings(_Frozen):
    """Where requests go."""

    url: str = "http://127.0.0.1:9000"
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    max_connections: int = Field(default=256, ge=1)
    # Idle pooled connections older than this are not reused: shorter than common upstream
    # keep-alives (uvicorn 5 s, Node 5 s, nginx 75 s), so the sidecar never races their close.
    keepalive_s: float = Field(default=4.0, gt=0)
    # Concurrent upstream requests one client address may have (0: no cap); the address is the
    # TCP peer, or the X-Forwarded-For entry a trusted proxy vouches for.
    max_concurrent_per_client: int = Field(default=0, ge=0)
    # Unset: every request header passes but those relay/headers.py removes. A list: only these
    # (and what the sidecar adds itself) reach the upstream, deny by default.
    forward_headers: tuple[HeaderName, ...] | None = None
    # Load shedding (0: unlimited): requests beyond it wait for a slot at most queue_timeout_s,
    # then get 503. At most max_queued_requests wait (0: as many as max_concurrent_requests).
    max_concurrent_requests: int = Field(default=0, ge=0)
    queue_timeout_s: float = Field(default=1.0, ge=0)
    max_queued_requests: int = Field(default=0, ge=0)
    # Re-sends of a request whose connection failed before any answer byte (see README).
    retries: int = Field(default=1, ge=0, le=5)
    circuit_breaker: CircuitBreakerSettings = Field(default_factory=CircuitBreakerSettings)
    # For an https upstream (and its wss tunnel): the CA bundle to trust instead of the system's,
    # and a client certificate and key (PEM) when the upstream asks for one (mTLS).
    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None

    @model_validator(mode="after")
    def _tls(self) -> UpstreamSettings:
        _pair(
            self.client_cert_file,
            self.client_key_file,
            "upstream.client_cert_file",
            "upstream.client_key_file",
        )
        if not self.url.startswith("https://"):
            for key in ("ca_file", "client_cert_file"):
                if getattr(self, key) is not None:
                    raise _KeyedError(
                        f"upstream.{key}", f"is set but upstream.url is not https:// ({self.url})"
                    )
        return self

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        if parts.query or parts.fragment or parts.username:
            raise ValueError("the upstream URL may not carry a query, fragment or userinfo")
        return value.rstrip("/")


class CorsSettings(_Frozen):
    """Cross-origin policy; a route may carry its own, merged over this one."""

    allow_origins: tuple[str, ...] = ()
    allow_credentials: bool = False
    allow_methods: tuple[str, ...] = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age_s: int = Field(default=600, ge=0)
    allow_private_network: bool = False
    reject_disallowed_origins: bool = True
    log_refusals: Literal["debug", "info", "warning", "off"] = "info"

    @field_validator("allow_methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _http_methods(value, star=True)

    @field_validator("allow_headers", "expose_headers")
    @classmethod
    def _headers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for h in value:
            if h != "*" and not grammar.token(h):
                raise ValueError(f"not a header name: {h!r}")
        return value

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, origin in enumerate(value):
            if origin in ("*", "null"):
                continue
            parts = urlsplit(origin)
            host = parts.hostname or ""
            if (
                parts.scheme not in ("http", "https")
                or not host
                or parts.path not in ("", "/")
                or parts.query
                or parts.fragment
                or parts.username is not None
                or ("*" in host and not (host.startswith("*.") and "*" not in host[2:]))
            ):
                raise ValueError(
                    f"[{i}] {origin!r} is not an origin (scheme://host[:port], "
                    "optionally scheme://*.domain)"
                )
            problem = wildcard_problem(host[2:]) if host.startswith("*.") else None
            if problem is not None:
                raise ValueError(
                    f"[{i}] {origin!r}: {problem}; list your own domain, e.g. https://*.example.com"
                )
        return value

    @model_validator(mode="after")
    def _wildcard_with_credentials(self) -> CorsSettings:
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError(
                "allow_origins = ['*'] cannot be combined with allow_credentials = true "
                "(browsers refuse it); list the origins"
            )
        return self


class JwtProviderSettings(_Frozen):
    """One trusted token issuer."""

    name: str = Field(min_length=1)
    issuer: str = Field(min_length=1)
    audiences: tuple[str, ...] = Field(min_length=1)
    jwks_url: str | None = None
    jwks_file: str | None = None
    public_key_file: str | None = None
    secret_env: str | None = None
    algorithms: tuple[str, ...] = Field(min_length=1)
    leeway_s: int = Field(default=30, ge=0, le=600)
    required_claims: tuple[str, ...] = ()
    max_lifetime_s: int | None = Field(default=None, gt=0)
    typ: str | None = None
    claim_headers: dict[str, str] = {}
    scope_claim: str | None = None
    jwks_refresh_s: float = Field(default=300.0, ge=5)
    jwks_min_refresh_s: float = Field(default=30.0, ge=0)
    jwks_timeout_s: float = Field(default=5.0, gt=0)
    # How long the last good keys are served once the JWKS endpoint (or the discovery document)
    # began failing; beyond it the provider's tokens get 503 jwks_unavailable, never 401.
    max_stale_s: float = Field(default=86400.0, ge=0)
    # RFC 7662: bearer tokens that are not JWTs are checked by the issuer's introspection
    # endpoint, authenticated with HTTP Basic (client id, and the secret from the environment).
    introspection_url: str | None = None
    introspection_client_id: str | None = None
    introspection_secret_env: str | None = None
    introspection_cache_s: float = Field(default=60.0, ge=0)
    introspection_timeout_s: float = Field(default=5.0, gt=0)

    @field_validator("introspection_url")
    @classmethod
    def _introspection_url(cls, value: str | None) -> str | None:
        if value is not None:
            problem = discovery_url_problem(value)
            if problem is not None:
                raise ValueError(problem)
        return value

    @property
    def discovers(self) -> bool:
        """No key source configured: the JWKS is found by OpenID Connect discovery."""
        return (
            self.jwks_url is None
            and self.jwks_file is None
            and self.public_key_file is None
            and self.secret_env is None
        )

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for alg in value:
            if alg.lower() == "none":
                raise ValueError("'none' is never accepted")
            if alg not in HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS:
                known = ", ".join(sorted(HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS))
                raise ValueError(f"unknown algorithm {alg!r} (known: {known})")
        hs = set(value) & HMAC_ALGORITHMS
        if hs and set(value) - HMAC_ALGORITHMS:
            raise ValueError(
                "a provider may not mix HS* with asymmetric algorithms (algorithm confusion)"
            )
        return value

    @field_validator("jwks_url")
    @classmethod
    def _jwks_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value

    @field_validator("claim_headers")
    @classmethod
    def _claim_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for header in value:
            if not grammar.token(header):
                raise ValueError(f"not a header name: {header!r}")
            if _reserved(header):
                raise ValueError(f"{header!r} is a header the sidecar handles itself")
        names = [h.lower().replace("_", "-") for h in value]
        if len(set(names)) != len(names):
            raise ValueError("two claim headers name the same header (case and '_' aside)")
        return value

    @model_validator(mode="after")
    def _introspection_client(self) -> JwtProviderSettings:
        given = (
            self.introspection_client_id is not None,
            self.introspection_secret_env is not None,
        )
        if self.introspection_url is not None and given != (True, True):
            raise ValueError(
                "introspection_url needs introspection_client_id and introspection_secret_env "
                "(the sidecar authenticates to the endpoint with HTTP Basic)"
            )
        if self.introspection_url is None and any(given):
            raise ValueError("introspection_client_id/_secret_env without introspection_url")
        return self

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtProviderSettings:
        sources = [
            k
            for k in ("jwks_url", "jwks_file", "public_key_file", "secret_env")
            if getattr(self, k) is not None
        ]
        if len(sources) > 1:
            raise ValueError(
                "at most one of jwks_url, jwks_file, public_key_file, secret_env "
                f"(got {', '.join(sources)}); none: OpenID Connect discovery from the issuer"
            )
        hmac = set(self.algorithms) <= HMAC_ALGORITHMS
        if not sources:
            # OpenID Connect discovery: `{issuer}/.well-known/openid-configuration`.
            problem = discovery_url_problem(self.issuer)
            if problem is not None:
                raise ValueError(
                    f"issuer {problem} (no key source is set: the issuer is where OpenID "
                    "Connect discovery fetches from)"
                )
            if hmac:
                raise ValueError("HS* algorithms need secret_env (a shared secret)")
        if self.secret_env is not None and not hmac:
            raise ValueError("secret_env is for HS* algorithms only")
        if self.secret_env is None and hmac:
            raise ValueError("HS* algorithms need secret_env (a shared secret)")
        return self


class JwtSettings(_Frozen):
    """JWT verification."""

    providers: tuple[JwtProviderSettings, ...] = ()
    max_token_bytes: int = Field(default=8192, ge=256)
    cache_size: int = Field(default=10_000, ge=0)

    @model_validator(mode="after")
    def _unique(self) -> JwtSettings:
        for attr in ("name", "issuer"):
            seen: set[str] = set()
            for p in self.providers:
                if getattr(p, attr) in seen:
                    raise ValueError(f"two providers share the {attr} {getattr(p, attr)!r}")
                seen.add(getattr(p, attr))
        introspecting = [i for i, p in enumerate(self.providers) if p.introspection_url]
        if len(introspecting) > 1:
            # An opaque token names no issuer: it would be sent, live, to every endpoint in turn
            # (another trust domain's included) until one said active.
            raise _KeyedError(
                f"auth.jwt.providers[{introspecting[1]}].introspection_url",
                "only one provider may introspect opaque tokens (they carry no issuer to choose "
                f"by); providers[{introspecting[0]}] already does",
            )
        return self


class ApiKeySettings(_Frozen):
    """One API key, stored as the SHA-256 of the key."""

    id: str = Field(min_length=1, max_length=128)
    sha256: str
    scopes: tuple[str, ...] = ()
    expires: datetime | None = None
    disabled: bool = False
    # What `routes[].require_claims` judges for this key, as a token's claims are judged.
    claims: ClaimMap = {}

    @field_validator("claims")
    @classmethod
    def _claims(cls, value: ClaimMap) -> ClaimMap:
        return _claim_map(value, "gives the claim no value")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not re.fullmatch(r"[\x21-\x7e]+", value):
            raise ValueError(
                f"{value!r}: printable ASCII without spaces (it is sent upstream as X-Auth-Subject)"
            )
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError(
                "expected 64 hex digits (the SHA-256 of the key; see authproxy hash-key)"
            )
        return value.lower()

    @field_validator("expires")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("needs a time zone offset, e.g. 2027-01-01T00:00:00Z")
        return value.astimezone(UTC) if value else None

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_scopes(value)


# Headers the sidecar handles itself: framing and hop-by-hop ones, the credentials it reads, the
# request id, forwarding and identity headers it sets. Configured as an API key header one would be
# read as a key (or hide the real credential); as a claim header, a token's claim would become the
# upstream's Content-Length, Host or X-Forwarded-For.
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "expect",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "authorization",
        "cookie",
        "x-request-id",
        "forwarded",
        "x-real-ip",
    }
)
_RESERVED_PREFIXES = ("x-auth-", "x-forwarded-", "sec-websocket-")


def _reserved(header: str) -> bool:
    name = header.lower().replace("_", "-")
    return name in _RESERVED_HEADERS or name.startswith(_RESERVED_PREFIXES)


class ApiKeysSettings(_Frozen):
    """API keys: inline and/or from `keys_file` (a TOML file of `[[keys]]`)."""

    header: str = "X-API-Key"
    keys: tuple[ApiKeySettings, ...] = ()
    keys_file: str | None = None
    watch_interval_s: float = Field(default=2.0, ge=0)

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not grammar.token(value):
            raise ValueError(f"not a header name: {value!r}")
        if _reserved(value):
            raise ValueError(f"{value!r} is a header the sidecar handles itself; name your own")
        return value

    @model_validator(mode="after")
    def _unique(self) -> ApiKeysSettings:
        _unique_key_ids(self.keys)
        return self


class AuthSettings(_Frozen):
    """Authentication methods."""

    jwt: JwtSettings = Field(default_factory=JwtSettings)
    api_keys: ApiKeysSettings = Field(default_factory=ApiKeysSettings)
    forward_credentials: bool = False
    token_cookie: str | None = None


# A public route's `auth`, as validated (`RouteSettings.public`; auth/chain.py tests it directly).
PUBLIC_AUTH: tuple[str, ...] = ("public",)


class RouteSettings(_Frozen):
    """One `[[routes]]` entry: first match wins."""

    path: str
    name: str | None = None  # the metrics/log label; default the path (see `route_names`)
    methods: tuple[str, ...] = ()
    auth: tuple[str, ...]
    scopes: tuple[str, ...] = ()
    auth_optional: bool = False
    cors: CorsSettings | None = None
    # The route's own upstream read timeout (long model streams) and total deadline for the
    # whole exchange, response body included (None: upstream.read_timeout_s, no deadline).
    read_timeout_s: float | None = Field(default=None, gt=0)
    timeout_s: float | None = Field(default=None, gt=0)
    # claim -> value (equality) or list (the claim, a string or a list, holds one of them); a
    # miss is 403 claim_mismatch. `auth.claims` decides, after the scopes.
    require_claims: ClaimMap = {}

    @field_validator("require_claims")
    @classmethod
    def _require_claims(cls, value: ClaimMap) -> ClaimMap:
        return _claim_map(value, "can never match")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not (
            0 < len(value) <= 100 and value.isprintable() and value == value.strip()
        ):
            raise ValueError("must be 1-100 printable characters without surrounding spaces")
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") and value != "*":
            raise ValueError(f"must start with '/', got {value!r}")
        if "*" in value[:-1]:
            raise ValueError(f"'*' is only allowed at the end, got {value!r}")
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _http_methods(value)

    @field_validator("auth", mode="before")
    @classmethod
    def _auth(cls, value: Any) -> tuple[str, ...]:
        if value == "public" or (isinstance(value, list | tuple) and list(value) == ["public"]):
            return PUBLIC_AUTH
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not value:
            raise ValueError('expected "public" or a non-empty list of methods, e.g. ["jwt"]')
        for method in value:
            if method == "public":
                raise ValueError('"public" cannot be combined with other methods')
            if method not in AUTH_METHODS:
                raise ValueError(
                    f"unknown method {method!r} (known: public, {', '.join(AUTH_METHODS)})"
                )
        if len(set(value)) != len(value):
            raise ValueError("a method is listed twice")
        return tuple(value)

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_scopes(value)

    @property
    def public(self) -> bool:
        return self.auth == PUBLIC_AUTH

    @property
    def anonymous_ok(self) -> bool:
        """An anonymous request passes: `auth_optional` with nothing a caller must prove."""
        return self.auth_optional and not self.scopes and not self.require_claims

    @model_validator(mode="after")
    def _public_without_scopes(self) -> RouteSettings:
        if self.public and self.scopes:
            raise ValueError("a public route cannot require scopes")
        if self.public and self.require_claims:
            raise ValueError("a public route cannot require claims")
        return self


class WebSocketSettings(_Frozen):
    """WebSocket tunnel limits."""

    max_message_bytes: int = Field(default=1024 * 1024, ge=1)
    idle_timeout_s: float = Field(default=0.0, ge=0)  # 0: no idle timeout
    max_connection_lifetime_s: float = Field(default=0.0, ge=0)  # 0: unlimited
    max_connections: int = Field(default=10_000, ge=1)
    # One identity (JWT subject, API key) may hold at most this many sessions, so one caller cannot
    # take every slot; 100 is far beyond a user's tabs. 0 lifts the cap (one service identity).
    max_connections_per_identity: int = Field(default=100, ge=0)
    drain_s: float = Field(default=5.0, ge=0)
    ping_interval_s: float = Field(default=20.0, ge=0)
    queue_messages: int = Field(default=16, ge=1)
    # permessage-deflate toward the upstream: off by default, the upstream is pod-local and
    # deflate there costs CPU both ends and lets one read inflate into many buffered messages.
    upstream_compression: bool = False
    # permessage-deflate toward clients (browsers over real networks gain from it); each message
    # is still limited to max_message_bytes once inflated.
    client_compression: bool = True
    # In-band re-authentication: the client's {"type": "authproxy.reauth", "token": ...} frames
    # are the sidecar's (never forwarded) and move the session's expiry (README: WebSockets).
    reauth: bool = False


class StateSettings(_Frozen):
    """What replicas (and workers) share: rate-limit windows, concurrency slots, revocations."""

    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    on_error: Literal["allow", "deny"] = "allow"
    # A dead Redis costs a request at most connect_timeout_s + timeout_s, and only one request
    # every retry_s: in between, on_error answers at once.
    connect_timeout_s: float = Field(default=0.25, gt=0, le=10)
    timeout_s: float = Field(default=0.25, gt=0, le=10)
    retry_s: float = Field(default=1.0, gt=0, le=60)
    max_connections: int = Field(default=64, ge=1)
    key_prefix: str = Field(default="authproxy:", max_length=64)
    # A concurrency slot held in Redis is renewed every lease_s / 3 by its sidecar; a sidecar that
    # dies without giving its slots back loses them after lease_s.
    lease_s: float = Field(default=30.0, ge=3, le=3600)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        parts = urlsplit(value)
        # Never echoed whole: the URL may hold the password.
        if parts.scheme not in ("redis", "rediss", "unix"):
            got = f"a {parts.scheme}:// URL" if parts.scheme else "no scheme"
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {got}")
        if parts.query or parts.fragment:
            # Both clients (redis-py and the per-request pipe) must read the same database
            # and credentials: only `scheme://[:password@]host[:port][/db]` is taken.
            raise ValueError(
                "a query or fragment is not supported (put the db in the path: redis://host/3)"
            )
        return value


class RateLimitSettings(_Frozen):
    """One `[[rate_limits]]` rule: every matching rule applies, the strictest refusal wins."""

    name: str = Field(min_length=1, max_length=64)
    routes: tuple[str, ...] | None = None  # `path` values of [[routes]]; None: every route
    by: Literal["identity", "ip"] = "identity"
    limit: int = Field(default=0, ge=0)  # requests in any window_s seconds; 0: no rate limit
    window_s: int = Field(default=60, ge=1, le=86400)
    # Requests and WebSocket sessions in progress at once per key (0: no cap): long model
    # streams hold a slot until they end.
    concurrent: int = Field(default=0, ge=0)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        # It is a key of the RateLimit headers (an sf-string) and a metric label.
        if not re.fullmatch(r"[A-Za-z0-9._:-]+", value):
            raise ValueError(f"{value!r}: letters, digits and . _ : - only")
        return value

    def applies_to(self, route: RouteSettings) -> bool:
        return self.routes is None or route.path in self.routes

    @model_validator(mode="after")
    def _something(self) -> RateLimitSettings:
        if not self.limit and not self.concurrent:
            raise ValueError("set limit (with window_s) or concurrent, or both")
        return self


class IdentitySettings(_Frozen):
    """How the caller's identity is told to the upstream."""

    sign: bool = False
    secret_env: str | None = None
    # "v2" binds method, path, query, a timestamp and every identity header; "v1" (the old
    # scheme, identity values and request id only) is kept for upstreams not yet migrated.
    signature: Literal["v1", "v2"] = "v2"
    # The tolerance upstreams should allow between X-Auth-Timestamp and their clock: the sidecar
    # only stamps the time, the checker refuses anything older (or newer) than this.
    max_skew_s: int = Field(default=30, ge=1, le=3600)

    @model_validator(mode="after")
    def _secret(self) -> IdentitySettings:
        if self.sign and not self.secret_env:
            raise ValueError(
                "sign = true needs secret_env (the name of the shared secret's variable)"
            )
        return self


class TracingSettings(_Frozen):
    """OpenTelemetry span export (OTLP over HTTP); off unless `otlp_endpoint` is set."""

    otlp_endpoint: str | None = None  # e.g. "http://otel-collector:4318" (/v1/traces is added)
    service_name: str = Field(default="authproxy", min_length=1)
    sample_ratio: float = Field(default=1.0, ge=0, le=1)  # for traces the sidecar starts
    export_interval_s: float = Field(default=2.0, gt=0)

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value


class LoggingSettings(_Frozen):
    """Log output: JSON lines on stdout."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    # Access lines are written in batches at most this far apart (0: each line at once).
    flush_interval_s: float = Field(default=0.1, ge=0, le=10)


COMPRESSIBLE_TYPES = (
    "text/*",
    "application/json",
    "application/*+json",
    "application/javascript",
    "application/x-ndjson",
    "application/xml",
    "application/*+xml",
    "image/svg+xml",
)


class CompressionSettings(_Frozen):
    """`[compression]`: compress text-like upstream answers for clients that accept it."""

    enabled: bool = False
    # Answers with a Content-Length below this pass untouched (a stream of unknown length does not).
    min_bytes: int = Field(default=1024, ge=0)
    level: int = Field(default=6, ge=1, le=9)  # gzip level (brotli uses a quality of its own)
    # Media types compressed: exact, "type/*" or "application/*+json" (suffix) patterns.
    types: tuple[str, ...] = COMPRESSIBLE_TYPES

    @field_validator("types")
    @classmethod
    def _types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for t in value:
            t = t.strip().lower()
            if t.count("/") != 1 or not t.split("/")[0] or not t.split("/")[1]:
                raise ValueError(f"expected a media type such as 'text/*', got {t!r}")
            out.append(t)
        return tuple(out)


class Settings(_Frozen):
    """The whole configuration."""

    server: ServerSettings = Field(default_factory=ServerSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    cors: CorsSettings = Field(default_factory=CorsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    routes: tuple[RouteSettings, ...] = ()
    websocket: WebSocketSettings = Field(default_factory=WebSocketSettings)
    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    compression: CompressionSettings = Field(default_factory=CompressionSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    rate_limits: tuple[RateLimitSettings, ...] = ()

    @model_validator(mode="after")
    def _rate_limits(self) -> Settings:
        paths = {r.path for r in self.routes}
        names: set[str] = set()
        for i, rule in enumerate(self.rate_limits):
            if rule.name in names:
                raise _KeyedError(f"rate_limits[{i}].name", f"{rule.name!r} is used twice")
            names.add(rule.name)
            for j, path in enumerate(rule.routes or ()):
                if path not in paths:
                    raise _KeyedError(
                        f"rate_limits[{i}].routes[{j}]",
                        f"{path!r} is not the path of any [[routes]] entry",
                    )
        if self.rate_limits and self.state.backend == "memory" and self.server.workers != 1:
            # Each worker would count alone: the limits would silently multiply.
            raise _KeyedError(
                "server.workers",
                f'{self.server.workers!r} with [[rate_limits]] needs state.backend = "redis" '
                "(the memory backend counts per process)",
            )
        return self

    @model_validator(mode="after")
    def _methods_configured(self) -> Settings:
        route_names(self.routes)  # unique, or a one-line error naming the key
        for i, route in enumerate(self.routes):
            if "jwt" in route.auth and not self.auth.jwt.providers:
                raise _KeyedError(f"routes[{i}].auth", "uses 'jwt' but no [[auth.jwt.providers]]")
        if self.auth.token_cookie and any(
            "*" in cors.allow_origins
            for cors in (self.cors, *(r.cors for r in self.routes if r.cors is not None))
        ):
            # Browsers send cookies on WebSocket handshakes from any site; with "*" origins the
            # Origin check is all that stops cross-site WebSocket hijacking, and it would pass.
            raise _KeyedError(
                "auth.token_cookie", "cannot be used while a cors table allows origin '*'"
            )
        if self.server.listen == self.admin.listen:
            raise _KeyedError("admin.listen", "must differ from server.listen")
        return self


def route_names(routes: tuple[RouteSettings, ...]) -> tuple[str, ...]:
    """Each route's stable label (metrics' `route`, the access line's `route`).

    Its `name`, else its path, else — when two routes share a path — the path and its methods
    (`/api/models POST`), else the path and its rank among its twins (`/api/* (2)`: a shadowed
    route, which `warnings` reports). Never the route's position in the file: reordering routes
    must not rename every series. Two routes given one `name` are a `ConfigError`.
    """
    counts: dict[str, int] = {}
    for r in routes:
        counts[r.path] = counts.get(r.path, 0) + 1
    names: list[str] = []
    taken: dict[str, int] = {}
    for i, r in enumerate(routes):
        if r.name is not None:
            name = r.name
        else:
            name = r.path
            if counts[r.path] > 1 and r.methods:
                name = f"{r.path} {','.join(r.methods)}"
            twin = 1
            while name in taken and routes[taken[name]].name is None:
                twin += 1
                name = f"{r.path} ({twin})"
        if name in taken:
            named = i if r.name is not None else taken[name]
            other = taken[name] if named == i else i
            raise _KeyedError(
                f"routes[{named}].name",
                f"{name!r} is also routes[{other}]'s label: give each route a unique `name`",
            )
        taken[name] = i
        names.append(name)
    return tuple(names)


class _KeyedError(ValueError):
    """A cross-field error that knows its full key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def _check_scopes(value: tuple[str, ...]) -> tuple[str, ...]:
    for s in value:
        if not grammar.scope_token(s):
            raise ValueError(f"not a scope token: {s!r}")
    return value


def _unique_key_ids(keys: tuple[ApiKeySettings, ...]) -> None:
    seen: set[str] = set()
    for key in keys:
        if key.id in seen:
            raise ValueError(f"two keys share the id {key.id!r}")
        seen.add(key.id)


# --- warnings: valid, but probably not what was meant -------------------------------------------


def warnings(settings: Settings) -> list[str]:
    """One line per thing the config allows but probably does not mean, each naming its key.

    `check-config` prints them and `serve` logs them at start; neither refuses the config.
    """
    out: list[str] = []
    routes = settings.routes
    if not routes:
        out.append("routes: none configured: every request gets 404")
    for j, later in enumerate(routes):
        for i, earlier in enumerate(routes[:j]):
            if _covers(earlier, later):
                out.append(
                    f"routes[{j}]: never matches: routes[{i}] ({earlier.path}) "
                    "matches every request it would"
                )
                break
    keys = settings.auth.api_keys
    if not keys.keys and keys.keys_file is None:
        out.extend(
            f"routes[{i}].auth: 'api_key' is listed but no API key is configured "
            "(auth.api_keys.keys, auth.api_keys.keys_file)"
            for i, route in enumerate(routes)
            if "api_key" in route.auth
        )
    return out


def _covers(earlier: RouteSettings, later: RouteSettings) -> bool:
    """Does `earlier` match every request `later` does (first match wins, so `later` is dead)?

    Mirrors `routing.RouteTable` (a test holds the two together): `/api/*` is the prefix
    `/api/`, `*` is `/`, GET also matches HEAD, no methods means every method.
    """
    if earlier.methods:
        if not later.methods or not _with_head(later.methods) <= _with_head(earlier.methods):
            return False
    prefix = "/" if earlier.path == "*" else earlier.path[:-1] if earlier.path[-1:] == "*" else None
    if prefix is None:
        return earlier.path == later.path
    later_path = "/" if later.path == "*" else later.path.rstrip("*")
    return later_path.startswith(prefix)


def _with_head(methods: tuple[str, ...]) -> set[str]:
    return {*methods, "HEAD"} if "GET" in methods else set(methods)


# --- loading -----------------------------------------------------------------------------------


# `[::1]:8000`, `[fd00::1]`: an IPv6 listen address or host, not a TOML list cut short.
_BRACKETED_HOST = re.compile(r"\[[0-9A-Fa-f:.%\w]*:[0-9A-Fa-f:.%\w]*\](:\d+)?\Z")


def _env_value(name: str, raw: str) -> Any:
    """An override's value: a TOML literal if it parses as one (60, true, ["a"]), else a string.

    A value that starts like a list, table or quoted string and does not parse is an error, not
    a string: `["a", "b"` taken literally would be silently wrong.
    """
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as exc:
        if raw.lstrip()[:1] in ("[", "{", '"', "'") and not _BRACKETED_HOST.match(raw):
            detail = str(exc).split(" (at ", 1)[0]
            raise ConfigError(name, f"not a valid TOML value: {detail}") from None
        return raw


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """Every `AUTHPROXY__*` variable and the key it sets (`routes[0].auth`), sorted by name.

    A name that is almost an override — one underscore after AUTHPROXY, a lower-case prefix, an
    empty part — is an error naming it: ignored, it would leave the file's value in force unseen.
    """
    out = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("AUTHPROXY_") or name == "AUTHPROXY_CONFIG":
            continue
        if not name.startswith(ENV_PREFIX):
            if upper.startswith(ENV_PREFIX):
                raise ConfigError(name, f"malformed override name: write {upper[:11]} in capitals")
            if "__" in name:
                raise ConfigError(
                    name, f"malformed override name: {ENV_PREFIX} takes two underscores"
                )
            continue  # AUTHPROXY_SOMETHING_ELSE: not ours to judge
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if not all(parts):
            raise ConfigError(name, "malformed override name")
        key = ""
        for part in parts:
            key += f"[{part}]" if part.isdigit() else (f".{part}" if key else part)
        out.append((name, key))
    return out


def apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Apply `AUTHPROXY__SECTION__KEY=value` overrides (list items by index: `ROUTES__0__AUTH`)."""
    for name, _ in env_overrides(environ):
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            key: Any = int(part) if part.isdigit() and isinstance(node, list) else part
            if isinstance(node, list):
                if not isinstance(key, int) or key >= len(node):
                    raise ConfigError(name, f"no list item {part!r} to override")
            elif not isinstance(node, dict):
                raise ConfigError(name, f"{'.'.join(parts[:depth])} is not a table")
            if last:
                node[key] = _env_value(name, environ[name])
            else:
                if isinstance(node, dict) and key not in node:
                    node[key] = {}
                node = node[key]
    return data


def _blame_override(exc: ConfigError, overrides: list[tuple[str, str]]) -> ConfigError:
    """`exc` with the variable that set its key named: the file does not hold the bad value."""
    for name, key in overrides:
        inside = exc.key == key or exc.key.startswith((key + ".", key + "["))
        # A misspelt table (AUTHPROXY__CROS__MAX_AGE_S) is reported at the table: `cros`.
        above = exc.message == "unknown key" and key.startswith((exc.key + ".", exc.key + "["))
        if inside or above:
            return ConfigError(exc.key, f"{exc.message} (set by the environment: {name})")
    return exc


def _merge_route_cors(data: dict[str, Any]) -> None:
    """A route's `cors` table inherits every key it does not set from the global `[cors]`."""
    base = data.get("cors", {})
    routes = data.get("routes", [])
    if not isinstance(base, dict) or not isinstance(routes, list):
        return
    for route in routes:
        if isinstance(route, dict) and isinstance(route.get("cors"), dict):
            route["cors"] = {**base, **route["cors"]}


def _key(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "tagged-", "list[", "tuple[", "literal[")):
            continue
        else:
            # A quoted TOML key may hold any character: one holding a control character or a line
            # break is shown escaped, so the error stays one line (and a terminal escape inert).
            breaks = any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in part)
            shown = repr(part) if breaks else part
            out += ("." if out else "") + shown
    return out


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if kind in (
        "string_type",
        "int_type",
        "int_parsing",
        "float_type",
        "float_parsing",
        "bool_type",
        "bool_parsing",
        "tuple_type",
        "list_type",
        "dict_type",
        "model_type",
        "datetime_type",
        "datetime_parsing",
        "datetime_from_date_parsing",
    ):
        msg += f" (got {error.get('input')!r})"
    return msg


def describe_validation_error(exc: ValidationError) -> tuple[str, str]:
    """The first error's key (`keys[0].sha256`, relative to what was validated) and message."""
    error = exc.errors()[0]
    return _key(tuple(error["loc"])), _message(error)


def from_dict(data: Mapping[str, Any]) -> Settings:
    """Validate a parsed document; errors become one-line `ConfigError`s."""
    raw = _deepcopy(dict(data))
    _merge_route_cors(raw)
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        ctx_error = error.get("ctx", {}).get("error")
        if isinstance(ctx_error, _KeyedError):
            raise ConfigError(ctx_error.key, ctx_error.message) from None
        key, message = describe_validation_error(exc)
        raise ConfigError(key or "config", message) from None


def _deepcopy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    return value


def default_path(environ: Mapping[str, str] | None = None) -> str:
    """`$AUTHPROXY_CONFIG`, then `./config.toml`."""
    environ = os.environ if environ is None else environ
    return environ.get("AUTHPROXY_CONFIG") or "config.toml"


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error is a `ConfigError`."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "file not found") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, override from the environment, validate. The result never changes."""
    environ = os.environ if environ is None else environ
    path = path or default_path(environ)
    data = apply_env(read_toml(path), environ)
    try:
        settings = from_dict(data)
    except ConfigError as exc:
        raise _blame_override(exc, env_overrides(environ)) from None
    # Relative file paths in the config are relative to the config file, not the working directory.
    return _resolve_paths(settings, Path(path).resolve().parent)


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    def rel(p: str | None) -> str | None:
        return None if p is None else str((base / p) if not os.path.isabs(p) else Path(p))

    providers = tuple(
        p.model_copy(
            update={"jwks_file": rel(p.jwks_file), "public_key_file": rel(p.public_key_file)}
        )
        for p in settings.auth.jwt.providers
    )
    jwt = settings.auth.jwt.model_copy(update={"providers": providers})
    api_keys = settings.auth.api_keys.model_copy(
        update={"keys_file": rel(settings.auth.api_keys.keys_file)}
    )
    auth = settings.auth.model_copy(update={"jwt": jwt, "api_keys": api_keys})
    server = settings.server.model_copy(
        update={k: rel(getattr(settings.server, k)) for k in ("tls_cert_file", "tls_key_file")}
    )
    upstream = settings.upstream.model_copy(
        update={
            k: rel(getattr(settings.upstream, k))
            for k in ("ca_file", "client_cert_file", "client_key_file")
        }
    )
    return settings.model_copy(update={"auth": auth, "server": server, "upstream": upstream})


# What a reload (SIGHUP) cannot change in a running process: the listeners and the processes
# behind them, the log setup, the WebSocket tunnel's limits and the upstream connection pool (with
# its breaker and queue). Whole tables, or (table, keys). A reload keeps the running values of
# these and says which changed; they take effect at the next restart.
RESTART_ONLY: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    (
        "server",
        (
            "listen",
            "workers",
            "max_header_bytes",
            "header_timeout_s",
            "graceful_shutdown_s",
            "shutdown_delay_s",
        ),
    ),
    ("admin", None),
    ("logging", None),
    ("tracing", None),
    ("state", None),
    ("websocket", None),
    (
        "upstream",
        tuple(
            name
            for name in UpstreamSettings.model_fields
            if name not in ("forward_headers", "max_concurrent_per_client")
        ),
    ),
)


def pin_restart_only(running: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """`new` with the running values of every key a reload cannot change, and the keys (dotted)
    whose new value therefore waits for a restart."""
    pinned: list[str] = []
    update: dict[str, Any] = {}
    for table, keys in RESTART_ONLY:
        old_part, new_part = getattr(running, table), getattr(new, table)
        if keys is None:
            if old_part != new_part:
                pinned += [
                    f"{table}.{k}"
                    for k in type(old_part).model_fields
                    if getattr(old_part, k) != getattr(new_part, k)
                ]
                update[table] = old_part
            continue
        changed = [k for k in keys if getattr(old_part, k) != getattr(new_part, k)]
        if table == "server" and (running.server.tls_cert_file is None) != (
            new.server.tls_cert_file is None
        ):
            # A new certificate reloads into the listener's TLS context; turning TLS on or off
            # is another listener.
            changed += ["tls_cert_file", "tls_key_file"]
        if changed:
            pinned += [f"{table}.{k}" for k in changed]
            update[table] = new_part.model_copy(update={k: getattr(old_part, k) for k in changed})
    return (new.model_copy(update=update) if update else new), pinned


def digest(settings: Settings) -> str:
    """The SHA-256 of the settings in effect (the file with its environment overrides): what the
    admin listener reports, equal across processes and replicas running the same policy."""
    return hashlib.sha256(settings.model_dump_json().encode()).hexdigest()
