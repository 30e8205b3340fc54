"""Authentication and scope policy: a registry of methods (JWT providers with JWKS, API keys),
the per-route chain."""

from .apikeys import hash_key, key_record, new_key
from .chain import Attempt
from .extractor import Credentials
from .jwks import new_key_session
from .registry import consumed_headers
from .service import AuthService

__all__ = [
    "Attempt",
    "AuthService",
    "Credentials",
    "consumed_headers",
    "hash_key",
    "key_record",
    "new_key",
    "new_key_session",
]
