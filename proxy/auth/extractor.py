"""Where credentials come from, decided per request from raw ASGI headers and the query string.

REST: `Authorization: Bearer <jwt>` and the API key header only. A WebSocket handshake cannot set
headers from a browser, so it may also use the `token`/`access_token`/`api_key` query parameters,
a `Sec-WebSocket-Protocol` entry (`bearer.<jwt>` or the Kubernetes form
`base64url.bearer.authorization.k8s.io.<base64url(jwt)>`) and, when configured, a cookie. Two
different explicit bearer tokens are ambiguous and refused; the cookie is ambient (the browser
sends it on its own), so it only counts when no explicit token was given. The credential query
parameters are removed from the query string on every request, every other byte kept as sent; a
credential name after a `;` makes the request a 400 (see `_split_query`).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from ..config import AuthSettings

_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_AUTHORIZATION = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?:[ \t]+(.*))?", re.DOTALL)
_BEARER_PARAMS = (b"token", b"access_token")
_API_KEY_PARAM = b"api_key"
_CREDENTIAL_PARAMS = frozenset({*_BEARER_PARAMS, _API_KEY_PARAM})
_K8S_PREFIX = "base64url.bearer.authorization.k8s.io."
_BEARER_PREFIX = "bearer."
_API_KEY_CHARS = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the request presented; credential values are kept out of `repr` (and so out of logs)."""

    bearer: str | None = field(repr=False)
    bearer_source: str | None  # "header" | "query" | "cookie" | "subprotocol"
    api_key: str | None = field(repr=False)
    api_key_source: str | None  # "header" | "query"
    clean_query: bytes
    subprotocols: tuple[str, ...]
    problem: str | None  # the first of the two below, else a note such as a non-Bearer scheme
    # A bearer / API key was attempted but is unusable (malformed, empty, two different ones):
    # the method is then responsible and the request gets 401 if the route uses it.
    bearer_problem: str | None = None
    api_key_problem: str | None = None
    # The query names a credential after a `;`: the request is refused (400), whatever the route.
    query_refusal: str | None = None


def _form_decode(value: bytes) -> bytes:
    return unquote_to_bytes(value.replace(b"+", b" "))


def _k8s_token(encoded: str) -> str | None:
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        token = raw.decode("ascii")
    except (binascii.Error, ValueError):
        return None
    return token if _TOKEN68.fullmatch(token) else None


