"""Streamed responses bound to the credential that opened them.

A Server-Sent Events stream or any body still flowing outlives no credential: when its JWT expires
(plus the provider's leeway), its API key is revoked or the key that signed its token is withdrawn,
the forwarder is told (`on_end("auth_expired" | "auth_revoked")`) and ends the stream (relay/http.py
says how). Only responses that stream are bound, and only when their credential can end: an answer
read whole, or one on a public route, costs nothing here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ..identity import Identity
from .ws_registry import SigningKey, revocable_key, signing_key, unindex

AUTH_EXPIRED = "auth_expired"
AUTH_REVOKED = "auth_revoked"


class Stream:
    """One bound response: whom to tell, and its expiry timer."""

    __slots__ = ("identity", "on_end", "timer", "ended")

    def __init__(self, identity: Identity, on_end: Callable[[str], None]) -> None:
        self.identity = identity
        self.on_end = on_end
        self.timer: asyncio.TimerHandle | None = None
        self.ended: str | None = None

    def end(self, why: str) -> None:
        if self.ended is None:
            self.ended = why
            self.on_end(why)


class StreamRegistry:
    """Every bound stream of a process, indexed as revocations and withdrawals name them."""

    def __init__(self, revoked: Callable[[Identity], bool] | None = None) -> None:
        # Whether a credential was revoked (`authproxy revoke`) while its answer was on its way:
        # the stream is bound only once its head is back, and must not outlive that revocation.
        self._revoked = revoked
        self._streams: set[Stream] = set()
        self._by_key: dict[str, set[Stream]] = {}
        self._by_signing_key: dict[SigningKey, set[Stream]] = {}

    def bind(self, identity: Identity, on_end: Callable[[str], None]) -> Stream | None:
        """Watch a streamed response; None when its credential cannot end (nothing to watch)."""
        valid_until = identity.valid_until
        key, signer = revocable_key(identity), signing_key(identity)
        if valid_until is None and key is None and signer is None and identity.token_id is None:
            return None
        s = Stream(identity, on_end)
        self._streams.add(s)
        if valid_until is not None:
            delay = max(valid_until - time.time(), 0.0)
            s.timer = asyncio.get_running_loop().call_later(delay, s.end, AUTH_EXPIRED)
        if key is not None:
            self._by_key.setdefault(key, set()).add(s)
        if signer is not None:
            self._by_signing_key.setdefault(signer, set()).add(s)
        if self._revoked is not None and self._revoked(identity):
            s.end(AUTH_REVOKED)
        return s

    def release(self, s: Stream) -> None:
        """The stream is over, however it ended."""
        if s.timer is not None:
            s.timer.cancel()
        self._streams.discard(s)
        unindex(self._by_key, revocable_key(s.identity), s)
        unindex(self._by_signing_key, signing_key(s.identity), s)

    def revoke_api_key(self, key_id: str) -> None:
        for s in list(self._by_key.get(key_id, ())):
            s.end(AUTH_REVOKED)

    def rejudge(self, untrusted: Callable[[Identity], bool]) -> int:
        """After a reload: end (revoked) every stream whose credential the new policy no longer
        trusts; how many."""
        ended = [s for s in self._streams if untrusted(s.identity)]
        for s in ended:
            s.end(AUTH_REVOKED)
        return len(ended)

    def revoke_token(self, jti: str) -> None:
        """`authproxy revoke --jti`: rare, so a scan rather than one more index per stream."""
        for s in [s for s in self._streams if s.identity.token_id == jti]:
            s.end(AUTH_REVOKED)

    def withdraw_signing_keys(self, provider: str, fingerprints: frozenset[str]) -> None:
        for fingerprint in fingerprints:
            for s in list(self._by_signing_key.get((provider, fingerprint), ())):
                s.end(AUTH_REVOKED)
