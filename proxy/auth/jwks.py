"""A provider's keys from its `jwks_url`, cached and refreshed (files and secrets: `key_files`).

The cache fetches at start-up (readiness waits for the first good set), refreshes in the
background on the `Cache-Control: max-age` the endpoint asks for (clamped to the provider's
`[jwks_min_refresh_s, jwks_refresh_s]`), and refreshes early when a token names an unknown `kid` —
at most once per `jwks_min_refresh_s`, and single-flight: however many requests ask at once, one
fetch runs and they all wait for it. A failed or garbage fetch keeps the last good set
(stale-if-error), flips `authproxy_jwks_stale` to 1 and logs one line.

Stale, but not forever: `max_stale_s` after the first failed fetch the provider becomes
unavailable (`authproxy_jwks_unavailable` 1, readiness false, its cached verdicts dropped) and its
tokens get 503 `jwks_unavailable` — never 401, which would sign every user out during an IdP
outage. While unavailable, a token of the provider asks for a refetch (at most once per
`jwks_min_refresh_s`), so service returns with the IdP, not at the next scheduled refresh.

A provider with no key source finds its `jwks_uri` by OpenID Connect discovery (`{issuer}/.well-
known/openid-configuration`), read again before every fetch so a moved JWKS is followed. The
document must name exactly the configured issuer (OIDC Discovery 4.3: otherwise anyone able to
serve that path could name keys for it), and its `jwks_uri` must be https (http only to a
loopback address). A discovery failure is a failed fetch: the last good keys stay.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable

import aiohttp

from ..config import JwtProviderSettings, discovery_url_problem
from ..telemetry.metrics import Metrics
from .keys import KeyError_, KeySet, parse_jwks

log = logging.getLogger("authproxy.auth")

MAX_JWKS_BYTES = 1024 * 1024
DISCOVERY_PATH = "/.well-known/openid-configuration"
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
        on_unavailable: Callable[[], None] | None = None,
    ) -> None:
        assert provider.jwks_url is not None or provider.discovers
        self.provider = provider
        # With discovery: the document's address until the first document names the JWKS.
        self.discovery_url = (
            provider.issuer.rstrip("/") + DISCOVERY_PATH if provider.discovers else None
        )
        self.url = provider.jwks_url or self.discovery_url or ""
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
        self._on_unavailable = on_unavailable
        # time.monotonic() of the first failed fetch since the last good one (None: fresh).
        self._failing_since: float | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self.unavailable = False

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

    def stale_for(self) -> float:
        """Seconds since the fetches began failing (0 while fresh)."""
        if self._failing_since is None:
            return 0.0
        return time.monotonic() - self._failing_since

    async def stop(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
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
            if self.discovery_url is not None:
                self.url = await self._discover(self.discovery_url)
            body, cache_control = await self._download(
                self.url, "application/jwk-set+json, application/json"
            )
            keys, skipped = parse_jwks(body, self._allowed)
        except (_FetchFailed, KeyError_) as exc:
            self._failed(str(exc), garbage=isinstance(exc, KeyError_))
            return
        self._metrics.jwks_fetches.labels(name, "ok").inc()
        self._metrics.jwks_stale.labels(name).set(0)
        self._failures = 0
        self._next_at = loop.time() + refresh_delay(cache_control, self.provider)
        self._recovered()
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

    async def _discover(self, url: str) -> str:
        """The `jwks_uri` of the issuer's OpenID Connect discovery document."""
        body, _ = await self._download(url, "application/json")
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise _FetchFailed("discovery document is not JSON") from None
        if not isinstance(doc, dict):
            raise _FetchFailed("discovery document is not a JSON object")
        issuer = doc.get("issuer")
        if issuer != self.provider.issuer:
            shown = repr(issuer)[:120] if isinstance(issuer, str) else "no issuer"
            raise _FetchFailed(
                f"discovery document names {shown}, not the configured issuer "
                f"{self.provider.issuer!r}; refused"
            )
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise _FetchFailed("discovery document has no jwks_uri")
        problem = discovery_url_problem(jwks_uri)
        if problem is not None:
            raise _FetchFailed(f"discovery document's jwks_uri {problem[:200]}")
        return jwks_uri

    async def _download(self, url: str, accept: str) -> tuple[bytes, str | None]:
        try:
            async with self._session.get(
                url,
                timeout=self._timeout,
                allow_redirects=True,
                max_redirects=3,
                # identity: the shared upstream session does not decompress bodies.
                headers={"Accept": accept, "Accept-Encoding": "identity"},
            ) as resp:
                if resp.history and discovery_url_problem(url) is None:
                    # A URL that is https (or http to loopback) may not be redirected anywhere
                    # weaker: keys fetched over plain http from elsewhere could be anyone's.
                    for hop in (*(r.url for r in resp.history[1:]), resp.url):
                        problem = discovery_url_problem(str(hop))
                        if problem is not None:
                            raise _FetchFailed(f"redirected to a URL that {problem[:200]}")
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
            self._began_failing(loop)
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

    # -- max_stale_s -------------------------------------------------------------------------

    def _began_failing(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._failing_since is not None:
            return
        self._failing_since = time.monotonic()
        self._metrics.jwks_stale_since.labels(self.provider.name).set(time.time())
        # A timer, not a clock read per request: the request path only reads `unavailable`.
        self._deadline = loop.call_later(self.provider.max_stale_s, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        if self._failing_since is None:
            return
        self.unavailable = True
        self._metrics.jwks_unavailable.labels(self.provider.name).set(1)
        log.error(
            "jwks provider %r: no good fetch for %.0f s (max_stale_s); its tokens get 503 "
            "jwks_unavailable until %s answers again (last error: %s)",
            self.provider.name,
            self.stale_for(),
            self.url,
            self.last_error,
        )
        if self._on_unavailable is not None:
            self._on_unavailable()

    def _recovered(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self.unavailable:
            log.warning(
                "jwks provider %r: keys fetched again after %.0f s; tokens accepted again",
                self.provider.name,
                self.stale_for(),
            )
        self._failing_since = None
        self.unavailable = False
        self._metrics.jwks_stale_since.labels(self.provider.name).set(0)
        self._metrics.jwks_unavailable.labels(self.provider.name).set(0)
