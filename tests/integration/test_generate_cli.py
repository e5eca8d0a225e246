"""`flywheel generate` for any use case, as a user runs it: the use case's own generator behind the
command, its options passed on, and refused by a use case whose data takes none."""

import os
import subprocess
import sys
from pathlib import Path

from tests.factories import REPO


def run(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "flywheel.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def test_generate_passes_fraud_options_on_to_the_use_case_and_another_use_case_refuses_them(tmp_path):
    """`flywheel generate` writes the use case's demo data: fraud's generator takes --start and --format;
    flights' real flights have neither, and say so before anything is read or written."""
    result = run("generate", "--rows", "300", "--days", "2", "--start", "2026-12-01", "--format", "jsonl",
                 "--out", str(tmp_path / "raw"), env={"FLYWHEEL_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "raw" / "part-00000.jsonl").read_text().splitlines()
    assert len(lines) == 300 and all('"ts":"2026-12-0' in line for line in lines)
    flights = REPO / "usecases" / "flights"
    result = run("--usecase", str(flights), "generate", "--format", "csv", "--out", str(tmp_path / "flights"),
                 env={"FLYWHEEL_HOME": str(tmp_path)})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "flights's demo data takes no --format" in result.stderr and not (tmp_path / "flights").exists()
