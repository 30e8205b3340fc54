"""The demo backend's OpenAPI 3.1 document, served at `GET /openapi.json`.

Written by hand beside the routes it describes (a test holds the two together), with the
request bodies' schemas taken from the pydantic models the handlers validate with. Like FastAPI
with `include_in_schema=False`, it leaves out the backend's own housekeeping (`/`, `/healthz`,
`/openapi.json`) and the WebSocket (`/ws`, which OpenAPI cannot describe). Point
`authproxy coverage --openapi` at it to see which operations the sidecar's routes protect.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

_ERROR = {"description": "a JSON error", "content": {"application/json": {}}}


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": model.model_json_schema()}},
    }


def _op(op_id: str, summary: str, body: type[BaseModel] | None = None, **extra: Any) -> Any:
    op: dict[str, Any] = {
        "operationId": op_id,
        "summary": summary,
        "responses": {"200": {"description": "OK"}, "default": _ERROR},
        **extra,
    }
    if body is not None:
        op["requestBody"] = _body(body)
    return op


_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]


def document(
    *,
    model_create: type[BaseModel],
    model_replace: type[BaseModel],
    model_patch: type[BaseModel],
    chat: type[BaseModel],
    login: type[BaseModel],
    refresh: type[BaseModel],
) -> dict[str, Any]:
    """The document; the body models are passed in so this module imports none of the app."""
    bearer: list[dict[str, list[str]]] = [
        {"sidecar": []}
    ]  # the demo trusts the sidecar's identity headers
    return {
        "openapi": "3.1.0",
        "info": {"title": "upstream_demo", "version": "1.0.0"},
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {
                "sidecar": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Auth-Subject",
                    "description": "set by authproxy after it authenticated the caller",
                }
            }
        },
        "paths": {
            "/api/models": {
                "get": _op("listModels", "list models (X-Total-Count)", security=bearer),
                "post": _op("createModel", "create a model", model_create, security=bearer),
            },
            "/api/models/{id}": {
                "parameters": _ID,
                "get": _op("getModel", "one model", security=bearer),
                "put": _op("replaceModel", "replace a model", model_replace, security=bearer),
                "patch": _op("patchModel", "change some fields", model_patch, security=bearer),
                "delete": _op("deleteModel", "delete a model", security=bearer),
            },
            "/api/models/{id}/start": {
                "parameters": _ID,
                "post": _op("startModel", "start a model (emits events)", security=bearer),
            },
            "/api/models/{id}/stop": {
                "parameters": _ID,
                "post": _op("stopModel", "stop a model (emits events)", security=bearer),
            },
            "/api/chat/completions": {
                "post": _op(
                    "chatCompletions", "chat (stream: true gives SSE)", chat, security=bearer
                )
            },
            "/api/whoami": {
                "get": _op("whoami", "echo the identity headers received", security=bearer)
            },
            "/auth/login": {"post": _op("login", "demo login: access and refresh tokens", login)},
            "/auth/refresh": {"post": _op("refresh", "new tokens for a refresh token", refresh)},
            "/.well-known/jwks.json": {"get": _op("jwks", "the IdP's signing keys")},
            "/.well-known/openid-configuration": {
                "get": _op("openidConfiguration", "OpenID Connect discovery")
            },
        },
    }
