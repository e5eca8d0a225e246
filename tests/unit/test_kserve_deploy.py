"""The KServe deployment: manifests from the kserve SDK checked against the CRD schemas, and the
rollout's API calls (create, patch, watch, rollback) against a stand-in Kubernetes API that plays a
Ready revision, a failed revision and a timeout."""

from __future__ import annotations

import pytest
import yaml

from flywheel.config import load_settings
from flywheel.deploy.kserve import KServeClient, render_all, render_inference_service, render_serving_runtime
from flywheel.deploy.release import release_on_kserve
from flywheel.errors import DeployError
from flywheel.registry import Registry
from flywheel.storage import Storage
from tests.crd_schema import assert_conforms, crd_schema, schema_errors
from tests.kube_standin import Scenario, kube_standin
from tests.unit.test_canary import window as canary_window
from tests.unit.test_registry_stages import publish

ISVC_CRD = ("serving.kserve.io_inferenceservices.yaml", "v1beta1")
ACCESS, SECRET = "AKIA-THE-REAL-ACCESS-KEY", "the-real-secret-key-value"


@pytest.fixture
def settings(tmp_path):
    return load_settings(env={
        "FLYWHEEL_HOME": str(tmp_path / "home"),
        "FLYWHEEL_STORAGE__ROOT": str(tmp_path / "store"),
        "FLYWHEEL_S3_ACCESS_KEY": ACCESS, "FLYWHEEL_S3_SECRET_KEY": SECRET,
        "FLYWHEEL_DEPLOY__TARGET": "kserve",
        "FLYWHEEL_DEPLOY__SCALE_TARGET": "12", "FLYWHEEL_DEPLOY__SCALE_METRIC": "rps",
        "FLYWHEEL_DEPLOY__CONTAINER_CONCURRENCY": "24", "FLYWHEEL_DEPLOY__CPU_LIMIT": "3",
        "FLYWHEEL_DEPLOY__READY_TIMEOUT_S": "2", "FLYWHEEL_DEPLOY__POLL_INTERVAL_S": "0.05",
    })


@pytest.fixture
def registry(settings, tmp_path):
    registry = Registry(Storage.from_settings(settings), "fraud")
    stable, candidate = (publish(registry, tmp_path / f"m{n}", n) for n in range(2))
    registry.promote(stable, run_id="r0")
    return registry, stable, candidate


