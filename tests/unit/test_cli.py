"""The command line: every command explains itself; user mistakes are one clear line, no traceback."""

import os
import subprocess
import sys

import pytest


def run(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "flywheel.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("command", [[], ["generate"], ["run"], ["serve"], ["compile"]])
def test_help_says_what_each_command_does(command):
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "usage: flywheel" in result.stdout and len(result.stdout.splitlines()) > 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--rows", "0", "--out", "x"], "must be at least 1"),
        (["generate", "--rows", "many", "--out", "x"], "is not a whole number"),
        (["run", "--rows", "-5"], "must be at least 1"),
        (["run", "--rows", "5000", "--source", "x"], "cannot be combined with --source"),
    ],
)
def test_bad_arguments_are_refused_clearly(args, message):
    result = run(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_bad_settings_are_one_line_without_traceback(tmp_path):
    result = run("compile", "--out", str(tmp_path), env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_TRAINING__EPOCHS": "-1"})
    assert result.returncode == 2
    assert result.stderr.startswith("error: invalid settings") and "training.epochs" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_without_a_production_model_says_what_to_do(tmp_path):
    result = run("serve", "--port", "1", env={"FLYWHEEL_HOME": str(tmp_path)})
    assert result.returncode != 0 and "run `flywheel run` first" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_latest_without_any_trained_version_says_what_to_do(tmp_path):
    result = run("serve", "--version", "latest", "--port", "1", env={"FLYWHEEL_HOME": str(tmp_path)})
    assert result.returncode != 0 and "has no version yet: train one first" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_writes_data_and_truth(tmp_path):
    result = run("generate", "--rows", "2000", "--days", "3", "--out", str(tmp_path / "raw"), env={"FLYWHEEL_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "wrote 2,000 rows" in result.stdout
    assert list((tmp_path / "raw").glob("part-*.parquet")) and list((tmp_path / "raw" / "_truth").glob("*.parquet"))


def test_serve_on_a_busy_port_is_a_clear_error():
    import socket

    from flywheel.errors import FlywheelError
    from serving.server import check_address

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(FlywheelError, match=f"cannot serve on 127.0.0.1:{port}"):
            check_address("127.0.0.1", port)
