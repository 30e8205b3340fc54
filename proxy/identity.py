"""Who the caller is, as decided by authentication; travels through the pipeline unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller."""

    # "introspection": an opaque bearer token an RFC 7662 endpoint vouched for.
    method: Literal["jwt", "api_key", "introspection"]
    subject: str
    scopes: frozenset[str] = frozenset()
    issuer: str | None = None
    # Unix time after which the credential is no longer valid (JWT `exp`, API key `expires`).
    expires_at: float | None = None
    # The JWT provider's name or the API key's id: what a revocation is announced under.
    credential_id: str | None = None
    # JWT: the fingerprint of the provider's key that verified the signature (not the `kid`: a
    # kid may be reused for a new key). A WebSocket opened with it ends when that key leaves the
    # provider's key set.
    signing_key: str | None = None
    # Extra upstream headers mapped from claims (`claim_headers`), already validated names.
    claim_headers: tuple[tuple[str, str], ...] = ()
    # How long past `expires_at` the credential is still accepted (a JWT provider's `leeway_s`),
    # folded in by the method that authenticated it.
    leeway_s: float = 0.0
    # The claims `routes[].require_claims` judges: a JWT's (or introspection answer's) payload,
    # an API key's configured `claims`. Never sent upstream, never logged.
    claims: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    # JWT: its `jti` claim, when a string: what `authproxy revoke --jti` names.
    token_id: str | None = None

    @property
    def valid_until(self) -> float | None:
        """Unix time the credential stops being accepted (None: never); a WebSocket
        authenticated with it is closed then."""
        return None if self.expires_at is None else self.expires_at + self.leeway_s
