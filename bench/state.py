"""The cost of `[[rate_limits]]` per request: no rule, the memory backend, the Redis backend.

    python -m bench.state [--seconds 5] [--rounds 3] [--connections 16]

Three sidecars on loopback, same config but the state: one without rules, one with a rule on
the route under the memory backend, one with the same rule under Redis (a real redis-server on a
free loopback port, stopped by PID at the end). wrk drives small API-key GETs at each in turn
(interleaved rounds, medians), with a limit far above what the run reaches (every answer is a
200: the figure is the check, not refusals). CPU per request is the kernel's utime + stime of the
sidecar process over the run divided by the requests (the Redis server's own CPU is shown apart);
ratios are against the sidecar without rules in the same run. Bounded: rounds x 3 x (1 + seconds) s.

Then the check alone, in this process (`Limiter.admit`, 16 concurrent callers on uvloop): the CPU
one check costs with each backend, without the HTTP around it (steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import psutil
import uvloop

from proxy.config import from_dict
from proxy.identity import Identity
from proxy.state import Limiter, MemoryStore, Store
from proxy.state.redis_store import RedisStore
from proxy.telemetry.metrics import Metrics
from tests.support.redis_server import RedisServer
from tests.support.servers import start_sidecar

from . import contenders, http_load, tokens

ORDER = (("no rule", None), ("memory", "memory"), ("redis", "redis"))

RULE = """
[[rate_limits]]
name = "per-caller"
routes = ["/key/*"]
limit = 1000000
window_s = 1
"""


def body(creds: tokens.Credentials, state: str | None, redis_url: str = "") -> str:
    text = f"""
[auth.api_keys]
[[auth.api_keys.keys]]
id = "bench"
sha256 = "{creds.api_key_sha256}"
[[routes]]
path = "/key/*"
auth = ["api_key"]
"""
    if state is None:
        return text
    text += RULE + f'\n[state]\nbackend = "{state}"\n'
    return text + (f'redis_url = "{redis_url}"\n' if redis_url else "")


def check_cost(redis_url: str, calls: int = 16000) -> dict[str, float]:
    """CPU µs per `Limiter.admit` call, by backend, with 16 callers at once."""
    settings = from_dict(
        {
            "routes": [{"path": "/key/*", "auth": "public"}],
            "rate_limits": [{"name": "r", "limit": 10**9, "window_s": 1}],
            "state": {"backend": "redis", "redis_url": redis_url},
        }
    )
    caller = Identity(method="api_key", subject="bench", credential_id="bench")

    async def measure(store: Store) -> float:
        await store.start(lambda _: None)
        limiter = Limiter(settings, Metrics(), store)
        assert limiter.routes is not None and limiter.routes[0] is not None
        limits = limiter.routes[0]

        async def caller_loop(n: int) -> None:
            for _ in range(n):
                await limiter.admit(limits, caller, None)

        await caller_loop(500)  # connections made, scripts loaded
        started = psutil.Process().cpu_times()
        await asyncio.gather(*(caller_loop(calls // 16) for _ in range(16)))
        ended = psutil.Process().cpu_times()
        await store.close()
        return (ended.user + ended.system - started.user - started.system) / calls * 1e6

    async def both() -> dict[str, float]:
        return {
            "memory": await measure(MemoryStore()),
            "redis": await measure(RedisStore(settings.state, Metrics())),
        }

    return uvloop.run(both())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.state", description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None or shutil.which("redis-server") is None:
        print("bench.state needs wrk and redis-server (make bench-deps, make system-deps)")
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-state-") as directory:
        tmp = Path(directory)
        creds = tokens.make(tmp)
        upstream = contenders.upstream(tmp)
        redis = RedisServer(tmp)
        redis.start()
        servers: dict[str, contenders.Server] = {}
        try:
            for name, state in ORDER:
                running = start_sidecar(
                    tmp, upstream.port, body(creds, state, redis.url), env=contenders.SIDECAR_ENV
                )
                servers[name] = contenders.Server(
                    name, running.port, [running.process.proc.pid], [running.stop]
                )
            assert redis.proc is not None
            redis_process = psutil.Process(redis.proc.pid)
            in_process = check_cost(redis.url)
            samples: dict[str, list[http_load.Sample]] = {name: [] for name in servers}
            redis_cpu: list[float] = []
            headers = {"X-API-Key": creds.api_key}
            for _ in range(args.rounds):
                for name, server in servers.items():
                    target = http_load.Target(name, server, "/key/models", headers)
                    http_load.warm(target, args.connections)
                    before = sum(redis_process.cpu_times()[:2])
                    sample = http_load.run(target, args.seconds, args.connections)
                    if sample.errors:
                        raise RuntimeError(f"{name}: {sample.errors} non-2xx answers or errors")
                    samples[name].append(sample)
                    if name == "redis":
                        spent = sum(redis_process.cpu_times()[:2]) - before
                        redis_cpu.append(spent / max(sample.requests, 1) * 1e6)
        finally:
            for server in servers.values():
                server.stop()
            redis.stop()
            upstream.stop()
    base = statistics.median(s.cpu_us for s in samples["no rule"])
    print(
        f"wrk -t1 -c{args.connections} -d{args.seconds}s, {args.rounds} interleaved rounds, "
        "medians; one rule, API-key GETs"
    )
    print("| state | req/s | p50 ms | sidecar CPU µs/req | vs no rule | redis-server CPU µs/req |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, runs in samples.items():
        cpu = statistics.median(s.cpu_us for s in runs)
        rps = statistics.median(s.rps for s in runs)
        p50 = statistics.median(s.p50_ms for s in runs)
        extra = f"{statistics.median(redis_cpu):.1f}" if name == "redis" else "-"
        print(f"| {name} | {rps:,.0f} | {p50:.2f} | {cpu:.1f} | {cpu / base:.2f}x | {extra} |")
    print()
    print("| the check alone (Limiter.admit, in process) | CPU µs per call |")
    print("| --- | ---: |")
    for name, cost in in_process.items():
        print(f"| {name} | {cost:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
