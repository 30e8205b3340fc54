"""Verified JWTs by their SHA-256, until their `exp`: a busy client's repeated token costs one
dictionary lookup instead of a signature check.

Least recently used first out once `auth.jwt.cache_size` is reached (0: no cache). Only verdicts
are kept, never refusals. When a signing key is withdrawn, the verdicts it produced are dropped:
a key that left its provider's set may have leaked, so what it signed is not honoured until `exp`.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from ..identity import Identity
from ..telemetry.metrics import Metrics
from ..telemetry.tally import Tally


class TokenCache:
    """The verified-token LRU of all providers."""

    def __init__(self, size: int, metrics: Metrics) -> None:
        self._size = size
        self._entries: OrderedDict[bytes, tuple[Identity, float]] = OrderedDict()
        # Metric children bound once: labels() per request costs more than inc().
        self._hits = Tally(metrics.jwt_cache.labels("hit"))
        self._misses = Tally(metrics.jwt_cache.labels("miss"))

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes) -> Identity | None:
        """The identity a token (by its SHA-256) was verified as, while before its `exp`."""
        if not self._size:
            return None
        hit = self._entries.get(digest)
        if hit is not None:
            if time.time() < hit[1]:
                self._entries.move_to_end(digest)
                self._hits.add()
                return hit[0]
            del self._entries[digest]
        self._misses.add()
        return None

    def put(self, digest: bytes, identity: Identity) -> None:
        """Keep a verdict until the token's `exp` (one already past it is not kept)."""
        exp = identity.expires_at
        if self._size and exp is not None and time.time() < exp:
            self._entries[digest] = (identity, exp)
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def drop(self, provider: str, keys: frozenset[str]) -> None:
        """Forget the verdicts of `provider` that its signing `keys` (fingerprints) produced."""
        for digest in [
            digest
            for digest, (identity, _) in self._entries.items()
            if identity.credential_id == provider and identity.signing_key in keys
        ]:
            del self._entries[digest]

    def drop_provider(self, provider: str) -> None:
        """Forget every verdict of `provider` (its keys became too stale to vouch for them)."""
        for digest in [
            digest
            for digest, (identity, _) in self._entries.items()
            if identity.credential_id == provider and identity.method == "jwt"
        ]:
            del self._entries[digest]
