"""The figures the robustness tests measure, written where ROBUSTNESS.md takes its numbers from:
`test-artifacts/robustness/<name>.json` (and one line on stdout, shown with `pytest -s`)."""

from __future__ import annotations

import json
from typing import Any

from tests.support.servers import ROOT

ARTIFACTS = ROOT / "test-artifacts" / "robustness"


def record(name: str, figures: dict[str, Any]) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(figures, indent=2, sort_keys=True, default=str)
    (ARTIFACTS / f"{name}.json").write_text(text + "\n")
    print(f"{name}: {json.dumps(figures, sort_keys=True, default=str)}")
