"""The notebooks, executed top to bottom by nbclient in a real Jupyter kernel, on small data; the KFP
calls of 02 go to the loopback stand-in of the KFP API (tests/kfp_standin.py)."""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import SMALL_DAYS, SMALL_ROWS
from tests.kfp_standin import kfp_standin

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
TOKEN = "notebook-token-7d2e"


@pytest.fixture(autouse=True)
def keep_sqlite_adapters():
    """nbformat (its notebook-signing module, imported as notebooks are run) registers sqlite3's
    process-wide datetime adapter and converter as ISO strings over Feast's epoch seconds: Feast's
    SQLite online store in this process then fails every read (`Invalid isoformat string`).
    Found when the serving and feature tests failed only after this module ran."""
    adapters, converters = dict(sqlite3.adapters), dict(sqlite3.converters)
    yield
    sqlite3.adapters.clear()
    sqlite3.adapters.update(adapters)
    sqlite3.converters.clear()
    sqlite3.converters.update(converters)


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """The kernel inherits this process's environment: the project's Python first on PATH (the kernel
    spec runs `python`), the repository importable, a fresh $FLYWHEEL_HOME and $HOME."""
    for name in list(os.environ):
        if name.startswith(("FLYWHEEL_", "KF_PIPELINES")) or name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "flywheel-home"))
    return monkeypatch


def execute(name: str, cwd: Path, timeout: int = 600) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def text_of(notebook: nbformat.NotebookNode) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_the_notebooks_are_committed_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), path.name


@pytest.mark.slow
def test_quickstart_runs_the_loop_shows_the_evaluation_and_scores_a_transaction(kernel_env, tmp_path):
    kernel_env.setenv("FLYWHEEL_DATA__ROWS", str(SMALL_ROWS))
    kernel_env.setenv("FLYWHEEL_DATA__DAYS", str(SMALL_DAYS))
    kernel_env.setenv("FLYWHEEL_TRAINING__EPOCHS", "3")
    notebook = execute("01-quickstart.ipynb", tmp_path, timeout=900)
    text = text_of(notebook)
    assert "blessed=True" in text and "production model" in text
    assert "roc_auc" in text and "pr_auc" in text
    assert "fraud_probability" in text and "model_version" in text
    # The scored probability is a probability.
    prediction = notebook.cells[-2]["outputs"][0]["data"]["text/plain"]
    probability = float(prediction.split("'fraud_probability':")[1].split(",")[0])
    assert 0.0 <= probability <= 1.0


def test_compile_upload_schedule_stops_after_compiling_without_a_host(kernel_env, tmp_path):
    notebook = execute("02-compile-upload-schedule.ipynb", tmp_path)
    assert "No KFP host is set" in text_of(notebook) and "stopping after compiling" in text_of(notebook)
    assert (tmp_path / "build" / "flywheel-training.yaml").is_file()


def test_compile_upload_schedule_uploads_runs_and_schedules_on_a_kfp_api(kernel_env, tmp_path):
    with kfp_standin(token=TOKEN) as api:
        kernel_env.setenv("FLYWHEEL_KFP__HOST", api.url)
        kernel_env.setenv("FLYWHEEL_KFP_TOKEN", TOKEN)
        notebook = execute("02-compile-upload-schedule.ipynb", tmp_path)
        assert "No KFP host" not in text_of(notebook)
        assert len(api.pipelines) == 1 and api.calls("POST", "/pipelines/upload_version")
        [run] = [c["body"] for c in api.calls("POST", "/runs")]
        assert run["display_name"] == "notebook-run"
        assert run["runtime_config"]["parameters"] == {"source_uri": "s3://flywheel/raw/latest"}
        [recurring] = [c["body"] for c in api.calls("POST", "/recurringruns")]
        assert recurring["no_catchup"] is True and int(recurring["max_concurrency"]) == 1
        assert recurring["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * *"
        [stored] = api.runs.values()
        assert stored["run_id"] in text_of(notebook) and "PENDING" in text_of(notebook)
