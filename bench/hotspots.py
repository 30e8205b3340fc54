"""Where the sidecar's time goes: py-spy samples its processes while wrk loads a route.

py-spy (`--nonblocking`, so the sidecar is never paused) writes collapsed stacks; idle samples
(the loop waiting in epoll) are left out by py-spy, so every sample is CPU spent. Two views:
self time by where the sample landed (a library, or one of the sidecar's modules), and inclusive
time of the sidecar's own functions (a stage's share, whatever it called).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .http_load import Target, wrk_args

_LOOP = ("asyncio/runners.py", "asyncio/base_events.py", "uvloop/")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


@dataclass(frozen=True)
class Profile:
    """Collapsed-stack counts, summarised."""

    samples: int
    self_by_place: list[tuple[str, int]]
    inclusive_sidecar: list[tuple[str, int]]

    def markdown(self, top: int = 12) -> str:
        if not self.samples:
            return "(no samples)"
        lines = [
            f"{self.samples:,} CPU samples.",
            "",
            "| self time in | share |",
            "| --- | ---: |",
        ]
        lines += [f"| {place} | {n / self.samples:.0%} |" for place, n in self.self_by_place[:top]]
        lines += ["", "| the sidecar's function, inclusive | share |", "| --- | ---: |"]
        lines += [
            f"| `{func}` | {n / self.samples:.0%} |" for func, n in self.inclusive_sidecar[:top]
        ]
        return "\n".join(lines)


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _place(file: str) -> str:
    """A library's name, or the sidecar's module path."""
    if file.startswith("proxy/"):
        return file
    head = file.split("/", 1)[0]
    return head.removesuffix(".py").removeprefix("<frozen ").removesuffix(">")


def summarise(collapsed: str) -> Profile:
    self_by_place: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [m for f in stack.split(";") if (m := _FRAME.match(f))]
        if not frames:
            continue
        total += count
        self_by_place[_place(frames[-1]["file"])] += count
        # Frames below the event loop (the CLI calling `serve`) hold every sample that reached
        # them; only what runs inside the loop says where the time goes.
        loop = max((i for i, m in enumerate(frames) if m["file"].startswith(_LOOP)), default=-1)
        own = {
            f"{m['func']} ({m['file']})"
            for m in frames[loop + 1 :]
            if m["file"].startswith("proxy/")
        }
        for func in own:
            inclusive[func] += count
    return Profile(total, self_by_place.most_common(), inclusive.most_common())


def record(target: Target, seconds: int, connections: int, output: Path) -> Profile:
    """Load `target` with wrk and sample every process of its server meanwhile."""
    spy = py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed (the bench extra installs it)")
    load = subprocess.Popen(
        wrk_args(target.url, seconds + 2, connections, target.headers),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # One sampler per process (the sidecar's workers are separate interpreters).
        spies: list[subprocess.Popen[str]] = []
        for n, process in enumerate(target.server.processes()):
            spies.append(
                subprocess.Popen(
                    [
                        spy,
                        "record",
                        "--pid",
                        str(process.pid),
                        "--duration",
                        str(seconds),
                        "--rate",
                        "400",
                        "--nonblocking",
                        "--format",
                        "raw",
                        "--output",
                        str(output.with_suffix(f".{n}.txt")),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        errors = [sampler.communicate(timeout=seconds + 60)[1] for sampler in spies]
    finally:
        load.wait(seconds + 30)
    texts = [
        output.with_suffix(f".{n}.txt").read_text()
        for n in range(len(spies))
        if output.with_suffix(f".{n}.txt").exists()
    ]
    if not texts:
        raise RuntimeError(" ".join(e.strip() for e in errors)[-300:] or "py-spy wrote nothing")
    return summarise("\n".join(texts))