class Extractor:
    """Finds the credentials of one request; configured names are prepared once."""

    def __init__(self, auth: AuthSettings) -> None:
        self._key_header = auth.api_keys.header.lower().encode("latin-1")
        self._cookie = auth.token_cookie

    def extract(
        self, headers: list[tuple[bytes, bytes]], query_string: bytes, *, websocket: bool
    ) -> Credentials:
        bearers: list[tuple[str, str]] = []
        keys: list[tuple[str, str]] = []
        bearer_problem: str | None = None
        key_problem: str | None = None
        note: str | None = None
        offered: list[str] = []
        cookie: str | None = None

        for name, value in headers:
            if name == b"authorization":
                m = _AUTHORIZATION.fullmatch(value.decode("latin-1").strip(" \t"))
                if m is None or m.group(1).lower() != "bearer":
                    note = "Authorization header is not a Bearer token"
                    continue
                token = (m.group(2) or "").strip(" \t")
                if not token:
                    bearer_problem = "empty bearer token"
                elif not _TOKEN68.fullmatch(token):
                    bearer_problem = "malformed bearer token"
                else:
                    bearers.append(("header", token))
            elif name == self._key_header:
                key = value.decode("latin-1").strip(" \t")
                if not key:
                    key_problem = "empty API key"
                elif not _API_KEY_CHARS.fullmatch(key):
                    key_problem = "malformed API key"
                else:
                    keys.append(("header", key))
            elif websocket and name == b"sec-websocket-protocol":
                offered.extend(
                    p.strip(" \t") for p in value.decode("latin-1").split(",") if p.strip(" \t")
                )
            elif websocket and self._cookie is not None and name == b"cookie" and cookie is None:
                cookie = self._find_cookie(value.decode("latin-1"))

        clean, from_query, query_refusal = self._split_query(query_string)
        if websocket:
            for param, raw in from_query:
                try:
                    text = _form_decode(raw).decode("ascii")
                except UnicodeDecodeError:
                    text = "\x00"  # fails the checks below
                if param == _API_KEY_PARAM:
                    if text and _API_KEY_CHARS.fullmatch(text):
                        keys.append(("query", text))
                    elif text:
                        key_problem = "malformed API key"
                elif text and _TOKEN68.fullmatch(text):
                    bearers.append(("query", text))
                elif text:
                    bearer_problem = "malformed bearer token"

        protocols: list[str] = []
        for entry in offered:
            if entry.startswith(_K8S_PREFIX):
                token_or_none = _k8s_token(entry[len(_K8S_PREFIX) :])
                if token_or_none is None:
                    bearer_problem = "malformed bearer token in Sec-WebSocket-Protocol"
                else:
                    bearers.append(("subprotocol", token_or_none))
            elif entry.startswith(_BEARER_PREFIX):
                token = entry[len(_BEARER_PREFIX) :]
                if token and _TOKEN68.fullmatch(token):
                    bearers.append(("subprotocol", token))
                else:
                    bearer_problem = "malformed bearer token in Sec-WebSocket-Protocol"
            else:
                protocols.append(entry)

        bearer, bearer_source = None, None
        if len({t for _, t in bearers}) > 1:
            bearer_problem = "two bearer tokens (" + ", ".join(s for s, _ in bearers) + ")"
        elif bearers:
            bearer_source, bearer = bearers[0]
        elif cookie:
            if _TOKEN68.fullmatch(cookie):
                bearer_source, bearer = "cookie", cookie
            else:
                bearer_problem = "malformed bearer token in cookie"
        if bearer_problem is not None:
            bearer, bearer_source = None, None

        api_key, api_key_source = None, None
        if len({k for _, k in keys}) > 1:
            key_problem = "two API keys (" + ", ".join(s for s, _ in keys) + ")"
        elif keys:
            api_key_source, api_key = keys[0]
        if key_problem is not None:
            api_key, api_key_source = None, None

        return Credentials(
            bearer=bearer,
            bearer_source=bearer_source,
            api_key=api_key,
            api_key_source=api_key_source,
            clean_query=clean,
            subprotocols=tuple(protocols),
            problem=bearer_problem or key_problem or note,
            bearer_problem=bearer_problem,
            api_key_problem=key_problem,
            query_refusal=query_refusal,
        )

    def _find_cookie(self, header: str) -> str | None:
        for pair in header.split(";"):
            name, sep, value = pair.strip(" \t").partition("=")
            if sep and name.strip(" \t") == self._cookie:
                value = value.strip(" \t")
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                return value
        return None

    @staticmethod
    def _split_query(query: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], str | None]:
        """The query without credential parameters (other bytes untouched), those removed, and
        why the request must be refused, if it must.

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
            decoded = _form_decode(name) if b"%" in name or b"+" in name else name
            if decoded in _CREDENTIAL_PARAMS:
                removed.append((decoded, value))
            elif decoded.lower().removesuffix(b"[]") in _CREDENTIAL_PARAMS:
                # `TOKEN=`, `token[]=`: not credentials to us, but frameworks that fold case or
                # collect arrays would read them as one, so they do not travel on either.
                dropped = True
            else:
                if b";" in part:
                    first, *rest = part.split(b";")
                    others = [p for p in rest if not _credential_name(p.partition(b"=")[0])]
                    if len(others) != len(rest):
                        refusal = "a credential parameter follows a ';' in the query"
                        part = b";".join([first, *others])
                kept.append(part)
        if not removed and not dropped and refusal is None:
            return query, [], None
        return b"&".join(kept), removed, refusal


def _credential_name(name: bytes) -> bool:
    """A credential parameter's name, or a spelling a framework may fold into one."""
    decoded = _form_decode(name) if b"%" in name or b"+" in name else name
    return decoded.lower().removesuffix(b"[]") in _CREDENTIAL_PARAMS
