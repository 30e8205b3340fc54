"""`make bench` rewrites BENCHMARKS.md from its run, and keeps the sections other bench modules
wrote (`python -m bench.state`, `bench.compression`): their figures are not lost to a rerun."""

from __future__ import annotations

from pathlib import Path

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
