"""The whole KFP DAG under kfp.local, as `flywheel run` runs it, on small data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flywheel import lineage
from flywheel.config import load_settings
from flywheel.demo import demo_base
from flywheel.registry import Registry
from flywheel.storage import Storage
from tests.conftest import small_env
from tests.factories import FRAUD

GOLDEN = Path(__file__).parent / "golden" / "flywheel-training.yaml"


def flywheel(*args: str, env: dict[str, str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flywheel.cli", *args], env=dict(os.environ, **env), cwd=cwd,
        capture_output=True, text=True, timeout=timeout,
    )


CUSTOM_EPOCHS = 3  # not the default (6): the file must reach the train step


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """`flywheel --config FILE run` twice on the same generated data (the second must reuse the
    first's work). The file moves the storage root and sets the epochs: every step must honour it."""
    home = tmp_path_factory.mktemp("pipeline")
    config = home / "settings.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"root": str(home / "custom-store")},
        "training": {"epochs": CUSTOM_EPOCHS},
        "data": {"days": 14},
    }))
    env = {k: v for k, v in small_env(home).items() if k != "FLYWHEEL_TRAINING__EPOCHS"}
    first = flywheel("--config", str(config), "run", "--rows", "30000", env=env, cwd=home)
    second = flywheel("--config", str(config), "run", "--rows", "30000", env=env, cwd=home)
    env = dict(env, FLYWHEEL_CONFIG=str(config))  # for the tests' own load_settings
    return home, env, first, second


def store_of(home: Path) -> Path:
    root = home / "custom-store" if (home / "custom-store").exists() else home / "store"
    return root / "fraud"  # the use case's namespace


def summaries(home: Path) -> list[dict]:
    runs = sorted((store_of(home) / "runs").glob("*/summary.json"))
    return [json.loads(p.read_text()) for p in runs]


def test_a_settings_file_is_honoured_by_every_step(two_runs):
    """`--config FILE` used to reach the CLI only: the steps (kfp.local subprocesses) wrote to the
    default root and trained with the default epochs."""
    home, env, first, _ = two_runs
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert not (home / "store").exists()  # the default root was never written
    summary = summaries(home)[0]
    for step in summary["steps"]:
        for uri in step.get("artifacts", {}).values():
            assert uri.startswith(str(home / "custom-store")), (step["step"], uri)
        assert (home / "custom-store" / "fraud" / "runs" / summary["run_id"] / "steps" / f"{step['step']}.json").is_file()
    model = Registry(Storage.from_settings(load_settings(env=env)), "fraud").get(summary["model_version"])
    assert model.meta["params"]["epochs"] == CUSTOM_EPOCHS and len(model.meta["epochs"]) == CUSTOM_EPOCHS


def test_flywheel_run_trains_gates_and_deploys(two_runs):
    home, env, first, _ = two_runs
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for text in ("ingest", "validate", "features", "train", "evaluate", "deploy", "ROC-AUC", "PR-AUC",
                 "production model:", "best achievable PR-AUC"):
        assert text in first.stdout
    summary = summaries(home)[0]
    assert [s["step"] for s in summary["steps"]] == ["ingest", "validate", "features", "train", "evaluate", "deploy"]
    assert all(s["status"] == "succeeded" and s["seconds"] > 0 for s in summary["steps"])
    assert summary["steps"][0]["rows"] == 30000
    assert summary["blessed"] and summary["deployed"] == summary["model_version"]
    assert 0.5 < summary["metrics"]["roc_auc"] <= 1 and 0.4 < summary["truth"]["pr_auc_vs_truth"] < 1.1
    settings = load_settings(env=env)
    assert Registry(Storage.from_settings(settings), "fraud").production().version == summary["model_version"]


def test_model_lineage_walks_back_to_the_raw_files(two_runs):
    home, env, _, _ = two_runs
    settings = load_settings(env=env)
    storage = Storage.from_settings(settings)
    model = Registry(storage, "fraud").production()
    tree = lineage.trace(storage, model.manifest_uri)
    raw = {leaf["uri"] for leaf in lineage.leaves(tree)}
    generated = set(storage.iter_objects(f"{demo_base(storage, FRAUD, 30000, settings.data)}/raw", (".parquet",)))
    assert generated and generated <= raw
    steps = set()

    def walk(node):
        if "step" in node:
            steps.add(node["step"])
        for child in node.get("inputs", []):
            walk(child)

    walk(tree)
    assert {"train", "features", "ingest"} <= steps


def test_a_rerun_with_the_same_inputs_does_no_new_work(two_runs):
    home, _, _, second = two_runs
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    first_summary, second_summary = summaries(home)[:2]
    steps = {s["step"]: s for s in second_summary["steps"]}
    assert steps["ingest"]["new_parts"] == 0
    assert steps["features"]["reused"] and steps["train"]["reused"]
    assert second_summary["model_version"] == first_summary["model_version"]
    assert second_summary["generate_seconds"] == 0.0


