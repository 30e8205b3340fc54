"""Shared state: rate-limit windows, concurrency slots and revocations, in memory (one process)
or in Redis (every sidecar and worker sharing it)."""

from .limiter import Admission, Limiter
from .revocations import Revocation, Revocations
from .rules import RouteLimits
from .store import MemoryStore, Store, open_store

__all__ = [
    "Admission",
    "Limiter",
    "MemoryStore",
    "Revocation",
    "Revocations",
    "RouteLimits",
    "Store",
    "open_store",
]
