"""CORS, terminated by the sidecar: which origins may call the API, decided once at start-up.

The sidecar answers preflights itself (before any authentication), adds the CORS headers to every
actual response (the upstream's and its own errors) and removes whatever `Access-Control-*` headers
the upstream set, so a response never carries two.

`Cors` holds the global policy and one per route that has its own `cors` table (config has already
merged it over the global one). A `CorsPolicy` normalises its origins (case, default ports,
trailing slash, IDN to punycode), groups its wildcards by scheme and port, and prebuilds its fixed
header values in `__init__`; a request only parses its Origin and looks it up.

A refusal is a `CorsRefused` (a `Forbidden`), logged once on `authproxy.cors` naming the origin,
the rule and why, and counted in `authproxy_cors_refusals{reason}`. Reasons: `origin` (well-formed
but not allowed), `origin_malformed`, `method`, `header`, `private_network`.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Any

from . import grammar
from .config import CorsSettings, Settings
from .errors import ConfigError, Forbidden
from .public_suffixes import wildcard_problem
from .telemetry.metrics import Metrics

logger = logging.getLogger("authproxy.cors")

RawHeaders = list[tuple[bytes, bytes]]

REASONS = ("origin", "origin_malformed", "method", "header", "private_network")

_DEFAULT_PORTS = {"http": 80, "https": 443}
# Browsers may send these in Access-Control-Request-Headers (content-type with a non-form value),
# and check them against Access-Control-Allow-Headers like any other, so they are always listed.
_SAFELISTED_HEADERS = ("accept", "accept-language", "content-language", "content-type")
# A serialised origin (RFC 6454): nothing after the port, no userinfo, no whitespace.
_ORIGIN = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://"
    r"(?P<host>[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*|\[[0-9A-Fa-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_SHOWN_CHARS = 200  # of an untrusted value put in a log line or an error body

_PREFLIGHT_VARY = b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
_PNA_VARY = b", Access-Control-Request-Private-Network"


class CorsRefused(Forbidden):
    """403 for a CORS reason; it is sent without CORS headers, so the browser reports it as such."""


def _parse(origin: str) -> tuple[str, str, int] | None:
    """`(scheme, host, port)` of a strictly well-formed http(s) origin, normalised; else None."""
    m = _ORIGIN.fullmatch(origin)
    if m is None:
        return None
    scheme = m["scheme"].lower()
    default = _DEFAULT_PORTS.get(scheme)
    if default is None:
        return None
    host = m["host"].lower()
    if host.startswith("["):
        try:
            host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            return None
    port = default if m["port"] is None else int(m["port"])
    if not 0 < port <= 65535:
        return None
    return scheme, host, port


def _serialise(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://{host}" if port == _DEFAULT_PORTS[scheme] else f"{scheme}://{host}:{port}"


def _malformed_because(origin: str) -> str:
    """Why `_parse` refused `origin`, for the operator's log line (refusal path only)."""
    if not origin.isascii() or any(c.isspace() or not c.isprintable() for c in origin):
        return "malformed: contains whitespace, control or non-ASCII characters"
    if origin == "null":
        return "'null' is allowed only when listed literally in allow_origins"
    scheme, sep, rest = origin.partition("://")
    if not sep:
        return "malformed: not scheme://host[:port]"
    if scheme.lower() not in _DEFAULT_PORTS:
        return f"malformed: scheme {scheme!r} is not http or https"
    if "@" in rest:
        return "malformed: carries userinfo"
    if any(c in rest for c in "/?#"):
        return "malformed: carries a path, query or fragment (even a trailing '/')"
    host, colon, port = rest.rpartition(":") if not rest.endswith("]") else (rest, "", "")
    if colon and not (port.isdigit() and 0 < int(port) <= 65535):
        return f"malformed: bad port {port!r}"
    return "malformed: bad host"


def _clip(value: str) -> str:
    return value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS] + "..."


