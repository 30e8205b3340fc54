"""The `api_key` method: a key in the configured header (`auth.api_keys.header`), or in the
`api_key` query parameter of a WebSocket handshake (a browser cannot set headers there). Two
different keys are ambiguous and refused. The key set itself, its reloads and revocations, is
`apikeys.ApiKeyStore`.
"""

from __future__ import annotations

import re

import aiohttp

from ..config import AuthSettings, Settings
from ..identity import Identity
from ..telemetry.metrics import Metrics
from .apikeys import ApiKey, ApiKeyStore
from .method import Found, MethodSpec, Presented, fingerprint, settle
from .rejected import Rejected

NAME = "api_key"
_MAX_IDENTITIES = 4096

_API_KEY_CHARS = re.compile(r"[\x21-\x7e]+")


class ApiKeyLocator:
    """Finds the API key of one request; the header name is prepared once."""

    name = NAME
    also_reads: tuple[bytes, ...] = ()
    query_params = (b"api_key",)
    subprotocol_prefixes: tuple[str, ...] = ()

    def __init__(self, auth: AuthSettings) -> None:
        self.consumes = (auth.api_keys.header.lower().encode("latin-1"),)

    def extract(self, presented: Presented, *, websocket: bool) -> Found:
        keys: list[tuple[str, str]] = []
        problem: str | None = None
        for _, value in presented.headers:
            key = value.decode("latin-1").strip(" \t")
            if not key:
                problem = "empty API key"
            elif not _API_KEY_CHARS.fullmatch(key):
                problem = "malformed API key"
            else:
                keys.append(("header", key))
        if websocket:
            for _, text in presented.query:
                if text and _API_KEY_CHARS.fullmatch(text):
                    keys.append(("query", text))
                elif text:
                    problem = "malformed API key"
        return settle(keys, problem, None, "two API keys")


class ApiKeyMethod:
    """API keys, as one method of a route's chain."""

    name = NAME
    bearer_challenge = False

    def __init__(
        self, settings: Settings, metrics: Metrics, session: aiohttp.ClientSession
    ) -> None:
        self.store = ApiKeyStore(settings.auth.api_keys, metrics)
        self.asks_for = f"an API key ({settings.auth.api_keys.header})"
        # One Identity per key, as a cached token has one: what is derived from it (the
        # upstream's identity headers, relay/headers.py) is then made once, not per request.
        # Keyed by the key's hash, and only while the store still holds that very key (a reload
        # that changes it makes a new one). Bounded: reloads can leave entries behind.
        self._identities: dict[str, tuple[ApiKey, Identity]] = {}

    @property
    def ready(self) -> bool:
        return True  # the key set is read in the constructor

    def found(self, credential: Found) -> str | None:
        if credential.problem is not None:
            return f"an unusable API key ({credential.problem})"
        if credential.value is not None:
            return f"an API key from the {credential.source} ({fingerprint(credential.value)})"
        return None

    async def authenticate(self, credential: Found) -> Identity:
        if credential.value is None:
            raise Rejected("malformed_credentials", credential.problem or "no key")
        key = self.store.lookup(credential.value)  # unknown, disabled, expired: refused here
        known = self._identities.get(key.sha256)
        if known is not None and known[0] is key:
            return known[1]
        identity = Identity(
            method="api_key",
            subject=key.id,
            scopes=key.scopes,
            issuer=None,
            expires_at=key.expires_at,
            credential_id=key.id,
            claims=key.claims,
        )
        if len(self._identities) >= _MAX_IDENTITIES:
            self._identities.clear()
        self._identities[key.sha256] = (key, identity)
        return identity

    async def start(self) -> None:
        await self.store.start()

    async def stop(self) -> None:
        await self.store.stop()

    def reload(self) -> None:
        self.store.reload()


METHOD: MethodSpec = MethodSpec(NAME, ApiKeyLocator, ApiKeyMethod)
