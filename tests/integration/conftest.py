from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import Process, start_upstream


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Process]:
    """The reporting upstream of tests/support/upstreams.py on a fresh port."""
    process = start_upstream("tests.support.upstreams:app", tmp_path)
    yield process
    process.stop()
