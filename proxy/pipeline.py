"""The request pipeline: path → route → CORS → authentication → scopes → forward or tunnel.

Every stage's decision was compiled at start-up; per request this module only looks things up. Any
`ProxyError` a stage raises is turned into the JSON error response (or the WebSocket handshake
refusal) here, in one place, with the request id and the CORS headers the browser needs to read it.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .auth import AuthService, Credentials
from .authority import valid_host
from .client_address import client_address
from .config import Settings
from .cors import Cors, CorsPolicy
from .errors import (
    BadRequest,
    InternalError,
    NotFound,
    ProxyError,
    RateLimited,
    ServiceUnavailable,
    render,
)
from .identity import Identity
from .ids import new_request_id
from .paths import judge_path
from .relay.headers import HeaderPolicy, peer
from .relay.http import ClientStalled, Exchange, Forwarder, UpstreamAborted
from .routing import Route, RouteTable
from .telemetry import logs
from .telemetry.metrics import Metrics
from .types import Receive, Scope, Send

if TYPE_CHECKING:
    from .relay.websocket import Tunnel

log = logging.getLogger("authproxy.pipeline")


_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@dataclass(slots=True)
class Request:
    """The few request facts every stage needs, read from the headers in one pass."""

    method: str
    headers: list[tuple[bytes, bytes]]
    request_id: str
    origin: str | None = None
    host: str | None = None
    content_length: int | None = None
    acr_method: str | None = None
    acr_headers: str | None = None
    acr_private_network: bool = False
    path: str = ""
    raw_path: bytes = b""
    route: Route | None = None
    identity: Identity | None = None
    credentials: Credentials | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def preflight(self) -> bool:
        """OPTIONS with Origin and Access-Control-Request-Method; any other OPTIONS is ordinary."""
        return self.method == "OPTIONS" and self.origin is not None and self.acr_method is not None

    @classmethod
    def read(cls, scope: Scope, method: str, max_header_bytes: int) -> Request:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        request_id = None
        r = cls(method=method, headers=headers, request_id="")
        size = 0
        for name, value in headers:
            size += len(name) + len(value) + 4
            if name == b"origin":
                r.origin = value.decode("latin-1")
            elif name == b"host":
                # RFC 9112 3.2: one valid Host or 400, checked before it can become
                # X-Forwarded-Host or (server.preserve_host) the upstream's Host.
                if r.host is not None or not valid_host(value):
                    raise _bad_host("more than one Host header" if r.host else "an invalid Host")
                r.host = value.decode("latin-1")
            elif name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _SANE_REQUEST_ID.fullmatch(candidate):
                    request_id = candidate
            elif name == b"content-length":
                if not value.isdigit() or (
                    r.content_length is not None and r.content_length != int(value)
                ):
                    raise BadRequest("invalid Content-Length")
                r.content_length = int(value)
            elif name == b"access-control-request-method":
                r.acr_method = value.decode("latin-1")
            elif name == b"access-control-request-headers":
                r.acr_headers = value.decode("latin-1")
            elif name == b"access-control-request-private-network":
                r.acr_private_network = value.strip().lower() == b"true"
        if size > max_header_bytes:
            raise BadRequest(
                "the request headers are larger than the limit",
                details={"reason": "headers_too_large", "limit_bytes": max_header_bytes},
            )
        if r.host is None and scope.get("http_version") == "1.1":
            raise _bad_host("no Host header")  # HTTP/1.0 may omit it
        r.request_id = request_id or new_request_id()
        return r


def _bad_host(what: str) -> BadRequest:
    return BadRequest(f"the request has {what}", details={"reason": "invalid_host"})


class Pipeline:
    """The sidecar's public ASGI application (without the lifespan, see `app`)."""

    def __init__(
        self,
        settings: Settings,
        *,
        routes: RouteTable,
        cors: Cors,
        auth: AuthService,
        headers: HeaderPolicy,
        forwarder: Forwarder,
        tunnel: Tunnel,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.routes = routes
        self.cors = cors
        self.auth = auth
        self.headers = headers
        self.forwarder = forwarder
        self.tunnel = tunnel
        self.metrics = metrics
        self.draining = False
        self.max_header_bytes = settings.server.max_header_bytes
        # Metric children by (route, status): labels() per request costs more than the increment.
        self._series: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._per_client = settings.upstream.max_concurrent_per_client
        self._in_flight: dict[str, int] = {}  # client address -> upstream requests it has open

    def _take_client_slot(self, scope: Scope, r: Request) -> str:
        """Count one more upstream request for this client address, or refuse it (429)."""
        address = client_address(r.headers, peer(scope), self.headers.trusted) or "-"
        open_now = self._in_flight.get(address, 0)
        if open_now >= self._per_client:
            raise RateLimited(
                "too many concurrent requests from this client",
                details={"reason": "client_concurrency", "limit": self._per_client},
                headers={"Retry-After": "1"},
            )
        self._in_flight[address] = open_now + 1
        return address

    def _give_client_slot(self, address: str) -> None:
        left = self._in_flight[address] - 1
        if left:
            self._in_flight[address] = left
        else:
            del self._in_flight[address]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.websocket(scope, receive, send)

    # --- shared stages ---------------------------------------------------------------------------

    def _same_origin(self, scope: Scope, r: Request) -> bool:
        scheme = {"ws": "http", "wss": "https"}.get(scope["scheme"], scope["scheme"])
        return r.host is not None and r.origin == f"{scheme}://{r.host}"

    def _judge(self, scope: Scope, r: Request, method: str) -> CorsPolicy:
        """Judge the path, match the route; the CORS policy that applies to the answer."""
        r.path, r.raw_path = judge_path(scope.get("raw_path") or scope["path"].encode())
        r.route = self.routes.match(r.path, method)
        return self.cors.policy(r.route.index if r.route else None)

    async def _admit(
        self, scope: Scope, r: Request, policy: CorsPolicy, *, websocket: bool
    ) -> None:
        """Origin, draining, route and credentials: raises what refuses the request."""
        if r.origin is not None:
            same_origin = self._same_origin(scope, r)
            if websocket:
                # Browsers apply no CORS to WebSockets: an Origin we do not allow is refused
                # here, or any site could ride the user's cookies (cross-site WebSocket
                # hijacking), whatever reject_disallowed_origins says.
                policy.refuse_websocket(r.origin, same_origin=same_origin)
            else:
                policy.refuse_actual(r.origin, same_origin=same_origin)
        if self.draining:
            raise ServiceUnavailable("the sidecar is shutting down", retry_after_s=5)
        if r.route is None:
            raise NotFound(
                "no route matches this path", details={"path": r.path, "method": r.method}
            )
        r.credentials = self.auth.extract(
            r.headers, scope.get("query_string", b""), websocket=websocket
        )
        r.identity = await self.auth.authenticate(r.route.settings, r.credentials)

    def _log(
        self, scope: Scope, r: Request, status: int, exchange: Exchange | None, **extra: Any
    ) -> None:
        duration = time.perf_counter() - r.started
        route = r.route.name if r.route else "-"
        series = self._series.get((route, status))
        if series is None:
            series = self._series[(route, status)] = (
                self.metrics.requests.labels(route, str(status)),
                self.metrics.request_seconds.labels(route),
            )
        series[0].inc()
        series[1].observe(duration)
        if not self.settings.logging.access_log:
            return
        query = r.credentials.clean_query if r.credentials else b""
        client = scope.get("client")
        fields: dict[str, Any] = {
            "request_id": r.request_id,
            "method": r.method,
            "path": r.path or scope.get("path", ""),
            "query": query.decode("latin-1"),
            "status": status,
            "duration_ms": round(duration * 1000, 3),
            "bytes_in": exchange.bytes_in if exchange else 0,
            "bytes_out": exchange.bytes_out if exchange else 0,
            "auth_method": r.identity.method if r.identity else None,
            "subject": r.identity.subject if r.identity else None,
            "origin": r.origin,
            "upstream_status": exchange.upstream_status if exchange else None,
            "route": route,
            "client": client[0] if client else None,
        }
        fields.update(extra)
        logs.access("request", fields)

    # --- HTTP ------------------------------------------------------------------------------------

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        try:
            r = Request.read(scope, method, self.max_header_bytes)
        except ProxyError as exc:
            r = Request(method=method, headers=scope["headers"], request_id=new_request_id())
            await self._reply_error(send, r, exc, None)
            self._log(scope, r, exc.status, None, error=exc.code)
            return
        token = logs.request_id_var.set(r.request_id)
        policy: CorsPolicy = self.cors.policy(None)  # until a route is known: the global one
        exchange = Exchange()
        try:
            preflight = r.preflight
            try:
                # A preflight is judged by the route of the request it asks about.
                policy = self._judge(scope, r, (r.acr_method or method) if preflight else method)
                if preflight:
                    assert r.origin is not None and r.acr_method is not None
                    headers = policy.preflight(
                        r.origin, r.acr_method, r.acr_headers, r.acr_private_network
                    )
                    headers.append((b"x-request-id", r.request_id.encode()))
                    await send({"type": "http.response.start", "status": 204, "headers": headers})
                    await send({"type": "http.response.body", "body": b""})
                    exchange.status = 204
                    self._log(scope, r, 204, exchange, preflight=True)
                    return
                await self._admit(scope, r, policy, websocket=False)
                assert r.credentials is not None
                upstream_headers = self.headers.upstream_request(
                    r.headers,
                    peer=peer(scope),
                    scheme=scope["scheme"],
                    request_id=r.request_id,
                    identity=r.identity,
                    method=method,
                    raw_path=r.raw_path,
                    query=r.credentials.clean_query,
                )
                origin = r.origin
                request_id = r.request_id.encode()
                cors = policy

                def response_headers(h: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
                    h.append((b"x-request-id", request_id))
                    return cors.response_headers(origin, h)

                client = self._take_client_slot(scope, r) if self._per_client else None
                try:
                    await self.forwarder.forward(
                        scope,
                        receive,
                        send,
                        raw_path=r.raw_path,
                        query=r.credentials.clean_query,
                        headers=upstream_headers,
                        content_length=r.content_length,
                        response_headers=response_headers,
                        exchange=exchange,
                    )
                finally:
                    if client is not None:
                        self._give_client_slot(client)
            except ProxyError as exc:
                exchange.status = exc.status
                r.identity = r.identity or exc.identity
                if exc.status >= 500:
                    self.metrics.upstream_errors.labels(exc.details.get("reason", exc.code)).inc()
                await self._reply_error(send, r, exc, None if preflight else policy)
                self._log(
                    scope, r, exc.status, exchange, error=exc.code, reason=exc.details.get("reason")
                )
                return
            except UpstreamAborted as exc:
                self.metrics.upstream_errors.labels("aborted_mid_response").inc()
                self._log(
                    scope, r, exchange.status, exchange, error="upstream_aborted", reason=str(exc)
                )
                raise
            except ClientStalled as exc:
                # Not the upstream's failure: no upstream_errors count. Raising cuts the client.
                self._log(
                    scope, r, exchange.status, exchange, error="send_timeout", reason=str(exc)
                )
                raise
            except Exception:
                log.exception("unexpected error")
                if exchange.response_started:
                    raise  # uvicorn cuts the connection: never a silently truncated body
                bug = InternalError("the sidecar failed on this request")
                await self._reply_error(send, r, bug, None if preflight else policy)
                self._log(scope, r, bug.status, exchange, error=bug.code)
                return
            self._log(
                scope,
                r,
                exchange.status,
                exchange,
                **({"client_gone": True} if exchange.client_gone else {}),
            )
        finally:
            logs.request_id_var.reset(token)

    async def _reply_error(
        self, send: Send, r: Request, exc: ProxyError, policy: CorsPolicy | None
    ) -> None:
        status, headers, body = render(exc, r.request_id)
        if policy is not None:
            headers = policy.response_headers(r.origin, headers)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # --- WebSocket -------------------------------------------------------------------------------

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        unreadable: ProxyError | None = None
        try:
            r = Request.read(scope, "GET", self.max_header_bytes)
        except ProxyError as exc:
            # Refused below, never passed on: the Origin check needs the headers that failed.
            unreadable = exc
            r = Request(method="GET", headers=scope["headers"], request_id=new_request_id())
        token = logs.request_id_var.set(r.request_id)
        try:
            message = await receive()
            if message["type"] != "websocket.connect":
                return
            policy: CorsPolicy = self.cors.policy(None)  # until a route is known: the global one
            try:
                if unreadable is not None:
                    raise unreadable
                policy = self._judge(scope, r, "GET")
                await self._admit(scope, r, policy, websocket=True)
                assert r.credentials is not None
                upstream_headers = self.headers.upstream_handshake(
                    r.headers,
                    peer=peer(scope),
                    scheme=scope["scheme"],
                    request_id=r.request_id,
                    identity=r.identity,
                    raw_path=r.raw_path,
                    query=r.credentials.clean_query,
                )
            except ProxyError as exc:
                r.identity = r.identity or exc.identity
                await self._deny(scope, send, r, exc, policy)
                self._log(
                    scope,
                    r,
                    exc.status,
                    None,
                    error=exc.code,
                    reason=exc.details.get("reason"),
                    websocket=True,
                )
                return
            assert r.route is not None and r.credentials is not None

            async def deny(exc: ProxyError) -> None:
                await self._deny(scope, send, r, exc, policy)

            await self.tunnel.run(
                scope,
                receive,
                send,
                request_id=r.request_id,
                route=r.route,
                identity=r.identity,
                credentials=r.credentials,
                raw_path=r.raw_path,
                upstream_headers=upstream_headers,
                deny=deny,
                origin=r.origin,
                started=r.started,
            )
        finally:
            logs.request_id_var.reset(token)

    async def _deny(
        self, scope: Scope, send: Send, r: Request, exc: ProxyError, policy: CorsPolicy | None
    ) -> None:
        """Refuse a WebSocket handshake with a real HTTP status and the JSON error body."""
        if "websocket.http.response" in scope.get("extensions", {}):
            status, headers, body = render(exc, r.request_id)
            if policy is not None:
                headers = policy.response_headers(r.origin, headers)
            await send(
                {"type": "websocket.http.response.start", "status": status, "headers": headers}
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": exc.close_code})
