"""`authproxy explain`: run one request through the server's own decision and say in words what
happened, so an operator debugs a 401 or a CORS refusal without reading code.

It builds the same `Decider` the server uses (a real `AuthService`, with its own HTTP session, so
JWKS are really fetched), so a preflight is answered, a disallowed Origin refused and a path
judged exactly as the server would. Credentials are shown only as a short SHA-256 prefix.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any
from urllib.parse import urlsplit

from .auth import Attempt, AuthService, consumed_headers, new_key_session
from .auth.jwks import JwksCache
from .auth.jwt import opaque
from .config import Settings
from .cors import Cors
from .decision import Decider, Decision, Facts
from .errors import ConfigError
from .identity import Identity
from .relay.headers import HeaderPolicy
from .routing import RouteTable
from .telemetry.clock import rfc3339
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
        if a.method == "claims":  # the route's require_claims, judged after the scopes
            out.append(_line("claims", f"{a.found} -> {a.outcome}"))
            continue
        found = a.found or "nothing"
        out.append(_line(f"try {a.method}", f"found {found} -> {a.outcome}"))
    return out


def _unverified_claims(token: str) -> dict[str, Any] | None:
    """The token's payload, unverified, for display only; None if it cannot be read."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        return None
    return claims if isinstance(claims, dict) else None


def _ago(seconds: float) -> str:
    s = abs(round(seconds))
    span = f"{s} s" if s < 120 else f"{s // 60} min {s % 60} s" if s < 7200 else f"{s / 3600:.1f} h"
    return f"{span} ago" if seconds >= 0 else f"in {span}"


def _time_claim(claims: dict[str, Any], name: str, now: float) -> str | None:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None if value is None else f"{name} {value!r} (not a number)"
    try:
        return f"{name} {rfc3339(float(value))} ({_ago(now - value)})"
    except (OverflowError, ValueError, OSError):
        return f"{name} {value!r} (out of range)"


def _token_lines(
    token: str, provider: str | None, settings_by_name: dict[str, tuple[str, int]]
) -> list[str]:
    """What the token says about time and issuer (unverified: its claims are shown, never it),
    beside the clock and the leeway that judge it, or beside the issuers configured."""
    claims = _unverified_claims(token)
    if claims is None:
        return []
    now = time.time()
    iss = claims.get("iss")
    if provider is None:
        configured = ", ".join(f"{i!r} ({n})" for n, (i, _) in settings_by_name.items())
        shown = repr(iss) if isinstance(iss, str) else "none"
        return [
            _line("provider", f"none: the token's iss {shown} names no configured provider"),
            _line("", f"configured issuers: {configured or 'none'}"),
        ]
    times = [t for t in (_time_claim(claims, n, now) for n in ("exp", "nbf", "iat")) if t]
    leeway = settings_by_name[provider][1] if provider in settings_by_name else 0
    lines = [_line("token", f"iss {iss!r}; " + ("; ".join(times) or "no exp, nbf or iat"))]
    lines.append(_line("clock", f"now {rfc3339(now)}, leeway {leeway} s (unverified claims)"))
    exp = claims.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool) and now >= exp + leeway:
        since = _ago(now - exp - leeway)
        lines.append(_line("", f"expired {_ago(now - exp)} (refused since exp + leeway, {since})"))
    return lines


def _key_status(cache: JwksCache) -> str:
    keys = cache.current()
    if keys is None:
        return f"NO KEYS from {cache.url} ({cache.last_error or 'not fetched'})"
    state = f"STALE (last fetch failed: {cache.last_error})" if cache.stale else "fresh"
    return f"{len(keys.keys)} key(s) from {cache.url}, {state}: {keys.describe()}"


def facts_for(
    settings: Settings, method: str, target: str, headers: list[tuple[str, str]]
) -> Facts:
    """The request `explain` is asked about, as the server would see it (a Host is supplied
    from `server.listen` when none is given, as any HTTP/1.1 client would send one)."""
    path_text, query = _split_target(target)
    raw = [(k.strip().lower().encode("latin-1"), v.strip().encode("latin-1")) for k, v in headers]
    if not any(k == b"host" for k, _ in raw):
        # `listen` is host:port already, an IPv6 host in brackets as a Host header writes it.
        raw.append((b"host", settings.server.listen.encode("latin-1")))
    websocket = any(k == b"upgrade" and v.lower() == b"websocket" for k, v in raw)
    return Facts(
        method=method.upper(),
        target=path_text.encode("utf-8"),
        query=query.encode("utf-8"),
        headers=raw,
        scheme="ws" if websocket else "http",
        peer="127.0.0.1",
        websocket=websocket,
    )


