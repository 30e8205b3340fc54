from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.servers import Process, start_upstream


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """The reporting upstream of tests/support/upstreams.py on a fresh port, one per module."""
    process = start_upstream("tests.support.upstreams:app", tmp_path_factory.mktemp("upstream"))
    yield process
    process.stop()
