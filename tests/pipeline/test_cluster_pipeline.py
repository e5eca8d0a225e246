"""The compiled pipelines' cluster settings (kfp-kubernetes): credentials from Secrets only, the image
and pull policy, per-step resources, retries, caching, the GPU step's placement. The expectations are
written out here, apart from pipelines/training.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden" / "cluster"
STEPS = {"ingest", "validate", "features", "train", "evaluate", "deploy"}

ACCESS_KEY = "AKIAFLYWHEELTEST0001"  # shaped like an AWS key id, so the pattern scan would see it
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYFLYWHEELKEY"
KFP_TOKEN = "eyJhbGciOiJSUzI1NiJ9.flywheel-test-token"
CLUSTER_ENV = {
    "FLYWHEEL_STORAGE__ROOT": "s3://ml/flywheel",
    "FLYWHEEL_STORAGE__S3_ENDPOINT": "http://minio.flywheel:9000",
    "FLYWHEEL_IMAGE": "registry.example/flywheel:0.1.0",
    "FLYWHEEL_KFP__IMAGE_PULL_POLICY": "Always",
    "FLYWHEEL_TRAINING__LAUNCHER": "pytorchjob",
    "FLYWHEEL_TRAINING__CLUSTER__NAMESPACE": "flywheel",
    "FLYWHEEL_TRAINING__CLUSTER__SERVICE_ACCOUNT": "flywheel-trainer",
}


def compile_to(out: Path, home: Path, **env: str) -> list[Path]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "AWS_"))}
    result = subprocess.run([sys.executable, "-m", "flywheel.cli", "compile", "--out", str(out)],
                            env={**clean, "FLYWHEEL_HOME": str(home), "PYTHONPATH": str(REPO), **env},
                            cwd=home.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    files = sorted(out.glob("*.yaml"))
    assert files
    return files


def named(files: list[Path], name: str) -> Path:
    return next(p for p in files if p.name == name)


def documents(path: Path) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def tasks_of(spec: dict) -> dict[str, dict]:
    """Every task by name, inside conditions too."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return {name: task for name, task in tasks.items() if not name.startswith(("condition-", "for-loop-"))}


@pytest.fixture(scope="module")
def cluster_compile(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    env = dict(CLUSTER_ENV, FLYWHEEL_S3_ACCESS_KEY=ACCESS_KEY, FLYWHEEL_S3_SECRET_KEY=SECRET_KEY, FLYWHEEL_KFP_TOKEN=KFP_TOKEN)
    return compile_to(root / "out", root / "home", **env)


def test_the_cluster_compile_matches_its_golden_file(cluster_compile):
    """An interface change (parameters, caching, retries, resources, Secrets) shows up as a diff here.
    After an intended change, refresh with the settings in CLUSTER_ENV:
    env $(CLUSTER_ENV as NAME=VALUE) .venv/bin/flywheel compile --out tests/pipeline/golden/cluster"""
    for path in cluster_compile:
        compiled = list(yaml.safe_load_all(path.read_text()))
        golden = list(yaml.safe_load_all((GOLDEN / path.name).read_text()))
        for spec in (compiled[0], golden[0]):
            spec.pop("sdkVersion", None)
        assert compiled == golden, path.name


def test_no_compiled_file_holds_a_credential(cluster_compile):
    """The S3 keys and the KFP token were in the environment at compile time: none may reach a file,
    and nothing shaped like a credential may either."""
    for path in cluster_compile:
        text = path.read_text()
        for secret in (ACCESS_KEY, SECRET_KEY, KFP_TOKEN, "flywheel-test-token"):
            assert secret not in text, (path.name, secret)
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), path.name
        assert not re.search(r"(?i)(secret_?key|access_?key|password|token)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{16,}", text), path.name
        spec, executors = documents(path)
        for name, executor in spec["deploymentSpec"]["executors"].items():
            env_names = {e["name"] for e in executor["container"].get("env", [])}
            assert not env_names & {"FLYWHEEL_S3_ACCESS_KEY", "FLYWHEEL_S3_SECRET_KEY", "AWS_ACCESS_KEY_ID",
                                    "AWS_SECRET_ACCESS_KEY", "FLYWHEEL_KFP_TOKEN"}, name
            # ... they come from the Secret, by reference.
            [secret] = executors[name]["secretAsEnv"]
            assert secret["secretName"] == "flywheel-s3"
            assert {(m["secretKey"], m["envVar"]) for m in secret["keyToEnv"]} == {
                ("accesskey", "FLYWHEEL_S3_ACCESS_KEY"), ("secretkey", "FLYWHEEL_S3_SECRET_KEY")}


