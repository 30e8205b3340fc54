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
