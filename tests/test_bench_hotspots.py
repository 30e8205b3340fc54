"""bench/hotspots.py: a profile of the compiled request path names its modules and functions."""

from __future__ import annotations

from bench import hotspots

LOOP = "run (uvloop/__init__.py:92);Runner.run (asyncio/runners.py:118);uv_run (core.c:452)"


def test_compiled_frames_are_named_by_module_and_waiting_threads_are_left_out() -> None:
    collapsed = "\n".join(
        [
            f"main (proxy/cli.py:83);{LOOP};"
            "CPyDef_pipeline___http_Pipeline_gen_____mypyc_generator_helper__ (__native.c:1);"
            "CPyDef_http___Forwarder___forward (__native.c:2);write (libc.so.6) 6",
            f"main (proxy/cli.py:83);{LOOP};"
            "CPyDef_http11___Cycle____start (__native.c:3);Py_DECREF (object.h:537) 3",
            f"main (proxy/cli.py:83);{LOOP};"
            "CPyDef_app_____call___3_App_gen_____mypyc_generator_helper__ (__native.c:5);"
            "CPyDef_decision___decide_Decider_gen_____mypyc_generator_helper__ (__native.c:4);"
            "AuthService.authenticate (proxy/auth/service.py:100) 1",
            # The log writer waiting, and the loop in epoll: not CPU.
            "Thread.run (threading.py:982);_Writer._run (proxy/telemetry/logs.py:189);"
            "pthread_cond_timedwait (libc.so.6);0x7f16 (libc.so.6) 50",
            f"main (proxy/cli.py:83);{LOOP};epoll_pwait (libc.so.6) 40",
        ]
    )
    profile = hotspots.summarise(collapsed)
    assert profile.samples == 10
    assert dict(profile.self_by_place) == {
        "system call: write": 6,
        "CPython": 3,
        "proxy/auth/service.py": 1,
    }
    inclusive = dict(profile.inclusive_sidecar)
    assert inclusive["Pipeline.http (proxy/pipeline.py, compiled)"] == 6
    assert inclusive["Forwarder.forward (proxy/relay/http.py, compiled)"] == 6
    assert inclusive["Cycle._start (proxy/http11.py, compiled)"] == 3
    assert inclusive["Decider.decide (proxy/decision.py, compiled)"] == 1
    assert inclusive["App.__call__ (proxy/app.py, compiled)"] == 1
    assert inclusive["AuthService.authenticate (proxy/auth/service.py)"] == 1
    assert not any("cli.py" in name for name in inclusive)  # below the loop: not a stage


def test_a_compiled_leaf_is_self_time_of_its_module() -> None:
    profile = hotspots.summarise(f"{LOOP};CPyDef_cors___Cors___response_headers (__native.c:9) 2")
    assert profile.self_by_place == [("proxy/cors.py (compiled)", 2)]
