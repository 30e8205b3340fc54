"""The authentication methods, by the name `routes[i].auth` uses: one line each.

A method is one module (see `method`): where its credential travels and how it is verified. Adding
one (opaque-token introspection, mTLS) is that module and a line here, plus its name in
`config.AUTH_METHODS`, which validates routes (config imports nothing of auth, so it keeps the names
itself; the check below holds the two together) and its settings table under `[auth]`. The order
is the order problems are reported in and methods start in; a route's own list orders its chain.
"""

from __future__ import annotations

from ..config import AUTH_METHODS, AuthSettings
from . import api_key, jwt
from .method import Locator, MethodSpec

METHODS: tuple[MethodSpec, ...] = (
    jwt.METHOD,
    api_key.METHOD,
)

if tuple(m.name for m in METHODS) != AUTH_METHODS:
    raise RuntimeError(
        f"auth methods {[m.name for m in METHODS]} differ from config.AUTH_METHODS "
        f"{list(AUTH_METHODS)}: route validation would accept other names than the chain runs"
    )


def locators(auth: AuthSettings) -> list[Locator]:
    """Every method's locator, in registry order."""
    return [m.locator(auth) for m in METHODS]


def consumed_headers(auth: AuthSettings) -> tuple[str, ...]:
    """The request headers that carry a credential of some method, lower case: the header rules
    never forward them upstream unless `auth.forward_credentials`."""
    names = (name for locator in locators(auth) for name in locator.consumes)
    return tuple(dict.fromkeys(name.decode("latin-1") for name in names))
