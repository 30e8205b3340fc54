"""Who the client is, by address: the TCP peer, or what a trusted proxy in front says it is."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable


def client_address(
    headers: list[tuple[bytes, bytes]], peer: str | None, trusted: Callable[[str | None], bool]
) -> str | None:
    """The TCP peer; when it is a trusted proxy, the right-most X-Forwarded-For address that is
    not one of ours (the left-most entries are whatever the client chose to write)."""
    if peer is None or not trusted(peer):
        return peer
    chain: list[str] = []
    for name, value in headers:
        if name == b"x-forwarded-for":
            chain.extend(part.strip() for part in value.decode("latin-1").split(","))
    for candidate in reversed(chain):
        try:
            address = str(ipaddress.ip_address(candidate))
        except ValueError:
            return peer  # a garbled chain proves nothing beyond the proxy itself
        if not trusted(address):
            return address
    return peer