def test_every_step_has_the_image_pull_policy_and_resources_of_the_settings(cluster_compile, tmp_path):
    spec, executors = documents(named(cluster_compile, "flywheel-training.yaml"))
    containers = {name.removeprefix("exec-"): e["container"] for name, e in spec["deploymentSpec"]["executors"].items()}
    assert set(containers) == STEPS
    assert {c["image"] for c in containers.values()} == {"registry.example/flywheel:0.1.0"}
    assert {e["imagePullPolicy"] for e in executors.values()} == {"Always"}
    # The defaults, written out: heavy steps get more.
    expected = {
        "ingest": ("500m", "2", "1Gi", "4Gi"), "validate": ("500m", "2", "2Gi", "8Gi"),
        "features": ("2", "4", "4Gi", "16Gi"), "train": ("2", "8", "4Gi", "16Gi"),
        "evaluate": ("1", "4", "2Gi", "8Gi"), "deploy": ("500m", "2", "1Gi", "4Gi"),
    }
    for step, (cpu_request, cpu_limit, memory_request, memory_limit) in expected.items():
        resources = containers[step]["resources"]
        assert (resources["resourceCpuRequest"], resources["resourceCpuLimit"], resources["resourceMemoryRequest"],
                resources["resourceMemoryLimit"]) == (cpu_request, cpu_limit, memory_request, memory_limit), step
    # A setting reaches its step.
    changed = named(compile_to(tmp_path / "out", tmp_path / "home", FLYWHEEL_KFP__RESOURCES__FEATURES__MEMORY_LIMIT="48Gi"),
                    "flywheel-training.yaml")
    features = next(yaml.safe_load_all(changed.read_text()))["deploymentSpec"]["executors"]["exec-features"]
    assert features["container"]["resources"]["resourceMemoryLimit"] == "48Gi"


def test_network_steps_retry_with_backoff_and_verdict_steps_do_not(cluster_compile):
    spec, _ = documents(named(cluster_compile, "flywheel-training.yaml"))
    tasks = tasks_of(spec)
    assert set(tasks) == STEPS
    for name in ("ingest", "features", "train", "deploy"):
        assert tasks[name]["retryPolicy"] == {"maxRetryCount": 3, "backoffDuration": "30s", "backoffFactor": 2.0,
                                              "backoffMaxDuration": "600s"}, name
    for name in ("validate", "evaluate"):  # a refused expectation or gate is the same on every attempt
        assert "retryPolicy" not in tasks[name], name


def test_steps_that_read_latest_state_are_never_cached(cluster_compile):
    """ingest (the files behind a URI), validate (the lake), evaluate (the production model) and deploy
    (the registry's state) read state outside their inputs; features and train are content-addressed."""
    spec, _ = documents(named(cluster_compile, "flywheel-training.yaml"))
    tasks = tasks_of(spec)
    for name in ("ingest", "validate", "evaluate", "deploy"):
        assert tasks[name]["cachingOptions"] == {}, name
    for name in ("features", "train"):
        assert tasks[name]["cachingOptions"] == {"enableCache": True}, name


def test_a_cluster_launcher_train_step_gets_the_launcher_settings_not_the_gpus(cluster_compile):
    spec, executors = documents(named(cluster_compile, "flywheel-training.yaml"))
    train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    env = {e["name"]: e["value"] for e in train["env"]}
    assert env["FLYWHEEL_TRAINING__LAUNCHER"] == "pytorchjob"
    assert env["FLYWHEEL_TRAINING__CLUSTER__NAMESPACE"] == "flywheel"
    assert env["FLYWHEEL_TRAINING__CLUSTER__SERVICE_ACCOUNT"] == "flywheel-trainer"
    assert env["FLYWHEEL_IMAGE"] == "registry.example/flywheel:0.1.0"
    assert "accelerator" not in train["resources"]  # the PyTorchJob's pods get the GPUs
    assert "nodeSelector" not in executors["exec-train"] and "tolerations" not in executors["exec-train"]


def test_a_local_launcher_train_step_runs_on_the_gpu_pool(tmp_path):
    env = dict(CLUSTER_ENV, FLYWHEEL_TRAINING__LAUNCHER="local", FLYWHEEL_TRAINING__CLUSTER__GPUS_PER_REPLICA="2",
               FLYWHEEL_TRAINING__CLUSTER__NODE_SELECTOR='{"cloud.example/pool": "a100"}')
    path = named(compile_to(tmp_path / "out", tmp_path / "home", **env), "flywheel-training.yaml")
    spec, executors = documents(path)
    containers = spec["deploymentSpec"]["executors"]
    accelerator = containers["exec-train"]["container"]["resources"]["accelerator"]
    assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", "2")
    assert executors["exec-train"]["nodeSelector"] == {"labels": {"cloud.example/pool": "a100"}}
    assert executors["exec-train"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    for name in containers.keys() - {"exec-train"}:  # only the GPU step goes to the GPU pool
        assert "accelerator" not in containers[name]["container"]["resources"], name
        assert "nodeSelector" not in executors[name] and "tolerations" not in executors[name], name


def test_the_scoring_pipeline_retries_chunks_and_never_caches_its_plan_or_summary(cluster_compile):
    spec, executors = documents(named(cluster_compile, "flywheel-scoring.yaml"))
    tasks = tasks_of(spec)
    assert set(tasks) == {"plan-scoring", "score", "summarize"}
    assert tasks["score"]["retryPolicy"]["maxRetryCount"] == 3  # a chunk that failed on the network retries alone
    assert "retryPolicy" not in tasks["plan-scoring"] and "retryPolicy" not in tasks["summarize"]
    assert tasks["plan-scoring"]["cachingOptions"] == {} and tasks["summarize"]["cachingOptions"] == {}  # production model, latest lake
    containers = spec["deploymentSpec"]["executors"]
    assert containers["exec-score"]["container"]["resources"]["resourceMemoryLimit"] == "16Gi"
    assert {e["imagePullPolicy"] for e in executors.values()} == {"Always"}
