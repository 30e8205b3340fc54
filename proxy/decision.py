"""One decision, many views: what the sidecar does with a request, decided in one place.

`Decider.decide(facts)` reads the request head, judges the path, matches the route, answers a CORS
preflight, checks the Origin, draining and credentials, and builds the headers for the upstream.
It writes nothing to the client: the pipeline acts on the `Decision` (answers, forwards, tunnels),
`authproxy explain` prints it with the trace of why, and a parity test holds the two together. A
second implementation of the policy is a bug waiting to disagree.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Literal

from .auth import Attempt, AuthService, Credentials
from .authority import valid_host
from .cors import Cors, CorsPolicy
from .errors import BadRequest, NotFound, ProxyError, ServiceUnavailable
from .identity import Identity
from .ids import new_request_id, new_span_id
from .paths import judge_path
from .relay.headers import HeaderPolicy
from .routing import Route, RouteTable
from .telemetry import logs
from .tracing import Trace, trace_of

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


# The per-request classes below write their own `__init__` (`init=False`): compiled with the
# module, where the one dataclasses generates runs as interpreted Python (about a microsecond a
# request for the five of them, measured with perf).
@dataclass(slots=True, init=False)
class Facts:
    """A request as it arrived: what the decision may look at."""

    method: str
    target: bytes  # the raw path, as the request line gave it
    query: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-case, as uvicorn gives them
    scheme: str  # http, https, ws, wss
    peer: str | None
    http_version: str
    websocket: bool

    def __init__(
        self,
        method: str,
        target: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        scheme: str,
        peer: str | None,
        http_version: str = "1.1",
        websocket: bool = False,
    ) -> None:
        self.method = method
        self.target = target
        self.query = query
        self.headers = headers
        self.scheme = scheme
        self.peer = peer
        self.http_version = http_version
        self.websocket = websocket


@dataclass(slots=True, init=False)
class Request:
    """The few request facts every stage needs, read from the headers in one pass."""

    method: str
    headers: list[tuple[bytes, bytes]]
    request_id: str
    origin: str | None
    host: str | None
    content_length: int | None
    acr_method: str | None
    acr_headers: str | None
    acr_private_network: bool
    # The values of its `Connection` headers (the names they list are not forwarded); () if none.
    connection: tuple[bytes, ...]
    path: str
    raw_path: bytes
    route: Route | None
    identity: Identity | None
    credentials: Credentials | None
    trace: Trace | None
    started: float
    # perf_counter() around the auth stage (for its span, when spans are exported)
    auth_started: float
    auth_ended: float

    def __init__(self, method: str, headers: list[tuple[bytes, bytes]], request_id: str) -> None:
        self.method = method
        self.headers = headers
        self.request_id = request_id
        self.origin = None
        self.host = None
        self.content_length = None
        self.acr_method = None
        self.acr_headers = None
        self.acr_private_network = False
        self.connection = ()
        self.path = ""
        self.raw_path = b""
        self.route = None
        self.identity = None
        self.credentials = None
        self.trace = None
        self.started = time.perf_counter()
        self.auth_started = 0.0
        self.auth_ended = 0.0

    @property
    def preflight(self) -> bool:
        """OPTIONS with Origin and Access-Control-Request-Method; any other OPTIONS is ordinary."""
        return self.method == "OPTIONS" and self.origin is not None and self.acr_method is not None

    @classmethod
    def read(cls, scope: dict[str, object] | Facts, method: str, max_header_bytes: int) -> Request:
        """The head's facts, or the `BadRequest` a head that cannot be judged safely gets."""
        if isinstance(scope, Facts):
            headers, http_version = scope.headers, scope.http_version
        else:
            headers = scope["headers"]  # type: ignore[assignment]
            http_version = str(scope.get("http_version"))
        request_id = None
        traceparent = tracestate = None
        r = Request(method, headers, "")  # (not `cls(...)`: mypyc calls its own class directly)
        size = 0
        for name, value in headers:
            size += len(name) + len(value) + 4
            # Most headers are none of these: one dictionary lookup, not a chain of comparisons.
            which = _READ.get(name)
            if which is None:
                continue
            if which == _ORIGIN:
                # One Origin, as browsers send it: with two, the CORS check and the upstream
                # could each believe a different one.
                if r.origin is not None:
                    raise BadRequest(
                        "the request has more than one Origin header",
                        details={"reason": "duplicate_origin"},
                    )
                r.origin = value.decode("latin-1")
            elif which == _HOST:
                # RFC 9112 3.2: one valid Host or 400, checked before it can become
                # X-Forwarded-Host or (server.preserve_host) the upstream's Host.
                if r.host is not None or not valid_host(value):
                    raise _bad_host("more than one Host header" if r.host else "an invalid Host")
                r.host = value.decode("latin-1")
            elif which == _REQUEST_ID:
                candidate = value.decode("latin-1")
                if _SANE_REQUEST_ID.fullmatch(candidate):
                    request_id = candidate
            elif which == _CONTENT_LENGTH:
                # httptools refuses a bad or doubled Content-Length before we see it; this holds
                # for what reaches the decision otherwise (explain's hand-written headers).
                if not value.isdigit() or (
                    r.content_length is not None and r.content_length != int(value)
                ):
                    raise BadRequest("invalid Content-Length")
                r.content_length = int(value)
            elif which == _ACR_METHOD:
                r.acr_method = value.decode("latin-1")
            elif which == _ACR_HEADERS:
                r.acr_headers = value.decode("latin-1")
            elif which == _ACR_PRIVATE_NETWORK:
                r.acr_private_network = value.strip().lower() == b"true"
            elif which == _CONNECTION:
                r.connection += (value,)
            elif which == _TRACEPARENT:
                traceparent = value if traceparent is None else b""  # two: invalid
            else:  # tracestate
                tracestate = value if tracestate is None else tracestate + b"," + value
        if size > max_header_bytes:
            raise BadRequest(
                "the request headers are larger than the limit",
                details={"reason": "headers_too_large", "limit_bytes": max_header_bytes},
            )
        if r.host is None and http_version == "1.1":
            raise _bad_host("no Host header")  # HTTP/1.0 may omit it
        own_id = None
        if request_id is None:
            request_id = own_id = new_request_id()
        r.request_id = request_id
        r.trace = trace_of(traceparent, tracestate, own_id, new_request_id, new_span_id)
        return r


