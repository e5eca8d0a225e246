"""The README's `flywheel ingest` / `flywheel lineage` example, run verbatim: the commands are read
from README.md (not copied here) and run by bash, one line at a time, in a fresh folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_ingest_example() -> list[tuple[str, str]]:
    """(command, the comment after it) for each line of the README's deliveries block."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"Deliveries, one at a time.*?```sh\n(.*?)```", text, re.S)
    assert block, "README.md has no deliveries example block"
    lines = []
    for line in block.group(1).splitlines():
        command, _, comment = line.partition("   #") if "   #" in line else (line, "", "")
        lines.append((command.strip(), comment.strip().lstrip("# ").strip()))
    return lines


def test_readme_ingest_and_lineage_example_verbatim(tmp_path: Path) -> None:
    lines = readme_ingest_example()
    assert [c.split()[1] for c, _ in lines] == ["generate", "ingest", "ingest", "generate", "ingest", "lineage"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    # `flywheel` is the venv's console script; this checkout's code comes first on the path.
    env.update(FLYWHEEL_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    outputs = []
    for command, comment in lines:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr
        if comment.startswith("accepted:"):  # the comment shows the start of what the command prints
            expected = comment.rstrip(".").rstrip(", ")
            assert expected in result.stdout, (command, result.stdout)
        outputs.append(result.stdout)
    assert "accepted: 1 file(s) seen, 0 skipped as already ingested, 2,000 rows accepted, 0 quarantined" in outputs[4]
    tree = outputs[5]
    assert tree.splitlines()[0].startswith("deliveries/monday/part-00000.parquet")
    assert "/lake/transactions/date=" in tree and "/lake/_snapshots/" in tree and "[ingest ingest-" in tree


def readme_weeks_example() -> list[tuple[str, str]]:
    """(command, the comment after it) for each line of the README's following-week block."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"A following week of the same world.*?```sh\n(.*?)```", text, re.S)
    assert block, "README.md has no following-week example block"
    lines = []
    for line in block.group(1).splitlines():
        command, _, comment = line.partition("   #") if "   #" in line else (line, "", "")
        lines.append((command.strip(), comment.strip().lstrip("# ").strip()))
    return lines


def test_readme_following_week_example_verbatim(tmp_path: Path) -> None:
    """A base period, then the following week on its own, stable and drifted: the drifted week is
    refused by the drift gate and accepted with it off, as the README says."""
    lines = readme_weeks_example()
    assert [c.split()[1 if c.startswith("flywheel") else 2] for c, _ in lines] == [
        "generate", "ingest", "generate", "generate", "ingest", "ingest"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(FLYWHEEL_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    for command, comment in lines:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert "Traceback" not in result.stderr
        if comment.startswith("rejected (exit 1): "):
            assert result.returncode == 1, f"{command}\n{result.stdout}\n{result.stderr}"
            assert comment.removeprefix("rejected (exit 1): ") in result.stderr, result.stderr
        else:
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        if comment.startswith("accepted:"):
            assert comment.rstrip(".").rstrip(", ") in result.stdout, (command, result.stdout)
    stable = (tmp_path / "weeks" / "stable" / "part-00000.parquet")
    drifted = (tmp_path / "weeks" / "drifted" / "part-00000.parquet")
    assert stable.is_file() and drifted.is_file()
