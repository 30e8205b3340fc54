"""API keys: stored and looked up only as SHA-256, reloadable without a restart.

A presented key is hashed and the digest looked up in a dict. Timing cannot leak a stored key: what
an attacker controls is the input of SHA-256, and learning anything about how a guess's digest
compares with stored digests does not help to find a preimage. The set is inline keys plus
`keys_file` (TOML `[[keys]]`, the same shape), and is swapped atomically on `reload()` (SIGHUP) or
when the file changes; a bad file keeps the old set. When a key stops being usable — removed,
disabled, its secret replaced, or its `expires` passed — subscribers hear its id, so open WebSockets
authenticated with it can be closed. Only key ids are ever logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ..config import ApiKeySettings, ApiKeysSettings, describe_validation_error, read_toml
from ..errors import ConfigError
from ..telemetry.metrics import Metrics
from .rejected import Rejected

log = logging.getLogger("authproxy.auth")

MAX_KEY_CHARS = 4096
MIN_KEY_CHARS = 16  # `hash-key` refuses shorter keys: guessable, and new_key() gives 46
# A keys file holds `[[keys]]`; the config's own table name is accepted too, so the record
# `authproxy hash-key` prints by default can be appended to either file.
_KEYS_FILE_TABLES = ("keys", "auth")
INVALID_KEY = ("invalid_api_key", "invalid API key")  # what a client hears for every bad key
_MAX_TIMER_S = 60.0  # re-check expiries at least this often (wall clock may jump)


def new_key() -> str:
    """A fresh random API key (256 bits)."""
    return "ak_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The SHA-256 hex digest stored for `key`."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def key_record(
    key_id: str, key: str, *, table: str | None = None, scopes: Iterable[str] = ()
) -> str:
    """The TOML block for the config or `keys_file` (both read it; "keys" is the short table)."""
    if not key_id:
        raise ValueError("a key id is required")
    return (
        f"[[{table or 'auth.api_keys.keys'}]]\n"
        f"id = {json.dumps(key_id)}\n"
        f'sha256 = "{hash_key(key)}"\n'
        f"scopes = {json.dumps(list(scopes))}\n"
    )


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A configured key, as the store keeps it."""

    id: str
    sha256: str
    scopes: frozenset[str]
    expires_at: float | None
    disabled: bool
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def active(self, now: float) -> bool:
        return not self.disabled and (self.expires_at is None or now < self.expires_at)


def _file_signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def read_keys_file(path: str) -> tuple[ApiKeySettings, ...]:
    """Parse and validate a keys file; every problem is a `ConfigError` naming file and key."""
    data = read_toml(path)
    extra = sorted(set(data) - set(_KEYS_FILE_TABLES))
    if extra:
        raise ConfigError(f"{path}: {extra[0]}", "unknown key (the file holds only [[keys]])")
    items = data.get("keys", [])
    if not isinstance(items, list):
        raise ConfigError(f"{path}: keys", "expected [[keys]] tables")
    nested = data.get("auth", {})
    if nested:
        # [[auth.api_keys.keys]] records, as `hash-key` prints them for the config file.
        api_keys = nested.get("api_keys") if isinstance(nested, dict) else None
        more = api_keys.get("keys") if isinstance(api_keys, dict) else None
        if not isinstance(more, list) or len(nested) != 1 or len(api_keys or ()) != 1:
            raise ConfigError(
                f"{path}: auth", "only [[auth.api_keys.keys]] records may stand beside [[keys]]"
            )
        items = [*items, *more]
    out = []
    for i, item in enumerate(items):
        try:
            out.append(ApiKeySettings.model_validate(item))
        except ValidationError as exc:
            loc, msg = describe_validation_error(exc)
            key_id = item.get("id") if isinstance(item, dict) else None
            who = f" (key {key_id!r})" if isinstance(key_id, str) else ""
            raise ConfigError(
                f"{path}: keys[{i}]" + (f".{loc}" if loc else ""), msg + who
            ) from None
    return tuple(out)


def _build(
    inline: tuple[ApiKeySettings, ...], from_file: tuple[ApiKeySettings, ...], path: str | None
) -> dict[str, ApiKey]:
    by_hash: dict[str, ApiKey] = {}
    ids: set[str] = set()
    sources = [(f"auth.api_keys.keys[{i}]", k) for i, k in enumerate(inline)]
    sources += [(f"{path}: keys[{i}]", k) for i, k in enumerate(from_file)]
    for where, k in sources:
        if k.id in ids:
            raise ConfigError(f"{where}.id", f"the id {k.id!r} is used by another key")
        ids.add(k.id)
        if k.sha256 in by_hash:
            raise ConfigError(
                f"{where}.sha256", f"key {k.id!r} has the same key as {by_hash[k.sha256].id!r}"
            )
        by_hash[k.sha256] = ApiKey(
            id=k.id,
            sha256=k.sha256,
            scopes=frozenset(k.scopes),
            expires_at=k.expires.timestamp() if k.expires is not None else None,
            disabled=k.disabled,
            # Lists as JSON gives them, so a key's claims read exactly as a token's would.
            claims={c: v if isinstance(v, str) else list(v) for c, v in k.claims.items()},
        )
    return by_hash


