"""What `[compression]` saves and costs: bytes saved on the demo's JSON, CPU per compressed MB.

Bounded and loopback-only: starts `python -m upstream_demo` and two sidecars (compression off, on),
creates models so the list answer is a realistic page, then

1. bytes on the wire for the demo's JSON answers, identity against gzip and brotli (as a client
   accepting each gets them through the sidecar);
2. the sidecar's CPU per compressed MB: the same number of list requests through each sidecar,
   the difference in the sidecar process's CPU time (psutil) divided by the megabytes compressed;
3. the encoders alone (in-process, no I/O): CPU seconds per MB of that JSON;
4. the per-request cost of the circuit breaker and the admission gate when on (in-process).

    python -m bench.compression [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import brotli  # type: ignore[import-untyped]
import httpx
import psutil

from proxy import config
from proxy.relay.breaker import CircuitBreaker
from proxy.relay.compress import Compression, brotli_encoder, gzip_encoder
from proxy.relay.shedding import Admission


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


@contextmanager
def _spawn(args: list[str], url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait(url, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _sidecar(tmp: Path, upstream: int, compression: bool) -> tuple[list[str], str, str]:
    port, admin = _free_port(), _free_port()
    text = (
        f'[server]\nlisten = "127.0.0.1:{port}"\n[admin]\nlisten = "127.0.0.1:{admin}"\n'
        f'[upstream]\nurl = "http://127.0.0.1:{upstream}"\n[logging]\naccess_log = false\n'
        f"[compression]\nenabled = {'true' if compression else 'false'}\n"
        '[[routes]]\npath = "/*"\nauth = "public"\n'
    )
    path = tmp / f"sidecar-{port}.toml"
    path.write_text(text)
    args = [sys.executable, "-m", "proxy", "serve", "--config", str(path)]
    return args, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}/readyz"


def _cpu(proc: subprocess.Popen[bytes]) -> float:
    t = psutil.Process(proc.pid).cpu_times()
    return float(t.user + t.system)


def _wire_bytes(client: httpx.Client, url: str, accept: str) -> tuple[int, bytes, str]:
    """Bytes on the wire, the body they decode to, and the coding."""
    with client.stream("GET", url, headers={"accept-encoding": accept}) as r:
        raw = b"".join(r.iter_raw())
        coding = r.headers.get("content-encoding", "identity")
    decoded = {"gzip": gzip.decompress, "br": brotli.decompress}.get(coding, bytes)(raw)
    return len(raw), decoded, coding


def _saved(n: int, ident: int, coding: str) -> str:
    return f"{1 - n / ident:.0%}" if coding != "identity" else "untouched"


def _per_mb(encode: object, data: bytes, rounds: int) -> float:
    start = time.process_time()
    for _ in range(rounds):
        encode(data)  # type: ignore[operator]
    return (time.process_time() - start) / (len(data) * rounds / 1e6)


def _micro_cost() -> tuple[float, float]:
    breaker = CircuitBreaker(5, 10.0)
    n = 200_000
    start = time.perf_counter()
    for _ in range(n):
        breaker.record(True, breaker.admit())
    breaker_us = (time.perf_counter() - start) / n * 1e6

    async def gate() -> float:
        a = Admission(64, 1.0, 0)
        start = time.perf_counter()
        for _ in range(n):
            await a.enter()
            a.leave()
        return (time.perf_counter() - start) / n * 1e6

    return breaker_us, asyncio.run(gate())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-compression-"))
    demo_port = _free_port()
    demo = [
        sys.executable, "-m", "upstream_demo", "--port", str(demo_port),
        "--web-port", "0", "--log-level", "warning",
    ]  # fmt: skip
    demo_url = f"http://127.0.0.1:{demo_port}"
    plain_args, plain_url, plain_ready = _sidecar(tmp, demo_port, False)
    gz_args, gz_url, gz_ready = _sidecar(tmp, demo_port, True)
    env_note = f"{os.cpu_count()} cores, Python {sys.version.split()[0]}"
    with (
        _spawn(demo, demo_url + "/healthz", tmp / "demo.log"),
        _spawn(plain_args, plain_ready, tmp / "plain.log") as plain,
        _spawn(gz_args, gz_ready, tmp / "gz.log") as gz,
        httpx.Client(timeout=10) as client,
    ):
        for i in range(120):  # a full page of 100 models, as a busy model server would list
            client.post(
                demo_url + "/api/models",
                json={"name": f"model {i}", "description": "A text model fine-tuned for support "
                      f"tickets, revision {i}.", "framework": "pytorch", "version": f"1.{i}.0"},
            )  # fmt: skip
        rows = []
        for path in ["/api/models?limit=100", "/api/models?limit=10", "/"]:
            ident, body, _ = _wire_bytes(client, gz_url + path, "identity")
            gzip_n, decoded, enc_g = _wire_bytes(client, gz_url + path, "gzip")
            br_n, decoded_b, enc_b = _wire_bytes(client, gz_url + path, "br")
            assert decoded == decoded_b == body, "decoded bytes differ from identity"
            rows.append((path, ident, gzip_n, enc_g, br_n, enc_b))
        page = client.get(demo_url + "/api/models?limit=100").content

        def cpu_for(proc: subprocess.Popen[bytes], url: str, accept: str) -> float:
            before = _cpu(proc)
            for _ in range(args.requests):
                client.get(url + "/api/models?limit=100", headers={"accept-encoding": accept})
            return _cpu(proc) - before

        cpu_for(gz, gz_url, "gzip")  # warm-up
        base = cpu_for(plain, plain_url, "gzip")
        with_gzip = cpu_for(gz, gz_url, "gzip")
        with_br = cpu_for(gz, gz_url, "br")
    mb = len(page) * args.requests / 1e6
    level = config.from_dict({}).compression.level
    assert Compression(config.from_dict({"compression": {"enabled": True}}).compression)
    rounds = max(20, int(20e6 / len(page)))
    enc = {
        "gzip -1": _per_mb(lambda d: gzip_encoder(1).whole(d), page, rounds),
        f"gzip -{level} (default)": _per_mb(lambda d: gzip_encoder(level).whole(d), page, rounds),
        "gzip -9": _per_mb(lambda d: gzip_encoder(9).whole(d), page, rounds),
        "brotli q4": _per_mb(lambda d: brotli_encoder().whole(d), page, rounds),
    }
    breaker_us, gate_us = _micro_cost()

    print(f"## Compression (issue 14): `python -m bench.compression --requests {args.requests}`")
    print()
    print(f"One run on this machine ({env_note}), loopback, demo upstream, one sidecar worker.")
    print()
    print("| demo answer | identity | gzip | saved | brotli | saved |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for path, ident, g, enc_g, b, enc_b in rows:
        print(
            f"| `GET {path}` | {ident:,} B | {g:,} B | {_saved(g, ident, enc_g)} "
            f"| {b:,} B | {_saved(b, ident, enc_b)} |"
        )
    print()
    print(f"Sidecar CPU for {args.requests} list requests ({len(page):,} B each, {mb:.1f} MB):")
    print()
    print("| sidecar | CPU s | extra CPU per compressed MB |")
    print("| --- | ---: | ---: |")
    print(f"| compression off | {base:.3f} | - |")
    print(f"| gzip -{level} | {with_gzip:.3f} | {(with_gzip - base) / mb * 1000:.1f} ms |")
    print(f"| brotli q4 | {with_br:.3f} | {(with_br - base) / mb * 1000:.1f} ms |")
    print()
    print("The encoders alone (in-process, that page compressed whole):")
    print()
    print("| encoder | CPU per MB |")
    print("| --- | ---: |")
    for name, per in enc.items():
        print(f"| {name} | {per * 1000:.1f} ms |")
    print()
    print(
        f"Per request when on: circuit breaker admit+record {breaker_us:.2f} µs, "
        f"admission gate enter+leave {gate_us:.2f} µs (in-process); off, each is one "
        "attribute check."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
