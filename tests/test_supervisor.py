"""The supervisor's admin app: ready when the supervisor and every worker are."""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from typing import Any

from proxy.supervisor import GroupAdmin, WorkerStatus


class _Exposition:
    def render(self) -> bytes:
        return b"# metrics of the group\n"


async def _get(app: GroupAdmin, path: str) -> tuple[int, Any]:
    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    await app({"type": "http", "path": path, "method": "GET"}, receive, send)
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], json.loads(body) if path == "/readyz" else body


def _admin(statuses: list[WorkerStatus], draining: bool = False) -> GroupAdmin:
    async def workers() -> list[WorkerStatus]:
        return statuses

    return GroupAdmin(_Exposition(), lambda: {"not_draining": not draining}, workers)


READY = {"started": True, "keys_loaded": True, "not_draining": True}


async def test_the_group_is_ready_when_every_worker_is() -> None:
    status, body = await _get(
        _admin([WorkerStatus(0, 11, READY), WorkerStatus(1, 12, READY)]), "/readyz"
    )
    assert status == 200
    assert body["status"] == "ready"
    assert body["checks"] == {**READY, "all_workers_ready": True}
    assert [(w["worker"], w["pid"], w["ready"]) for w in body["workers"]] == [
        (0, 11, True),
        (1, 12, True),
    ]


async def test_one_worker_failing_a_check_fails_that_check_for_the_group() -> None:
    loading = {**READY, "keys_loaded": False}
    status, body = await _get(
        _admin([WorkerStatus(0, 11, READY), WorkerStatus(1, 12, loading)]), "/readyz"
    )
    assert status == 503
    assert body["checks"]["keys_loaded"] is False
    assert body["checks"]["started"] is True
    assert [w["ready"] for w in body["workers"]] == [True, False]


async def test_a_worker_that_does_not_answer_makes_the_group_not_ready() -> None:
    status, body = await _get(
        _admin([WorkerStatus(0, 11, READY), WorkerStatus(1, None, None)]), "/readyz"
    )
    assert status == 503
    assert body["checks"]["all_workers_ready"] is False
    assert body["workers"][1] == {
        "worker": 1,
        "pid": None,
        "checks": None,
        "config": None,
        "ready": False,
    }


async def test_a_draining_supervisor_is_not_ready() -> None:
    status, body = await _get(_admin([WorkerStatus(0, 11, READY)], draining=True), "/readyz")
    assert status == 503
    assert body["checks"]["not_draining"] is False


async def test_metrics_are_the_groups() -> None:
    status, body = await _get(_admin([]), "/metrics")
    assert (status, body) == (200, b"# metrics of the group\n")
