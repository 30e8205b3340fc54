"""Authentication and scope policy: JWT providers with JWKS, API keys, the per-route chain."""

from .apikeys import hash_key, key_record, new_key
from .chain import Attempt
from .extractor import Credentials
from .jwks import new_key_session
from .service import AuthService

__all__ = [
    "Attempt",
    "AuthService",
    "Credentials",
    "hash_key",
    "key_record",
    "new_key",
    "new_key_session",
]
