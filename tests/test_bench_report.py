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
