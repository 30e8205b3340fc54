"""`make bench` rewrites BENCHMARKS.md from its run, and keeps the sections other bench modules
wrote (`python -m bench.state`, `bench.compression`): their figures are not lost to a rerun."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from bench import report


def test_a_rerun_replaces_its_own_sections_and_keeps_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(
        "# Benchmarks\n\n## Targets (issue 9)\nold figures\n\n"
        "## Shared state (`python -m bench.state`)\n| no rule | 132.8 |\n"
    )
    monkeypatch.setattr(
        report, "render", lambda results, meta: "# Benchmarks\n\n## Targets (issue 9)\nnew\n"
    )
    report.write(path, None, {})  # type: ignore[arg-type]
    text = path.read_text()
    assert "new" in text and "old figures" not in text
    assert "## Shared state (`python -m bench.state`)\n| no rule | 132.8 |\n" in text
    assert text.count("## Targets (issue 9)") == 1
    report.write(path, None, {})  # type: ignore[arg-type]
    assert path.read_text() == text  # stable: nothing doubles on a second run


def test_a_goal_says_whether_it_holds_and_by_how_much_it_misses() -> None:
    share = report.Goal("JWT share", ">=", 0.45, 0.43, 0.94)
    # 0.45 / 0.43 = 1.047: one decimal would read "needs ×1.0", which says nothing.
    assert share.verdict == "missed: short by 0.02 (needs ×1.05)"
    assert report.Goal("JWT share", ">=", 0.45, 0.45, 0.94).verdict == "**met**"
    latency = report.Goal("latency", "<=", 0.150, 0.1504, 0.03, " ms", ".3f")
    assert latency.verdict == "**met**"  # judged as shown: 0.150 ms
    over = report.Goal("latency", "<=", 0.150, 0.160, 0.03, " ms", ".3f")
    assert over.verdict == "missed: over by 0.010 ms (×1.07 the goal)"


def test_the_websocket_goal_is_read_against_the_byte_relays_floor() -> None:
    r = report.Results()
    r.ws_echo = {
        report.DIRECT: [60000.0, 62000.0, 61000.0],
        report.SIDECAR_W1: [27000.0, 28000.0, 27500.0],
        report.BYTE_RELAY: [29000.0, 29500.0, 30000.0],
    }
    (sentence, blank) = report.ws_floor(r)
    assert blank == ""
    # Medians: 61000 direct, 27500 sidecar, 29500 relay.
    assert (
        "reached 0.48 of direct" in sentence
        and "the sidecar, which checks every frame, 0.45" in sentence
    )
    assert "0.93 of the floor" in sentence and "no relay written in Python" in sentence
    r.ws_echo[report.BYTE_RELAY] = [33000.0]
    assert "within the floor's reach" in report.ws_floor(r)[0]
    del r.ws_echo[report.BYTE_RELAY]
    assert report.ws_floor(r) == []  # not measured: nothing said


def test_the_websocket_profile_follows_the_echo_table_only_when_taken() -> None:
    r = report.Results()
    r.ws_echo = {report.DIRECT: [60000.0], report.SIDECAR_W1: [28000.0]}
    meta = {
        "bulk_mib": "100",
        "connections": "32",
        "invocation": "python -m bench.run",
        "rounds": "1",
        "ws_connections": "8",
    }
    assert "WebSocket echo, one worker" not in report.render(r, meta)
    r.ws_profile = "| self time in | share |\n| --- | ---: |\n| kernel: write | 35% |"
    r.ws_profile_command = "perf record ..., while python -m bench.ws_echo ws://x/ws"
    text = report.render(r, meta)
    echo = text.index("## WebSocket echo, 8 connections")
    section = text.index("### Where the sidecar's time goes (WebSocket echo, one worker)")
    assert echo < section < text.index("## Idle WebSockets")
    assert "| kernel: write | 35% |" in text[section:]
    assert "`perf record ..., while python -m bench.ws_echo ws://x/ws`" in text[section:]
    assert "The byte relay, sampled" not in text
    r.ws_floor_profile = "| self time in | share |\n| --- | ---: |\n| kernel: write | 40% |"
    text = report.render(r, meta)
    floor = text.index("The byte relay, sampled the same way under the same load:")
    assert text.index("| kernel: write | 35% |") < floor < text.index("| kernel: write | 40% |")


def test_the_report_says_the_hosts_pace_beside_the_absolute_goals() -> None:
    from bench.http_load import Sample

    def samples(cpu_us: float) -> tuple[Any, list[Sample]]:
        return (None, [Sample(1000.0, 1.0, 2.0, cpu_us, 1000, 0)])

    r = report.Results()
    assert report.host_pace(r) == []  # not measured: nothing said
    r.http32 = {
        report.NGINX: samples(43.0),
        report.DIRECT: samples(63.0),
        report.JWT_W1: samples(145.0),
    }
    (sentence, blank, share, blank2) = report.host_pace(r)
    assert blank == blank2 == ""
    assert "nginx spent 43 µs of CPU a request and the upstream 63 µs" in sentence
    assert "had nginx at 20–30 µs" in sentence
    assert "3.4× nginx's and 2.3× the upstream's own" in sentence
    # The share is read as the two processes' CPU: predicted beside measured (both 1000 req/s).
    assert "the upstream's CPU a request over the sidecar's: 63 / 145 = 0.43 (measured: 1.00)" in (
        share
    )
    assert "at most 2.22× the CPU the upstream" in share
    r.http32[report.NGINX] = samples(math.nan)
    assert report.host_pace(r) == []
