"""Authorization by scope: every scope a route lists is required (403 otherwise, RFC 6750)."""

from __future__ import annotations

from ..config import RouteSettings
from ..errors import InsufficientScope
from ..identity import Identity


def missing_scopes(identity: Identity, route: RouteSettings) -> list[str]:
    """The route's required scopes the identity lacks, in the route's order."""
    return [s for s in route.scopes if s not in identity.scopes]


def require_scopes(identity: Identity, route: RouteSettings, *, bearer: bool) -> None:
    """Raise `InsufficientScope` (403, `error="insufficient_scope"`) if any is missing; with
    `bearer` (the route uses a Bearer method) it carries the RFC 6750 challenge."""
    missing = missing_scopes(identity, route)
    if missing:
        raise InsufficientScope(missing, list(route.scopes), bearer=bearer)
