"""Where the sidecar's time goes: `perf` samples its processes while wrk loads a route.

`perf record -e cpu-clock` samples a process only while it runs on a CPU, at a fixed rate, with
the kernel's frames and (unwound from the stack with DWARF) the user-space ones: every sample is
CPU spent, in the kernel or not, in the proportion it was spent. The request path is compiled by
mypyc, and its functions are C frames (`CPyDef_<module>___<name>`); interpreted Python shows as
CPython's evaluation loop under whichever compiled function called it (Python 3.11 has no perf
support of its own).

(py-spy, used before, pauses the process with ptrace for each sample, which lands far more often
at a system call's end than CPU time does: it gave system calls half the samples where perf gives
the kernel a third.)

Two views: self time by where the sample landed (the kernel by system call, a library, or one of
the sidecar's compiled modules), and inclusive time of the sidecar's compiled functions (a stage's
share, whatever it called).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from proxy import compiled

from .contenders import Server
from .http_load import Target, wrk_args

_ROOT = Path(__file__).resolve().parent.parent  # a load may be `python -m bench.<tool>`
RATE_HZ = 700
# Enough of each sample's stack for DWARF unwinding through the interpreter and the extensions.
STACK_BYTES = 32768
# A compiled module's functions are named by the module's last part (relay/http -> `http`).
_COMPILED = {module.rsplit("/", 1)[-1]: f"proxy/{module}.py" for module in compiled.MODULES}
# `perf script` frame lines: address, symbol(+offset), (dso).
_FRAME = re.compile(r"^\s*[0-9a-f]+ (?P<sym>.*?)(?:\+0x[0-9a-f]+)? \((?P<dso>[^()]*)\)$")
# The kernel's entry point of a system call, right above `do_syscall_64`.
_SYSCALL = re.compile(r"^(?:__x64_sys_|__se_sys_|__do_sys_|ksys_|do_)(?P<name>\w+?)(?:\.\w+)?$")
_LIBRARIES = {
    "loop": "uvloop",
    "parser": "httptools",
    "url_parser": "httptools",
    "_asyncio": "asyncio (C)",
    "orjson": "orjson",
    "libcrypto": "OpenSSL",
    "_hashlib": "OpenSSL",
    "libc": "libc",
}


@dataclass(frozen=True)
class Profile:
    """Sample counts, summarised."""

    samples: int
    self_by_place: list[tuple[str, int]]
    inclusive_sidecar: list[tuple[str, int]]

    def markdown(self, top: int = 12, inclusive: bool = True) -> str:
        """The two views as tables (`inclusive`: the sidecar's functions too, when it has any)."""
        if not self.samples:
            return "(no samples)"
        lines = [
            f"{self.samples:,} CPU samples.",
            "",
            "| self time in | share |",
            "| --- | ---: |",
        ]
        lines += [f"| {place} | {n / self.samples:.0%} |" for place, n in self.self_by_place[:top]]
        if not inclusive:
            return "\n".join(lines)
        lines += ["", "| the sidecar's function, inclusive | share |", "| --- | ---: |"]
        lines += [
            f"| `{func}` | {n / self.samples:.0%} |" for func, n in self.inclusive_sidecar[:top]
        ]
        return "\n".join(lines)


def perf() -> str | None:
    """The `perf` binary (Debian's linux-perf), if installed."""
    return shutil.which("perf")


def record_command(seconds: int) -> str:
    return (
        f"perf record -e cpu-clock -F {RATE_HZ} --call-graph dwarf,{STACK_BYTES} "
        f"-p <the sidecar's processes> -- sleep {seconds}"
    )


def _compiled_function(sym: str) -> tuple[str, str] | None:
    """(`Class.method`, module path) of a mypyc function, e.g. `CPyDef_http11___Cycle____start`
    or a coroutine's `CPyDef_decision___decide_Decider_gen_____mypyc_generator_helper__`."""
    if not sym.startswith("CPyDef_"):
        return None
    module, _, rest = sym.removeprefix("CPyDef_").partition("___")
    path = _COMPILED.get(module)
    if path is None or not rest:
        return None
    if "_gen___" in rest:  # a coroutine's body: `<method>_<Class>_gen`
        method, _, owner = rest.split("_gen___", 1)[0].rpartition("_")
    else:
        owner, _, method = rest.partition("___")
    method = re.sub(r"^(__\w+__)_\d+$", r"\1", method)  # mypyc numbers some dunders
    return (f"{owner}.{method}" if method else owner), path


def _place(stack: list[tuple[str, str]]) -> str:
    """Where a sample (frames root first) landed: the kernel (by system call), a library, the
    interpreter, or one of the sidecar's compiled modules."""
    sym, dso = stack[-1]
    if dso == "[kernel.kallsyms]":
        syms = [s for s, _ in stack]
        if "do_syscall_64" in syms:
            entry = syms[syms.index("do_syscall_64") + 1 :][:1]
            m = _SYSCALL.match(entry[0]) if entry else None
            return f"kernel: {m['name'] if m else 'system call'}"
        return "kernel: interrupts, scheduling"
    name = Path(dso).name
    if name.startswith("libpython"):
        return "CPython"
    if (known := _compiled_function(sym)) is not None:
        return f"{known[1]} (compiled)"
    if name.startswith("_native__mypyc") or (
        name.split(".", 1)[0] in _COMPILED and "cpython" in name
    ):
        return "mypyc runtime"
    stem = name.split(".", 1)[0]
    return _LIBRARIES.get(stem, stem or sym)


def summarise(script: str) -> Profile:
    """`perf script` output (with call graphs) of the sidecar's processes, summarised."""
    self_by_place: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for block in script.split("\n\n"):
        frames = [m for line in block.splitlines() if (m := _FRAME.match(line))]
        if not frames:
            continue
        # Root first; an inlined function's frame is left out (its caller's frame follows, at the
        # same address, with the library it is in).
        stack = [(m["sym"], m["dso"]) for m in reversed(frames) if m["dso"] != "inlined"]
        if not stack:
            continue
        total += 1
        self_by_place[_place(stack)] += 1
        own = {f"{k[0]} ({k[1]}, compiled)" for s, _ in stack if (k := _compiled_function(s))}
        for func in own:
            inclusive[func] += 1
    return Profile(total, self_by_place.most_common(), inclusive.most_common())


def record(target: Target, seconds: int, connections: int, output: Path) -> Profile:
    """Load `target` with wrk and sample every process of its server meanwhile."""
    load = wrk_args(target.url, seconds + 2, connections, target.headers)
    return record_under(load, target.server, seconds, output)


def record_under(load: list[str], server: Server, seconds: int, output: Path) -> Profile:
    """Run `load` (a command that keeps the server busy for `seconds` and a little more) and
    sample every process of `server` meanwhile."""
    binary = perf()
    if binary is None:
        raise RuntimeError("perf is not installed (make bench-deps installs linux-perf)")
    load_process = subprocess.Popen(
        load,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=_ROOT,
    )
    data = output.with_suffix(".perf.data")
    try:
        pids = ",".join(str(p.pid) for p in server.processes())
        recorded = subprocess.run(
            [
                binary,
                "record",
                "-e",
                "cpu-clock",
                "-F",
                str(RATE_HZ),
                "--call-graph",
                f"dwarf,{STACK_BYTES}",
                "-p",
                pids,
                "-o",
                str(data),
                "--",
                "sleep",
                str(seconds),
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
    finally:
        load_process.wait(seconds + 30)
    if recorded.returncode != 0 or not data.exists():
        raise RuntimeError((recorded.stderr or "perf record wrote nothing").strip()[-300:])
    script = subprocess.run(
        [binary, "script", "-i", str(data)],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    data.unlink()
    return summarise(script)
