"""Content keys cover the code that makes an artifact: found by following imports, not listed by hand."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.config import load_settings
from flywheel.errors import FlywheelError
from flywheel.features.build import features_key
from flywheel.fingerprint import code_fingerprint, project_modules

ROOT = Path(__file__).resolve().parents[2]
KEY_OF_A_TRAINING_SET = "from flywheel.config import load_settings; from flywheel.features.build import features_key; " \
    "print(features_key('s' * 64, load_settings(env={'FLYWHEEL_HOME': '/tmp/fw-fingerprint'})))"


@pytest.fixture(scope="module")
def pristine_keys(tmp_path_factory) -> dict[str, str]:
    """Each program's key over an unedited copy, computed once per module (each costs a fresh process
    that imports torch): the parametrized edits compare against it."""
    keys: dict[str, str] = {}

    def key(program: str) -> str:
        if program not in keys:
            keys[program] = key_with(tmp_path_factory.mktemp("pristine"), None, program)
        return keys[program]

    return key


def key_with(tmp_path: Path, edit: tuple[str, str, str] | None, program: str = KEY_OF_A_TRAINING_SET) -> str:
    """The training-set key computed in a fresh process over a copy of the package, with one edit:
    (file relative to flywheel/, text to find, replacement)."""
    copy = tmp_path / "src"
    if not copy.exists():
        shutil.copytree(ROOT / "flywheel", copy / "flywheel", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "usecases", copy / "usecases")  # the settings' default use case, from cwd
    if edit:
        path = copy / "flywheel" / edit[0]
        text = path.read_text()
        assert edit[1] in text, f"{edit[1]!r} not in {path}"
        path.write_text(text.replace(edit[1], edit[2], 1))
    result = subprocess.run([sys.executable, "-c", program], cwd=copy, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(copy)})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_training_set_key_follows_the_modules_its_code_imports():
    names = {name for name, _ in project_modules("flywheel.features.build")}
    # split_by_time's module, the aggregation engine, the views and Feast definitions, the join, the
    # declarations' and contract's readers and the lake reader all shape the training set.
    assert {"flywheel.features.build", "flywheel.features.engine", "flywheel.features.views", "flywheel.features.definitions",
            "flywheel.features.store", "flywheel.aggregations", "flywheel.contract", "flywheel.usecase"} <= names
    assert any(name in names for name in ("flywheel.lake", "flywheel.ingest"))
    assert "flywheel.cli" not in names and "flywheel.steps" not in names  # callers do not shape it


@pytest.mark.parametrize(
    "edit",
    [
        # The defect the review found: split_by_time's code was not in the key.
        ("features/build.py", "cutoff = start + (end - start) * (1 - holdout_fraction)",
         "cutoff = start + (end - start) * (1 - holdout_fraction * 1.0)"),
        ("features/engine.py", "q_code, q_time - window)", "q_code, q_time - window + 1)"),
        ("features/views.py", "ttl=max(a.window for _, a in named),", "ttl=max(a.window for _, a in named) * 2,"),
        ("contract.py", '"timestamp": pa.timestamp("us", tz="UTC")', '"timestamp": pa.timestamp("ms", tz="UTC")'),
    ],
    ids=["split_by_time", "aggregates", "feast-ttl", "contract"],
)
def test_changing_the_code_of_the_features_stage_changes_the_key(tmp_path, edit, pristine_keys):
    assert key_with(tmp_path / "edited", edit) != pristine_keys(KEY_OF_A_TRAINING_SET)


CODE_OF_A_MODEL = "from flywheel.training.train import training_code_hash; print(training_code_hash())"


@pytest.mark.parametrize(
    "edit",
    [
        ("training/worker.py", "return torch.nn.BCEWithLogitsLoss()", "return torch.nn.BCEWithLogitsLoss(reduction='mean')"),
        ("training/model.py", "layers += [nn.Linear(previous, size), nn.ReLU()]", "layers += [nn.Linear(previous, size), nn.GELU()]"),
        ("features/transform.py", "MAX_AGE_S = 30 * 24 * 3600.0", "MAX_AGE_S = 31 * 24 * 3600.0"),
    ],
    ids=["worker", "model", "input-transform"],
)
def test_changing_the_code_of_the_training_stage_changes_the_model_key(tmp_path, edit, pristine_keys):
    """The worker runs in torchrun's processes, never imported by the step: it is a root of its own."""
    assert key_with(tmp_path / "edited", edit, CODE_OF_A_MODEL) != pristine_keys(CODE_OF_A_MODEL)


def test_a_comment_outside_the_stage_does_not_change_the_key(tmp_path, pristine_keys):
    """cli.py does not shape a training set: editing it keeps the key (and the reuse)."""
    assert key_with(tmp_path / "edited", ("cli.py", "def main(", "# a comment\ndef main(")) == pristine_keys(KEY_OF_A_TRAINING_SET)


def test_settings_that_shape_the_split_change_the_key(tmp_path):
    base = load_settings(env={"FLYWHEEL_HOME": str(tmp_path)})
    other = load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_DATA__HOLDOUT_FRACTION": "0.3"})
    serving = load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_SERVING__PORT": "9000"})
    assert features_key("s" * 64, base) != features_key("s" * 64, other)
    assert features_key("s" * 64, base) == features_key("s" * 64, serving)
    assert features_key("s" * 64, base) != features_key("t" * 64, base)  # another lake snapshot


def test_an_unknown_root_is_a_clear_error():
    with pytest.raises(FlywheelError, match="no such flywheel module"):
        code_fingerprint("flywheel.no_such_module")


def test_the_fingerprint_is_stable_within_and_across_processes():
    here = code_fingerprint("flywheel.features.build")
    assert here == code_fingerprint("flywheel.features.build")
    there = subprocess.run([sys.executable, "-c", "from flywheel.fingerprint import code_fingerprint as f; print(f('flywheel.features.build'))"],
                           capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    assert there == here
