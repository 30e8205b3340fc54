"""What a supervisor and its workers share: the worker count, the marker, the public socket and
the readiness exchange."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from proxy import config, workers
from proxy.errors import ConfigError
from proxy.workers import WorkerRole


@pytest.mark.parametrize("value", [1, 4, "auto"])
def test_server_workers_is_a_positive_integer_or_auto(value: int | str) -> None:
    assert config.from_dict({"server": {"workers": value}}).server.workers == value


@pytest.mark.parametrize("value", [0, -1, "two", True, 2.0, "4"])
def test_server_workers_refuses_anything_else_naming_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r'^server\.workers: expected an integer >= 1 or "auto"'):
        config.from_dict({"server": {"workers": value}})


def test_workers_default_to_one_process() -> None:
    assert workers.count(config.from_dict({}).server.workers) == 1


def test_auto_is_one_worker_per_usable_core() -> None:
    assert workers.count("auto") == workers.usable_cores() >= 1
    assert workers.count(3) == 3


def test_a_cgroup_cpu_quota_caps_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "_cgroup_cpu_quota", lambda: 0.5)
    assert workers.usable_cores() == 1
    monkeypatch.setattr(workers, "_cgroup_cpu_quota", lambda: 1000.0)
    assert workers.usable_cores() == len(os.sched_getaffinity(0))


def test_cgroup_quotas_are_read_from_v2_then_v1(tmp_path: Path) -> None:
    assert workers._cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert workers._cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    assert workers._cgroup_cpu_quota(tmp_path) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert workers._cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert workers._cgroup_cpu_quota(tmp_path) == 1.5


def test_a_worker_finds_its_role_and_the_supervisors_settings(tmp_path: Path) -> None:
    settings = config.from_dict(
        {"server": {"workers": 2}, "routes": [{"path": "/*", "auth": "public"}]}
    )
    workers.prepare(str(tmp_path), settings)
    role = WorkerRole(index=1, directory=str(tmp_path), port=8000, parent_fd=5)
    environ = role.environ()
    assert WorkerRole.from_environ(environ) == role
    assert environ["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "metrics")
    assert stat.S_IMODE(os.stat(tmp_path / "metrics").st_mode) == 0o700
    assert role.settings() == settings
    assert role.readiness_path == str(tmp_path / "worker-1.sock")


def test_a_process_without_the_marker_is_no_worker() -> None:
    assert WorkerRole.from_environ({"AUTHPROXY__SERVER__WORKERS": "2"}) is None


def test_workers_bind_the_same_port_and_a_port_taken_otherwise_fails() -> None:
    first = workers.reuseport_socket("127.0.0.1", 0)
    port = first.getsockname()[1]
    with first, workers.reuseport_socket("127.0.0.1", port) as second:
        second.listen()
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            workers.reuseport_socket("127.0.0.1", taken.getsockname()[1])


def test_the_supervisor_will_not_join_a_port_another_group_listens_on() -> None:
    with workers.reserve_port("127.0.0.1", 0) as reserved:
        port = reserved.getsockname()[1]
        with workers.reuseport_socket("127.0.0.1", port) as worker:
            worker.listen()
            with pytest.raises(OSError):
                workers.reserve_port("127.0.0.1", port)


async def test_a_worker_answers_its_readiness_socket_with_its_checks(tmp_path: Path) -> None:
    path = str(tmp_path / "worker-0.sock")
    Path(path).touch()  # left behind by the worker this one replaces
    checks = {"started": True, "not_draining": True}
    server = await workers.serve_readiness(path, lambda: checks)
    try:
        assert await workers.ask_readiness(path) == {"pid": os.getpid(), "checks": checks}
        checks["not_draining"] = False
        answer = await workers.ask_readiness(path)
        assert answer is not None and answer["checks"]["not_draining"] is False
    finally:
        server.close()
        await server.wait_closed()
    os.unlink(path)
    assert await workers.ask_readiness(path) is None


def test_a_serving_process_collects_young_objects_less_often_and_freezes_what_it_started_with() -> (
    None
):
    import gc

    from proxy.server import GC_YOUNG_THRESHOLD, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