def _config_origin(value: str, key: str) -> tuple[str, str, int, bool]:
    """`(scheme, host, port, wildcard)` of a configured origin; IDN hosts become punycode."""
    text = value[:-1] if value.endswith("/") else value
    scheme, sep, rest = text.partition("://")
    wildcard = rest.startswith("*.")
    if wildcard:
        rest = rest[2:]
    if rest.startswith("["):
        host, _, after = rest.partition("]")
        host, port = host + "]", after
    else:
        host, colon, port = rest.partition(":")
        port = colon + port
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ConfigError(key, f"{value!r}: not a valid international host name") from None
    parsed = _parse(f"{scheme}://{host}{port}") if sep else None
    if parsed is None:
        raise ConfigError(
            key, f"{value!r} is not an origin (scheme://host[:port], optionally scheme://*.domain)"
        )
    # Config refuses these already; a policy built another way must not echo https://evil.com.
    problem = wildcard_problem(parsed[1]) if wildcard else None
    if problem is not None:
        raise ConfigError(key, f"{value!r}: {problem}")
    return (*parsed, wildcard)


class CorsPolicy:
    """One origin policy, compiled from a CorsSettings at start-up."""

    def __init__(
        self,
        settings: CorsSettings,
        *,
        rule: str,
        metrics: Metrics | None = None,
        config_key: str = "cors",
    ) -> None:
        self.rule = rule
        self.settings = settings
        self.allow_all = "*" in settings.allow_origins
        self.credentials = settings.allow_credentials
        if self.allow_all and self.credentials:
            # Config refuses this already; a policy built another way must not echo every origin.
            raise ConfigError(f"{config_key}.allow_origins", "'*' cannot be used with credentials")
        self.reject_disallowed = settings.reject_disallowed_origins
        self.allow_private_network = settings.allow_private_network

        exact: set[str] = set()
        listed: list[tuple[str, str, int, bool]] = []
        wildcards: dict[tuple[str, int], list[str]] = {}
        for i, value in enumerate(settings.allow_origins):
            if value in ("*", "null"):
                exact.add(value)
                continue
            scheme, host, port, wildcard = _config_origin(value, f"{config_key}.allow_origins[{i}]")
            listed.append((scheme, host, port, wildcard))
            if wildcard:
                wildcards.setdefault((scheme, port), []).append("." + host)
            else:
                exact.add(_serialise(scheme, host, port))
        exact.discard("*")
        self._exact = frozenset(exact)
        self._listed = tuple(listed)
        self._wildcards = {k: tuple(v) for k, v in wildcards.items()}

        # "*" in allow_methods / allow_headers: echo what was asked, which also works with
        # credentials (where browsers read "*" literally).
        self._methods = None if "*" in settings.allow_methods else frozenset(settings.allow_methods)
        allow_all_headers = "*" in settings.allow_headers
        header_list = list(_SAFELISTED_HEADERS)
        for h in settings.allow_headers:
            if h != "*" and h.lower() not in header_list:
                header_list.append(h.lower())
        self._headers = None if allow_all_headers else frozenset(header_list)

        # A credential-less "*" answers every origin the same way: no echo, no Vary: Origin.
        self.star = self.allow_all and not self.credentials
        fixed: RawHeaders = []
        if self.credentials:
            fixed.append((b"access-control-allow-credentials", b"true"))
        self._preflight_fixed = list(fixed)
        if self._methods is not None:
            self._preflight_fixed.append(
                (b"access-control-allow-methods", ", ".join(settings.allow_methods).encode())
            )
        if self._headers is not None:
            self._preflight_fixed.append(
                (b"access-control-allow-headers", ", ".join(header_list).encode())
            )
        self._preflight_fixed.append((b"access-control-max-age", str(settings.max_age_s).encode()))
        self._preflight_fixed.append(
            (b"vary", _PREFLIGHT_VARY + (_PNA_VARY if self.allow_private_network else b""))
        )
        if settings.expose_headers:
            fixed.append(
                (b"access-control-expose-headers", ", ".join(settings.expose_headers).encode())
            )
        self._actual_fixed = fixed

        self._log_level = _LOG_LEVELS.get(settings.log_refusals)
        self._counters: dict[str, Any] = (
            {r: metrics.cors_refusals.labels(reason=r) for r in REASONS} if metrics else {}
        )

    # --- matching ------------------------------------------------------------------------------

    def origin_allowed(self, origin: str) -> bool:
        """Whether `origin` (an Origin header value) may read responses under this policy."""
        if self.allow_all or origin in self._exact:
            return True
        parsed = _parse(origin)
        if parsed is None:
            return False
        scheme, host, port = parsed
        if _serialise(scheme, host, port) in self._exact:
            return True
        suffixes = self._wildcards.get((scheme, port))
        return suffixes is not None and host.endswith(suffixes)

    # --- preflight -----------------------------------------------------------------------------

    def preflight(
        self,
        origin: str,
        request_method: str,
        request_headers: str | None,
        private_network: bool,
    ) -> list[tuple[bytes, bytes]]:
        """Headers of the 204 answering a preflight; raises `CorsRefused` when it is refused."""
        if not self.origin_allowed(origin):
            raise self._origin_refused(origin)
        if not grammar.token(request_method) or (
            self._methods is not None and request_method not in self._methods
        ):
            shown = _clip(request_method)
            raise self._refused(
                "method",
                origin,
                f"method {shown!r} is not allowed",
                why=f"method {shown!r} is not in allow_methods",
                method=shown,
            )
        requested = [h.strip().lower() for h in (request_headers or "").split(",")]
        requested = [h for h in requested if h]
        allowed = self._headers
        for name in requested:
            if not grammar.token(name) or (allowed is not None and name not in allowed):
                shown = _clip(name)
                raise self._refused(
                    "header",
                    origin,
                    f"header {shown!r} is not allowed",
                    why=f"header {shown!r} is not in allow_headers",
                    header=shown,
                )
        if private_network and not self.allow_private_network:
            raise self._refused(
                "private_network",
                origin,
                "private network access is not allowed",
                why="a Private Network Access preflight and allow_private_network = false",
            )

        allow_origin = b"*" if self.star else origin.encode("latin-1")
        headers = [(b"access-control-allow-origin", allow_origin), *self._preflight_fixed]
        if self._methods is None:
            headers.append((b"access-control-allow-methods", request_method.encode("latin-1")))
        if self._headers is None and requested:
            headers.append((b"access-control-allow-headers", ", ".join(requested).encode()))
        if private_network:
            headers.append((b"access-control-allow-private-network", b"true"))
        return headers

    # --- actual requests -----------------------------------------------------------------------

    def response_headers(
        self, origin: str | None, headers: list[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]]:
        """A response's `headers` without any Access-Control-*, plus this policy's CORS headers."""
        out: RawHeaders = []
        vary: list[bytes] = []
        for name, value in headers:
            lname = name.lower()
            if lname.startswith(b"access-control-"):
                continue
            if lname == b"vary":
                vary.append(value)
                continue
            out.append((name, value))

        if self.star:
            # Same answer for every caller (with or without Origin), so caches need no Vary.
            out.append((b"access-control-allow-origin", b"*"))
            out.extend(self._actual_fixed)
            out.extend((b"vary", v) for v in vary)
            return out
        if origin is not None and self.origin_allowed(origin):
            out.append((b"access-control-allow-origin", origin.encode("latin-1")))
            out.extend(self._actual_fixed)
        out.append((b"vary", _merge_vary(vary)) if vary else (b"vary", b"Origin"))
        return out

    def refuse_actual(self, origin: str, *, same_origin: bool) -> None:
        """Raise `CorsRefused` for a request from a disallowed origin, when the policy says so."""
        if same_origin or not self.reject_disallowed or self.origin_allowed(origin):
            return
        raise self._origin_refused(origin)

    def refuse_websocket(self, origin: str, *, same_origin: bool) -> None:
        """Raise `CorsRefused` for a WebSocket handshake from a disallowed origin, always.

        Browsers do not apply CORS to WebSockets, so this is the only defence against cross-site
        WebSocket hijacking: it ignores `reject_disallowed_origins`.
        """
        if same_origin or self.origin_allowed(origin):
            return
        raise self._origin_refused(origin)

    # --- refusals ------------------------------------------------------------------------------

    def _origin_refused(self, origin: str) -> CorsRefused:
        message = f"origin {_clip(origin)!r} is not allowed"
        parsed = _parse(origin)
        if parsed is None:
            return self._refused(
                "origin_malformed", origin, message, why=f"origin {_malformed_because(origin)}"
            )
        return self._refused("origin", origin, message, why=self._not_listed_because(*parsed))

    def _not_listed_because(self, scheme: str, host: str, port: int) -> str:
        if not self._listed and not self._exact:
            return "allow_origins is empty"
        for l_scheme, l_host, l_port, wildcard in self._listed:
            shown = _serialise(l_scheme, ("*." if wildcard else "") + l_host, l_port)
            if wildcard and host == l_host:
                return f"not in allow_origins ({shown} matches subdomains only)"
            same_site = l_host == host or (wildcard and host.endswith("." + l_host))
            if same_site and (l_scheme, l_port) != (scheme, port):
                return f"not in allow_origins ({shown} differs in scheme or port)"
        return "not in allow_origins"

    def _refused(
        self, reason: str, origin: str, message: str, *, why: str, **extra: str
    ) -> CorsRefused:
        shown = _clip(origin)
        if self._log_level is not None:
            logger.log(
                self._log_level,
                "CORS refused origin %r under rule %s: %s",
                shown,
                self.rule,
                why,
                extra={
                    "fields": {
                        "event": "cors_refused",
                        "origin": shown,
                        "rule": self.rule,
                        "reason": reason,
                    }
                },
            )
        counter = self._counters.get(reason)
        if counter is not None:
            counter.inc()
        return CorsRefused(message, details={"origin": shown, "reason": reason, **extra})


