"""A provider's keys from `jwks_file` or `public_key_file` (re-read on SIGHUP), or the HS secret of
`secret_env` (read once: a running process's environment does not change).

At start-up a key that cannot be loaded is a `ConfigError` naming its config key. On a reload, a
file that cannot be read or parsed keeps the keys in use and logs one line; a file that can is
swapped in whole, and the old and new sets go to `on_change`, which works out what was withdrawn.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from ..config import JwtProviderSettings
from ..errors import ConfigError
from .keys import KeyError_, KeySet, hmac_key, load_pem, parse_jwks

log = logging.getLogger("authproxy.auth")

_MAX_FILE_BYTES = 4 * 1024 * 1024


def load_keys(index: int, p: JwtProviderSettings) -> KeySet:
    """Keys from the environment or a file; problems are `ConfigError`s naming the key."""
    allowed = frozenset(p.algorithms)
    prefix = f"auth.jwt.providers[{index}]"
    if p.secret_env is not None:
        secret = os.environ.get(p.secret_env)
        if not secret:
            raise ConfigError(
                f"{prefix}.secret_env", f"environment variable {p.secret_env!r} is not set or empty"
            )
        try:
            return KeySet.of([hmac_key(secret.encode("utf-8"), allowed)])
        except KeyError_ as exc:
            raise ConfigError(f"{prefix}.secret_env", str(exc)) from None
    path = p.public_key_file or p.jwks_file
    key = f"{prefix}.{'public_key_file' if p.public_key_file else 'jwks_file'}"
    assert path is not None
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE_BYTES)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    try:
        if p.public_key_file:
            return KeySet.of([load_pem(data, allowed)])
        keys, skipped = parse_jwks(data, allowed)
    except KeyError_ as exc:
        raise ConfigError(key, f"{path}: {exc}") from None
    for line in skipped:
        log.warning("provider %r: %s: skipped %s", p.name, path, line)
    return keys


class FileKeys:
    """One provider's keys from a file or the environment: replaced only by `reload()`."""

    unavailable = False  # read from disk: never stale

    def __init__(
        self,
        index: int,
        provider: JwtProviderSettings,
        on_change: Callable[[KeySet | None, KeySet], None] | None = None,
    ) -> None:
        self._index = index
        self._provider = provider
        self._on_change = on_change
        self._keys = load_keys(index, provider)

    def current(self) -> KeySet:
        return self._keys

    async def refresh_for_unknown_kid(self) -> None:
        return None  # only a reload changes a file's keys

    def reload(self) -> None:
        """Re-read the file (SIGHUP); one that cannot be read or parsed keeps the old keys."""
        if self._provider.secret_env is not None:
            return
        try:
            keys = load_keys(self._index, self._provider)
        except ConfigError as exc:
            log.error("provider %r: keeping the old keys: %s", self._provider.name, exc)
            return
        old, self._keys = self._keys, keys
        if self._on_change is not None:
            self._on_change(old, keys)
