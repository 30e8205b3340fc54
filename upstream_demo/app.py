"""The demo backend (REST, identity provider, `/ws`) and the demo web page, as Starlette apps.

The backend has no authentication of its own: like the services authproxy is deployed in front of,
it trusts the `X-Auth-*` headers the sidecar sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from upstream_demo.events import EventBus, ModelSimulator
from upstream_demo.idp import AuthError, IdentityProvider, KeyRing
from upstream_demo.openapi import document as openapi_document
from upstream_demo.signature import IdentitySignatureCheck, Scheme
from upstream_demo.store import ConflictError, ModelCreate, ModelPatch, ModelReplace, ModelStore
from upstream_demo.ws import EventSession

WEB_DIR = Path(__file__).parent / "web"
DEFAULT_PAGE_LIMIT = 50
MAX_PAGE_LIMIT = 100

# Headers /api/whoami reports by name: what the sidecar tells the upstream about the caller.
IDENTITY_HEADERS = (
    "X-Auth-Subject",
    "X-Auth-Method",
    "X-Auth-Scopes",
    "X-Auth-Issuer",
    "X-Request-ID",
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
)

BodyT = TypeVar("BodyT", bound=BaseModel)


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"error": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


class BadRequest(Exception):
    """A request the handler refuses; carries the ready JSON error response."""

    def __init__(self, response: JSONResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


async def parse_body(request: Request, schema: type[BodyT]) -> BodyT:
    try:
        raw = await request.json()
    except ValueError:
        raise BadRequest(error_response(400, "bad_request", "body is not valid JSON")) from None
    if not isinstance(raw, dict):
        raise BadRequest(error_response(400, "bad_request", "body must be a JSON object"))
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        details = json.loads(exc.json(include_url=False, include_context=False))
        first = details[0] if details else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        message = f"{where}: {first.get('msg', 'invalid value')}"
        raise BadRequest(error_response(422, "validation_error", message, details)) from None


def _model_not_found(model_id: str) -> JSONResponse:
    return error_response(404, "not_found", f"model {model_id!r} not found")


class ChatMessage(BaseModel):
    """One message of a chat completion request."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=32768)