# The headers `Request.read` looks at, by name.
(
    _ORIGIN,
    _HOST,
    _REQUEST_ID,
    _CONTENT_LENGTH,
    _ACR_METHOD,
    _ACR_HEADERS,
    _ACR_PRIVATE_NETWORK,
    _CONNECTION,
    _TRACEPARENT,
    _TRACESTATE,
) = range(10)
_READ = {
    b"origin": _ORIGIN,
    b"host": _HOST,
    b"x-request-id": _REQUEST_ID,
    b"content-length": _CONTENT_LENGTH,
    b"access-control-request-method": _ACR_METHOD,
    b"access-control-request-headers": _ACR_HEADERS,
    b"access-control-request-private-network": _ACR_PRIVATE_NETWORK,
    b"connection": _CONNECTION,
    b"traceparent": _TRACEPARENT,
    b"tracestate": _TRACESTATE,
}
_HTTP_SCHEME = {"ws": "http", "wss": "https"}  # an Origin names the page's scheme


def _bad_host(what: str) -> BadRequest:
    return BadRequest(f"the request has {what}", details={"reason": "invalid_host"})


Action = Literal["preflight", "forward", "tunnel", "refuse"]


@dataclass(slots=True, init=False)
class Decision:
    """What to do with one request, and (when asked for) why."""

    action: Action
    request: Request
    # The CORS policy of the answer (the route's once a route is known, else the global one);
    # None: the answer carries no CORS headers (a refused preflight, an unreadable head).
    policy: CorsPolicy | None
    error: ProxyError | None  # when refused
    preflight_headers: list[tuple[bytes, bytes]] | None
    upstream_headers: list[tuple[bytes, bytes]] | None  # REST: the wire bytes
    handshake_headers: list[tuple[str, str]] | None  # WebSocket: for the client library
    trace: list[tuple[str, str]] | None  # (stage, what it concluded), for explain
    attempts: list[Attempt] | None  # what each auth method found and concluded

    def __init__(
        self,
        action: Action,
        request: Request,
        policy: CorsPolicy | None,
        error: ProxyError | None = None,
        preflight_headers: list[tuple[bytes, bytes]] | None = None,
        upstream_headers: list[tuple[bytes, bytes]] | None = None,
        handshake_headers: list[tuple[str, str]] | None = None,
        trace: list[tuple[str, str]] | None = None,
        attempts: list[Attempt] | None = None,
    ) -> None:
        self.action = action
        self.request = request
        self.policy = policy
        self.error = error
        self.preflight_headers = preflight_headers
        self.upstream_headers = upstream_headers
        self.handshake_headers = handshake_headers
        self.trace = trace
        self.attempts = attempts


