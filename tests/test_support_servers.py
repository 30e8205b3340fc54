"""tests/support/servers.py: what the suite's helpers read from a running child process."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tests.support.servers import spawn

# Writes one whole line and half of the next, waits, then ends the second.
CHILD = (
    'import sys, time; sys.stdout.write(\'{"a": 1}\\n{"b"\'); sys.stdout.flush(); '
    "time.sleep(1.5); sys.stdout.write(': 2}\\n')"
)


def test_a_running_process_shows_whole_lines_only_and_all_of_it_once_ended(
    tmp_path: Path,
) -> None:
    process = spawn([sys.executable, "-c", CHILD], tmp_path / "child.log", 0, wait=False)
    deadline = time.monotonic() + 10
    while "{" not in process.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.log_path.read_text() == '{"a": 1}\n{"b"'  # the file holds half a line...
    assert process.output() == '{"a": 1}\n'  # ...which a reader of JSON lines never gets
    process.proc.wait(10)
    assert process.output() == '{"a": 1}\n{"b": 2}\n'
