"""`authproxy explain`: run one request through path judgement, routing and authentication, and
say in words what happened, so an operator debugs a 401 without reading code.

It uses a real `AuthService` (with its own HTTP session, so JWKS are really fetched) and prints the
normalised path, the matched route, what each method of the route's chain found and concluded, and
the exact reason for the verdict. Credentials are shown only as a short SHA-256 prefix.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import aiohttp

from .auth import Attempt, AuthService
from .auth.chain import fingerprint
from .auth.jwks import JwksCache
from .config import Settings
from .errors import BadRequest, ConfigError, ProxyError
from .identity import Identity
from .paths import judge_path
from .routing import RouteTable
from .telemetry.metrics import Metrics


def _split_target(target: str) -> tuple[str, str]:
    if target.startswith(("http://", "https://", "ws://", "wss://")):
        parts = urlsplit(target)
        return parts.path or "/", parts.query
    path, _, query = target.partition("?")
    return path.partition("#")[0], query.partition("#")[0]


def _line(label: str, text: str) -> str:
    return f"{label + ':' if label else '':<13} {text}"


def _identity_lines(identity: Identity) -> list[str]:
    out = [
        _line("identity", f"method {identity.method}, subject {identity.subject!r}"),
        _line("upstream", f"X-Auth-Subject: {identity.subject}"),
        _line("", f"X-Auth-Method: {identity.method}"),
        _line("", f"X-Auth-Scopes: {' '.join(sorted(identity.scopes))}"),
    ]
    if identity.issuer:
        out.append(_line("", f"X-Auth-Issuer: {identity.issuer}"))
    out.extend(_line("", f"{name}: {value}") for name, value in identity.claim_headers)
    return out


def _trace_lines(trace: list[Attempt]) -> list[str]:
    out = []
    for a in trace:
        found = a.found or "nothing"
        out.append(_line(f"try {a.method}", f"found {found} -> {a.outcome}"))
    return out


def _key_status(cache: JwksCache) -> str:
    keys = cache.current()
    if keys is None:
        return f"NO KEYS from {cache.url} ({cache.last_error or 'not fetched'})"
    state = f"STALE (last fetch failed: {cache.last_error})" if cache.stale else "fresh"
    return f"{len(keys.keys)} key(s) from {cache.url}, {state}: {keys.describe()}"


async def explain(
    settings: Settings, method: str, target: str, headers: list[tuple[str, str]]
) -> tuple[bool, str]:
    """(accepted?, the explanation). Never prints a token or key, only their SHA-256 prefix."""
    method = method.upper()
    lines: list[str] = []
    path_text, query = _split_target(target)
    raw_headers = [
        (k.strip().lower().encode("latin-1"), v.strip().encode("latin-1")) for k, v in headers
    ]
    websocket = any(k == b"upgrade" and v.lower() == b"websocket" for k, v in raw_headers)

    try:
        path, upstream_path = judge_path(path_text.encode("utf-8"))
    except BadRequest as exc:
        lines.append(_line("request", f"{method} {path_text}"))
        lines.append(_line("path", f"refused: {exc.message}"))
        lines.append(_line("result", f"REFUSED {exc.status} {exc.code}: {exc.message}"))
        return False, "\n".join(lines)

    async with aiohttp.ClientSession() as session:
        try:
            service = AuthService(settings, Metrics(), session)
        except ConfigError as exc:
            lines.append(_line("config", f"error: {exc}"))
            return False, "\n".join(lines)
        await service.start()
        try:
            return await _explain(
                service, settings, method, path, upstream_path, query, raw_headers, websocket, lines
            )
        finally:
            await service.stop()


async def _explain(
    service: AuthService,
    settings: Settings,
    method: str,
    path: str,
    upstream_path: bytes,
    query: str,
    raw_headers: list[tuple[bytes, bytes]],
    websocket: bool,
    lines: list[str],
) -> tuple[bool, str]:
    creds = service.extract(raw_headers, query.encode("utf-8"), websocket=websocket)
    shown_query = "?" + creds.clean_query.decode("latin-1") if creds.clean_query else ""
    kind = " (WebSocket handshake)" if websocket else ""
    lines.append(_line("request", f"{method} {path}{shown_query}{kind}"))
    lines.append(_line("path", f"{path}  (sent upstream as {upstream_path.decode('ascii')})"))

    route = RouteTable(settings.routes).match(path, method)
    if route is None:
        lines.append(_line("route", f"no route matches {method} {path}"))
        lines.append(_line("result", "REFUSED 404 not_found: no route"))
        return False, "\n".join(lines)
    r = route.settings
    policy = "public" if r.public else " or ".join(r.auth)
    extra = f"; scopes {' '.join(r.scopes)}" if r.scopes else ""
    extra += "; auth optional" if r.auth_optional else ""
    lines.append(_line("route", f"routes[{route.index}] {r.path!r} (auth: {policy}{extra})"))

    if method == "OPTIONS" and any(k == b"access-control-request-method" for k, _ in raw_headers):
        lines.append(_line("note", "a CORS preflight: answered by the CORS stage, before auth"))

    found = []
    if creds.bearer is not None:
        found.append(f"bearer token from the {creds.bearer_source} ({fingerprint(creds.bearer)})")
    if creds.api_key is not None:
        found.append(f"API key from the {creds.api_key_source} ({fingerprint(creds.api_key)})")
    if creds.problem:
        found.append(f"problem: {creds.problem}")
    lines.append(_line("credentials", "; ".join(found) or "none"))

    if creds.bearer is not None and "jwt" in r.auth:
        provider = service.jwt.peek_provider(creds.bearer)
        if provider is None:
            lines.append(_line("provider", "none (the token's 'iss' names no configured provider)"))
        else:
            status = "keys from a file or the environment"
            for cache in service.jwt.jwks:
                if cache.provider.name == provider:
                    status = _key_status(cache)
            lines.append(_line("provider", f"{provider!r}: {status}"))

    trace: list[Attempt] = []
    try:
        identity = await service.authenticate(r, creds, trace)
    except ProxyError as exc:
        lines.extend(_trace_lines(trace))
        lines.append(_line("result", f"REFUSED {exc.status} {exc.code}: {exc.message}"))
        for name, value in exc.headers.items():
            lines.append(_line("", f"{name}: {value}"))
        return False, "\n".join(lines)
    lines.extend(_trace_lines(trace))
    if identity is None:
        why = "public route" if r.public else "no credential presented; route allows anonymous"
        lines.append(_line("result", f"ACCEPTED anonymously ({why})"))
    else:
        lines.append(_line("result", f"ACCEPTED as {identity.method} {identity.subject!r}"))
        lines.extend(_identity_lines(identity))
    return True, "\n".join(lines)
