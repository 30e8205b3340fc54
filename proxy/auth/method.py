"""What an authentication method is (oathkeeper's authenticator): the contract every method module
fulfils and `registry` lists.

A method comes in two parts. Its `Locator` knows where its credential travels — the request headers
it consumes, the query parameters and `Sec-WebSocket-Protocol` entries that may carry it, and how to
read them — and is built from the settings alone, so the header rules and the extractor can be
prepared at start-up and tested without keys or sockets. Its `Method` decides: is the credential
there (`present`), what was found (`found`, for traces), and who it names (`authenticate`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from ..config import AuthSettings, Settings
from ..identity import Identity
from ..telemetry.metrics import Metrics
from .found import NOTHING, Found, Presented, settle

__all__ = [
    "NOTHING",
    "Found",
    "Locator",
    "Method",
    "MethodSpec",
    "Presented",
    "fingerprint",
    "settle",
]


def fingerprint(secret: str) -> str:
    """A short, safe name for a credential in logs and explain output: a SHA-256 prefix."""
    return "sha256:" + hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()[:12]


class Locator(Protocol):
    """Where one method's credential comes from; built once from the settings, no I/O."""

    @property
    def name(self) -> str:
        """The method's config name."""

    @property
    def consumes(self) -> tuple[bytes, ...]:
        """Lower-case names of the headers that carry the credential: read by this method
        (unless an earlier one in the registry consumes the same name), and never forwarded
        upstream unless `auth.forward_credentials`."""

    @property
    def also_reads(self) -> tuple[bytes, ...]:
        """Headers read but not owned (the `Cookie` header a token cookie travels in)."""

    @property
    def query_params(self) -> tuple[bytes, ...]:
        """Query parameter names that may carry the credential: removed from every query string
        (so never forwarded or logged), whether or not this request may use them."""

    @property
    def subprotocol_prefixes(self) -> tuple[str, ...]:
        """`Sec-WebSocket-Protocol` entries starting with one of these are its credential, and are
        not offered to the upstream."""

    def extract(self, presented: Presented, *, websocket: bool) -> Found:
        """The credential in what the request presented (REST or a WebSocket handshake)."""


class Method(Protocol):
    """One authentication method of a route's chain; owns its keys or key set."""

    @property
    def name(self) -> str:
        """The method's config name (`routes[i].auth`)."""

    @property
    def asks_for(self) -> str:
        """What a "missing credentials" 401 tells the client to send: "a Bearer token"."""

    @property
    def bearer_challenge(self) -> bool:
        """Do 401s and 403s of a route using it carry `WWW-Authenticate: Bearer` (RFC 6750)?"""

    @property
    def ready(self) -> bool:
        """Its keys are loaded (readiness waits for every method)."""

    def found(self, credential: Found) -> str | None:
        """A description of the credential this method is responsible for, or None (for
        `explain` and traces only: it hashes the credential)."""

    async def authenticate(self, credential: Found) -> Identity:
        """The identity, or `Rejected`."""

    async def start(self) -> None:
        """First key fetches and background tasks (failures logged, not raised)."""

    async def stop(self) -> None: ...

    def reload(self) -> None:
        """SIGHUP: re-read key files; a bad file keeps the keys in use."""


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """A registry entry: the config name, where the credential comes from, and the method."""

    name: str
    locator: Callable[[AuthSettings], Locator]
    build: Callable[[Settings, Metrics, aiohttp.ClientSession], Method]