async def explain(
    settings: Settings, method: str, target: str, headers: list[tuple[str, str]]
) -> tuple[bool, str]:
    """(accepted?, the explanation). Never prints a token or key, only their SHA-256 prefix."""
    facts = facts_for(settings, method, target, headers)
    metrics = Metrics()
    async with new_key_session() as session:
        try:
            service = AuthService(settings, metrics, session)
            decider = Decider(
                routes=RouteTable(settings.routes),
                cors=Cors(settings, metrics),
                auth=service,
                headers=HeaderPolicy(settings, credential_headers=consumed_headers(settings.auth)),
                max_header_bytes=settings.server.max_header_bytes,
            )
        except ConfigError as exc:
            return False, _line("config", f"error: {exc}")
        await service.start()
        try:
            decision = await decider.decide(facts, explain=True)
            return report(decision, facts, service, limits=_rate_limits(settings, decision))
        finally:
            await service.stop()


def _rate_limits(settings: Settings, d: Decision) -> str | None:
    """The [[rate_limits]] rules the request's route is under (explain counts nothing)."""
    route = d.request.route
    if route is None or d.action in ("preflight", "refuse"):
        return None
    rules = [rule for rule in settings.rate_limits if rule.applies_to(route.settings)]
    if not rules:
        return None
    shown = []
    for rule in rules:
        parts = [f"{rule.limit} per {rule.window_s} s"] if rule.limit else []
        parts += [f"{rule.concurrent} at once"] if rule.concurrent else []
        shown.append(f"{rule.name} ({', '.join(parts)}, by {rule.by})")
    return "; ".join(shown) + f" [state: {settings.state.backend}; not counted here]"


def report(
    d: Decision, facts: Facts, service: AuthService, *, limits: str | None = None
) -> tuple[bool, str]:
    """The decision in words: (accepted?, the lines)."""
    r = d.request
    creds = r.credentials
    shown_query = ""
    if creds is not None and creds.clean_query:
        shown_query = "?" + creds.clean_query.decode("latin-1")
    elif creds is None and facts.query:
        shown_query = " (query not read)"
    kind = " (WebSocket handshake)" if facts.websocket else ""
    path = r.path or facts.target.decode("utf-8", "replace")
    lines = [_line("request", f"{r.method} {path}{shown_query}{kind}")]
    for stage, text in d.trace or []:
        if stage != "result":
            lines.append(_line(stage, text))
    if creds is not None:
        # Each method describes what it found (hashing the credential): the chain's own words.
        described = (method.found(creds.of(name)) for name, method in service.methods.items())
        found = [text for text in described if text is not None]
        if creds.problem:
            found.append(f"problem: {creds.problem}")
        lines.append(_line("credentials", "; ".join(found) or "none"))
        if creds.bearer is not None and r.route is not None and "jwt" in r.route.settings.auth:
            provider = service.jwt.peek_provider(creds.bearer)
            introspectors = service.jwt.introspectors
            if introspectors and opaque(creds.bearer.encode("latin-1")):
                names = ", ".join(repr(i.name) for i in introspectors)
                lines.append(_line("provider", f"opaque token: introspected by {names}"))
            else:
                configured = {
                    p.settings.name: (p.settings.issuer, p.settings.leeway_s)
                    for p in service.jwt.providers
                }
                lines.extend(_token_lines(creds.bearer, provider, configured))
                if provider is None and not any(x.startswith("provider:") for x in lines):
                    lines.append(
                        _line("provider", "none (the token's 'iss' names no configured provider)")
                    )
                elif provider is not None:
                    status = "keys from a file or the environment"
                    for cache in service.jwt.jwks:
                        if cache.provider.name == provider:
                            status = _key_status(cache)
                    lines.append(_line("provider", f"{provider!r}: {status}"))
    lines.extend(_trace_lines(d.attempts or []))
    if limits is not None:
        lines.append(_line("rate limits", limits))
    if d.action == "refuse":
        assert d.error is not None
        exc = d.error
        lines.append(_line("result", f"REFUSED {exc.status} {exc.code}: {exc.message}"))
        for name, value in exc.headers.items():
            lines.append(_line("", f"{name}: {value}"))
        return False, "\n".join(lines)
    if d.action == "preflight":
        lines.append(_line("result", "ANSWERED 204 by the sidecar (CORS preflight, before auth)"))
        for raw_name, raw_value in d.preflight_headers or []:
            lines.append(_line("", f"{raw_name.decode('latin-1')}: {raw_value.decode('latin-1')}"))
        return True, "\n".join(lines)
    if r.identity is None:
        assert r.route is not None
        why = (
            "public route"
            if r.route.settings.public
            else "no credential presented; route allows anonymous"
        )
        lines.append(_line("result", f"ACCEPTED anonymously ({why})"))
    else:
        lines.append(_line("result", f"ACCEPTED as {r.identity.method} {r.identity.subject!r}"))
        lines.extend(_identity_lines(r.identity))
    return True, "\n".join(lines)
