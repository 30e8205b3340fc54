"""The long soak is marked `soak` and left out unless asked for: `make soak` (which runs
`pytest -m soak tests/soak`), any `-m` expression naming it, or AUTHPROXY_SOAK=1. The short soak
has no such mark and runs with the rest of the suite."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("AUTHPROXY_SOAK") == "1" or "soak" in (config.getoption("markexpr") or ""):
        return
    keep = [item for item in items if item.get_closest_marker("soak") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
