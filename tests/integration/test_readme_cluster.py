"""The README's "On a Kubeflow cluster" section: its `sh` blocks run verbatim, in order, against the
loopback stand-in of the KFP API (multi-user, namespace flywheel). Its `console` blocks need a real
cluster and are only checked for the names they share with the code (manifests, Secret, image)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from flywheel.config import Settings
from tests.kfp_standin import kfp_standin

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "readme-token-31f0"


def section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## On a Kubeflow cluster\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README.md has no 'On a Kubeflow cluster' section"
    return match.group(1)


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", section(), re.S | re.M)


def test_the_sh_blocks_run_verbatim_against_a_kfp_api(tmp_path):
    scripts = blocks("sh")
    assert len(scripts) >= 3
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)  # the commands say .venv/bin/flywheel
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "KF_PIPELINES"))}
    with kfp_standin(token=TOKEN, namespace="flywheel") as api:
        env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path), FLYWHEEL_HOME=str(tmp_path / "fh"),
                   FLYWHEEL_KFP__HOST=api.url, FLYWHEEL_KFP_TOKEN=TOKEN)  # what step 5 (cluster-only) exports
        script = "set -euo pipefail\n" + "\n".join(scripts)
        result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        assert {p["display_name"] for p in api.pipelines.values()} == {"flywheel-training", "flywheel-scoring"}
        runs = {c["body"]["display_name"]: c["body"] for c in api.calls("POST", "/runs")}
        assert runs["first-training"]["runtime_config"]["parameters"] == {"source_uri": "s3://flywheel/raw/2026-11"}
        [recurring] = [c["body"] for c in api.calls("POST", "/recurringruns")]
        assert recurring["display_name"] == "nightly-retraining" and recurring["no_catchup"] is True
        assert recurring["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * *"
        assert all(e["namespace"] == "flywheel" for e in api.experiments.values())
    # Step 4 compiled for the cluster: the store in MinIO, S3 keys from the Secret the console steps create.
    spec, platform = yaml.safe_load_all((tmp_path / "build" / "flywheel-training.yaml").read_text())
    env_of_ingest = {e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"]["exec-ingest"]["container"]["env"]}
    assert env_of_ingest["FLYWHEEL_STORAGE__ROOT"] == "s3://flywheel/store"
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-ingest"]["secretAsEnv"][0]["secretName"] == "flywheel-s3"
    assert (tmp_path / "build" / "flywheel-scoring.yaml").is_file()


def test_the_cluster_only_steps_name_what_the_code_uses():
    console = "\n".join(blocks("console"))
    assert f"docker build -t {Settings().image} ." in console
    assert "create secret generic flywheel-s3" in console and "accesskey=" in console and "secretkey=" in console
    for overlay in re.findall(r"kubectl apply -k (\S+)", console):
        assert (ROOT / overlay / "kustomization.yaml").is_file(), overlay
    assert "FLYWHEEL_KFP__HOST=" in console and "FLYWHEEL_KFP_TOKEN=" in console
