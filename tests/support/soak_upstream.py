"""The soak's upstream: the demo backend (`upstream_demo.app.create_app`, the app
`python -m upstream_demo` serves: REST, /ws model events) with the reporting upstream's
`/upload` (tests/support/upstreams.py, answers the body's SHA-256) beside it, so one sidecar in
front of one upstream carries both. Run it with uvicorn and `--lifespan on` (the event simulator
lives in the demo's lifespan); `SOAK_EVENT_INTERVAL` sets the simulator's step (seconds)."""

from __future__ import annotations

import os
from typing import Any

from tests.support import upstreams
from upstream_demo.app import create_app

demo = create_app(
    event_interval=float(os.environ.get("SOAK_EVENT_INTERVAL", "0.2")),
    heartbeat_s=float(os.environ.get("SOAK_HEARTBEAT_S", "15")),
)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"] == "/upload":
        await upstreams.app(scope, receive, send)
    else:
        await demo(scope, receive, send)