class Decider:
    """The policy, compiled at start-up: routes, CORS, authentication, header rules."""

    def __init__(
        self,
        *,
        routes: RouteTable,
        cors: Cors,
        auth: AuthService,
        headers: HeaderPolicy,
        max_header_bytes: int,
    ) -> None:
        self.routes = routes
        self.cors = cors
        self.auth = auth
        self.headers = headers
        self.max_header_bytes = max_header_bytes
        self.draining = False

    async def decide(self, facts: Facts, *, explain: bool = False) -> Decision:
        """The decision for `facts`; never raises a `ProxyError` (a refusal is a decision).

        Sets the request id of the log context (`logs.request_id_var`) for the calling task."""
        method = "GET" if facts.websocket else facts.method
        trace: list[tuple[str, str]] | None = [] if explain else None
        try:
            r = Request.read(facts, method, self.max_header_bytes)
        except ProxyError as exc:
            r = Request(method=method, headers=facts.headers, request_id=new_request_id())
            logs.request_id_var.set(r.request_id)
            if trace is not None:
                trace.append(("request", f"refused: {exc.message}"))
            # A WebSocket refusal still answers with the global CORS policy (the Origin check
            # needs the headers that failed); a plain request's gets none.
            unread = self.cors.policy(None) if facts.websocket else None
            return Decision("refuse", r, unread, error=exc, trace=trace)
        # From here on every log line of this request (a CORS refusal, an auth failure) names it.
        # A keep-alive connection's requests may run one after another in one task (http11.py):
        # each sets its id here, before anything of it logs, so none is logged under another's.
        logs.request_id_var.set(r.request_id)
        policy: CorsPolicy = self.cors.policy(None)  # until a route is known: the global one
        preflight = not facts.websocket and r.preflight
        attempts: list[Attempt] | None = [] if explain else None
        try:
            # A preflight is judged by the route of the request it asks about.
            judged = (r.acr_method or method) if preflight else method
            r.path, r.raw_path = judge_path(facts.target)
            if trace is not None:
                shown = r.raw_path.decode("ascii")
                trace.append(("path", f"{r.path}  (sent upstream as {shown})"))
            r.route = self.routes.match(r.path, judged)
            policy = self.cors.policy(r.route.index if r.route else None)
            if trace is not None:
                trace.append(("route", _route_line(r.route, judged, r.path)))
            if preflight:
                assert r.origin is not None and r.acr_method is not None
                headers = policy.preflight(
                    r.origin, r.acr_method, r.acr_headers, r.acr_private_network
                )
                if trace is not None:
                    trace.append(("cors", f"preflight from {r.origin} answered by the sidecar"))
                return Decision("preflight", r, policy, preflight_headers=headers, trace=trace)
            if r.origin is not None:
                same_origin = self._same_origin(facts, r)
                if facts.websocket:
                    # Browsers apply no CORS to WebSockets: an Origin we do not allow is refused
                    # here, or any site could ride the user's cookies (cross-site WebSocket
                    # hijacking), whatever reject_disallowed_origins says.
                    policy.refuse_websocket(r.origin, same_origin=same_origin)
                else:
                    policy.refuse_actual(r.origin, same_origin=same_origin)
                if trace is not None:
                    trace.append(("origin", f"{r.origin} allowed"))
            if self.draining:
                raise ServiceUnavailable("the sidecar is shutting down", retry_after_s=5)
            if r.route is None:
                raise NotFound(
                    "no route matches this path", details={"path": r.path, "method": r.method}
                )
            r.credentials = self.auth.extract(r.headers, facts.query, websocket=facts.websocket)
            r.auth_started = time.perf_counter()
            r.identity = await self.auth.authenticate(r.route.settings, r.credentials, attempts)
            r.auth_ended = time.perf_counter()
            query = r.credentials.clean_query
            if facts.websocket:
                handshake = self.headers.upstream_handshake(
                    r.headers,
                    peer=facts.peer,
                    scheme=facts.scheme,
                    request_id=r.request_id,
                    identity=r.identity,
                    raw_path=r.raw_path,
                    query=query,
                    trace=r.trace,
                    connection=r.connection,
                )
                return Decision(
                    "tunnel",
                    r,
                    policy,
                    handshake_headers=handshake,
                    trace=trace,
                    attempts=attempts,
                )
            upstream = self.headers.upstream_request(
                r.headers,
                peer=facts.peer,
                scheme=facts.scheme,
                request_id=r.request_id,
                identity=r.identity,
                method=method,
                raw_path=r.raw_path,
                query=query,
                trace=r.trace,
                connection=r.connection,
            )
            return Decision(
                "forward", r, policy, upstream_headers=upstream, trace=trace, attempts=attempts
            )
        except ProxyError as exc:
            r.identity = r.identity or exc.identity
            if trace is not None:
                trace.append(("result", f"refused: {exc.message}"))
            return Decision(
                "refuse",
                r,
                None if preflight else policy,
                error=exc,
                trace=trace,
                attempts=attempts,
            )

    @staticmethod
    def _same_origin(facts: Facts, r: Request) -> bool:
        scheme = _HTTP_SCHEME.get(facts.scheme, facts.scheme)
        return r.host is not None and r.origin == f"{scheme}://{r.host}"


def _route_line(route: Route | None, method: str, path: str) -> str:
    if route is None:
        return f"no route matches {method} {path}"
    s = route.settings
    policy = "public" if s.public else " or ".join(s.auth)
    extra = f"; scopes {' '.join(s.scopes)}" if s.scopes else ""
    extra += "; auth optional" if s.auth_optional else ""
    extra += f"; read timeout {s.read_timeout_s:g} s" if s.read_timeout_s else ""
    extra += f"; deadline {s.timeout_s:g} s" if s.timeout_s else ""
    if s.require_claims:
        extra += "; claims " + ", ".join(
            f"{k} = {v!r}" if isinstance(v, str) else f"{k} in {list(v)!r}"
            for k, v in s.require_claims.items()
        )
    return f"routes[{route.index}] {s.path!r} (auth: {policy}{extra})"
