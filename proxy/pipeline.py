"""The sidecar's public ASGI application: decide (decision.py), then act.

The decision (path, route, CORS, Origin, draining, credentials, upstream headers) is made by the
`Decider` that `authproxy explain` also calls; this module only acts on it: answers a preflight or
a refusal (the JSON error body, with the request id and the CORS headers the browser needs to read
it), forwards, or tunnels. Every request and session ends in exactly one access record.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .auth import AuthService
from .client_address import client_address
from .config import Settings
from .cors import Cors, CorsPolicy
from .decision import Decider, Decision, Facts, Request
from .errors import InternalError, ProxyError, RateLimited, render
from .relay.headers import HeaderPolicy, peer
from .relay.http import AuthEnded, ClientStalled, Exchange, Forwarder, UpstreamAborted
from .relay.tunnel import Handshake
from .routing import RouteTable
from .state import Admission, Limiter, Revocations, RouteLimits
from .telemetry.access import AccessLog, AccessRecord
from .telemetry.metrics import Metrics
from .telemetry.otel import Exporter
from .types import Receive, Scope, Send

if TYPE_CHECKING:
    from .relay.tunnel import Tunnel

log = logging.getLogger("authproxy.pipeline")

__all__ = ["Pipeline", "Request"]


def facts_of(scope: Scope, *, websocket: bool) -> Facts:
    """What the decision may look at, from an ASGI scope."""
    return Facts(
        method="GET" if websocket else scope["method"],
        target=scope.get("raw_path") or scope["path"].encode(),
        query=scope.get("query_string", b""),
        headers=scope["headers"],
        scheme=scope["scheme"],
        peer=peer(scope),
        http_version=scope.get("http_version", "1.1"),
        websocket=websocket,
    )


def record_of(scope: Scope, d: Decision) -> AccessRecord:
    """The access record of a decided request, before anything is sent."""
    r = d.request
    return AccessRecord(
        request_id=r.request_id,
        method=r.method,
        started=r.started,
        path=r.path or scope.get("path", ""),
        query=r.credentials.clean_query.decode("latin-1") if r.credentials else "",
        route=r.route.name if r.route else "-",
        auth_method=r.identity.method if r.identity else None,
        subject=r.identity.subject if r.identity else None,
        origin=r.origin,
        client=peer(scope),
        websocket=scope["type"] == "websocket",
        trace_id=r.trace.trace_id if r.trace is not None else None,
    )


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
        access: AccessLog | None = None,
        otel: Exporter | None = None,
        limiter: Limiter | None = None,
        revocations: Revocations | None = None,
    ) -> None:
        self.settings = settings
        self.decider = Decider(
            routes=routes,
            cors=cors,
            auth=auth,
            headers=headers,
            max_header_bytes=settings.server.max_header_bytes,
        )
        self.headers = headers
        self.forwarder = forwarder
        self.tunnel = tunnel
        self.metrics = metrics
        self.access = access or AccessLog(metrics, log_lines=settings.logging.access_log)
        self._in_flight_count = metrics.in_flight
        self._otel = otel
        self._per_client = settings.upstream.max_concurrent_per_client
        self._in_flight: dict[str, int] = {}  # client address -> upstream requests it has open
        # Shared state: per route index its [[rate_limits]] (None without any rule, so a request
        # pays one test), and the revoked keys and tokens (skipped while none is revoked).
        self.limiter = limiter
        self._limits = limiter.routes if limiter is not None else None
        self._session_cap = limiter is not None and limiter.session_cap is not None
        self.revocations = revocations if revocations is not None else Revocations()

    def share_client_counts(self, other: Pipeline) -> None:
        """A reload's pipeline counts `max_concurrent_per_client` on from the running one's."""
        self._in_flight = other._in_flight

    @property
    def draining(self) -> bool:
        return self.decider.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.decider.draining = value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.websocket(scope, receive, send)

    # --- HTTP ------------------------------------------------------------------------------------

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        in_flight = self._in_flight_count
        in_flight.enter()
        try:
            d = await self.decider.decide(facts_of(scope, websocket=False))
            r = d.request
            record = record_of(scope, d)
            span = self._request_span(r, record) if self._otel is not None else None
            try:
                if d.action == "preflight":
                    assert d.preflight_headers is not None
                    headers = d.preflight_headers
                    headers.append((b"x-request-id", r.request_id.encode()))
                    await send({"type": "http.response.start", "status": 204, "headers": headers})
                    await send({"type": "http.response.body", "body": b""})
                    record.status = 204
                    record.extra["preflight"] = True
                elif d.action == "refuse":
                    assert d.error is not None
                    await self._reply_error(send, r, d.error, d.policy, record)
                else:
                    await self._forward(scope, receive, send, d, record, span)
            finally:
                self.access.emit(record)
                if span is not None:
                    self._end_request_span(span, record)
        finally:
            in_flight.leave()

    def _request_span(self, r: Request, record: AccessRecord) -> Any:
        """The request's server span (and its auth stage's, already over), when spans are
        exported; the access line then names the span's trace."""
        otel = self._otel
        assert otel is not None
        trace = r.trace
        parent = trace.traceparent if trace is not None and not trace.started else None
        span = otel.request_span(f"{r.method} {record.route}", parent, r.started)
        record.trace_id = otel.traceparent(span)[0]
        if r.auth_ended and r.route is not None and not r.route.public:
            auth = otel.child_span(span, "authproxy.auth", r.auth_started)
            identity = r.identity
            otel.end(
                auth,
                r.auth_ended,
                {"authproxy.auth_method": identity.method if identity else None},
                error=False,
            )
        return span

    def _end_request_span(self, span: Any, record: AccessRecord) -> None:
        assert self._otel is not None
        self._otel.end(
            span,
            time.perf_counter(),
            {
                "http.request.method": record.method,
                "url.path": record.path,
                "http.response.status_code": record.status,
                "http.route": record.route,
                "authproxy.request_id": record.request_id,
                "authproxy.auth_method": record.auth_method,
                "error.type": record.error,
            },
            error=record.status >= 500 or record.status == 0,
        )

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        d: Decision,
        record: AccessRecord,
        span: Any = None,
    ) -> None:
        r, policy = d.request, d.policy
        assert r.credentials is not None and d.upstream_headers is not None and policy is not None
        origin = r.origin
        request_id = r.request_id.encode()

        limited: list[tuple[bytes, bytes]] = []  # RateLimit headers, on a limited route

        def response_headers(h: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
            h.append((b"x-request-id", request_id))
            if limited:
                h.extend(limited)
            return policy.response_headers(origin, h)

        exchange = Exchange(identity=r.identity, request_id=r.request_id)
        admission: Admission | None = None
        upstream_span = None
        assert r.route is not None
        route = r.route
        try:
            if self._limits is not None or self.revocations.active:
                admission = await self._admit(scope, r, record)
                if admission is not None:
                    limited = admission.headers
            client = self._take_client_slot(scope, r) if self._per_client else None
            if span is not None:  # admitted: the exchange with the upstream begins
                upstream_span = self._upstream_span(span, d.upstream_headers)
            try:
                await self.forwarder.forward(
                    scope,
                    receive,
                    send,
                    raw_path=r.raw_path,
                    query=r.credentials.clean_query,
                    headers=d.upstream_headers,
                    content_length=r.content_length,
                    response_headers=response_headers,
                    exchange=exchange,
                    read_timeout=route.read_timeout_s,
                    timeout=route.timeout_s,
                )
            finally:
                if client is not None:
                    self._give_client_slot(client)
            record.status = exchange.status
            if exchange.client_gone:
                record.extra["client_gone"] = True
            if exchange.auth_end is not None:
                record.extra["end"] = exchange.auth_end  # an SSE stream closed with its event
        except ProxyError as exc:
            await self._reply_error(send, r, exc, policy, record)
        except UpstreamAborted as exc:
            record.status = exchange.status
            record.error, record.reason = "upstream_aborted", "aborted_mid_response"
            record.extra["detail"] = str(exc)
            raise
        except AuthEnded as exc:
            # A streamed body whose credential ended mid-stream: raising cuts the connection.
            record.status = exchange.status
            record.error, record.reason = exc.why, exc.why
            record.extra["end"] = exc.why
            raise
        except ClientStalled as exc:
            # Not the upstream's failure. Raising cuts the client's connection.
            record.status = exchange.status
            record.error, record.reason = "send_timeout", "send_timeout"
            record.extra["detail"] = str(exc)
            raise
        except Exception:
            log.exception("unexpected error")
            if exchange.response_started:
                record.status = exchange.status
                record.error = "internal_error"
                raise  # uvicorn cuts the connection: never a silently truncated body
            await self._reply_error(
                send, r, InternalError("the sidecar failed on this request"), policy, record
            )
        finally:
            record.bytes_in = exchange.bytes_in
            record.bytes_out += exchange.bytes_out  # += : an error answer of our own counted
            record.upstream_status = exchange.upstream_status
            record.upstream_seconds = exchange.upstream_seconds
            if upstream_span is not None:
                assert self._otel is not None
                status = exchange.upstream_status
                self._otel.end(
                    upstream_span,
                    time.perf_counter(),
                    {"http.response.status_code": status},
                    error=status is None or status >= 500,
                )

            if admission is not None and self.limiter is not None:
                self.limiter.release(admission)

    def _upstream_span(self, span: Any, headers: list[tuple[bytes, bytes]]) -> Any:
        """The upstream exchange's client span; the `traceparent` sent names it."""
        assert self._otel is not None
        upstream = self._otel.child_span(
            span, "authproxy.upstream", time.perf_counter(), client=True
        )
        _, traceparent = self._otel.traceparent(upstream)
        for i, (name, _) in enumerate(headers):
            if name == b"traceparent":
                headers[i] = (name, traceparent)
                break
        return upstream

    async def _admit(
        self, scope: Scope, r: Request, record: AccessRecord, *, websocket: bool = False
    ) -> Admission | None:
        """After authentication: refuse a revoked credential (401), then apply the route's
        rate limits (429) and, for a WebSocket, the shared per-identity session cap; the
        admission holds the slots to give back."""
        if r.identity is not None and self.revocations.active:
            self.revocations.check(r.identity)
        admission = None
        limits = self._limits[r.route.index] if self._limits is not None and r.route else None
        if limits is not None:
            admission = await self._admit_route(scope, r, record, limits)
        if websocket and self._session_cap and r.identity is not None:
            assert self.limiter is not None
            admission = admission or Admission([])
            try:
                await self.limiter.admit_session(admission, r.identity)
            except ProxyError:
                self.limiter.release(admission)
                raise
        return admission

    async def _admit_route(
        self, scope: Scope, r: Request, record: AccessRecord, limits: RouteLimits
    ) -> Admission:
        assert self.limiter is not None
        address = (
            client_address(r.headers, peer(scope), self.headers.trusted)
            if r.identity is None or limits.by_ip
            else None
        )
        try:
            return await self.limiter.admit(limits, r.identity, address)
        except ProxyError as exc:
            rule = exc.details.get("rule")
            if rule is not None:
                record.extra["rate_limit"] = rule
            raise

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

    async def _reply_error(
        self,
        send: Send,
        r: Request,
        exc: ProxyError,
        policy: CorsPolicy | None,
        record: AccessRecord,
    ) -> None:
        status, headers, body = render(exc, r.request_id)
        if policy is not None:
            headers = policy.response_headers(r.origin, headers)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        _refused(record, r, exc)
        record.bytes_out = len(body)

    # --- WebSocket -------------------------------------------------------------------------------

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        d = await self.decider.decide(facts_of(scope, websocket=True))
        r = d.request
        if d.action == "refuse":
            assert d.error is not None
            record = record_of(scope, d)
            record.bytes_out = await self._deny(scope, send, r, d.error, d.policy)
            _refused(record, r, d.error)
            self.access.emit(record)
            return
        assert r.route is not None and r.credentials is not None
        assert d.handshake_headers is not None
        policy = d.policy
        record = record_of(scope, d)
        admission: Admission | None = None
        try:
            if self._limits is not None or self.revocations.active or self._session_cap:
                admission = await self._admit(scope, r, record, websocket=True)
        except ProxyError as exc:
            await self._deny(scope, send, r, exc, policy)
            _refused(record, r, exc)
            self.access.emit(record)
            return

        async def deny(exc: ProxyError) -> None:
            await self._deny(scope, send, r, exc, policy)  # the tunnel's record counts no body

        handshake = Handshake(
            request_id=r.request_id,
            route=r.route.name,
            identity=r.identity,
            raw_path=r.raw_path,
            query=r.credentials.clean_query,
            subprotocols=r.credentials.subprotocols,
            upstream_headers=d.handshake_headers,
            deny=deny,
            origin=r.origin,
            started=r.started,
            record=record,
        )
        # A session lives for hours in this frame: keep nothing it will not read again (the
        # credentials hold the token itself, a kilobyte a socket).
        r.credentials = None
        r.trace = None  # its id is in the record; the header bytes went with the handshake
        del d
        try:
            await self.tunnel.run(scope, receive, send, handshake)
        finally:
            if admission is not None and self.limiter is not None:
                self.limiter.release(admission)

    async def _deny(
        self, scope: Scope, send: Send, r: Request, exc: ProxyError, policy: CorsPolicy | None
    ) -> int:
        """Refuse a WebSocket handshake with a real HTTP status and the JSON error body; the
        body's length is returned (the access line's `bytes_out`)."""
        if "websocket.http.response" in scope.get("extensions", {}):
            status, headers, body = render(exc, r.request_id)
            if policy is not None:
                headers = policy.response_headers(r.origin, headers)
            await send(
                {"type": "websocket.http.response.start", "status": status, "headers": headers}
            )
            await send({"type": "websocket.http.response.body", "body": body})
            return len(body)
        await send({"type": "websocket.close", "code": exc.close_code})
        return 0


def _refused(record: AccessRecord, r: Request, exc: ProxyError) -> None:
    record.status = exc.status
    record.error = exc.code
    record.reason = exc.details.get("reason") or exc.log_reason
    identity = r.identity or exc.identity
    if identity is not None:
        record.auth_method, record.subject = identity.method, identity.subject
    elif exc.auth_method is not None:
        record.auth_method = exc.auth_method  # refused: which credential, never whose
