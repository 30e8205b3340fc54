"""bench/hotspots.py: a perf profile of the compiled request path names its modules, functions and
the kernel's system calls."""

from __future__ import annotations

from bench import hotspots

HEAD = "python 24488 53339.683567:    1428571 cpu-clock: "
LOOP = [
    "7f95dd4a0000 __pyx_f_6uvloop_4loop_4Loop__run+0x1 (/venv/uvloop/loop.cpython-311.so)",
    "7f95dd4a0100 __pyx_f_6uvloop_4loop_6Handle__run+0x2 (/venv/uvloop/loop.cpython-311.so)",
]
SYSCALL = [
    "ffffffff81000130 entry_SYSCALL_64_after_hwframe+0x76 ([kernel.kallsyms])",
    "ffffffff821ef691 do_syscall_64+0x71 ([kernel.kallsyms])",
]
NATIVE = "(/work/proxy/_native__mypyc.cpython-311-x86_64-linux-gnu.so)"


def sample(*frames_root_first: str) -> str:
    """One `perf script` sample: its head, then its frames leaf first."""
    return "\n".join([HEAD, *(f"\t{f}" for f in reversed(frames_root_first))]) + "\n"


def test_the_kernel_is_named_by_system_call_and_compiled_frames_by_module() -> None:
    forward = f"7f1 CPyDef_http___Forwarder___forward+0x10 {NATIVE}"
    pipeline = f"7f0 CPyDef_pipeline___http_Pipeline_gen_____mypyc_generator_helper__+0x3 {NATIVE}"
    script = "\n".join(
        [
            # A write to a socket, woken reader and all, from the forwarder.
            sample(
                *LOOP,
                pipeline,
                forward,
                "f838f __GI___libc_write+0x4f (/usr/lib/x86_64-linux-gnu/libc.so.6)",
                *SYSCALL,
                "ffffffff816bba2a ksys_write+0xba ([kernel.kallsyms])",
                "ffffffff82203249 _raw_spin_unlock_irqrestore+0x19 ([kernel.kallsyms])",
            ),
            # CPython called from compiled code; its inlined helper's frame is left out.
            sample(
                *LOOP,
                f"7f2 CPyDef_http11___Cycle____start+0x5 {NATIVE}",
                "7f3 PyObject_VectorcallMethod+0x9 (/usr/lib/libpython3.11.so.1.0)",
                "7f3 _PyObject_VectorcallTstate (inlined)",
            ),
            # A compiled leaf, a timer interrupt, and the loop waiting in epoll.
            sample(*LOOP, f"7f4 CPyDef_cors___Cors___response_headers+0x1 {NATIVE}"),
            sample(*LOOP, "ffffffff8136213d handle_softirqs+0xcd ([kernel.kallsyms])"),
            sample(
                *LOOP,
                *SYSCALL,
                "ffffffff81700000 __x64_sys_epoll_pwait+0x10 ([kernel.kallsyms])",
            ),
        ]
    )
    profile = hotspots.summarise(script)
    assert profile.samples == 5
    assert dict(profile.self_by_place) == {
        "kernel: write": 1,
        "CPython": 1,
        "proxy/cors.py (compiled)": 1,
        "kernel: interrupts, scheduling": 1,
        "kernel: epoll_pwait": 1,
    }
    inclusive = dict(profile.inclusive_sidecar)
    assert inclusive == {
        "Pipeline.http (proxy/pipeline.py, compiled)": 1,
        "Forwarder.forward (proxy/relay/http.py, compiled)": 1,
        "Cycle._start (proxy/http11.py, compiled)": 1,
        "Cors.response_headers (proxy/cors.py, compiled)": 1,
    }
    assert "| kernel: write | 20% |" in profile.markdown()
    alone = profile.markdown(inclusive=False)  # (the byte relay's: no compiled functions)
    assert "| kernel: write | 20% |" in alone and "inclusive" not in alone


def test_a_mypyc_helper_is_the_runtime_and_an_unknown_library_is_named_by_its_file() -> None:
    script = (
        sample(*LOOP, f"7f5 CPyDict_GetItem+0x2 {NATIVE}")
        + "\n"
        + sample(*LOOP, "7f6 something+0x2 (/usr/lib/x86_64-linux-gnu/libfoo.so.3)")
    )
    assert dict(hotspots.summarise(script).self_by_place) == {"mypyc runtime": 1, "libfoo": 1}