def _merge_vary(values: list[bytes]) -> bytes:
    """One Vary value holding every token of `values` once, plus Origin (`*` is left alone)."""
    tokens: list[bytes] = []
    seen: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip()
            if token == b"*":
                return b"*"
            if token and token.lower() not in seen:
                seen.add(token.lower())
                tokens.append(token)
    if b"origin" not in seen:
        tokens.append(b"Origin")
    return b", ".join(tokens)


# Exposed to pages on routes a [[rate_limits]] rule covers (none is CORS-safelisted).
RATE_LIMIT_HEADERS = ("Retry-After", "RateLimit-Policy", "RateLimit")


class Cors:
    """Global policy plus per-route overrides."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.global_policy = CorsPolicy(settings.cors, rule="global", metrics=metrics)
        routes: list[CorsPolicy] = []
        for i, route in enumerate(settings.routes):
            limited = any(rule.applies_to(route) for rule in settings.rate_limits)
            if route.cors is None and not limited:
                routes.append(self.global_policy)
                continue
            cors = route.cors or settings.cors
            if limited:
                # A page must be able to read why it was refused and when to come back.
                extra = [h for h in RATE_LIMIT_HEADERS if h not in cors.expose_headers]
                cors = cors.model_copy(update={"expose_headers": (*cors.expose_headers, *extra)})
            routes.append(
                CorsPolicy(
                    cors,
                    rule=f"routes[{i}] {route.path}",
                    metrics=metrics,
                    config_key=f"routes[{i}].cors" if route.cors is not None else "cors",
                )
            )
        self._routes = tuple(routes)

    def policy(self, route_index: int | None) -> CorsPolicy:
        """The route's own policy, or the global one (also for requests that match no route)."""
        return self.global_policy if route_index is None else self._routes[route_index]
