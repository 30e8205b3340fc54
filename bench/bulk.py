"""100 MiB upload and download throughput, with curl as the client (C, so the client is not the
bottleneck): PUT of a file (streamed from disk, `Content-Length` known) and GET of a body the
upstream streams from one preallocated chunk. MiB/s from curl's own total time.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

# curl sends `Expect: 100-continue` before a large body and waits up to 1 s for the interim
# answer; a proxy that forwards the body without it would be charged that second.
NO_EXPECT = ["-H", "Expect:"]


def make_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        chunk = b"\x5a" * (1024 * 1024)
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.write(chunk[: size % len(chunk)])
    return path


def download_args(url: str, size: int) -> list[str]:
    return [
        "curl",
        "-sS",
        "--fail",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download} %{time_total}",
        f"{url}?bytes={size}",
    ]


def upload_args(url: str, file: Path) -> list[str]:
    return [
        "curl",
        "-sS",
        "--fail",
        *NO_EXPECT,
        "-T",
        str(file),
        "-o",
        "/dev/null",
        "-w",
        "%{size_upload} %{time_total}",
        url,
    ]


def _mib_per_s(args: list[str], expected: int) -> float:
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip() or f"curl exited {out.returncode}")
    size, seconds = out.stdout.split()
    if int(float(size)) != expected:
        raise RuntimeError(f"moved {size} bytes, expected {expected}")
    return expected / float(seconds) / (1024 * 1024)


def download(url: str, size: int) -> float:
    return _mib_per_s(download_args(url, size), size)


def upload(url: str, file: Path) -> float:
    return _mib_per_s(upload_args(url, file), file.stat().st_size)