class ChatRequest(BaseModel):
    """The body of POST /api/chat/completions."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1, le=4096)


class LoginRequest(BaseModel):
    """The body of POST /auth/login."""

    username: str = Field(min_length=1, max_length=200)
    password: str = Field(max_length=200)


class RefreshRequest(BaseModel):
    """The body of POST /auth/refresh."""

    refresh_token: str = Field(min_length=1, max_length=500)


def _tokens(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text)


class DemoBackend:
    """Owns the backend's long-lived objects and serves its routes."""

    def __init__(
        self,
        *,
        store: ModelStore,
        bus: EventBus,
        simulator: ModelSimulator,
        idp: IdentityProvider,
        heartbeat_s: float,
        token_delay_s: float,
        simulate: bool,
    ) -> None:
        self.store = store
        self.bus = bus
        self.simulator = simulator
        self.idp = idp
        self.heartbeat_s = heartbeat_s
        self.token_delay_s = token_delay_s
        self.simulate = simulate
        # A cache that lives longer than the rotation interval would miss the next key for long.
        max_age = int(max(1.0, min(300.0, idp.keyring.rotation_s / 2)))
        self.jwks_cache_control = f"public, max-age={max_age}"

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(self.simulator.run()) if self.simulate else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self.simulator.close()

    def routes(self) -> list[Route | WebSocketRoute]:
        return [
            Route("/", self.index),
            Route("/healthz", self.healthz),
            Route("/api/models", self.list_models, methods=["GET"]),
            Route("/api/models", self.create_model, methods=["POST"]),
            Route("/api/models/{id}", self.get_model, methods=["GET"]),
            Route("/api/models/{id}", self.replace_model, methods=["PUT"]),
            Route("/api/models/{id}", self.patch_model, methods=["PATCH"]),
            Route("/api/models/{id}", self.delete_model, methods=["DELETE"]),
            Route("/api/models/{id}/start", self.start_model, methods=["POST"]),
            Route("/api/models/{id}/stop", self.stop_model, methods=["POST"]),
            Route("/api/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/api/whoami", self.whoami, methods=["GET"]),
            Route("/auth/login", self.login, methods=["POST"]),
            Route("/auth/refresh", self.refresh, methods=["POST"]),
            Route("/.well-known/jwks.json", self.jwks, methods=["GET"]),
            Route("/.well-known/openid-configuration", self.openid_configuration, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            WebSocketRoute("/ws", self.websocket),
        ]

    # -- misc ---------------------------------------------------------------------------------

    async def index(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "service": "upstream_demo",
                "endpoints": [
                    "/api/models",
                    "/api/chat/completions",
                    "/api/whoami",
                    "/auth/login",
                    "/auth/refresh",
                    "/.well-known/jwks.json",
                    "/ws",
                ],
            }
        )

    async def healthz(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    # -- models -------------------------------------------------------------------------------

    async def list_models(self, request: Request) -> JSONResponse:
        try:
            offset = int(request.query_params.get("offset", "0"))
            limit = int(request.query_params.get("limit", str(DEFAULT_PAGE_LIMIT)))
        except ValueError:
            return error_response(400, "bad_request", "offset and limit must be integers")
        if offset < 0 or not 1 <= limit <= MAX_PAGE_LIMIT:
            return error_response(
                400, "bad_request", f"need offset >= 0 and 1 <= limit <= {MAX_PAGE_LIMIT}"
            )
        page = [m.to_json() for m in self.store.list(offset, limit)]
        return JSONResponse(page, headers={"X-Total-Count": str(len(self.store))})

    async def create_model(self, request: Request) -> JSONResponse:
        try:
            body = await parse_body(request, ModelCreate)
        except BadRequest as exc:
            return exc.response
        try:
            model = self.store.create(body, created_by=request.headers.get("x-auth-subject"))
        except ConflictError:
            return error_response(409, "conflict", f"model {body.id!r} already exists")
        self.simulator.publish(model, source="api", action="created")
        return JSONResponse(
            model.to_json(), status_code=201, headers={"Location": f"/api/models/{model.id}"}
        )

    async def get_model(self, request: Request) -> JSONResponse:
        model_id = request.path_params["id"]
        model = self.store.get(model_id)
        if model is None:
            return _model_not_found(model_id)
        return JSONResponse(model.to_json())

    async def replace_model(self, request: Request) -> JSONResponse:
        return await self._update(request, ModelReplace)

    async def patch_model(self, request: Request) -> JSONResponse:
        return await self._update(request, ModelPatch)

    async def _update(self, request: Request, schema: type[BaseModel]) -> JSONResponse:
        model_id = request.path_params["id"]
        if self.store.get(model_id) is None:
            return _model_not_found(model_id)
        try:
            body = await parse_body(request, schema)
        except BadRequest as exc:
            return exc.response
        # PATCH changes only what was sent; PUT sends (or defaults) every field.
        changes = body.model_dump(exclude_unset=schema is ModelPatch, exclude_none=True)
        model = self.store.update(model_id, changes)
        if model is None:
            return _model_not_found(model_id)
        self.simulator.publish(model, source="api", action="updated")
        return JSONResponse(model.to_json())

    async def delete_model(self, request: Request) -> Response:
        model_id = request.path_params["id"]
        model = self.store.delete(model_id)
        if model is None:
            return _model_not_found(model_id)
        self.simulator.publish(model, source="api", status="deleted", action="deleted")
        return Response(status_code=204)

    async def start_model(self, request: Request) -> JSONResponse:
        return self._transition(request, self.simulator.start)

    async def stop_model(self, request: Request) -> JSONResponse:
        return self._transition(request, self.simulator.stop)

    def _transition(self, request: Request, action: Callable[[str], Any]) -> JSONResponse:
        model_id = request.path_params["id"]
        model = action(model_id)
        if model is None:
            return _model_not_found(model_id)
        return JSONResponse(model.to_json())

    # -- chat ---------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        try:
            body = await parse_body(request, ChatRequest)
        except BadRequest as exc:
            return exc.response
        model = self.store.get(body.model)
        if model is None:
            return error_response(404, "model_not_found", f"model {body.model!r} not found")
        question = next((m.content for m in reversed(body.messages) if m.role == "user"), "")
        shown = question.strip().replace("\n", " ")[:120] or "nothing"
        reply = (
            f"Hello from {model.name}! You asked: \u201c{shown}\u201d. "
            "This answer comes from the authproxy demo backend, one token at a time."
        )
        tokens = _tokens(reply)
        finish_reason = "stop"
        if body.max_tokens is not None and len(tokens) > body.max_tokens:
            tokens, finish_reason = tokens[: body.max_tokens], "length"
        completion_id = f"chatcmpl-{secrets.token_hex(12)}"
        created = int(time.time())
        prompt_tokens = sum(len(_tokens(m.content)) for m in body.messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
        }
        if not body.stream:
            return JSONResponse(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model.id,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(tokens)},
                            "finish_reason": finish_reason,
                        }
                    ],
                    "usage": usage,
                }
            )

        def chunk(delta: dict[str, str], finish: str | None, **extra: Any) -> bytes:
            data = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model.id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            return f"data: {json.dumps(data)}\n\n".encode()

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant"}, None)
            for token in tokens:
                await asyncio.sleep(self.token_delay_s)
                yield chunk({"content": token}, None)
            yield chunk({}, finish_reason, usage=usage)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -- identity -----------------------------------------------------------------------------

    async def whoami(self, request: Request) -> JSONResponse:
        h = request.headers
        scopes = h.get("x-auth-scopes")
        return JSONResponse(
            {
                "subject": h.get("x-auth-subject"),
                "auth_method": h.get("x-auth-method"),
                "scopes": scopes.split() if scopes is not None else [],
                "issuer": h.get("x-auth-issuer"),
                "request_id": h.get("x-request-id"),
                "forwarded_for": h.get("x-forwarded-for"),
                "forwarded_proto": h.get("x-forwarded-proto"),
                "forwarded_host": h.get("x-forwarded-host"),
                "identity_headers": {name: h.get(name) for name in IDENTITY_HEADERS},
                # Everything received, so tests can check what the sidecar removed or added.
                "headers": {k: v for k, v in request.headers.items()},
                "path": request.url.path,
                "query": request.url.query,
            }
        )

    async def login(self, request: Request) -> JSONResponse:
        try:
            body = await parse_body(request, LoginRequest)
            return JSONResponse(self.idp.login(body.username, body.password), headers=_NO_STORE)
        except BadRequest as exc:
            return exc.response
        except AuthError as exc:
            return error_response(401, "unauthorized", str(exc))

    async def refresh(self, request: Request) -> JSONResponse:
        try:
            body = await parse_body(request, RefreshRequest)
            return JSONResponse(self.idp.refresh(body.refresh_token), headers=_NO_STORE)
        except BadRequest as exc:
            return exc.response
        except AuthError as exc:
            return error_response(401, "unauthorized", str(exc))

    async def jwks(self, request: Request) -> JSONResponse:
        return JSONResponse(
            self.idp.keyring.jwks(),
            headers={"Cache-Control": self.jwks_cache_control},
            media_type="application/jwk-set+json",
        )

    async def openid_configuration(self, request: Request) -> JSONResponse:
        return JSONResponse(self.idp.openid_configuration())

    async def openapi(self, request: Request) -> JSONResponse:
        return JSONResponse(_OPENAPI)

    # -- live events --------------------------------------------------------------------------

    async def websocket(self, websocket: WebSocket) -> None:
        await EventSession(websocket, self.bus, heartbeat_s=self.heartbeat_s).run()


