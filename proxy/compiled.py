"""The request path's modules that the build compiles with mypyc, and which of them run compiled.

`make install` (and the Docker image) compile these modules into C extensions with mypyc, from the
same typed source: the sidecar then spends about a quarter less CPU a request (BENCHMARKS.md).
Without a C compiler, `pip install .` gives the same modules as plain Python; that works the same,
only slower, and the start-up line says which one runs (`"compiled"`).

In a source checkout the extensions sit beside their `.py` files and Python prefers them, so an
edited module would run its old compiled self until rebuilt. `stale()` names such modules;
importing `proxy` refuses to go on with one (`make install` rebuilds them).

Stdlib only: setup.py reads `MODULES` from this file before anything is installed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

# Relative to the `proxy` package: what every proxied HTTP request runs through.
# Left out, on purpose:
# - the WebSocket modules (wsprotocol, relay/tunnel, relay/ws_registry, relay/ws_outcomes):
#   compiled, the suite crashed in the garbage collector (wsprotocol's class extends uvicorn's,
#   an interpreted class). What a relayed frame runs through is compiled (wsframes,
#   relay/ws_passthrough, and relay/ws_session, whose counters each frame adds to): classes of
#   their own, extending nothing interpreted;
# - modules that run per reload, per key fetch or per start;
# - the rest of the HTTP path (telemetry/clock and metrics, auth/service and method,
#   authority, relay/streams, breaker and shedding): compiled too, they saved ~1 µs a request.
# Add a module here only with `make test` green on the compiled build.
MODULES = (
    "app",
    "cors",
    "decision",
    "grammar",
    "http11",
    "ids",
    "outbox",
    "paths",
    "pipeline",
    "routing",
    "tracing",
    "wsframes",
    "auth/api_key",
    "auth/chain",
    "auth/extractor",
    "auth/found",
    "auth/jwt",
    "auth/token_cache",
    "relay/headers",
    "relay/http",
    "relay/upstream",
    "relay/ws_passthrough",
    "relay/ws_session",
    "telemetry/access",
    "telemetry/lines",
    "telemetry/number",
    "telemetry/tally",
)

PACKAGE = Path(__file__).resolve().parent


def _extension(module: str) -> Path | None:
    """The compiled file of `module` in this package, if one was built."""
    stem = PACKAGE / module
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = stem.with_name(stem.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def running() -> dict[str, bool]:
    """Each module of MODULES: True when it is (or would be) imported from its compiled file."""
    found: dict[str, bool] = {}
    for module in MODULES:
        spec = importlib.util.find_spec("proxy." + module.replace("/", "."))
        origin = spec.origin if spec is not None else None
        found[module] = origin is not None and origin.endswith(
            tuple(importlib.machinery.EXTENSION_SUFFIXES)
        )
    return found


def summary() -> str:
    """`"mypyc"` when every module runs compiled, `"no"` when none does, else `"partly"`."""
    states = set(running().values())
    if states == {True}:
        return "mypyc"
    return "partly" if True in states else "no"


def stale() -> list[str]:
    """Modules whose source changed after their compiled file was built (a source checkout)."""
    old = []
    for module in MODULES:
        built = _extension(module)
        source = PACKAGE / (module + ".py")
        if built is not None and source.is_file():
            if source.stat().st_mtime > built.stat().st_mtime:
                old.append(module)
    return old
