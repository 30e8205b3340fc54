"""Revoked API keys and JWT ids, as every request checks them: a local lookup, fed by the store.

`authproxy revoke` writes a revocation to the state backend (Redis: a deny list plus a pub/sub
message to every sidecar; memory: the sidecar's admin listener). Each sidecar keeps the set in
memory, so a request pays a dictionary lookup (and nothing while the set is empty), and the check
runs after authentication: a token already in the verified-token cache is refused too.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ..errors import Unauthorized
from ..identity import Identity

log = logging.getLogger("authproxy.state")

Kind = Literal["key", "jti"]


@dataclass(frozen=True, slots=True)
class Revocation:
    """One revoked API key id or JWT id, until a Unix time (None: for good)."""

    kind: Kind
    value: str
    until: float | None = None

    @property
    def field(self) -> str:
        """Its name in the Redis deny list."""
        return f"{self.kind}:{self.value}"

    def encode(self) -> str:
        return json.dumps({"kind": self.kind, "value": self.value, "until": self.until})

    @classmethod
    def decode(cls, text: str | bytes) -> Revocation:
        """From `encode`'s text; `ValueError` for anything else."""
        try:
            data = json.loads(text)
            kind, value, until = data["kind"], data["value"], data["until"]
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"not a revocation: {exc}") from None
        if kind not in ("key", "jti") or not isinstance(value, str) or not value:
            raise ValueError("not a revocation: bad kind or value")
        if until is not None and not isinstance(until, int | float):
            raise ValueError("not a revocation: bad until")
        return cls(kind, value, None if until is None else float(until))


class Revocations:
    """The revocations this sidecar knows of; `check` refuses a revoked identity with 401."""

    def __init__(self, on_revoked: Callable[[Revocation], None] | None = None) -> None:
        self._keys: dict[str, float] = {}  # API key id -> until (inf: for good)
        self._jtis: dict[str, float] = {}
        self._on_revoked = on_revoked
        # Anything revoked; false, a request skips the check altogether (an attribute, not a
        # property: it is read on every request).
        self.active = False

    def __len__(self) -> int:
        return len(self._keys) + len(self._jtis)

    def apply(self, revocation: Revocation) -> None:
        """Remember `revocation` and end what it names (open WebSockets: 4403)."""
        until = math.inf if revocation.until is None else revocation.until
        if until <= time.time():
            return
        table = self._keys if revocation.kind == "key" else self._jtis
        known = table.get(revocation.value)
        table[revocation.value] = until
        self.active = True
        if known == until:
            return  # heard again (a resubscription reloads the deny list): nothing new to end
        if known is None:
            log.info(
                "state: %s revoked",
                "API key" if revocation.kind == "key" else "token",
                extra={
                    "fields": {
                        "event": "revoked",
                        "kind": revocation.kind,
                        # A key id is a name, not a secret; a jti neither (it only identifies).
                        "id": revocation.value,
                        "until": revocation.until,
                    }
                },
            )
        if self._on_revoked is not None:
            try:
                self._on_revoked(revocation)
            except Exception:
                log.exception("state: ending what a revocation names failed")

    def check(self, identity: Identity) -> None:
        """Raise 401 when `identity`'s key or token is revoked."""
        value: str | None
        if identity.method == "api_key":
            table, value = self._keys, identity.credential_id or identity.subject
        else:
            table, value = self._jtis, identity.token_id
        if value is None:
            return
        until = table.get(value)
        if until is None:
            return
        if until <= time.time():
            del table[value]
            self.active = bool(self._keys or self._jtis)
            return
        raise Unauthorized(
            "this credential has been revoked",
            details={"reason": "revoked", "method": identity.method},
            bearer=identity.method != "api_key",  # JWTs and opaque bearer tokens alike
        )