def test_the_inference_service_is_serverless_scales_to_zero_and_follows_the_settings(settings, registry):
    reg, stable, candidate = registry
    model = reg.get(candidate)
    body = render_inference_service(settings, model, canary_percent=10).body
    assert_conforms(body, *ISVC_CRD)
    annotations = body["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Serverless"
    assert annotations["serving.kserve.io/enable-tag-routing"] == "true"
    predictor = body["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["scaleTarget"], predictor["scaleMetric"]) == (0, 12, "rps")
    assert (predictor["containerConcurrency"], predictor["canaryTrafficPercent"]) == (24, 10)
    assert predictor["serviceAccountName"] == settings.deploy.service_account
    spec = predictor["model"]
    assert "name" not in spec  # the kserve SDK's stray "name": "" is stripped
    assert spec["storageUri"] == model.uri and spec["args"] == ["--version", candidate]
    assert spec["resources"]["limits"]["cpu"] == "3"
    assert spec["readinessProbe"]["httpGet"]["path"] == "/v2/models/fraud/ready"  # 200 only once the model is loaded
    keys = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in spec["env"] if "valueFrom" in e}
    assert keys["FLYWHEEL_S3_SECRET_KEY"] == {"name": settings.deploy.s3_secret, "key": "AWS_SECRET_ACCESS_KEY"}
    # Without a canary share the field is absent (a rollout at 100%).
    assert "canaryTrafficPercent" not in render_inference_service(settings, model).body["spec"]["predictor"]


def test_every_rendered_manifest_passes_its_crd_and_holds_no_credential(settings, registry):
    reg, _, candidate = registry
    docs = list(yaml.safe_load_all(render_all(settings, reg.get(candidate), 10)))
    assert [d["kind"] for d in docs] == ["ServiceAccount", "ServingRuntime", "InferenceService"]
    assert docs[0]["secrets"] == [{"name": settings.deploy.s3_secret}]
    assert_conforms(docs[1], "serving.kserve.io_servingruntimes.yaml", "v1alpha1")
    assert_conforms(docs[2], *ISVC_CRD)
    text = render_all(settings, reg.get(candidate), 10)
    assert ACCESS not in text and SECRET not in text


def test_the_grpc_protocol_exposes_the_h2c_port_and_still_passes_the_crds(settings, registry):
    """Bug caught: no gRPC port on the cluster (KServe's gRPC off, nothing exposed), or two ports
    on one container, which Knative (Serverless mode) refuses."""
    reg, _, candidate = registry
    docs = list(yaml.safe_load_all(render_all(settings, reg.get(candidate), 10)))
    runtime, isvc = docs[1]["spec"]["containers"][0], docs[2]["spec"]["predictor"]["model"]
    assert runtime["args"][-2:] == ["--grpc-port", "8081"] and "grpc-v2" in docs[1]["spec"]["protocolVersions"]
    assert runtime["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}] == isvc["ports"]
    grpc = settings.model_copy(update={"deploy": settings.deploy.model_copy(update={"protocol": "grpc"})})
    docs = list(yaml.safe_load_all(render_all(grpc, reg.get(candidate), 10)))
    runtime, isvc = docs[1]["spec"]["containers"][0], docs[2]["spec"]["predictor"]["model"]
    assert runtime["ports"] == [{"name": "h2c", "containerPort": 8081, "protocol": "TCP"}] == isvc["ports"]
    assert isvc["protocolVersion"] == "grpc-v2" and isvc["readinessProbe"]["tcpSocket"] == {"port": 8081}
    assert_conforms(docs[1], "serving.kserve.io_servingruntimes.yaml", "v1alpha1")
    assert_conforms(docs[2], *ISVC_CRD)


def test_the_schema_check_rejects_an_unknown_field(settings, registry):
    """The check the manifests pass is a real one: the SDK's raw output with its stray field fails it."""
    reg, _, candidate = registry
    body = render_inference_service(settings, reg.get(candidate)).body
    body["spec"]["predictor"]["model"]["storageURI"] = "s3://typo"
    assert any("storageURI: unknown field" in e for e in schema_errors(body, crd_schema(*ISVC_CRD)))


# ------------------------------------------------------------------ the rollout against the stand-in
STABLE_URL, CANARY_URL = "http://prev-fraud-predictor.kubeflow.example.com", "http://latest-fraud-predictor.kubeflow.example.com"


def ready(obj, latest_ready=True, reason=""):
    generation = obj["metadata"]["generation"]
    conditions = [{"type": "Ready", "status": "True"}, {"type": "PredictorReady", "status": "True"},
                  {"type": "LatestDeploymentReady", "status": "True" if latest_ready else "False", "reason": reason}]
    traffic = [{"tag": "prev", "percent": 90, "latestRevision": False, "url": STABLE_URL},
               {"tag": "latest", "percent": 10, "latestRevision": True, "url": CANARY_URL}]
    return {"observedGeneration": generation, "conditions": conditions, "url": "http://fraud.kubeflow.example.com",
            "components": {"predictor": {"traffic": traffic}}}


def observer(canary_errors=0, canary_latency=6.0, seen=None):
    def observe(stable_url, canary_url, instances, percent):
        if seen is not None:
            seen.append((stable_url, canary_url, len(instances)))
        return canary_window(len(instances), errors=canary_errors, canary_latency=canary_latency, percent=percent)

    return observe


def requests():
    while True:
        yield {"card_id": "c", "merchant_id": "m", "amount": 1.0, "ts": "2026-11-01T00:00:00+00:00"}


def existing_service(standin, settings, registry):
    reg, stable, _ = registry
    standin.objects["fraud"] = render_inference_service(settings, reg.get(stable)).body | {}
    standin.objects["fraud"]["metadata"]["generation"] = 1


def patches(standin):
    return [r.body for r in standin.calls("PATCH", "/inferenceservices/fraud")]


def test_a_good_canary_is_patched_in_watched_analysed_and_promoted(settings, registry):
    reg, stable, candidate = registry
    seen = []
    with kube_standin(Scenario(status=lambda n, obj: ready(obj))) as standin:
        existing_service(standin, settings, registry)
        record = release_on_kserve(reg.storage, settings, candidate, "run-good", api_client=standin.api_client(),
                                   observe=observer(seen=seen), requests=requests())
        sent = patches(standin)
    assert record.verdict == "promote" and reg.production().version == candidate and reg.stage(stable) == "archived"
    assert not standin.calls("POST")  # the service existed: patched, never re-created
    assert sent[0]["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert sent[0]["spec"]["predictor"]["model"]["storageUri"].endswith(candidate)
    assert sent[-1] == {"spec": {"predictor": {"canaryTrafficPercent": 100}}}
    assert seen == [(STABLE_URL, CANARY_URL, 200)] * 3  # three windows on the tag-routed revisions
    stored = reg.storage.read_json(record.uri)
    assert stored["verdict"] == "promote" and len(stored["windows"]) == 3 and stored["meta"]["windows"] == 3
    assert stored["target"] == "kserve" and stored["steps"] == [10] and stored["final_canary_percent"] == 100


def test_an_erroring_canary_is_rolled_back_to_zero_percent(settings, registry):
    reg, stable, candidate = registry
    with kube_standin(Scenario(status=lambda n, obj: ready(obj))) as standin:
        existing_service(standin, settings, registry)
        record = release_on_kserve(reg.storage, settings, candidate, "run-bad", api_client=standin.api_client(),
                                   observe=observer(canary_errors=20), requests=requests())
        sent = patches(standin)
    assert record.verdict == "rollback" and any("canary error rate" in r for r in record.reasons)
    assert sent[-1] == {"spec": {"predictor": {"canaryTrafficPercent": 0}}}
    assert reg.production().version == stable and reg.stage(candidate) == "archived"
    assert len(record.windows) == 1  # the first bad window decides


def test_a_failed_revision_is_rolled_back_without_analysis(settings, registry):
    reg, stable, candidate = registry

    def status(n, obj):
        if obj["metadata"]["generation"] == 1:
            return ready(obj)
        return ready(obj, latest_ready=False, reason="RevisionFailed")

    seen = []
    with kube_standin(Scenario(status=status)) as standin:
        existing_service(standin, settings, registry)
        record = release_on_kserve(reg.storage, settings, candidate, "run-failed", api_client=standin.api_client(),
                                   observe=observer(seen=seen), requests=requests())
        sent = patches(standin)
    assert record.verdict == "rollback" and "RevisionFailed" in record.reasons[0]
    assert seen == [] and sent[-1] == {"spec": {"predictor": {"canaryTrafficPercent": 0}}}
    assert reg.production().version == stable and reg.stage(candidate) == "archived"


def test_a_canary_that_never_becomes_ready_times_out_and_is_rolled_back(settings, registry):
    reg, stable, candidate = registry

    def status(n, obj):  # the new generation is never observed: the revision hangs
        return ready(obj) | {"observedGeneration": 1}

    with kube_standin(Scenario(status=status)) as standin:
        existing_service(standin, settings, registry)
        record = release_on_kserve(reg.storage, settings, candidate, "run-slow", api_client=standin.api_client(),
                                   observe=observer(), requests=requests())
        sent = patches(standin)
    assert record.verdict == "rollback" and "not ready after" in record.reasons[0] and "ready_timeout_s=2" in record.reasons[0]
    assert sent[-1] == {"spec": {"predictor": {"canaryTrafficPercent": 0}}}
    assert reg.production().version == stable


def test_the_first_version_is_created_at_full_traffic_and_promoted(settings, tmp_path):
    reg = Registry(Storage.from_settings(settings), "fraud")
    first = publish(reg, tmp_path / "m", 0)
    with kube_standin(Scenario(status=lambda n, obj: ready(obj))) as standin:
        record = release_on_kserve(reg.storage, settings, first, "run-first", api_client=standin.api_client())
        created = standin.created
    assert record.verdict == "promote" and reg.production().version == first
    assert len(created) == 1 and "canaryTrafficPercent" not in created[0]["spec"]["predictor"]
    assert_conforms({k: v for k, v in created[0].items() if k != "status"} | {"metadata": {k: v for k, v in created[0]["metadata"].items() if k != "generation"}}, *ISVC_CRD)


def test_an_unreachable_api_is_a_clear_error(settings, registry):
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = "http://127.0.0.1:9"
    configuration.retries = 0
    with pytest.raises(DeployError, match="Kubernetes API is unreachable"):
        KServeClient(settings, client.ApiClient(configuration)).get("fraud")


def test_deploy_render_prints_manifests_that_pass_the_crds(settings, registry, tmp_path):
    import os
    import subprocess
    import sys

    _, stable, candidate = registry
    env = dict(os.environ, FLYWHEEL_HOME=str(settings.home), FLYWHEEL_STORAGE__ROOT=settings.storage.root)
    result = subprocess.run([sys.executable, "-m", "flywheel.cli", "deploy", "--target", "kserve", "--render", "--version", candidate],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))
    assert_conforms(docs[-1], *ISVC_CRD)
    assert docs[-1]["spec"]["predictor"]["canaryTrafficPercent"] == settings.deploy.canary.traffic_percent
    result = subprocess.run([sys.executable, "-m", "flywheel.cli", "deploy", "--render"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "use --target kserve" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "flywheel.cli", "deploy", "--version", candidate], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode != 0 and "has no evaluation report" in result.stderr