class ApiKeyStore:
    """The current key set, its reloads and its revocation announcements."""

    def __init__(self, settings: ApiKeysSettings, metrics: Metrics) -> None:
        self._inline = settings.keys
        self._path = settings.keys_file
        self._interval = settings.watch_interval_s
        self._metrics = metrics
        self._subscribers: dict[int, Callable[[str], None]] = {}
        self._next_subscriber = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._changed: asyncio.Event | None = None
        self._file_sig = _file_signature(self._path) if self._path else None
        from_file = read_keys_file(self._path) if self._path else ()
        self._by_hash = _build(self._inline, from_file, self._path)
        self._active = self._active_now(time.time())  # id -> sha256 of keys usable right now
        if self._path:
            log.info(
                "api keys: %d key(s) (%d from %s)", len(self._by_hash), len(from_file), self._path
            )

    # -- lookups -----------------------------------------------------------------------------

    def lookup(self, presented: str) -> ApiKey:
        """The key `presented` names, if usable; otherwise `Rejected` with the reason."""
        if len(presented) > MAX_KEY_CHARS:
            raise Rejected("malformed", "API key too long")
        key = self._by_hash.get(hash_key(presented))
        # Unknown, disabled and expired look alike to the client: different answers would tell
        # whoever holds a leaked or retired key that it exists. The log keeps which, and the id.
        if key is None:
            raise Rejected("unknown_api_key", "unknown API key", client=INVALID_KEY)
        if key.disabled:
            raise Rejected(
                "api_key_disabled",
                f"API key {key.id!r} is disabled",
                client=INVALID_KEY,
                log_fields={"key_id": key.id},
            )
        if key.expires_at is not None and time.time() >= key.expires_at:
            raise Rejected(
                "api_key_expired",
                f"API key {key.id!r} has expired",
                client=INVALID_KEY,
                log_fields={"key_id": key.id},
            )
        return key

    def active(self) -> dict[str, str]:
        """Id -> SHA-256 of every key usable now."""
        return self._active_now(time.time())

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        return tuple(self._by_hash.values())

    # -- reloads and revocations -------------------------------------------------------------

    def subscribe(self, callback: Callable[[str], None]) -> Callable[[], None]:
        token = self._next_subscriber
        self._next_subscriber += 1
        self._subscribers[token] = callback

        def unsubscribe() -> None:
            self._subscribers.pop(token, None)

        return unsubscribe

    def reload(self) -> bool:
        """Re-read `keys_file`; on any problem keep the current set and log. True on success."""
        if not self._path:
            log.info("api keys: reload requested; no keys_file configured, nothing to reload")
            return True
        self._file_sig = _file_signature(self._path)
        try:
            from_file = read_keys_file(self._path)
            by_hash = _build(self._inline, from_file, self._path)
        except ConfigError as exc:
            self._metrics.api_key_reloads.labels("error").inc()
            log.error("api keys: reload failed, keeping the previous key set: %s", exc)
            return False
        self._by_hash = by_hash
        self._metrics.api_key_reloads.labels("ok").inc()
        log.info("api keys: reloaded %d key(s) from %s", len(by_hash), self._path)
        self._reconcile()
        if self._changed is not None:
            self._changed.set()
        return True

    def _active_now(self, now: float) -> dict[str, str]:
        return {k.id: k.sha256 for k in self._by_hash.values() if k.active(now)}

    def _reconcile(self) -> None:
        """Announce every key that was usable and is not any more (or has another secret now)."""
        active = self._active_now(time.time())
        revoked = [kid for kid, sha in self._active.items() if active.get(kid) != sha]
        self._active = active
        for key_id in revoked:
            log.info("api keys: key %r revoked (removed, disabled, replaced or expired)", key_id)
            for callback in list(self._subscribers.values()):
                try:
                    callback(key_id)
                except Exception:
                    log.exception("api keys: revocation callback failed for key %r", key_id)

    # -- background: file watcher and expiry timer --------------------------------------------

    async def start(self) -> None:
        self._changed = asyncio.Event()
        self._tasks.append(asyncio.create_task(self._expiry_timer(), name="apikeys:expiry"))
        if self._path and self._interval > 0:
            self._tasks.append(asyncio.create_task(self._watch(), name="apikeys:watch"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    async def _watch(self) -> None:
        assert self._path is not None
        while True:
            await asyncio.sleep(self._interval)
            if _file_signature(self._path) != self._file_sig:
                self.reload()

    async def _expiry_timer(self) -> None:
        assert self._changed is not None
        while True:
            self._reconcile()
            now = time.time()
            upcoming = [
                k.expires_at
                for k in self._by_hash.values()
                if k.expires_at is not None and k.expires_at > now and not k.disabled
            ]
            delay = min(min(upcoming, default=now + _MAX_TIMER_S) - now, _MAX_TIMER_S)
            self._changed.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # races with the event being set, and stop() would then wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(delay, 0.0) + 0.01):
                    await self._changed.wait()
