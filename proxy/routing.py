"""The route table: ordered `[[routes]]`, first match wins, compiled at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from .config import RouteSettings, route_names


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled route."""

    index: int
    settings: RouteSettings
    prefix: str | None  # "/api/" for "/api/*"; None for an exact pattern
    exact: str | None
    methods: frozenset[str]  # empty: every method
    name: str  # `name`, default the path: the label in logs and metrics (never the position)
    public: bool  # `settings.public`, read here without the model's interpreted property
    # The route's own upstream timeouts (settings' `read_timeout_s`, `timeout_s`): a pydantic
    # model's attribute costs a `__getattr__` hook a read, and every forwarded request reads both.
    read_timeout_s: float | None
    timeout_s: float | None

    def matches(self, path: str, method: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.prefix is not None:
            return path.startswith(self.prefix)
        return path == self.exact


class RouteTable:
    """Finds the first route matching a judged path and method."""

    def __init__(self, routes: tuple[RouteSettings, ...]) -> None:
        compiled = []
        names = route_names(routes)
        for i, r in enumerate(routes):
            # "/api/*" matches "/api/" and everything below it, not "/api" itself; "*" everything.
            prefix = r.path[:-1] if r.path.endswith("*") else None
            if r.path == "*":
                prefix = "/"
            methods = set(r.methods)
            if "GET" in methods:
                methods.add("HEAD")  # RFC 9110 9.3.2: HEAD is GET without the body
            compiled.append(
                Route(
                    i,
                    r,
                    prefix,
                    None if prefix is not None else r.path,
                    frozenset(methods),
                    names[i],
                    r.public,
                    r.read_timeout_s,
                    r.timeout_s,
                )
            )
        self.routes: tuple[Route, ...] = tuple(compiled)

    def match(self, path: str, method: str) -> Route | None:
        # `Route.matches`, inlined: a method call per route tried cost more than the test.
        for route in self.routes:
            if route.methods and method not in route.methods:
                continue
            if path.startswith(route.prefix) if route.prefix is not None else path == route.exact:
                return route
        return None
