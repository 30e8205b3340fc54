"""The sidecar's app served by granian instead of uvicorn: `granian --interface asgi --factory
bench.granian_app:create`, with AUTHPROXY_CONFIG naming the config.

`proxy.server` wires the app to uvicorn (its own HTTP protocol class, the admin listener, the
drain on SIGTERM); none of that matters for the request path, so this builds the same
`App(settings)` and lets granian drive its ASGI lifespan. The admin listener is not served.
"""

from __future__ import annotations

from proxy import config
from proxy.app import App
from proxy.telemetry import logs


def create() -> App:
    settings = config.load()
    logs.configure(settings.logging.level, settings.logging.flush_interval_s)
    return App(settings)