_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_OPENAPI = openapi_document(
    model_create=ModelCreate,
    model_replace=ModelReplace,
    model_patch=ModelPatch,
    chat=ChatRequest,
    login=LoginRequest,
    refresh=RefreshRequest,
)


def create_app(
    *,
    event_interval: float = 3.0,
    issuer: str = "http://127.0.0.1:9000",
    audience: str = "webplus",
    token_ttl: int = 300,
    refresh_ttl: int = 86400,
    key_rotation_s: float = 3600.0,
    key_grace_s: float | None = None,
    heartbeat_s: float = 15.0,
    token_delay_s: float = 0.04,
    transition_s: float | None = None,
    simulate: bool = True,
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    store: ModelStore | None = None,
    identity_secret: bytes | None = None,
    identity_signature: Scheme = "v2",
    identity_max_skew_s: float = 30.0,
) -> Starlette:
    """The backend app. `simulate=False` (or `event_interval <= 0`) turns the random steps off.

    `clock` drives token times, key rotation and the signature window, so tests can step
    through them.
    `identity_secret` makes the app refuse requests whose identity headers the sidecar did not
    sign (`[identity] sign = true` in the sidecar's config) with the `identity_signature` scheme
    (the sidecar's `identity.signature`), v2 ones older or newer than `identity_max_skew_s`.
    """
    store = store or ModelStore()
    bus = EventBus()
    simulator = ModelSimulator(
        store,
        bus,
        interval_s=event_interval,
        transition_s=min(1.5, max(event_interval, 0.1)) if transition_s is None else transition_s,
        rng=rng,
    )
    keyring = KeyRing(
        rotation_s=key_rotation_s,
        grace_s=key_grace_s if key_grace_s is not None else 2.0 * token_ttl,
        clock=clock,
    )
    idp = IdentityProvider(
        issuer=issuer,
        audience=audience,
        token_ttl_s=token_ttl,
        refresh_ttl_s=refresh_ttl,
        keyring=keyring,
        clock=clock,
    )
    backend = DemoBackend(
        store=store,
        bus=bus,
        simulator=simulator,
        idp=idp,
        heartbeat_s=heartbeat_s,
        token_delay_s=token_delay_s,
        simulate=simulate and event_interval > 0,
    )
    middleware = []
    if identity_secret is not None:
        middleware.append(
            Middleware(
                IdentitySignatureCheck,
                secret=identity_secret,
                scheme=identity_signature,
                max_skew_s=identity_max_skew_s,
                clock=clock,
            )
        )
    app = Starlette(routes=backend.routes(), lifespan=backend.lifespan, middleware=middleware)
    app.state.backend = backend
    return app


def create_web_app(
    *, api_url: str = "http://localhost:8000", ws_url: str = "ws://localhost:8000/ws"
) -> Starlette:
    """The demo page: static files plus a generated `/config.js` naming the sidecar's URLs."""
    config_js = (
        "window.AUTHPROXY_CONFIG = "
        + json.dumps({"apiUrl": api_url.rstrip("/"), "wsUrl": ws_url})
        + ";\n"
    )

    async def config(request: Request) -> Response:
        return Response(
            config_js,
            media_type="application/javascript",
            headers={"Cache-Control": "no-store"},
        )

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/config.js", config),
            Route("/healthz", healthz),
            Mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web"),
        ]
    )
