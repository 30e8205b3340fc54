"""What a request presented to one authentication method, and what the method found in it.

Compiled with the request path (`proxy/compiled.py`): one `Presented` and one `Found` are made per
method per request. `method.py` (the methods' contract) re-exports them.
"""

from __future__ import annotations


class Found:
    """What one method found in a request; the credential is kept out of `repr` (and logs)."""

    # A class of this compiled module, not a NamedTuple or a dataclass: one is made per
    # credential per request, and theirs is built by interpreted code.
    __slots__ = ("value", "source", "problem", "note")

    def __init__(
        self,
        value: str | None = None,
        # Where it came from: "header", "query", "cookie", "subprotocol".
        source: str | None = None,
        # A credential of this kind was attempted but is unusable (malformed, empty, two
        # different ones): the method is then responsible, and the request gets 401 if the
        # route uses it.
        problem: str | None = None,
        # Something near it that is not a credential of this kind (a non-Bearer
        # `Authorization`): not the method's business, but worth saying in a "missing
        # credentials" 401.
        note: str | None = None,
    ) -> None:
        self.value = value
        self.source = source
        self.problem = problem
        self.note = note

    def __repr__(self) -> str:
        return f"Found(source={self.source!r}, problem={self.problem!r}, note={self.note!r})"

    @property
    def present(self) -> bool:
        """A credential of this kind is there, usable or not."""
        return self.value is not None or self.problem is not None


NOTHING = Found()


class Presented:
    """The raw material one request holds for one method, gathered in one pass by the extractor."""

    __slots__ = ("headers", "query", "subprotocols")

    def __init__(self) -> None:
        # (name, value) of the headers the locator consumes or reads, in request order.
        self.headers: list[tuple[bytes, bytes]] = []
        # (name, decoded value) of its query parameters, in query order. Bytes that are not
        # ASCII read as U+FFFD, which no credential grammar accepts.
        self.query: list[tuple[bytes, str]] = []
        # `Sec-WebSocket-Protocol` entries that start with one of its prefixes (handshakes only).
        self.subprotocols: list[str] = []


def settle(
    candidates: list[tuple[str, str]], problem: str | None, note: str | None, two: str
) -> Found:
    """One credential out of the `(source, value)` candidates of a request. Two different values
    are ambiguous (`two`, e.g. "two bearer tokens", names the problem); the same one twice is
    fine; any problem voids the credential, so a request never passes on half of what it sent."""
    if len(candidates) > 1 and len({value for _, value in candidates}) > 1:
        problem = f"{two} (" + ", ".join(source for source, _ in candidates) + ")"
    if problem is not None:
        return Found(problem=problem, note=note)
    if candidates:
        source, value = candidates[0]
        return Found(value, source, note=note)
    return NOTHING if note is None else Found(note=note)
