"""The rate-limit stage: a route's `[[rate_limits]]` rules against the caller, through the store.

Every matching rule applies and the strictest refusal wins (the longest Retry-After). A rule
keys by identity (JWT issuer and `sub`, API key id; anonymous requests by client address) or by
client address (`server.trusted_proxies` honoured). Windows are checked first, then concurrency
slots are taken; a slot is given back when the request or WebSocket session ends, however it ends.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..errors import RateLimited, ServiceUnavailable
from ..identity import Identity
from ..telemetry.metrics import Metrics
from .rules import RouteLimits, Rule, compile_routes, state_item, whole_seconds
from .store import Slots, StateUnavailable, Store

log = logging.getLogger("authproxy.state")


@dataclass(slots=True)
class Admission:
    """What an admitted request carries: its RateLimit headers and the slots it holds."""

    headers: list[tuple[bytes, bytes]]
    slots: Slots | None = None
    session: Slots | None = (
        None  # the WebSocket's slot under websocket.max_connections_per_identity
    )


class Limiter:
    """The `[[rate_limits]]` rules of every route, over one store."""

    def __init__(self, settings: Settings, metrics: Metrics, store: Store) -> None:
        # None when no rule exists: the pipeline then never calls in.
        self.routes = compile_routes(settings)
        self.store = store
        self._deny = settings.state.on_error == "deny"
        self._refusals: dict[tuple[str, str], Any] = {
            (r.name, kind): metrics.rate_limited.labels(r.name, kind)
            for r in settings.rate_limits
            for kind in ("rate", "concurrency")
        }
        self._fallbacks = {o: metrics.state_fallbacks.labels(o) for o in ("allow", "deny")}
        # With a shared store, `websocket.max_connections_per_identity` holds across every sidecar
        # and worker on it (the registry's own count stays, per process, beneath it).
        cap = settings.websocket.max_connections_per_identity
        self.session_cap = Rule(_SESSION_RULE, False, 0, 1, cap) if store.shared and cap else None

    async def admit_session(self, admission: Admission, identity: Identity) -> None:
        """Take the identity's WebSocket slot across the store, or raise 429 as the registry
        does (503 with `on_error = "deny"` while the store cannot answer)."""
        rule = self.session_cap
        assert rule is not None
        try:
            got = await self.store.acquire([rule], [_key(rule, identity, None)])
        except StateUnavailable:
            self._unavailable()
            return
        if isinstance(got, Rule):
            raise RateLimited(
                "too many WebSocket connections for this identity",
                details={"reason": "websocket_identity_limit", "limit": rule.concurrent},
                headers={"Retry-After": "5"},
            )
        admission.session = got

    async def admit(
        self, limits: RouteLimits, identity: Identity | None, address: str | None
    ) -> Admission:
        """Count the request under each rule, or raise 429 (503 with `on_error = "deny"` while
        the store cannot answer)."""
        admission = Admission([])
        if limits.windowed:
            keys = [_key(rule, identity, address) for rule in limits.windowed]
            try:
                result = await self.store.hit(limits.windowed, keys)
            except StateUnavailable:
                self._unavailable()
            else:
                assert limits.policy_header is not None
                state = ", ".join(state_item(*s) for s in result.states).encode()
                admission.headers = [
                    (b"ratelimit-policy", limits.policy_header),
                    (b"ratelimit", state),
                ]
                if result.refused is not None:
                    rule = result.refused
                    self._refusals[(rule.name, "rate")].inc()
                    raise RateLimited(
                        f"rate limit {rule.name!r} exceeded: {rule.limit} per {rule.window_s} s",
                        details={
                            "reason": "rate_limit",
                            "rule": rule.name,
                            "limit": rule.limit,
                            "window_s": rule.window_s,
                        },
                        headers={
                            "Retry-After": str(max(whole_seconds(result.retry_after_s), 1)),
                            "RateLimit-Policy": limits.policy_header.decode(),
                            "RateLimit": state.decode(),
                        },
                    )
        if limits.capped:
            keys = [_key(rule, identity, address) for rule in limits.capped]
            try:
                got = await self.store.acquire(limits.capped, keys)
            except StateUnavailable:
                self._unavailable()
            else:
                if isinstance(got, Rule):
                    self._refusals[(got.name, "concurrency")].inc()
                    headers = {"Retry-After": "1"}
                    headers.update((k.decode(), v.decode()) for k, v in admission.headers)
                    raise RateLimited(
                        f"concurrency limit {got.name!r} reached: {got.concurrent} at once",
                        details={
                            "reason": "concurrency_limit",
                            "rule": got.name,
                            "concurrent": got.concurrent,
                        },
                        headers=headers,
                    )
                admission.slots = got
        return admission

    def release(self, admission: Admission) -> None:
        """Give back the slots `admission` holds (idempotent)."""
        if admission.slots is not None:
            slots, admission.slots = admission.slots, None
            self.store.release(slots)
        if admission.session is not None:
            session, admission.session = admission.session, None
            self.store.release(session)

    def _unavailable(self) -> None:
        if self._deny:
            self._fallbacks["deny"].inc()
            raise ServiceUnavailable(
                "the shared rate-limit state is unavailable",
                details={"reason": "state_unavailable"},
            )
        self._fallbacks["allow"].inc()


_SESSION_RULE = "websocket-identity"


def client_key(address: str | None) -> str:
    """What an address is counted as: itself for IPv4, its /64 for IPv6 (one subscriber holds
    a whole /64 and could otherwise take a fresh bucket per address)."""
    if not address:
        return "-"
    if ":" not in address:
        return address
    try:
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    except ValueError:
        return address


def _key(rule: Rule, identity: Identity | None, address: str | None) -> str:
    if identity is None or rule.by_ip:
        return f"{rule.name}|ip:{client_key(address)}"
    if identity.method == "api_key":
        return f"{rule.name}|key:{identity.credential_id or identity.subject}"
    return f"{rule.name}|jwt:{identity.issuer or ''} {identity.subject}"
