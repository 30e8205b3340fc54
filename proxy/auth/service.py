"""The auth stage as the pipeline sees it: extract credentials, run the route's chain, reload keys.

Everything that can be decided at start-up is: every registered method is built in the constructor
with its keys (a missing HS secret or a bad key file is a `ConfigError` there), JWKS are first
fetched in `start()` (readiness waits for them), and a request only looks things up.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp

from ..config import JwtProviderSettings, Settings
from ..identity import Identity
from ..telemetry.metrics import Metrics
from . import api_key, jwt
from .apikeys import ApiKeyStore
from .chain import Chain
from .extractor import Extractor
from .jwt import JwtVerifier
from .method import Method
from .registry import METHODS, locators


def _trust(p: JwtProviderSettings) -> dict[str, object]:
    """What decides which tokens a provider accepts (not its cache or refresh timings)."""
    return p.model_dump(
        include={
            "issuer",
            "audiences",
            "algorithms",
            "jwks_url",
            "jwks_file",
            "public_key_file",
            "secret_env",
            "required_claims",
            "typ",
            "scope_claim",
            "max_lifetime_s",
            "introspection_url",
            "introspection_client_id",
        }
    )


class AuthService:
    """Authentication and scope policy for every route; owns the key caches."""

    def __init__(
        self, settings: Settings, metrics: Metrics, session: aiohttp.ClientSession
    ) -> None:
        self.extractor = Extractor(locators(settings.auth))
        self.methods: dict[str, Method] = {
            m.name: m.build(settings, metrics, session) for m in METHODS
        }
        self.chain = Chain(self.methods, metrics)
        # The request path's two calls, bound once to the compiled extractor's and chain's own
        # methods (a method of this interpreted class around them is a frame on every request).
        # `extract(headers, query_string, *, websocket)`: the request's credentials.
        # `authenticate(route, credentials, trace=None)`: the caller's identity, None when
        # anonymous is allowed; raises 401/403 otherwise (and 400 for a query that hides a
        # credential behind a `;`, on every route).
        self.extract = self.extractor.extract
        self.authenticate = self.chain.run

    @property
    def jwt(self) -> JwtVerifier:
        """The `jwt` method's verifier: its providers and JWKS caches (for explain and tests)."""
        method = self.methods[jwt.NAME]
        assert isinstance(method, jwt.JwtMethod)
        return method.verifier

    @property
    def api_keys(self) -> ApiKeyStore:
        """The `api_key` method's key set."""
        method = self.methods[api_key.NAME]
        assert isinstance(method, api_key.ApiKeyMethod)
        return method.store

    async def start(self) -> None:
        """First JWKS fetch of every provider (failures logged), then the background tasks."""
        for method in self.methods.values():
            await method.start()

    async def stop(self) -> None:
        for method in self.methods.values():
            await method.stop()

    @property
    def ready(self) -> bool:
        """Every method has its keys (every JWKS provider a usable key set)."""
        return all(method.ready for method in self.methods.values())

    def reload_keys(self) -> None:
        """SIGHUP: re-read JWT key files and `keys_file`; a bad file keeps the old set."""
        for method in self.methods.values():
            method.reload()

    def still_trusts(self, identity: Identity, previous: AuthService) -> str | None:
        """After a reload built this service in place of `previous`: why a credential that
        `previous` accepted (an open WebSocket's) is not trusted here, or None when it is."""
        if identity.method == api_key.NAME:
            key_id = identity.credential_id
            now = self.api_keys.active().get(key_id or "")
            if now is None or now != previous.api_keys.active().get(key_id or ""):
                return "api_key_revoked"  # removed, disabled, expired or given another secret
            return None
        provider = self.jwt.provider(identity.credential_id)
        before = previous.jwt.provider(identity.credential_id)
        if provider is None or before is None:
            return "provider_removed"
        if _trust(provider.settings) != _trust(before.settings):
            return "provider_changed"
        keys = provider.keys.current() if identity.signing_key is not None else None
        if keys is not None and identity.signing_key not in keys.fingerprints():
            return "signing_key_withdrawn"
        return None

    def subscribe_revocations(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """`callback(key_id)` whenever an API key stops being usable; returns an unsubscribe."""
        return self.api_keys.subscribe(callback)

    def subscribe_key_withdrawals(
        self, callback: Callable[[str, frozenset[str]], None]
    ) -> Callable[[], None]:
        """`callback(provider, fingerprints)` whenever signing keys leave a JWT provider's set
        (a JWKS refresh or a key file reload; never a failed fetch); returns an unsubscribe."""
        return self.jwt.subscribe_withdrawals(callback)
