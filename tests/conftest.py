"""Suite-wide settings."""

from __future__ import annotations

import os

from hypothesis import settings

# On CI the property tests take the same examples every run, so a red build is reproducible and
# never a dice roll; on a developer's machine they keep exploring (and the database remembers
# what they found). A finding worth keeping goes into the test as an explicit @example.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
