"""`server.shutdown_delay_s`: on SIGTERM readiness fails at once and the listener keeps serving for
the delay (while Kubernetes takes the pod out of its endpoints), then the drain; SIGINT skips it."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.servers import Process, start_sidecar, start_upstream


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Process]:
    process = start_upstream("tests.support.upstreams:app", tmp_path)
    yield process
    process.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_fails_readiness_at_once_and_serves_through_the_delay(
    tmp_path: Path, upstream: Process, workers: int
) -> None:
    sidecar = start_sidecar(
        tmp_path, upstream.port, server=f"shutdown_delay_s = 2.0\nworkers = {workers}\n"
    )
    try:
        assert httpx.get(sidecar.admin_url + "/readyz").status_code == 200
        signalled = time.monotonic()
        sidecar.process.signal(signal.SIGTERM)
        deadline = signalled + 1.0
        while httpx.get(sidecar.admin_url + "/readyz").status_code != 503:
            assert time.monotonic() < deadline, "readiness still 200 after SIGTERM"
            time.sleep(0.05)
        # Within the delay, new connections are accepted and served as before (not 503).
        served = 0
        while time.monotonic() - signalled < 1.5:
            r = httpx.get(sidecar.url + "/echo/during-delay", headers={"Connection": "close"})
            assert r.status_code == 200, r.text
            served += 1
            time.sleep(0.1)
        assert served >= 5
        # After it: the listener closes and the process exits 0.
        assert sidecar.process.proc.wait(15) == 0
        assert time.monotonic() - signalled >= 2.0
        with pytest.raises(httpx.ConnectError):
            httpx.get(sidecar.url + "/echo/after", timeout=2)
    finally:
        sidecar.stop()


def test_sigint_and_a_second_sigterm_skip_the_delay(tmp_path: Path, upstream: Process) -> None:
    for signals in ([signal.SIGINT], [signal.SIGTERM, signal.SIGTERM]):
        sidecar = start_sidecar(tmp_path, upstream.port, server="shutdown_delay_s = 60\n")
        try:
            started = time.monotonic()
            for sig in signals:
                sidecar.process.signal(sig)
                time.sleep(0.3)
            assert sidecar.process.proc.wait(15) == 0
            assert time.monotonic() - started < 10, signals
        finally:
            sidecar.stop()
