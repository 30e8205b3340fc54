"""`make run` as a newcomer meets it: real make, real ports, real signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.servers import ROOT, free_port


@dataclass
class Run:
    proc: subprocess.Popen[bytes]
    log: Path
    ports: dict[str, int]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def listening(self) -> list[int]:
        busy = []
        for port in self.ports.values():
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    busy.append(port)
        return busy

    def stack_processes(self) -> list[str]:
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
        mark = f"--upstream-port {self.ports['upstream']}"
        return [
            line
            for line in ps.splitlines()
            if mark in line or f"--port {self.ports['upstream']}" in line
        ]

    def wait_stopped(self, timeout: float) -> float:
        start = time.monotonic()
        while self.listening() or self.stack_processes():
            assert time.monotonic() - start < timeout, (
                self.listening(),
                self.stack_processes(),
                self.output()[-3000:],
            )
            time.sleep(0.1)
        return time.monotonic() - start


def make_run(tmp_path: Path, ports: dict[str, int], *extra: str) -> Run:
    log = tmp_path / "make-run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                # As from a terminal: SIGINT and SIGQUIT at their defaults, whatever this process
                # inherited (a job started with `&` by a script ignores both, and make keeps
                # ignoring a signal ignored at its start). The pid stays make's (exec).
                sys.executable,
                "-c",
                "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                "signal.signal(signal.SIGQUIT, signal.SIG_DFL); os.execvp('make', sys.argv[1:])",
                "make",
                "--no-print-directory",
                "run",
                f"WEB_PORT={ports['web']}",
                f"SIDECAR_PORT={ports['sidecar']}",
                f"ADMIN_PORT={ports['admin']}",
                f"UPSTREAM_PORT={ports['upstream']}",
                *extra,
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a "Ctrl-C" reaches only it
        )
    return Run(proc, log, ports)


def _answers_200(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def ports() -> dict[str, int]:
    return {name: free_port() for name in ("web", "sidecar", "admin", "upstream")}


@pytest.fixture
def running(tmp_path: Path, ports: dict[str, int]) -> Iterator[Run]:
    run = make_run(tmp_path, ports, "TOKEN_TTL=120")
    try:
        deadline = time.monotonic() + 40
        ready = f"http://127.0.0.1:{ports['admin']}/readyz"
        while "demo is running" not in run.output() or not _answers_200(ready):
            assert run.proc.poll() is None, run.output()
            assert time.monotonic() < deadline, run.output()
            time.sleep(0.2)
        yield run
    finally:
        if run.proc.poll() is None or run.stack_processes():
            with_group = run.proc.pid
            try:
                os.killpg(with_group, signal.SIGTERM)
            except ProcessLookupError:
                pass
            run.proc.wait(20)


def test_a_taken_port_is_one_line_naming_the_port_and_the_variable_and_starts_nothing(
    tmp_path: Path, ports: dict[str, int]
) -> None:
    with socket.socket() as squatter:  # Vite, say, already on the page's port
        squatter.bind(("127.0.0.1", ports["web"]))
        squatter.listen()
        run = make_run(tmp_path, ports)
        assert run.proc.wait(30) != 0
    lines = [line for line in run.output().splitlines() if line.startswith("make run:")]
    assert lines == [
        f"make run: port {ports['web']} (the demo page) is already in use; free it or choose "
        f"another: make run WEB_PORT={ports['web'] + 1} "
        f"(python -m upstream_demo.stack --web-port {ports['web'] + 1})"
    ]
    assert "running" not in run.output()
    assert run.listening() == []


def _moved_ports_serve_the_demo(run: Run) -> None:
    """Every moved port is in step: CORS for the page's origin, the IdP's issuer and JWKS."""
    origin = f"http://localhost:{run.ports['web']}"
    sidecar = f"http://127.0.0.1:{run.ports['sidecar']}"
    login = httpx.post(
        f"{sidecar}/auth/login",
        json={"username": "viewer@example.com", "password": "viewer"},
        headers={"Origin": origin},
    )
    assert login.status_code == 200
    assert login.headers["access-control-allow-origin"] == origin
    assert login.json()["expires_in"] == 120  # TOKEN_TTL passed through
    token = login.json()["access_token"]
    models = httpx.get(f"{sidecar}/api/models", headers={"Authorization": f"Bearer {token}"})
    assert models.status_code == 200
    ready = httpx.get(f"http://127.0.0.1:{run.ports['admin']}/readyz")
    assert ready.status_code == 200


def test_sigint_to_make_alone_stops_all_three_within_seconds(running: Run) -> None:
    _moved_ports_serve_the_demo(running)
    # What an IDE's stop button or a supervisor does: SIGINT to the make process only.
    running.proc.send_signal(signal.SIGINT)
    # Well within the 20 s it took before; slack for a loaded machine (it takes ~0.5 s).
    assert running.wait_stopped(timeout=8) < 8
    running.proc.wait(5)
    assert "Traceback" not in running.output()


def test_ctrl_c_stops_all_three_without_a_traceback(running: Run) -> None:
    _moved_ports_serve_the_demo(running)
    os.killpg(running.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole group
    assert running.wait_stopped(timeout=8) < 8
    output = running.output()
    assert "Shutting down" in output  # the servers did stop, and said so
    assert "Traceback" not in output and "CancelledError" not in output
