"""The demo serves an OpenAPI document true to its routes, and `authproxy coverage` reads it
against the demo configuration."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.routing import Route

from proxy import config
from proxy.coverage import judge, load_document
from tests.support.servers import ROOT

ServeApp = Callable[..., AbstractAsyncContextManager[str]]

# Left out on purpose, as FastAPI's include_in_schema=False would: housekeeping, not the API.
UNDOCUMENTED = {"/", "/healthz", "/openapi.json"}


async def served(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    doc: dict[str, Any] = response.json()
    return doc


async def test_every_http_route_is_documented_with_its_methods_and_nothing_else(
    client: httpx.AsyncClient, demo_app: Starlette
) -> None:
    doc = await served(client)
    assert doc["openapi"].startswith("3.")
    documented = {
        (path, method.upper())
        for path, item in doc["paths"].items()
        for method in item
        if method != "parameters"
    }
    routed = {
        (r.path, m)
        for r in demo_app.routes
        if isinstance(r, Route) and r.path not in UNDOCUMENTED
        for m in (r.methods or ())
        if m != "HEAD"
    }
    assert documented == routed


async def test_request_bodies_carry_the_handlers_schemas(client: httpx.AsyncClient) -> None:
    doc = await served(client)
    login = doc["paths"]["/auth/login"]["post"]["requestBody"]["content"]["application/json"]
    assert set(login["schema"]["required"]) == {"username", "password"}
    chat = doc["paths"]["/api/chat/completions"]["post"]["requestBody"]
    assert "messages" in chat["content"]["application/json"]["schema"]["properties"]


async def test_coverage_of_the_demo_config_protects_the_api_and_finds_the_idp_paths(
    client: httpx.AsyncClient,
) -> None:
    ops = judge(config.load(ROOT / "config.toml", environ={}), await served(client))
    verdicts = {(o.method, o.path): o.verdict for o in ops}
    assert all(v == "protected" for (_, p), v in verdicts.items() if p.startswith("/api/"))
    assert verdicts[("POST", "/auth/login")] == "public"
    # The IdP's own endpoints are fetched by the sidecar directly, not through it: no route.
    assert verdicts[("GET", "/.well-known/jwks.json")] == "UNMATCHED"
    scoped = {o.path for o in ops if o.method == "DELETE"}
    assert scoped == {"/api/models/{id}"}
    delete = next(o for o in ops if o.method == "DELETE")
    assert delete.auth == "jwt | api_key scopes=models:write"


async def test_coverage_reads_the_document_from_the_running_demo_by_url(
    serve_app: ServeApp, demo_app: Starlette
) -> None:
    async with serve_app(demo_app) as host:
        doc = await asyncio.to_thread(load_document, f"http://{host}/openapi.json")
    assert "/api/models/{id}/start" in doc["paths"]
