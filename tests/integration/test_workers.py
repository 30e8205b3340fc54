"""`server.workers = 2`: a supervisor and two worker processes sharing the public port."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.support.servers import (
    Process,
    Sidecar,
    free_port,
    sidecar_config,
    start_sidecar,
    start_upstream,
)

WORKERS = 2
# Connections the kernel spreads over the workers by a hash of their addresses: the chance that
# this many all land on one of two workers is 2**-23.
CONNECTIONS = 24


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory, upstream: Process) -> Iterator[Sidecar]:
    s = start_sidecar(tmp_path_factory.mktemp("workers"), upstream.port, server="workers = 2")
    yield s
    s.stop()


def workers_of(sidecar: Sidecar) -> set[int]:
    return {p.pid for p in psutil.Process(sidecar.process.proc.pid).children()}


def private_dir_of(sidecar: Sidecar) -> Path:
    """The supervisor's private directory, as its workers were told."""
    worker = psutil.Process(min(workers_of(sidecar)))
    return Path(json.loads(worker.environ()["AUTHPROXY_WORKER"])["directory"])


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.05)


def worker_holding(sidecar: Sidecar, client_port: int) -> int:
    """The pid of the worker holding the other end of an open connection from `client_port`."""
    for pid in workers_of(sidecar):
        for c in psutil.Process(pid).net_connections("tcp"):
            if c.laddr.port == sidecar.port and c.raddr and c.raddr.port == client_port:
                return pid
    raise AssertionError(f"no worker holds the connection from port {client_port}")


def serving_worker(sidecar: Sidecar, conn: http.client.HTTPConnection) -> int:
    assert conn.sock is not None
    return worker_holding(sidecar, conn.sock.getsockname()[1])


def requests_on_fresh_connections(
    sidecar: Sidecar, path: str = "/echo/workers", headers: dict[str, str] | None = None
) -> list[tuple[int, int]]:
    """(status, serving worker pid) of one request on each of CONNECTIONS new connections."""
    conns = [
        http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=10)
        for _ in range(CONNECTIONS)
    ]
    try:
        out = []
        for conn in conns:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            response.read()
            out.append((response.status, serving_worker(sidecar, conn)))  # kept alive: still open
        return out
    finally:
        for conn in conns:
            conn.close()


def requests_total(sidecar: Sidecar) -> float:
    text = httpx.get(f"{sidecar.admin_url}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "authproxy_requests"
        for sample in family.samples
        if sample.name == "authproxy_requests_total"
    )


def test_requests_on_separate_connections_are_served_by_every_worker(group: Sidecar) -> None:
    workers = workers_of(group)
    assert len(workers) == WORKERS
    served = requests_on_fresh_connections(group)
    assert {status for status, _ in served} == {200}
    assert {pid for _, pid in served} == workers


def test_the_admin_listener_sums_the_requests_of_every_worker(group: Sidecar) -> None:
    before = requests_total(group)
    served = requests_on_fresh_connections(group)
    assert len({pid for _, pid in served}) == WORKERS
    # Each worker's access is counted by the time its response has been read.
    assert requests_total(group) - before == len(served)


def test_readyz_is_ready_with_every_worker_ready_and_lists_them(group: Sidecar) -> None:
    ready = httpx.get(f"{group.admin_url}/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert body["checks"]["all_workers_ready"] is True
    assert {w["pid"] for w in body["workers"]} == workers_of(group)
    assert all(w["ready"] and w["checks"]["not_draining"] for w in body["workers"])


def test_the_public_port_does_not_answer_admin_paths(group: Sidecar) -> None:
    r = httpx.get(f"{group.url}/readyz")
    assert "all_workers_ready" not in r.text


def test_one_worker_is_one_process_with_no_supervisor(tmp_path: Path, upstream: Process) -> None:
    s = start_sidecar(tmp_path, upstream.port, server="workers = 1")
    try:
        assert httpx.get(f"{s.url}/echo/one").status_code == 200
        assert psutil.Process(s.process.proc.pid).children() == []
        assert "workers" not in httpx.get(f"{s.admin_url}/readyz").json()
    finally:
        s.stop()


def test_sighup_reloads_the_keys_of_every_worker(tmp_path: Path, upstream: Process) -> None:
    def sha(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[keys]]\nid = "first"\nsha256 = "{sha("ak_first_key")}"\n')
    body = f"""
        [auth.api_keys]
        keys_file = "{keys}"
        watch_interval_s = 0
        [[routes]]
        path = "/*"
        auth = ["api_key"]
        """
    s = start_sidecar(tmp_path, upstream.port, body, server="workers = 2")
    try:
        new_key = {"X-API-Key": "ak_second_key"}
        assert {status for status, _ in requests_on_fresh_connections(s, headers=new_key)} == {401}
        keys.write_text(
            keys.read_text() + f'[[keys]]\nid = "second"\nsha256 = "{sha("ak_second_key")}"\n'
        )
        s.process.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while True:
            served = requests_on_fresh_connections(s, headers=new_key)
            if {status for status, _ in served} == {200}:
                break
            assert time.monotonic() < deadline, f"the new key is refused after SIGHUP: {served}"
            time.sleep(0.1)
        assert {pid for _, pid in served} == workers_of(s)
        assert s.process.proc.poll() is None
    finally:
        s.stop()


def test_sigterm_lets_every_workers_in_flight_requests_finish_and_exits_0(
    tmp_path: Path, upstream: Process
) -> None:
    s = start_sidecar(tmp_path, upstream.port, server="workers = 2")
    workers = workers_of(s)
    directory = private_dir_of(s)
    conns = [http.client.HTTPConnection("127.0.0.1", s.port, timeout=10) for _ in range(16)]
    for conn in conns:
        conn.request("GET", "/slow?delay=1.5")
    time.sleep(0.3)
    assert {serving_worker(s, conn) for conn in conns} == workers  # in flight on both
    s.process.signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{s.url}/echo/new", timeout=2)
    for conn in conns:
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read()) == {"slow": True}
        conn.close()
    assert s.process.proc.wait(10) == 0
    assert not any(psutil.pid_exists(pid) for pid in workers)
    assert not directory.exists()
    output = s.output()
    assert output.count('"message":"worker exited"') == WORKERS
    assert '"exit":0' in output and "Traceback" not in output


