"""The README's `feast` CLI block, run verbatim in feature_repo/ against the latest features step's
world, and its "When one machine is not enough" settings, loaded as they are written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from flywheel.config import load_settings
from flywheel.features import store as feast_store
from flywheel.features.build import latest_training_set

ROOT = Path(__file__).resolve().parents[2]


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", (ROOT / "README.md").read_text(), re.S | re.M)
    assert match, f"README.md has no {title!r} section"
    return match.group(1)


def blocks(title: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", section(title), re.S | re.M)


def test_feast_cli_in_feature_repo_lists_and_materializes_the_latest_world_verbatim(trained_loop, tmp_path):
    """Bugs caught: feature_repo/ reading a registry of its own (the CLI lists no views, or views
    flywheel never serves), the features step not pointing the CLI at the world it built."""
    [script] = blocks("Feast's CLI on flywheel's registry", "sh")
    settings = trained_loop["settings"]
    world = latest_training_set(trained_loop["storage"]).world
    assert (Path(settings.features.dir) / "fraud" / "latest.env").read_text() == (
        f"FLYWHEEL_FEAST_PROJECT={feast_store.feast_project(settings, world)}\n"
        f"FLYWHEEL_FEAST_WORLD={feast_store.world_dir(settings, world).resolve()}\n"
        "FLYWHEEL_FEAST_OFFLINE_STORE=flywheel.features.asof_store.AsofDuckDBOfflineStore\n"
    )
    # materialize-incremental writes to the world: run on a copy, so the session's loop stays as it was.
    home = tmp_path / "home"
    shutil.copytree(Path(settings.features.dir), home / "feast", symlinks=True)
    copy = load_settings(env={**trained_loop["env"], "FLYWHEEL_HOME": str(home)})
    feast_store.point_feast_cli_at(copy, world)
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "feature_repo", checkout / "feature_repo")
    (checkout / ".venv").symlink_to(Path(sys.executable).parent.parent)  # the commands say ../.venv/bin/feast
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "FEAST_"))}
    env.update(FLYWHEEL_HOME=str(home), PYTHONPATH=str(ROOT))
    result = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=checkout, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert {"card_features", "merchant_features"} <= listed, result.stdout

    store = feast_store.open_store(copy, world)
    ends = {view.name: max(end for _, end in view.materialization_intervals) for view in store.list_feature_views()}
    assert {name: end.year for name, end in ends.items()} == {"card_features": 2030, "merchant_features": 2030}
    # The original world was not touched.
    original = feast_store.open_store(settings, world)
    assert all(max(end for _, end in view.materialization_intervals).year < 2030 for view in original.list_feature_views())


def test_the_ray_settings_block_loads_as_written(tmp_path):
    """Bug caught: README settings the settings object refuses or reads differently."""
    [block] = blocks("When one machine is not enough", "yaml")
    (tmp_path / "flywheel.yaml").write_text(block)
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path)})
    assert settings.features.offline_store == "ray"
    assert settings.features.ray_address == yaml.safe_load(block)["features"]["ray_address"]
    engines = feast_store.ray_engines(settings.features.ray_address)
    assert engines["offline_store"]["ray_address"] == engines["batch_engine"]["ray_address"] == settings.features.ray_address
