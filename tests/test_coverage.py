"""`authproxy coverage`: every operation of an OpenAPI document with the route and auth that
apply; exit 1 when one is public by accident or matches no route."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Settings, from_dict
from proxy.coverage import base_path, judge, load_document
from proxy.errors import ConfigError
from tests.support.servers import ROOT

ROUTES: list[dict[str, Any]] = [
    {"path": "/auth/*", "auth": "public"},
    {"path": "/v1/models/default", "auth": "public", "methods": ["GET"]},
    {"path": "/v1/admin/*", "auth": ["api_key"], "scopes": ["admin"]},
    {"path": "/v1/tenants/*", "auth": ["jwt"], "require_claims": {"tenant": "acme"}},
    {"path": "/v1/*", "auth": ["api_key"], "methods": ["GET", "POST"]},
    {"path": "/preview/*", "auth": ["api_key"], "auth_optional": True},
]
KEY = {"id": "k", "sha256": "a" * 64}
PROVIDER = {
    "name": "p",
    "issuer": "https://idp.example",
    "audiences": ["x"],
    "jwks_url": "https://idp.example/jwks",
    "algorithms": ["RS256"],
}


def settings(extra: list[dict[str, Any]] | None = None) -> Settings:
    return from_dict(
        {
            "auth": {"jwt": {"providers": [PROVIDER]}, "api_keys": {"keys": [KEY]}},
            "routes": ROUTES + (extra or []),
        }
    )


def op(op_id: str) -> dict[str, Any]:
    return {"operationId": op_id, "responses": {"200": {"description": "OK"}}}


DOC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "t", "version": "1"},
    "paths": {
        "/auth/token": {"post": op("token")},
        "/v1/models": {"get": op("list"), "post": op("create")},
        "/v1/models/{name}": {"get": op("get"), "delete": op("delete")},
        "/v1/admin/reset": {"post": op("reset")},
        "/v1/tenants/{t}/usage": {"get": op("usage")},
        "/preview/feature": {"get": op("preview")},
        "/metrics": {"get": op("metrics")},
    },
}


def verdicts(s: Settings, doc: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(o.method, o.path): o.verdict for o in judge(s, doc)}


def test_each_operation_gets_its_route_auth_and_verdict() -> None:
    ops = judge(settings(), DOC)
    by = {(o.method, o.path): o for o in ops}
    assert len(ops) == 9
    assert by[("POST", "/auth/token")].verdict == "public"
    assert by[("GET", "/v1/models")].verdict == "protected"
    assert by[("GET", "/v1/models")].auth == "api_key"
    assert by[("POST", "/v1/admin/reset")].auth == "api_key scopes=admin"
    assert by[("GET", "/v1/tenants/{t}/usage")].auth == "jwt claims=tenant"
    # A method the matching prefix route does not take falls through: nothing else matches.
    assert by[("DELETE", "/v1/models/{name}")].verdict == "UNMATCHED"
    assert by[("GET", "/metrics")].verdict == "UNMATCHED"
    assert by[("GET", "/metrics")].route is None
    preview = by[("GET", "/preview/feature")]
    assert preview.verdict == "PUBLIC BY ACCIDENT" and "auth_optional" in preview.note


def test_an_earlier_exact_route_some_parameter_values_hit_is_noted() -> None:
    get = next(o for o in judge(settings(), DOC) if o.operation_id == "get")
    assert get.verdict == "protected"
    assert get.note == "/v1/models/default is judged by /v1/models/default"


def test_a_catch_all_public_route_is_public_by_accident_a_named_one_is_not() -> None:
    s = settings([{"path": "/*", "auth": "public"}])
    v = verdicts(s, DOC)
    assert v[("GET", "/metrics")] == "PUBLIC BY ACCIDENT"
    assert v[("POST", "/auth/token")] == "public"
    s = settings([{"path": "/metrics", "auth": "public"}])
    assert verdicts(s, DOC)[("GET", "/metrics")] == "public"


def test_the_servers_path_and_swagger_base_path_prefix_every_operation() -> None:
    assert base_path({"servers": [{"url": "https://api.example.com/v1/"}]}) == "/v1"
    assert base_path({"servers": [{"url": "/{version}"}]}) == "/x"
    assert base_path({"swagger": "2.0", "basePath": "/v1"}) == "/v1"
    assert base_path({}) == ""
    doc = {"servers": [{"url": "/v1"}], "paths": {"/models": {"get": op("list")}}}
    assert verdicts(settings(), doc) == {("GET", "/v1/models"): "protected"}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_file(tmp_path: Path, routes: str) -> Path:
    return write(
        tmp_path,
        "authproxy.toml",
        '[auth.api_keys]\n[[auth.api_keys.keys]]\nid = "k"\nsha256 = "' + "a" * 64 + '"\n' + routes,
    )


def coverage(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "coverage", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_the_command_prints_a_table_and_exits_1_on_a_problem(tmp_path: Path) -> None:
    cfg = config_file(
        tmp_path, '[[routes]]\npath = "/v1/*"\nauth = ["api_key"]\nmethods = ["GET", "POST"]\n'
    )
    api = write(tmp_path, "openapi.json", json.dumps(DOC))
    result = coverage("--config", str(cfg), "--openapi", str(api))
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["METHOD", "PATH", "ROUTE", "AUTH", "VERDICT", "NOTE"]
    row = next(line for line in lines if line.startswith("GET") and "/v1/models " in line)
    assert row.split()[:5] == ["GET", "/v1/models", "/v1/*", "api_key", "protected"]
    assert "9 operation(s): 4 problem(s) (0 public by accident, 4 unmatched)" in result.stdout


def test_the_command_exits_0_when_every_operation_is_covered(tmp_path: Path) -> None:
    cfg = config_file(tmp_path, '[[routes]]\npath = "/v1/*"\nauth = ["api_key"]\n')
    yaml_doc = "openapi: 3.0.3\npaths:\n  /v1/models:\n    get: {}\n    post: {}\n"
    api = write(tmp_path, "openapi.yaml", yaml_doc)
    result = coverage("--config", str(cfg), "--openapi", str(api))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 operation(s): 0 problem(s)" in result.stdout


def test_an_unreadable_document_is_a_one_line_error_exit_2(tmp_path: Path) -> None:
    cfg = config_file(tmp_path, '[[routes]]\npath = "/v1/*"\nauth = ["api_key"]\n')
    bad = write(tmp_path, "bad.json", "{not json")
    result = coverage("--config", str(cfg), "--openapi", str(bad))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not a valid OpenAPI document" in result.stderr
    with pytest.raises(ConfigError, match="no 'paths' object"):
        load_document(write(tmp_path, "empty.json", "{}"))
    with pytest.raises(ConfigError, match="file not found"):
        load_document(tmp_path / "missing.json")
