"""The README's models-and-releases example, run verbatim: the commands are read from README.md
(not copied here) and run by bash, one line at a time, on a copy of a trained home where a second
version (production's weights, published again, evaluated and blessed by the real gate) waits: a good
candidate, promoted by `flywheel deploy --target local` through two real `flywheel serve` processes.
Only the canary's windows move, through the settings (20% then 50%, 60 canary requests each)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from flywheel import steps
from flywheel.config import load_settings
from flywheel.registry import Registry
from flywheel.storage import Storage
from tests.candidates import copy_version
from tests.conftest import small_env

ROOT = Path(__file__).resolve().parents[2]


def readme_release_example() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Models and releases.*?```sh\n(.*?)```", text, re.S)
    assert block, "README.md has no models-and-releases example block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_release_example_verbatim(trained_loop, tmp_path):
    lines = readme_release_example()
    assert [line.split()[1] for line in lines] == ["models", "deploy", "models", "models", "deploy"]
    home = tmp_path / "home"
    shutil.copytree(trained_loop["home"], home)
    env_settings = dict(small_env(home), FLYWHEEL_DEPLOY__CANARY__STEPS="[20, 50]", FLYWHEEL_DEPLOY__CANARY__WINDOW_REQUESTS="60")
    settings = load_settings(env=env_settings)
    registry = Registry(Storage.from_settings(settings), "fraud")
    production = registry.production().version
    candidate = copy_version(registry, production, tmp_path)
    evaluation = steps.evaluate_step(trained_loop["training_set"], {"version": candidate}, "readme-eval", "", settings)
    assert evaluation["blessed"], evaluation["reasons"]

    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(env_settings, PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    outputs = []
    for line in lines:
        result = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr
        outputs.append(result.stdout)
    listed, deployed, after, rolled_back, _ = outputs
    assert re.search(rf"{candidate}\s+candidate", listed) and re.search(rf"{production}\s+production", listed)
    assert deployed.startswith("promote: 2 window(s) at 20%, 50% passed every threshold"), deployed
    assert f"production model: {candidate}" in deployed
    record_uri = re.search(r"decision record: (\S+)", deployed).group(1)
    record = registry.storage.read_json(record_uri)
    assert record["verdict"] == "promote" and record["candidate"] == candidate and record["stable"] == production
    # A good candidate, promoted on what two real `flywheel serve` processes answered through the proxy.
    assert record["target"] == "local" and [w["step"] for w in record["windows"]] == [20, 50]
    for window, step in zip(record["windows"], (20, 50)):
        seen = window["observations"]
        assert seen["canary"]["requests"] == 60 and seen["client"]["requests"] == 60 * 100 // step  # the split is exact
        assert seen["canary"]["errors"] == 0 and seen["agreement"]["pairs"] == 60
        # The same weights: the same scores, up to float32 rounding (a server scores the requests that
        # arrive together in one forward pass, and a batch's sums can round differently).
        assert seen["agreement"]["max_abs_diff"] < 1e-6
    assert record["client"]["failures"] == 0 and record["client"]["requests"] == 300 + 120
    assert [(e.action, e.version) for e in registry.events()[-3:-1]] == [("canary", candidate), ("promote", candidate)]
    assert re.search(rf"{candidate}\s+production", after) and re.search(rf"{production}\s+archived", after)
    assert f"{production} is production again (was {candidate})" in rolled_back
    assert registry.production().version == production
    kinds = [doc["kind"] for doc in yaml.safe_load_all((tmp_path / "release.yaml").read_text()) if doc]
    assert kinds[-1] == "InferenceService" and "ServingRuntime" in kinds
