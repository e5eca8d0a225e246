"""`flywheel generate` for any use case, as a user runs it: the use case's own generator behind the
command, its options passed on, and refused by a use case whose data takes none."""

import json
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


def test_generate_passes_free_form_options_to_fraud_and_refuses_bad_ones_by_name(tmp_path):
    """`--option KEY=VALUE` reaches fraud's generator as text; an unknown option or a bad value is one
    error line naming it (and, for an unknown one, the options it knows), exit 1, nothing written."""
    env = {"FLYWHEEL_HOME": str(tmp_path)}
    result = run("generate", "--rows", "300", "--days", "2", "--option", "amount_scale=3", "--option",
                 "new_category=crypto_atm", "--out", str(tmp_path / "raw"), env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "raw" / "_generation.json").read_text())
    assert summary["parameters"]["options"] == {"amount_scale": 3.0, "new_category": "crypto_atm",
                                                "new_category_share": 0.1}
    for options, message in [
        (["--option", "amount_scal=3"], "error: fraud's generator has no option 'amount_scal': the known options are "
                                        "world_rows, drift_from, amount_scale"),
        (["--option", "amount_scale=-3"], "error: option amount_scale='-3': must be a number above 0"),
        (["--option", "amount_scale=3", "--option", "amount_scale=4"], "error: --option amount_scale is given twice"),
        (["--option", "amount_scale"], "argument --option: 'amount_scale' is not KEY=VALUE"),
    ]:
        result = run("generate", "--rows", "300", *options, "--out", str(tmp_path / "bad"), env=env)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert message in result.stderr, result.stderr
        assert not (tmp_path / "bad").exists()
    flights = REPO / "usecases" / "flights"
    result = run("--usecase", str(flights), "generate", "--option", "amount_scale=3", "--out", str(tmp_path / "flights"), env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "flights's demo data takes no --option" in result.stderr and not (tmp_path / "flights").exists()
