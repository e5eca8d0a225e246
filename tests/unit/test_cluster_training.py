"""Training on Kubernetes without a cluster: the PyTorchJob and TrainJob manifests against the CRD
schemas in tests/crds, and the launcher's watch against a stand-in API server that plays a job
that succeeds, fails, runs past the timeout or cannot start. The real kubernetes client is used
throughout; only the server is a stand-in.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from flywheel.cli import main
from flywheel.config import Settings, load_settings
from flywheel.errors import TrainingError
from flywheel.storage import Storage
from flywheel.training.cluster import JobInputs, render
from flywheel.training.watch import run_cluster_job
from tests.crd_schema import assert_conforms, crd_schema, schema_errors
from tests.kube_standin import (
    Scenario, condition, failed_pod, kube_standin, pod, unschedulable_pod, waiting_pod,
)

CRD_FILES = {"pytorchjob": "kubeflow.org_pytorchjobs.yaml", "trainjob": "trainer.kubeflow.org_trainjobs.yaml"}
INPUTS = JobInputs("s3://lake/fw/datasets/training/k/train.parquet", "s3://lake/fw/runs/r1/train/spec.json",
                   "s3://lake/fw/runs/r1/train/out")
FAST_WATCH = {"POLL_INTERVAL_S": "0.02", "WATCH_TIMEOUT_S": "30", "PENDING_TIMEOUT_S": "0"}


def cluster_settings(tmp_path: Path, **cluster: object) -> Settings:
    env = {"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_STORAGE__ROOT": "s3://lake/fw",
           "FLYWHEEL_STORAGE__S3_ENDPOINT": "minio.minio:9000", "FLYWHEEL_STORAGE__S3_SECURE": "false",
           "FLYWHEEL_S3_ACCESS_KEY": "AKIA-NEVER-IN-A-MANIFEST", "FLYWHEEL_S3_SECRET_KEY": "secret-never-in-a-manifest"}
    env.update({f"FLYWHEEL_TRAINING__CLUSTER__{k.upper()}": str(v) for k, v in {**FAST_WATCH, **cluster}.items()})
    return load_settings(env=env)


# ---------------------------------------------------------------- manifests vs the CRD schemas
VARIANTS = {
    "defaults": {},
    "cpu only, master alone": {"GPUS_PER_REPLICA": "0", "WORKER_REPLICAS": "0", "ELASTIC_MAX_REPLICAS": "1"},
    "four GPUs, three workers, a service account, a timed toleration": {
        "GPUS_PER_REPLICA": "4", "WORKER_REPLICAS": "3", "ELASTIC_MIN_REPLICAS": "2", "ELASTIC_MAX_REPLICAS": "6",
        "SERVICE_ACCOUNT": "trainer",
        "TOLERATIONS": '[{"key": "gpu", "operator": "Equal", "value": "a100", "effect": "NoExecute", "tolerationSeconds": 60}]',
    },
}


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_manifest_conforms_to_its_crd_schema(tmp_path, backend, variant):
    job = render(cluster_settings(tmp_path, **VARIANTS[variant]), backend, INPUTS, "run-1", "a" * 64)
    assert_conforms(yaml.safe_load(job.to_yaml()), CRD_FILES[backend], job.version)


def test_the_schema_check_rejects_an_unknown_field_a_wrong_type_and_a_missing_required_field(tmp_path):
    body = render(cluster_settings(tmp_path), "pytorchjob", INPUTS, "run-1", "a" * 64).body
    schema = crd_schema(CRD_FILES["pytorchjob"], "v1")
    assert schema_errors(body, schema) == []
    typo = json.loads(json.dumps(body))
    typo["spec"]["elasticPolicy"]["maxReplica"] = typo["spec"]["elasticPolicy"].pop("maxReplicas")
    assert any("spec.elasticPolicy.maxReplica: unknown field" in e for e in schema_errors(typo, schema))
    deep = json.loads(json.dumps(body))
    deep["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["gpus"] = 1
    assert any("containers[0].gpus: unknown field" in e for e in schema_errors(deep, schema))
    wrong = json.loads(json.dumps(body))
    wrong["spec"]["runPolicy"]["activeDeadlineSeconds"] = "3600"
    assert any("activeDeadlineSeconds: expected integer" in e for e in schema_errors(wrong, schema))
    missing = json.loads(json.dumps(body))
    del missing["spec"]["pytorchReplicaSpecs"]
    assert any("required field 'pytorchReplicaSpecs'" in e for e in schema_errors(missing, schema))
    typo_in_meta = json.loads(json.dumps(body))
    typo_in_meta["metadata"]["label"] = typo_in_meta["metadata"].pop("labels")
    assert any("metadata.label: unknown field" in e for e in schema_errors(typo_in_meta, schema))


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_the_manifest_carries_the_settings_and_no_credential(tmp_path, backend):
    settings = cluster_settings(tmp_path, GPUS_PER_REPLICA="2", WORKER_REPLICAS="2", ELASTIC_MAX_REPLICAS="4",
                                NODE_SELECTOR='{"pool": "a100"}')
    job = render(settings, backend, INPUTS, "run-1", "a" * 64)
    text = job.to_yaml()
    assert "NEVER-IN-A-MANIFEST" not in text.upper()
    body = yaml.safe_load(text)
    if backend == "pytorchjob":
        master = body["spec"]["pytorchReplicaSpecs"]["Master"]
        assert body["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2 and master["replicas"] == 1
        assert body["spec"]["elasticPolicy"] == {"minReplicas": 1, "maxReplicas": 4, "maxRestarts": 3, "rdzvBackend": "c10d"}
        pod_spec = master["template"]["spec"]
        container = pod_spec["containers"][0]
        limits, env, command = container["resources"]["limits"], container["env"], container["command"]
        assert container["image"] == settings.image and body["spec"]["nprocPerNode"] == "2"
    else:
        trainer = body["spec"]["trainer"]
        assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == 2 and trainer["image"] == settings.image
        assert body["spec"]["runtimeRef"] == {"name": "torch-distributed"}
        limits, env, command = trainer["resourcesPerNode"]["limits"], trainer["env"], trainer["command"]
        patch = body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        pod_spec = patch["template"]["spec"]["template"]["spec"]
    assert limits["nvidia.com/gpu"] == "2"
    assert pod_spec["nodeSelector"] == {"pool": "a100"}
    assert pod_spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert secrets == {"FLYWHEEL_S3_ACCESS_KEY": {"name": "flywheel-s3", "key": "accesskey"},
                       "FLYWHEEL_S3_SECRET_KEY": {"name": "flywheel-s3", "key": "secretkey"}}
    assert command[:5] == ["python", "-m", "torch.distributed.run", "-m", "flywheel.training.worker"]
    flags = dict(zip(command[5::2], command[6::2]))
    assert (flags["--data"], flags["--spec"], flags["--out"]) == (INPUTS.data, INPUTS.spec, INPUTS.out)


# ---------------------------------------------------------------- the watch, against the stand-in
def watch(settings: Settings, scenario: Scenario, backend: str = "pytorchjob"):
    """Run a rendered job through the launcher against a stand-in playing ``scenario``."""
    job = render(settings, backend, INPUTS, "run-1", "a" * 64)
    with kube_standin(scenario) as api:
        try:
            return api, run_cluster_job(settings, job, api.api_client()), None
        except TrainingError as exc:
            return api, None, str(exc)


def test_a_job_that_succeeds_returns_and_is_deleted(tmp_path):
    scenario = Scenario(conditions=lambda n: [condition("Created"), condition("Running")] if n < 2 else
                        [condition("Created"), condition("Succeeded", "PyTorchJobSucceeded")],
                        pods=lambda n: [pod("flywheel-train-run-1-master-0")])
    api, outcome, error = watch(cluster_settings(tmp_path), scenario)
    assert error is None and outcome.deleted
    assert len(api.created) == 1 and api.created[0]["kind"] == "PyTorchJob"
    assert len(api.calls("DELETE")) == 1
    assert api.calls("GET", "/pods")[0].query["labelSelector"] == ["training.kubeflow.org/job-name=flywheel-train-run-1"]


def test_a_trainjob_that_completes_is_read_by_its_own_condition_and_pod_label(tmp_path):
    scenario = Scenario(conditions=lambda n: [condition("Created")] if n < 1 else [condition("Complete")])
    api, outcome, error = watch(cluster_settings(tmp_path), scenario, backend="trainjob")
    assert error is None and outcome.kind == "TrainJob"
    assert api.calls("POST", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/kubeflow/trainjobs")
    assert api.calls("GET", "/pods")[0].query["labelSelector"] == ["jobset.sigs.k8s.io/jobset-name=flywheel-train-run-1"]


def test_a_failed_job_fails_the_step_with_the_reason_and_the_pods_last_log_lines_and_is_kept(tmp_path):
    log = "\n".join(f"epoch {i}" for i in range(100)) + "\nKeyError: 'is_fraud' (the worker's last words)"
    scenario = Scenario(
        conditions=lambda n: [condition("Running")] if n < 1 else
        [condition("Failed", "PyTorchJobFailed", "PyTorchJob flywheel-train-run-1 is failed because 1 Master replica(s) failed.")],
        pods=lambda n: [failed_pod("flywheel-train-run-1-master-0", "pytorch")],
        logs={"flywheel-train-run-1-master-0": log},
    )
    api, _, error = watch(cluster_settings(tmp_path), scenario)
    assert error is not None and "failed (PyTorchJobFailed" in error
    assert "KeyError: 'is_fraud' (the worker's last words)" in error  # the log's tail ...
    assert "epoch 99" in error and "epoch 5\n" not in error  # ... and only its tail
    assert "exited 1" in error
    assert api.calls("GET", "/log")[0].query["container"] == ["pytorch"]
    assert not api.calls("DELETE") and "kept to inspect" in error  # cleanup=on_success keeps a failed job


def test_a_job_still_running_at_the_timeout_fails_as_timed_out_and_is_cleaned_up(tmp_path):
    settings = cluster_settings(tmp_path, WATCH_TIMEOUT_S="1", CLEANUP="always")
    scenario = Scenario(conditions=lambda n: [condition("Running")],
                        pods=lambda n: [pod("flywheel-train-run-1-master-0")],
                        logs={"flywheel-train-run-1-master-0": "epoch 1 of 1000"})
    api, _, error = watch(settings, scenario)
    assert error is not None and "timed out" in error and "watch_timeout_s=1" in error
    assert "epoch 1 of 1000" in error
    assert len(api.calls("DELETE")) == 1 and "was deleted" in error


def test_cleanup_never_keeps_even_a_job_that_succeeded(tmp_path):
    scenario = Scenario(conditions=lambda n: [condition("Succeeded")])
    api, outcome, _ = watch(cluster_settings(tmp_path, CLEANUP="never"), scenario)
    assert outcome is not None and not outcome.deleted and not api.calls("DELETE")


@pytest.mark.parametrize("stuck_pod, reason", [
    (unschedulable_pod("flywheel-train-run-1-master-0",
                       "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."), "3 Insufficient nvidia.com/gpu"),
    (waiting_pod("flywheel-train-run-1-master-0", "pytorch", "ImagePullBackOff",
                 'Back-off pulling image "ghcr.io/flywheel-ml/flywheel:0.1.0"'), "ImagePullBackOff"),
])
def test_a_job_stuck_pending_fails_naming_why_its_pod_cannot_start(tmp_path, stuck_pod, reason):
    scenario = Scenario(conditions=lambda n: [condition("Created")], pods=lambda n: [stuck_pod])
    api, _, error = watch(cluster_settings(tmp_path, WATCH_TIMEOUT_S="30", CLEANUP="always"), scenario)
    assert error is not None and "cannot start" in error and reason in error
    assert "flywheel-train-run-1-master-0" in error
    assert len(api.calls("GET", "/apis/")) < 5  # it failed at once, not at the 30 s timeout
    assert len(api.calls("DELETE")) == 1


def test_a_pod_pending_only_briefly_is_waited_for(tmp_path):
    """A pod waits for a GPU node while the autoscaler adds one: that is no failure."""
    pending = unschedulable_pod("flywheel-train-run-1-master-0", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    scenario = Scenario(conditions=lambda n: [condition("Succeeded")] if n >= 3 else [condition("Created")],
                        pods=lambda n: [pending] if n < 2 else [pod("flywheel-train-run-1-master-0")])
    _, outcome, error = watch(cluster_settings(tmp_path, PENDING_TIMEOUT_S="20"), scenario)
    assert error is None and outcome is not None


def test_an_unreachable_api_server_is_a_clear_training_error(tmp_path):
    settings = cluster_settings(tmp_path)
    job = render(settings, "pytorchjob", INPUTS, "run-1", "a" * 64)
    with kube_standin() as api:
        client = api.api_client()  # the server stops when the block ends: nothing listens there afterwards
    with pytest.raises(TrainingError, match="Kubernetes API is unreachable"):
        run_cluster_job(settings, job, client)


# ---------------------------------------------------------------- item 5: the content key decides, on the cluster
def writes_outputs_on_create(storage: Storage, settings: Settings):
    """A job that 'trains' the moment it is created: it writes final weights and a history where
    its command line says ``--out``, as the worker does, from the spec it was told to read."""
    import torch

    from flywheel.features.transform import FeatureSpec
    from flywheel.training.model import WEIGHTS_FILE, TabularMLP

    def on_create(body: dict) -> None:
        container = body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        flags = dict(zip(container["command"][5::2], container["command"][6::2]))
        spec = FeatureSpec.from_dict(storage.read_json(flags["--spec"]))
        buffer = io.BytesIO()
        torch.save(TabularMLP(spec.width, settings.training.hidden).state_dict(), buffer)
        storage.write_bytes(f"{flags['--out']}/{WEIGHTS_FILE}", buffer.getvalue())
        storage.write_bytes(f"{flags['--out']}/history.jsonl", b'{"epoch": 0, "loss": 0.5}\n')

    return on_create


def test_on_the_cluster_the_content_key_decides_reuse_no_job_for_a_trained_key_one_for_a_new_key(
    s3_storage, s3_env, tmp_path, monkeypatch
):
    from flywheel.training.train import train
    from tests.unit.test_training import tiny_training_set

    root = s3_storage.settings_root
    env = s3_env(root, FLYWHEEL_TRAINING__LAUNCHER="pytorchjob",
                 **{f"FLYWHEEL_TRAINING__CLUSTER__{k}": v for k, v in FAST_WATCH.items()})
    settings = load_settings(env=env)
    training_set = tiny_training_set(s3_storage, rows=200)
    scenario = Scenario(conditions=lambda n: [condition("Succeeded")],
                        on_create=writes_outputs_on_create(s3_storage, settings))
    with kube_standin(scenario) as api:
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path)))
        first = train(s3_storage, settings, training_set, "run-a")
        assert not first.reused and len(api.created) == 1
        assert first.model.meta["launcher"] == "pytorchjob" and first.epochs == [{"epoch": 0, "loss": 0.5}]
        assert api.created[0]["metadata"]["labels"]["flywheel.io/training-key"] == first.model.training_key[:16]

        again = train(s3_storage, settings, training_set, "run-b")
        assert again.reused and again.model.version == first.model.version
        assert len(api.created) == 1  # the key was trained: no PyTorchJob

        operational = load_settings(env={**env, "FLYWHEEL_TRAINING__CLUSTER__NAMESPACE": "ml-team"})
        assert train(s3_storage, operational, training_set, "run-c").reused and len(api.created) == 1

        changed = load_settings(env={**env, "FLYWHEEL_TRAINING__EPOCHS": "3"})
        retrained = train(s3_storage, changed, training_set, "run-d")
        assert not retrained.reused and retrained.model.version != first.model.version
        assert len(api.created) == 2  # a new key: always a new job
        flags = api.created[1]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
        assert flags[flags.index("--epochs") + 1] == "3"


def test_a_cluster_launcher_refuses_a_local_storage_root(tmp_path):
    from flywheel.errors import ConfigError
    from flywheel.training.train import render_training_job
    from tests.unit.test_training import tiny_training_set

    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_TRAINING__LAUNCHER": "trainjob"})
    storage = Storage.from_settings(settings)
    with pytest.raises(ConfigError, match="cannot read this machine's storage root"):
        render_training_job(storage, settings, tiny_training_set(storage, rows=50), "run-1")


# ---------------------------------------------------------------- the CLI
def publish_latest_training_set(storage: Storage):
    """What a features step leaves behind: latest.json naming a key and that key's manifest."""
    from tests.unit.test_training import tiny_training_set

    training_set = tiny_training_set(storage, rows=50)
    key = "c" * 64
    training_set.key = key
    storage.write_json(storage.uri("datasets", "training", key[:16], "manifest.json"), training_set.to_dict())
    storage.write_json(storage.uri("features", "offline", "latest.json"), {"key": key})
    return training_set


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_train_render_prints_a_manifest_that_conforms_and_needs_no_cluster(s3_storage, s3_env, monkeypatch, capsys, backend):
    training_set = publish_latest_training_set(s3_storage)
    for name, value in s3_env(s3_storage.settings_root).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KUBECONFIG", "/nonexistent")  # any API call would fail
    assert main(["train", "--backend", backend, "--render"]) == 0
    body = yaml.safe_load(capsys.readouterr().out)
    assert_conforms(body, CRD_FILES[backend], body["apiVersion"].split("/")[1])
    command = body["spec"]["trainer"]["command"] if backend == "trainjob" else \
        body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--data") + 1] == training_set.train_uri  # the latest training set's data


def test_train_usage_mistakes_exit_2_with_a_message_and_no_traceback(flywheel_home, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", "--backend", "slurm"])
    assert exited.value.code == 2 and "invalid choice: 'slurm'" in capsys.readouterr().err
    assert main(["train", "--backend", "local", "--render"]) == 2
    err = capsys.readouterr().err
    assert "--render prints the cluster job" in err and "Traceback" not in err


def test_train_without_a_training_set_says_to_run_the_pipeline_first(flywheel_home, capsys):
    assert main(["train", "--backend", "local"]) == 1
    err = capsys.readouterr().err
    assert "no training set yet: run `flywheel run` first" in err and "Traceback" not in err
