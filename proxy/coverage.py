"""`authproxy coverage`: which of the upstream's operations the policy protects, and which it
leaves open by accident.

Every operation of an OpenAPI document (3.x `servers`, or 2.0 `basePath`, give the path prefix
the upstream serves them under) is matched against the same `RouteTable` the server uses, with
the path template itself as the path (`/api/models/{id}`: a parameter stands for any segment).
An operation is a problem when it matches no route (the sidecar answers 404: the endpoint is
unreachable through it) or when it is reachable anonymously without a route saying
`auth = "public"` for it: an `auth_optional` route, or a catch-all (`*`, `/*`) public route
that names nothing in particular. An earlier exact route that some parameter values would match
is shown as a note (first match wins, so those values are judged by it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config import Settings
from .errors import ConfigError
from .routing import Route, RouteTable

HTTP_OPERATIONS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_PARAM = re.compile(r"\{[^/{}]*\}")

Verdict = str  # "protected", "public", "PUBLIC BY ACCIDENT", "UNMATCHED"
PROBLEMS = frozenset({"PUBLIC BY ACCIDENT", "UNMATCHED"})


@dataclass(frozen=True, slots=True)
class Operation:
    """One method on one path of the document, and what the policy makes of it."""

    method: str
    path: str  # as the upstream serves it: the base path plus the document's template
    operation_id: str | None
    route: Route | None
    verdict: Verdict
    auth: str
    note: str = ""

    @property
    def problem(self) -> bool:
        return self.verdict in PROBLEMS


MAX_DOCUMENT_BYTES = 32 * 1024 * 1024


def _fetch(url: str) -> str:
    # The CLI only, never the server: the standard library is enough for one GET.
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (http/https only)
            data: bytes = resp.read(MAX_DOCUMENT_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ConfigError(url, f"cannot fetch: {exc}") from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ConfigError(url, f"larger than {MAX_DOCUMENT_BYTES} bytes")
    return data.decode("utf-8", "replace")


def load_document(path: str | Path) -> dict[str, Any]:
    """The OpenAPI document from a file (JSON, or YAML by its extension) or an http(s) URL
    (`http://127.0.0.1:8001/openapi.json`); problems are `ConfigError`s."""
    name = str(path)
    if name.startswith(("http://", "https://")):
        text = _fetch(name)
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(name, "file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(name, f"cannot read: {exc}") from None
    try:
        if urlsplit(name).path.endswith((".yaml", ".yml")):
            import yaml  # type: ignore[import-untyped]

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as exc:  # json and yaml raise their own error types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(name, f"not a valid OpenAPI document: {first}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("paths"), dict):
        raise ConfigError(name, "not an OpenAPI document (no 'paths' object)")
    return doc


def base_path(doc: dict[str, Any]) -> str:
    """The path prefix of every operation: the first server's path (3.x) or `basePath` (2.0)."""
    servers = doc.get("servers")
    if isinstance(servers, list) and servers and isinstance(servers[0], dict):
        url = servers[0].get("url")
        if isinstance(url, str):
            return _PARAM.sub("x", urlsplit(url).path).rstrip("/")
    base = doc.get("basePath")
    return base.rstrip("/") if isinstance(base, str) else ""


def _auth_text(route: Route) -> str:
    s = route.settings
    if s.public:
        return "public"
    text = " | ".join(s.auth)
    if s.scopes:
        text += f" scopes={' '.join(s.scopes)}"
    if s.require_claims:
        text += " claims=" + ",".join(s.require_claims)
    if s.auth_optional:
        text += " (optional)"
    return text


def _shadowing(routes: RouteTable, path: str, method: str, matched: Route | None) -> str:
    if "{" not in path:
        return ""
    pattern = re.compile(
        _PARAM.sub("[^/]+", re.escape(path).replace(r"\{", "{").replace(r"\}", "}"))
    )
    for route in routes.routes:
        if route is matched:
            break
        exact = route.exact
        if exact is not None and pattern.fullmatch(exact) and route.matches(exact, method):
            return f"{exact} is judged by {route.name}"
    return ""


def judge(settings: Settings, doc: dict[str, Any]) -> list[Operation]:
    """Every operation of `doc`, in document order, with its route and verdict."""
    routes = RouteTable(settings.routes)
    base = base_path(doc)
    out = []
    for template, item in doc["paths"].items():
        if not isinstance(template, str) or not isinstance(item, dict):
            continue
        path = base + (template if template.startswith("/") else "/" + template)
        for op in HTTP_OPERATIONS:
            spec = item.get(op)
            if not isinstance(spec, dict):
                continue
            method = op.upper()
            route = routes.match(path, method)
            op_id = spec.get("operationId")
            op_id = op_id if isinstance(op_id, str) else None
            note = _shadowing(routes, path, method, route)
            if route is None:
                out.append(Operation(method, path, op_id, None, "UNMATCHED", "-", note or "404"))
                continue
            s = route.settings
            if s.public and s.path in ("*", "/*"):
                verdict = "PUBLIC BY ACCIDENT"
                note = note or "only a catch-all public route matches"
            elif s.public:
                verdict = "public"
            elif s.anonymous_ok:
                verdict = "PUBLIC BY ACCIDENT"
                note = note or "auth_optional: anonymous requests pass"
            else:
                verdict = "protected"
            out.append(Operation(method, path, op_id, route, verdict, _auth_text(route), note))
    return out


def table(ops: list[Operation]) -> str:
    """The operations as an aligned text table, problems counted in a last line."""
    rows = [("METHOD", "PATH", "ROUTE", "AUTH", "VERDICT", "NOTE")]
    for o in ops:
        route = o.route.name if o.route is not None else "(none)"
        rows.append((o.method, o.path, route, o.auth, o.verdict, o.note))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r[:5])) + "  " + r[5] for r in rows
    ]
    problems = sum(o.problem for o in ops)
    summary = f"{len(ops)} operation(s): {problems} problem(s)"
    if problems:
        unmatched = sum(o.verdict == "UNMATCHED" for o in ops)
        summary += f" ({problems - unmatched} public by accident, {unmatched} unmatched)"
    return "\n".join(line.rstrip() for line in [*lines, "", summary])
