"""A provider's keys from its `jwks_url`, cached and refreshed (files and secrets: `key_files`).

The cache fetches at start-up (readiness waits for the first good set), refreshes in the
background on the `Cache-Control: max-age` the endpoint asks for (clamped to the provider's
`[jwks_min_refresh_s, jwks_refresh_s]`), and refreshes early when a token names an unknown `kid` —
at most once per `jwks_min_refresh_s`, and single-flight: however many requests ask at once, one
fetch runs and they all wait for it. A failed or garbage fetch keeps the last good set
(stale-if-error), flips `authproxy_jwks_stale` to 1 and logs one line.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable

import aiohttp

from ..config import JwtProviderSettings
from ..telemetry.metrics import Metrics
from .keys import KeyError_, KeySet, parse_jwks

log = logging.getLogger("authproxy.auth")

MAX_JWKS_BYTES = 1024 * 1024
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)\"?", re.IGNORECASE)
_NO_CACHE = re.compile(r"(?:^|[,\s])(?:no-store|no-cache)(?:$|[,\s=])", re.IGNORECASE)


class _FetchFailed(Exception):
    pass


def refresh_delay(cache_control: str | None, provider: JwtProviderSettings) -> float:
    """How long to keep a fetched set: the endpoint's max-age within the provider's bounds."""
    high = provider.jwks_refresh_s
    low = min(max(provider.jwks_min_refresh_s, 1.0), high)
    if cache_control:
        if _NO_CACHE.search(cache_control):
            return low
        m = _MAX_AGE.search(cache_control)
        if m:
            return min(max(float(m.group(1)), low), high)
    return high


def new_key_session() -> aiohttp.ClientSession:
    """The client for key fetches (JWKS): apart from the upstream pool, so a fetch never waits
    behind user traffic, and with nothing of the environment (no proxies, no cookies)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=8, ttl_dns_cache=60),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )


class JwksCache:
    """One provider's keys from its `jwks_url`."""

    def __init__(
        self,
        provider: JwtProviderSettings,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        on_change: Callable[[KeySet | None, KeySet], None] | None = None,
    ) -> None:
        assert provider.jwks_url is not None
        self.provider = provider
        self.url = provider.jwks_url
        self._session = session
        self._metrics = metrics
        self._on_change = on_change
        self._allowed = frozenset(provider.algorithms)
        self._timeout = aiohttp.ClientTimeout(total=provider.jwks_timeout_s)
        self._keys: KeySet | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._last_attempt = float("-inf")
        self._next_at = 0.0
        self._failures = 0
        self._task: asyncio.Task[None] | None = None
        self.stale = False
        self.last_error: str | None = None

    def current(self) -> KeySet | None:
        return self._keys

    @property
    def ready(self) -> bool:
        return self._keys is not None

    async def start(self) -> None:
        """The first fetch (a failure is logged, not raised), then the background refresher."""
        await self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"jwks:{self.provider.name}")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, self._inflight) if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._task = None
        self._inflight = None

    async def refresh(self) -> None:
        """Fetch now, or join the fetch already running (single-flight)."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._fetch())
        # shield: a request that gives up (client gone) must not cancel everyone's fetch.
        await asyncio.shield(self._inflight)

    async def refresh_for_unknown_kid(self) -> None:
        """A token named an unknown kid: refetch, at most once per `jwks_min_refresh_s`."""
        if self._inflight is not None and not self._inflight.done():
            await asyncio.shield(self._inflight)
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_attempt < self.provider.jwks_min_refresh_s:
            return
        await self.refresh()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            delay = self._next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the refresher die
                log.exception("jwks refresh for provider %r crashed", self.provider.name)
                self._next_at = loop.time() + self.provider.jwks_refresh_s

    async def _fetch(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_attempt = loop.time()
        name = self.provider.name
        try:
            body, cache_control = await self._download()
            keys, skipped = parse_jwks(body, self._allowed)
        except (_FetchFailed, KeyError_) as exc:
            self._failed(str(exc), garbage=isinstance(exc, KeyError_))
            return
        self._metrics.jwks_fetches.labels(name, "ok").inc()
        self._metrics.jwks_stale.labels(name).set(0)
        self._failures = 0
        self._next_at = loop.time() + refresh_delay(cache_control, self.provider)
        for line in skipped:
            log.warning("jwks provider %r: skipped %s", name, line)
        old = self._keys
        if self.stale:
            log.info("jwks provider %r: fetch succeeded again; keys fresh", name)
        self.stale = False
        self.last_error = None
        self._keys = keys
        if old is None or old.fingerprints() != keys.fingerprints():
            log.info(
                "jwks provider %r: %d key(s) loaded (%s)", name, len(keys.keys), keys.describe()
            )
            if self._on_change is not None:
                self._on_change(old, keys)

    async def _download(self) -> tuple[bytes, str | None]:
        try:
            async with self._session.get(
                self.url,
                timeout=self._timeout,
                allow_redirects=True,
                max_redirects=3,
                # identity: the shared upstream session does not decompress bodies.
                headers={
                    "Accept": "application/jwk-set+json, application/json",
                    "Accept-Encoding": "identity",
                },
            ) as resp:
                if resp.status != 200:
                    raise _FetchFailed(f"HTTP {resp.status}")
                if resp.content_length is not None and resp.content_length > MAX_JWKS_BYTES:
                    raise _FetchFailed(f"response larger than {MAX_JWKS_BYTES} bytes")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise _FetchFailed(f"response larger than {MAX_JWKS_BYTES} bytes")
                return bytes(body), resp.headers.get("Cache-Control")
        except TimeoutError:
            raise _FetchFailed(f"timed out after {self.provider.jwks_timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise _FetchFailed(f"{type(exc).__name__}: {exc}"[:200]) from None

    def _failed(self, why: str, *, garbage: bool) -> None:
        loop = asyncio.get_running_loop()
        name = self.provider.name
        self._failures += 1
        self.last_error = why
        self._metrics.jwks_fetches.labels(name, "invalid" if garbage else "error").inc()
        # Retry sooner while we have nothing to serve; back off while serving stale keys.
        base = 1.0 if self._keys is None else max(self.provider.jwks_min_refresh_s, 1.0)
        delay = min(base * 2 ** min(self._failures - 1, 10), self.provider.jwks_refresh_s)
        self._next_at = loop.time() + delay
        if self._keys is not None:
            self.stale = True
            self._metrics.jwks_stale.labels(name).set(1)
            log.warning(
                "jwks provider %r: fetch from %s failed (%s); serving the last good keys",
                name,
                self.url,
                why,
            )
        else:
            log.warning(
                "jwks provider %r: fetch from %s failed (%s); no keys yet, retry in %.0f s",
                name,
                self.url,
                why,
                delay,
            )
