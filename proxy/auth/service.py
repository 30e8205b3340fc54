"""The auth stage as the pipeline sees it: extract credentials, run the route's chain, reload keys.

Everything that can be decided at start-up is: providers, key sources and the API key set are
built in the constructor (a missing HS secret or a bad key file is a `ConfigError` there), JWKS
are first fetched in `start()` (readiness waits for them), and a request only looks things up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import aiohttp

from ..config import RouteSettings, Settings
from ..errors import BadRequest
from ..identity import Identity
from ..telemetry.metrics import Metrics
from .apikeys import ApiKeyStore
from .chain import ApiKeyMethod, Attempt, Chain, JwtMethod, Method
from .extractor import Credentials, Extractor
from .jwt import JwtVerifier

log = logging.getLogger("authproxy.auth")


class AuthService:
    """Authentication and scope policy for every route; owns the key caches."""

    def __init__(
        self, settings: Settings, metrics: Metrics, session: aiohttp.ClientSession
    ) -> None:
        self.settings = settings
        self.extractor = Extractor(settings.auth)
        self.jwt = JwtVerifier(settings.auth.jwt, metrics, session)
        self.api_keys = ApiKeyStore(settings.auth.api_keys, metrics)
        methods: dict[str, Method] = {
            "jwt": JwtMethod(self.jwt),
            "api_key": ApiKeyMethod(self.api_keys),
        }
        self._chain = Chain(methods, metrics, settings.auth.api_keys.header)

    async def start(self) -> None:
        """First JWKS fetch of every provider (failures logged), then the background tasks."""
        await self.jwt.start()
        await self.api_keys.start()

    async def stop(self) -> None:
        await self.jwt.stop()
        await self.api_keys.stop()

    @property
    def ready(self) -> bool:
        """Every JWKS provider has a usable key set."""
        return self.jwt.ready

    def extract(
        self, headers: list[tuple[bytes, bytes]], query_string: bytes, *, websocket: bool
    ) -> Credentials:
        return self.extractor.extract(headers, query_string, websocket=websocket)

    async def authenticate(
        self, route: RouteSettings, credentials: Credentials, trace: list[Attempt] | None = None
    ) -> Identity | None:
        """The caller's identity, None when anonymous is allowed; raises 401/403 otherwise (and
        400 for a query that hides a credential behind a `;`, on every route)."""
        if credentials.query_refusal is not None:
            raise BadRequest(credentials.query_refusal, details={"reason": "credential_in_query"})
        return await self._chain.run(route, credentials, trace)

    def reload_keys(self) -> None:
        """SIGHUP: re-read `keys_file` and JWT key files; a bad file keeps the old set."""
        self.api_keys.reload()
        self.jwt.reload_files()

    def subscribe_revocations(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """`callback(key_id)` whenever an API key stops being usable; returns an unsubscribe."""
        return self.api_keys.subscribe(callback)

    def subscribe_key_withdrawals(
        self, callback: Callable[[str, frozenset[str]], None]
    ) -> Callable[[], None]:
        """`callback(provider, fingerprints)` whenever signing keys leave a JWT provider's set
        (a JWKS refresh or a key file reload; never a failed fetch); returns an unsubscribe."""
        return self.jwt.subscribe_withdrawals(callback)
