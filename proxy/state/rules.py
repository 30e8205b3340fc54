"""`[[rate_limits]]` compiled per route, and the IETF RateLimit header values they give.

Header form: draft-ietf-httpapi-ratelimit-headers-10, structured fields. `RateLimit-Policy`
lists each rule as `"name";q=<limit>;w=<window_s>`; `RateLimit` gives its state as
`"name";r=<remaining>;t=<seconds>`, where `t` is when the window next gives a unit back (the
oldest counted request leaves it): for a refused request, its Retry-After.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import RateLimitSettings, Settings


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule, as the stores see it."""

    name: str
    by_ip: bool
    limit: int  # 0: no window
    window_s: int
    concurrent: int  # 0: no cap

    @classmethod
    def of(cls, s: RateLimitSettings) -> Rule:
        return cls(s.name, s.by == "ip", s.limit, s.window_s, s.concurrent)


@dataclass(frozen=True, slots=True)
class RouteLimits:
    """The rules of one route, split by what they hold, with the fixed header built once."""

    windowed: tuple[Rule, ...]
    capped: tuple[Rule, ...]
    policy_header: bytes | None  # RateLimit-Policy (None: only concurrency caps)
    by_ip: bool  # some rule keys by address: it is needed even for an identified caller


def compile_routes(settings: Settings) -> tuple[RouteLimits | None, ...] | None:
    """Per route index, its limits (None: unlimited); None when no rule exists at all, so the
    pipeline pays one attribute test per request."""
    if not settings.rate_limits:
        return None
    out: list[RouteLimits | None] = []
    for route in settings.routes:
        rules = [Rule.of(r) for r in settings.rate_limits if r.applies_to(route)]
        if not rules:
            out.append(None)
            continue
        windowed = tuple(r for r in rules if r.limit)
        policy = ", ".join(f'"{r.name}";q={r.limit};w={r.window_s}' for r in windowed)
        out.append(
            RouteLimits(
                windowed=windowed,
                capped=tuple(r for r in rules if r.concurrent),
                policy_header=policy.encode() if policy else None,
                by_ip=any(r.by_ip for r in rules),
            )
        )
    return tuple(out)


def state_item(rule: Rule, remaining: int, reset_s: float) -> str:
    """One rule's item of the `RateLimit` field."""
    return f'"{rule.name}";r={max(remaining, 0)};t={whole_seconds(reset_s)}'


def whole_seconds(seconds: float) -> int:
    """Rounded up: a client that waits this long is not refused for being early."""
    whole = int(seconds)
    return whole + 1 if seconds > whole else whole