async def test_sigterm_closes_the_websockets_of_every_worker_with_1001_after_the_drain(
    tmp_path: Path,
) -> None:
    upstream = start_upstream("tests.support.ws_upstream:app", tmp_path)
    s = start_sidecar(tmp_path, upstream.port, "[websocket]\ndrain_s = 1\n", server="workers = 2")
    try:
        sessions = [
            await connect(f"{s.ws_url}/ws/echo", open_timeout=5, ping_interval=None)
            for _ in range(16)
        ]
        holders = {worker_holding(s, ws.transport.get_extra_info("sockname")[1]) for ws in sessions}
        assert holders == workers_of(s)  # sessions open on both workers
        s.process.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        for ws in sessions:  # still relayed while draining
            await ws.send("during the drain")
            assert await ws.recv() == "during the drain"
        for ws in sessions:
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(5):
                    await ws.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1001
        assert s.process.proc.wait(10) == 0
    finally:
        s.stop()
        upstream.stop()


def test_a_killed_worker_is_replaced_and_readiness_waits_for_it(
    tmp_path: Path, upstream: Process
) -> None:
    s = start_sidecar(tmp_path, upstream.port, server="workers = 2")
    try:
        victim = min(workers_of(s))
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: httpx.get(f"{s.admin_url}/readyz").status_code == 503,
            what="/readyz to turn 503 without the killed worker",
        )
        wait_for(
            lambda: httpx.get(f"{s.admin_url}/readyz").status_code == 200,
            what="/readyz to be ready again with a new worker",
        )
        replaced = workers_of(s)
        assert len(replaced) == WORKERS and victim not in replaced
        served = requests_on_fresh_connections(s)
        assert {status for status, _ in served} == {200}
        assert {pid for _, pid in served} == replaced
        assert '"message":"worker exited unexpectedly; replacing it"' in s.output()
    finally:
        code = s.stop()
    assert code == 0


def test_workers_drain_and_exit_when_the_supervisor_is_killed(
    tmp_path: Path, upstream: Process
) -> None:
    s = start_sidecar(tmp_path, upstream.port, server="workers = 2")
    workers = [psutil.Process(pid) for pid in workers_of(s)]
    directory = private_dir_of(s)
    try:
        s.process.proc.kill()
        s.process.proc.wait(5)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive
        for p in workers:  # each drained (its own log line) rather than died
            assert f"Finished server process [{p.pid}]" in s.output()
    finally:
        for p in workers:
            if p.is_running():
                p.kill()
        shutil.rmtree(directory, ignore_errors=True)  # the supervisor had no chance to


def test_a_config_error_exits_2_before_any_worker_starts(tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    config = tmp_path / "c.toml"
    config.write_text(
        sidecar_config(
            free_port(),
            port,
            admin_port,
            """
            [[auth.jwt.providers]]
            name = "t"
            issuer = "https://idp.test"
            audiences = ["api"]
            secret_env = "UNSET_SECRET_FOR_WORKERS_TEST"
            algorithms = ["HS256"]
            [[routes]]
            path = "/*"
            auth = ["jwt"]
            """,
            server="workers = 2",
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "UNSET_SECRET_FOR_WORKERS_TEST"}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    assert "config error: auth.jwt.providers[0].secret_env" in lines[0]
    assert "Traceback" not in result.stderr
