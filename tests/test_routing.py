"""The route table: first match wins, exact and trailing-* patterns, methods."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy import config
from proxy.routing import RouteTable


def table(*routes: dict[str, object]) -> RouteTable:
    return RouteTable(config.from_dict({"routes": list(routes)}).routes)


def test_first_match_wins() -> None:
    t = table({"path": "/api/admin/*", "auth": ["api_key"]}, {"path": "/api/*", "auth": "public"})
    first = t.match("/api/admin/users", "GET")
    second = t.match("/api/models", "GET")
    assert first is not None and first.index == 0
    assert second is not None and second.index == 1


def test_prefix_pattern_covers_below_not_the_bare_prefix() -> None:
    t = table({"path": "/api/*", "auth": "public"})
    assert t.match("/api/", "GET") is not None
    assert t.match("/api/a/b/c", "GET") is not None
    assert t.match("/api", "GET") is None
    assert t.match("/apix/y", "GET") is None


def test_exact_pattern_matches_only_itself() -> None:
    t = table({"path": "/ws", "auth": "public"})
    assert t.match("/ws", "GET") is not None
    assert t.match("/ws/", "GET") is None
    assert t.match("/wsx", "GET") is None


def test_star_alone_matches_everything() -> None:
    t = table({"path": "*", "auth": "public"})
    assert t.match("/anything/at/all", "DELETE") is not None


def test_methods_restrict_and_get_implies_head() -> None:
    t = table({"path": "/api/*", "methods": ["get"], "auth": "public"})
    assert t.match("/api/x", "GET") is not None
    assert t.match("/api/x", "HEAD") is not None
    assert t.match("/api/x", "POST") is None


def test_no_route_is_none() -> None:
    assert table().match("/", "GET") is None


_TABLE = table(
    {"path": "/api/admin/*", "methods": ["post", "delete"], "auth": ["api_key"]},
    {"path": "/api/*", "auth": "public"},
    {"path": "/ws", "methods": ["get"], "auth": "public"},
    {"path": "/health", "auth": "public"},
)


@given(
    st.sampled_from(["/api/", "/api/admin/", "/ws", "/health", "/", "/apix", "/ws/"]).flatmap(
        lambda base: st.text("abc/", max_size=6).map(lambda tail: base + tail)
    ),
    st.sampled_from(["GET", "HEAD", "POST", "DELETE", "PUT"]),
)
def test_the_table_picks_the_first_route_whose_own_rule_matches(path: str, method: str) -> None:
    # RouteTable.match inlines Route.matches for speed: it must stay the same rule.
    expected = next((r for r in _TABLE.routes if r.matches(path, method)), None)
    assert _TABLE.match(path, method) is expected
