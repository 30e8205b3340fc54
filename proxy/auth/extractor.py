"""Every method's credential in one request, from raw ASGI headers and the query string.

Each method's locator says where its credential travels (see `method.Locator`; today: the
`Authorization` Bearer header, the API key header, the `token`/`access_token`/`api_key` query
parameters and `bearer.` subprotocols on WebSocket handshakes, a token cookie); this module reads
the request once and hands each locator its part. It owns what is shared: the query string, from
which every method's parameters are removed on every request, every other byte kept as sent (a
credential name after a `;` makes the request a 400, see `split_query`), and the
`Sec-WebSocket-Protocol` list, from which the entries a method claims are taken out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import unquote_to_bytes

from .method import NOTHING, Found, Locator, Presented


class Credentials:
    """What the request presented, by method name; credential values never show in `repr`."""

    # A class of this compiled module, not a NamedTuple or a dataclass: one is made per request,
    # and theirs is built by interpreted code.
    __slots__ = ("found", "clean_query", "subprotocols", "problem", "query_refusal")

    def __init__(
        self,
        found: Mapping[str, Found],  # only methods that were given something to look at
        clean_query: bytes,
        subprotocols: tuple[str, ...],
        problem: str | None,  # the first method's problem, else a note (a non-Bearer scheme)
        # The query names a credential after a `;`: the request is refused (400), whatever the
        # route.
        query_refusal: str | None = None,
    ) -> None:
        self.found = found
        self.clean_query = clean_query
        self.subprotocols = subprotocols
        self.problem = problem
        self.query_refusal = query_refusal

    def __repr__(self) -> str:
        return (
            f"Credentials(found={dict(self.found)!r}, clean_query={self.clean_query!r}, "
            f"subprotocols={self.subprotocols!r}, problem={self.problem!r}, "
            f"query_refusal={self.query_refusal!r})"
        )

    def of(self, method: str) -> Found:
        return self.found.get(method, NOTHING)

    # Views by credential kind, for `explain` and tests; a new method needs none of its own.
    @property
    def bearer(self) -> str | None:
        return self.of("jwt").value

    @property
    def bearer_source(self) -> str | None:
        return self.of("jwt").source

    @property
    def bearer_problem(self) -> str | None:
        return self.of("jwt").problem

    @property
    def api_key(self) -> str | None:
        return self.of("api_key").value

    @property
    def api_key_source(self) -> str | None:
        return self.of("api_key").source

    @property
    def api_key_problem(self) -> str | None:
        return self.of("api_key").problem


def _form_decode(value: bytes) -> bytes:
    return unquote_to_bytes(value.replace(b"+", b" "))


class Extractor:
    """Finds the credentials of one request; who reads what is worked out once, from the
    locators, in registry order (which is also the order their problems are reported in)."""

    def __init__(self, locators: Sequence[Locator]) -> None:
        self._locators = tuple(locators)
        # Each header has one reader: the first method that consumes it, else the first that
        # reads it; `Sec-WebSocket-Protocol` is parsed here unless a method consumes it. (An API
        # key header over one the sidecar reads itself, such as `Authorization`, `Cookie` or
        # `Sec-WebSocket-Protocol`, is refused by the config.) Two methods sharing a header (an
        # introspection method beside `jwt` on `Authorization: Bearer`) would need each locator
        # to decline values that are not its own first.
        owners: dict[bytes, int] = {}
        for i, locator in enumerate(self._locators):
            for name in locator.consumes:
                owners.setdefault(name, i)
        for i, locator in enumerate(self._locators):
            for name in locator.also_reads:
                owners.setdefault(name, i)
        params: dict[bytes, int] = {}
        prefixes: list[tuple[str, int]] = []
        for i, locator in enumerate(self._locators):
            for param in locator.query_params:
                if param in params:
                    raise ValueError(f"query parameter {param!r} is claimed by two methods")
                params[param] = i
            prefixes.extend((prefix, i) for prefix in locator.subprotocol_prefixes)
        self._owners = owners
        self._params = params
        self._param_names = frozenset(params)
        self._prefixes = tuple(prefixes)

    def extract(
        self, headers: list[tuple[bytes, bytes]], query_string: bytes, *, websocket: bool
    ) -> Credentials:
        presented: list[Presented | None] = [None] * len(self._locators)
        offered: list[str] = []
        owners = self._owners
        for name, value in headers:
            i = owners.get(name)
            if i is not None:
                p = presented[i]
                if p is None:
                    p = presented[i] = Presented()
                p.headers.append((name, value))
            elif websocket and name == b"sec-websocket-protocol":
                offered.extend(
                    e.strip(" \t") for e in value.decode("latin-1").split(",") if e.strip(" \t")
                )

        query_refusal = None
        removed: Sequence[tuple[bytes, bytes]] = ()
        clean = b""
        if query_string:
            clean, removed, query_refusal = split_query(query_string, self._param_names)
        for param, raw in removed:
            i = self._params[param]
            p = presented[i]
            if p is None:
                p = presented[i] = Presented()
            p.query.append((param, _form_decode(raw).decode("ascii", "replace")))

        protocols: list[str] = []
        for entry in offered:
            for prefix, i in self._prefixes:
                if entry.startswith(prefix):
                    p = presented[i]
                    if p is None:
                        p = presented[i] = Presented()
                    p.subprotocols.append(entry)
                    break
            else:
                protocols.append(entry)

        found: dict[str, Found] = {}
        problem: str | None = None
        note: str | None = None
        for i, p in enumerate(presented):
            if p is not None:
                locator = self._locators[i]
                f = found[locator.name] = locator.extract(p, websocket=websocket)
                problem = problem or f.problem
                note = note or f.note
        return Credentials(
            found=found,
            clean_query=clean,
            subprotocols=tuple(protocols),
            problem=problem or note,
            query_refusal=query_refusal,
        )


def split_query(
    query: bytes, names: frozenset[bytes]
) -> tuple[bytes, list[tuple[bytes, bytes]], str | None]:
    """The query without the credential parameters `names` (other bytes untouched), those removed
    as (decoded name, raw value), and why the request must be refused, if it must.

    `;` is not a separator to us, nor to Python (since 3.10), Go (1.17), Java servlets or
    Node, but it is to Rack 2, PHP with `arg_separator.input = "&;"` and older stacks: in
    `a=1;access_token=T` the first group reads one parameter `a` holding the token, the second
    reads the token. Removing `;access_token=T` would change `a` for the first group; keeping
    it sends (and logs) the token to the second; taking it as a credential would authenticate
    with something most upstreams never see as one. No reading is right for every upstream,
    so a credential name after a `;` refuses the request (400), as ambiguous paths are; the
    clean query (logged) leaves that part out. Other `;` pass unchanged: they carry no secret.
    """
    if not query:
        return b"", [], None
    kept: list[bytes] = []
    removed: list[tuple[bytes, bytes]] = []
    dropped = False
    refusal: str | None = None
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        decoded = _param_name(name)
        if decoded in names:
            removed.append((decoded, value))
        elif decoded.lower().removesuffix(b"[]") in names:
            # `TOKEN=`, `token[]=`: not credentials to us, but frameworks that fold case or
            # collect arrays would read them as one, so they do not travel on either.
            dropped = True
        else:
            if b";" in part:
                first, *rest = part.split(b";")
                others = [p for p in rest if not _credential_name(p.partition(b"=")[0], names)]
                if len(others) != len(rest):
                    refusal = "a credential parameter follows a ';' in the query"
                    part = b";".join([first, *others])
            kept.append(part)
    if not removed and not dropped and refusal is None:
        return query, [], None
    return b"&".join(kept), removed, refusal


def _param_name(name: bytes) -> bytes:
    return _form_decode(name) if b"%" in name or b"+" in name else name


def _credential_name(name: bytes, names: frozenset[bytes]) -> bool:
    """A credential parameter's name, or a spelling a framework may fold into one."""
    return _param_name(name).lower().removesuffix(b"[]") in names
