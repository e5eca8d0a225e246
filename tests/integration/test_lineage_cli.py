"""`flywheel lineage`: from a model back to raw file hashes, and from a raw file down to the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def flywheel(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flywheel.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, cwd=ROOT)


def test_lineage_up_from_a_model_and_down_from_a_raw_file(trained_loop) -> None:
    storage, env = trained_loop["storage"], trained_loop["env"]
    model_file = next(uri for uri in storage.list(trained_loop["model"]["uri"]) if uri.endswith("model.pt"))
    raw_files = [uri for uri in storage.iter_objects(trained_loop["source"], (".parquet",))]

    up = flywheel(env, "lineage", model_file)
    assert up.returncode == 0, up.stderr
    assert up.stdout.splitlines()[0].startswith(model_file)
    for raw in raw_files:  # every raw file, with the sha256 it had when ingested
        sha = storage.stat(raw).sha256
        assert f"{raw}  [raw]  sha256 {sha[:12]}" in up.stdout

    tree = json.loads(flywheel(env, "lineage", "--down", "--json", raw_files[0]).stdout)

    def reached(node: dict) -> set[str]:
        return {node["uri"]} | {u for child in node.get("users", []) for u in reached(child)}

    uris = reached(tree)
    assert tree["sha256"] == storage.stat(raw_files[0]).sha256
    assert any("/lake/transactions/date=" in u for u in uris) and any("/lake/_snapshots/" in u for u in uris)
    assert any(u.startswith(trained_loop["training_set"]["uri"]) for u in uris)
    assert model_file in uris

    missing = flywheel(env, "lineage", "/nowhere/at/all.parquet")
    assert missing.returncode == 2 and "no lineage record" in missing.stderr and "Traceback" not in missing.stderr