def test_another_generated_size_in_the_same_home_is_its_own_world(two_runs):
    """`flywheel run --rows N` once mixed every generated size into one lake. The run's own lake is
    checked on the 30k runs (the pipeline is handed it); another size gets its own data and lake, and
    ingesting it leaves the 30k lake as it was. (A third whole pipeline run here cost about a minute.)"""
    from flywheel import steps
    from flywheel.demo import demo_dataset

    home, env, _, _ = two_runs
    first = summaries(home)[0]
    settings = load_settings(env=env)
    storage = Storage.from_settings(settings)
    lake_30k = f"{demo_base(storage, FRAUD, 30000, settings.data)}/lake"
    assert "/demo/generated-r30000-d14-s7-" in lake_30k
    assert first["steps"][1]["artifacts"]["lake_snapshot"].startswith(f"{lake_30k}/_snapshots/")
    before = {uri: storage.stat(uri).sha256 for uri in storage.list(lake_30k)}
    source, lake, _ = demo_dataset(storage, FRAUD, 5000, settings.data)
    assert lake != lake_30k and "/demo/generated-r5000-d14-s7-" in lake
    staged = steps.ingest_step(source, "run-other-size", settings, lake)
    published = steps.validate_step(staged, "run-other-size", settings)
    assert published["uri"].startswith(f"{lake}/_snapshots/")
    assert published["rows"] == 5000  # not mixed with the 30k dataset's lake
    assert {uri: storage.stat(uri).sha256 for uri in storage.list(lake_30k)} == before


def test_a_validation_failure_stops_the_run_with_the_expectation_named(tmp_path):
    import pandas as pd

    from tests.factories import make_transactions

    bad = make_transactions(300)
    bad.loc[:4, "amount"] = -5.0
    source = tmp_path / "raw"
    source.mkdir()
    bad.to_parquet(source / "bad.parquet")
    result = flywheel("run", "--source", str(source), env=small_env(tmp_path / "home"), cwd=tmp_path)
    assert result.returncode != 0
    assert "step validate failed" in result.stderr
    assert "expect_column_values_to_be_between(amount)" in result.stderr
    assert "Traceback" not in result.stderr
    summary = summaries(tmp_path / "home")[0]
    assert [s["step"] for s in summary["steps"]] == ["ingest", "validate"]
    assert pd.isna(summary["deployed"]) or summary["deployed"] is None


def test_compiled_pipeline_matches_the_golden_file(tmp_path):
    """Catches accidental interface and cache-key changes. After an intended change, refresh with:
    .venv/bin/flywheel compile --out tests/pipeline/golden"""
    result = flywheel("compile", "--out", str(tmp_path), env={"FLYWHEEL_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    compiled = list(yaml.safe_load_all((tmp_path / "flywheel-training.yaml").read_text()))
    golden = list(yaml.safe_load_all(GOLDEN.read_text()))
    for spec in (compiled[0], golden[0]):
        spec.pop("sdkVersion", None)
    assert compiled == golden  # the pipeline spec and the Kubernetes platform spec
    tasks = compiled[0]["root"]["dag"]["tasks"]
    assert set(tasks) == {"ingest", "validate", "features", "train", "evaluate", "condition-1"}
    assert tasks["ingest"]["cachingOptions"] == {}  # ingest always re-reads its source


def artifact_from(task: dict, name: str) -> dict:
    return task["inputs"]["artifacts"][name]["taskOutputArtifact"]


def test_features_read_only_the_snapshot_validation_published(tmp_path):
    """The interface, stated apart from the golden file: ingest stages, validate publishes (or discards),
    features consume validate's published snapshot (never ingest's staged one), deploy waits for the blessing."""
    result = flywheel("compile", "--out", str(tmp_path), env={"FLYWHEEL_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    compiled = next(yaml.safe_load_all((tmp_path / "flywheel-training.yaml").read_text()))
    tasks = compiled["root"]["dag"]["tasks"]
    assert artifact_from(tasks["validate"], "staged") == {"producerTask": "ingest", "outputArtifactKey": "staged"}
    assert artifact_from(tasks["features"], "snapshot") == {"producerTask": "validate", "outputArtifactKey": "snapshot"}
    assert tasks["validate"]["cachingOptions"] == {}  # it publishes into the lake: never skipped as cached
    outputs = compiled["components"]["comp-validate"]["outputDefinitions"]["artifacts"]
    assert outputs["snapshot"]["artifactType"]["schemaTitle"] == "system.Dataset"
    condition = tasks["condition-1"]
    assert condition["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--evaluate-Output'] == true"
    assert "deploy" not in tasks and set(compiled["components"]["comp-condition-1"]["dag"]["tasks"]) == {"deploy"}


def test_cluster_compile_takes_credentials_from_a_secret_never_from_the_yaml(tmp_path):
    env = {
        "FLYWHEEL_HOME": str(tmp_path / "home"),
        "FLYWHEEL_STORAGE__ROOT": "s3://ml/flywheel",
        "FLYWHEEL_STORAGE__S3_ENDPOINT": "http://minio.kubeflow:9000",
        "FLYWHEEL_S3_ACCESS_KEY": "AKIA-very-secret",
        "FLYWHEEL_S3_SECRET_KEY": "never-in-yaml",
    }
    result = flywheel("compile", "--out", str(tmp_path), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "flywheel-training.yaml").read_text()
    assert "AKIA-very-secret" not in text and "never-in-yaml" not in text
    documents = list(yaml.safe_load_all(text))
    executors = documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{s}" for s in ("ingest", "validate", "features", "train", "evaluate", "deploy")}
    for spec in executors.values():
        assert spec["secretAsEnv"][0]["secretName"] == "flywheel-s3"
    assert "value: s3://ml/flywheel" in text


def test_every_step_runs_in_the_image_the_settings_name(tmp_path):
    """Settings.image used to be ignored: the components hard-coded their image."""
    env = {"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_IMAGE": "registry.internal:5000/ml/flywheel:2026.11.23"}
    result = flywheel("compile", "--out", str(tmp_path), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    executors = next(yaml.safe_load_all((tmp_path / "flywheel-training.yaml").read_text()))["deploymentSpec"]["executors"]
    assert len(executors) == 6
    assert {spec["container"]["image"] for spec in executors.values()} == {env["FLYWHEEL_IMAGE"]}
