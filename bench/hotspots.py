"""Where the sidecar's time goes: py-spy samples its processes while wrk loads a route.

py-spy writes collapsed stacks with native frames (`--native`: the request path is compiled by
mypyc, and its functions are C frames, `CPyDef_<module>___<name>`). Native sampling pauses the
process for each sample, a small perturbation. Samples of a thread waiting (the log writer, the
loop in epoll) are left out, so every sample counted is CPU spent. Two views: self time by where
the sample landed (a system call, a library, or one of the sidecar's modules, compiled or not),
and inclusive time of the sidecar's own functions (a stage's share, whatever it called).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from proxy import compiled

from .http_load import Target, wrk_args

_LOOP = ("asyncio/runners.py", "asyncio/base_events.py", "uvloop/")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
# A thread blocked, not working (on a lock, the GIL, a condition, epoll): the sample's last
# frames name one of these.
_WAITING = (
    "pthread_cond_wait",
    "pthread_cond_timedwait",
    "PyThread_acquire_lock_timed",
    "sem_wait",
    "sem_timedwait",
    "sem_clockwait",
    "epoll_wait",
    "epoll_pwait",
    "futex",
)
_SYSCALLS = {
    "write": "system call: write",
    "writev": "system call: write",
    "read": "system call: read",
}
# A compiled module's functions are named by the module's last part (relay/http -> `http`).
_COMPILED = {module.rsplit("/", 1)[-1]: f"proxy/{module}.py" for module in compiled.MODULES}


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


def _compiled_function(func: str) -> tuple[str, str] | None:
    """(`Class.method`, module path) of a mypyc function, e.g. `CPyDef_http11___Cycle____start`
    or a coroutine's `CPyDef_decision___decide_Decider_gen_____mypyc_generator_helper__`."""
    if not func.startswith("CPyDef_"):
        return None
    module, _, rest = func.removeprefix("CPyDef_").partition("___")
    path = _COMPILED.get(module)
    if path is None or not rest:
        return None
    if "_gen___" in rest:  # a coroutine's body: `<method>_<Class>_gen`
        method, _, owner = rest.split("_gen___", 1)[0].rpartition("_")
    else:
        owner, _, method = rest.partition("___")
    method = re.sub(r"^(__\w+__)_\d+$", r"\1", method)  # mypyc numbers some dunders
    return (f"{owner}.{method}" if method else owner), path


def _place(func: str, file: str) -> str:
    """Where a sample landed: a system call, a library, or the sidecar's module path."""
    if (known := _compiled_function(func)) is not None:
        return f"{known[1]} (compiled)"
    if file.startswith("proxy/"):
        return file
    if file.startswith("libc") and func in _SYSCALLS:
        return _SYSCALLS[func]
    if file.startswith(("__native", "CPy", "mypyc", "proxy/_native__mypyc")) or file.endswith(
        ("_ops.c", "getargs.c", "getargsfast.c", "pythonsupport.h")
    ):
        return "mypyc runtime"
    if file.startswith(("object.h", "libpython", "Objects/", "Python/", "pythoncapi")):
        return "CPython"
    if file == "<string>":
        return "generated __init__ (dataclasses)"
    if file == "loop.c":
        return "uvloop"
    if file == "_asynciomodule.c":
        return "asyncio"
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
        if not frames or any(m["func"].startswith(_WAITING) for m in frames[-4:]):
            continue
        total += count
        self_by_place[_place(frames[-1]["func"], frames[-1]["file"])] += count
        # Frames below the event loop (the CLI calling `serve`) hold every sample that reached
        # them; only what runs inside the loop says where the time goes.
        loop = max((i for i, m in enumerate(frames) if m["file"].startswith(_LOOP)), default=-1)
        own: set[str] = set()
        for m in frames[loop + 1 :]:
            if m["file"].startswith("proxy/"):
                own.add(f"{m['func']} ({m['file']})")
            elif (known := _compiled_function(m["func"])) is not None:
                own.add(f"{known[0]} ({known[1]}, compiled)")
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
                        "--native",
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
