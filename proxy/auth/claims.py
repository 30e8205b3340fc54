"""Authorization by claim (`routes[].require_claims`): groups, tenants, roles beyond scopes.

A rule maps a claim to a string (the claim must equal it) or to a list (the claim, a string or a
list of strings, must hold one of its values). Every rule of a route must hold; a miss is 403
`forbidden`, reason `claim_mismatch`, naming the claim but never its value (a token's claims are
the caller's, not the response's). A claim name with dots reaches into nested objects when no
top-level claim has that exact name (`realm_access.roles`). Only strings match: a number or a
boolean claim never equals a configured string, so a type surprise denies rather than allows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import ClaimMap
from ..errors import Forbidden
from ..identity import Identity

_ABSENT = object()


def _lookup(claims: Mapping[str, Any], name: str) -> Any:
    value = claims.get(name, _ABSENT)
    if value is not _ABSENT or "." not in name:
        return value
    node: Any = claims
    for part in name.split("."):
        if not isinstance(node, Mapping):
            return _ABSENT
        node = node.get(part, _ABSENT)
        if node is _ABSENT:
            return _ABSENT
    return node


def claim_holds(claims: Mapping[str, Any], name: str, wanted: str | tuple[str, ...]) -> bool:
    """Does the claim `name` satisfy one rule?"""
    value = _lookup(claims, name)
    if isinstance(wanted, str):
        return isinstance(value, str) and value == wanted
    if isinstance(value, str):
        return value in wanted
    if isinstance(value, list):
        return any(isinstance(v, str) and v in wanted for v in value)
    return False


def failed_claim(identity: Identity, rules: ClaimMap) -> tuple[str, bool] | None:
    """The first rule the identity fails, as (claim, whether the claim was there at all)."""
    claims = identity.claims or {}
    for name, wanted in rules.items():
        if not claim_holds(claims, name, wanted):
            return name, _lookup(claims, name) is not _ABSENT
    return None


def require_claims(identity: Identity, rules: ClaimMap) -> None:
    """Raise 403 `claim_mismatch` unless every rule holds."""
    failed = failed_claim(identity, rules)
    if failed is not None:
        name, present = failed
        why = "does not match" if present else "is missing"
        raise Forbidden(
            f"claim {name!r} {why} what this route requires",
            details={"reason": "claim_mismatch", "claim": name},
        )


def describe(rules: ClaimMap) -> str:
    """The rules in words, for `explain` and `coverage`."""
    parts = []
    for name, wanted in rules.items():
        if isinstance(wanted, str):
            parts.append(f"{name} = {wanted!r}")
        else:
            parts.append(f"{name} in [{', '.join(repr(w) for w in wanted)}]")
    return ", ".join(parts)
