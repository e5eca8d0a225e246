"""The KServe deployment: the InferenceService (and the ServingRuntime and ServiceAccount it uses)
built with the ``kserve`` SDK's typed models, and applied with the ``kubernetes`` client.

The InferenceService runs in Serverless mode (Knative): ``minReplicas: 0`` lets an idle service
scale to zero, and Knative's autoscaler adds replicas by ``scaleMetric``/``scaleTarget`` up to
``maxReplicas``; ``containerConcurrency`` caps in-flight requests per replica. The predictor is the
flywheel ServingRuntime (the project image running ``flywheel serve --version V``) with the model
version's ``storageUri``; S3 keys reach it through the ServiceAccount's Secret (KServe's storage
initializer reads ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` from it) and as env from the same
Secret (``secretKeyRef``): never as literal values. The readiness probe asks KServe's own model
readiness endpoint, which answers 200 only after the model has been loaded.

A candidate rolls out as a canary: the spec names the new version with ``canaryTrafficPercent``, and
KServe keeps the previously rolled-out revision serving the rest. With the
``serving.kserve.io/enable-tag-routing`` annotation each revision also gets its own URL (tags
``latest`` and ``prev``), which the canary analysis reads. Promotion sets the percentage to 100;
rollback sets it to 0 (all traffic back on the previous revision).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from flywheel.config import Settings
from flywheel.errors import DeployError
from flywheel.kube import api_client_from_environment, manifest_yaml
from flywheel.registry import ModelVersion

log = logging.getLogger(__name__)
GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
KIND = "InferenceService"
MODEL_FORMAT = "flywheel"
HTTP_PORT = 8080
DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
TAG_ROUTING = "serving.kserve.io/enable-tag-routing"
# Why a revision will not become ready without someone changing something.
FAILED_REASONS = {"RevisionFailed", "RevisionMissing", "ContainerMissing", "ExitCode", "ProgressDeadlineExceeded"}
FAILED_TRANSITIONS = {"BlockedByFailedLoad", "InvalidSpec"}


@dataclass(frozen=True)
class Manifest:
    """A rendered Kubernetes object and where it lives."""

    group: str
    version: str
    plural: str
    name: str
    namespace: str
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    def to_yaml(self) -> str:
        return manifest_yaml(self.body)


def service_name(settings: Settings) -> str:
    return settings.deploy.service_name or settings.model_name.lower().replace("_", "-")


def prune(value: Any) -> Any:
    """Drop None and empty maps/lists that serialisation leaves, and the model spec's stray empty
    ``name`` (the kserve SDK writes ``"name": ""``, which the CRD would keep as a real, empty name)."""
    if isinstance(value, dict):
        pruned = {k: prune(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in (None, {}, [], "") or (k == "value" and v == "")}
    if isinstance(value, list):
        return [prune(v) for v in value if v is not None]
    return value


def _serialize(obj: Any) -> dict[str, Any]:
    from kubernetes import client

    return prune(client.ApiClient().sanitize_for_serialization(obj))


def _env(settings: Settings) -> list[Any]:
    """Where storage and the online store are (plain values), and the S3 keys (from the Secret)."""
    from kubernetes import client

    store, cfg = settings.storage, settings.deploy
    plain = {
        "FLYWHEEL_MODEL_NAME": settings.model_name,
        "FLYWHEEL_STORAGE__ROOT": store.root,
        "FLYWHEEL_STORAGE__S3_ENDPOINT": store.s3_endpoint,
        "FLYWHEEL_STORAGE__S3_SECURE": str(store.s3_secure).lower(),
        "FLYWHEEL_STORAGE__S3_REGION": store.s3_region,
        "FLYWHEEL_FEATURES__ONLINE_STORE": settings.features.online_store,
        "FLYWHEEL_FEATURES__REDIS_CONNECTION": settings.features.redis_connection if settings.features.online_store == "redis" else "",
    }
    env = [client.V1EnvVar(name=name, value=value) for name, value in plain.items() if value]
    for name, key in (("FLYWHEEL_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID"), ("FLYWHEEL_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY")):
        env.append(client.V1EnvVar(name=name, value_from=client.V1EnvVarSource(
            secret_key_ref=client.V1SecretKeySelector(name=cfg.s3_secret, key=key))))
    return env


def render_inference_service(settings: Settings, model: ModelVersion, canary_percent: int | None = None) -> Manifest:
    """The InferenceService serving ``model``; with ``canary_percent``, as a canary taking that share
    of traffic while the previously rolled-out revision keeps the rest."""
    from kserve import (V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1ModelFormat, V1beta1ModelSpec,
                        V1beta1PredictorSpec)
    from kubernetes import client

    cfg = settings.deploy
    name = service_name(settings)
    if canary_percent is not None and not 0 <= canary_percent <= 100:
        raise DeployError(f"canaryTrafficPercent must be 0..100, not {canary_percent}")
    if cfg.protocol == "grpc":
        # Knative lets a probe reach the served port only; the gRPC port opens once the model is
        # loaded and warmed up (serving.server.serve loads it before either server starts).
        readiness = client.V1Probe(tcp_socket=client.V1TCPSocketAction(port=grpc_port(settings)),
                                   initial_delay_seconds=2, period_seconds=5, failure_threshold=3)
    else:
        readiness = client.V1Probe(
            http_get=client.V1HTTPGetAction(path=f"/v2/models/{settings.model_name}/ready", port=HTTP_PORT),
            initial_delay_seconds=2, period_seconds=5, failure_threshold=3,
        )
    predictor = V1beta1PredictorSpec(
        min_replicas=cfg.min_replicas,
        max_replicas=cfg.max_replicas,
        scale_metric=cfg.scale_metric,
        scale_target=cfg.scale_target,
        container_concurrency=cfg.container_concurrency,
        canary_traffic_percent=canary_percent,
        service_account_name=cfg.service_account,
        model=V1beta1ModelSpec(
            model_format=V1beta1ModelFormat(name=MODEL_FORMAT),
            runtime=cfg.runtime,
            storage_uri=model.uri,
            args=["--version", model.version],
            env=_env(settings),
            protocol_version="grpc-v2" if cfg.protocol == "grpc" else None,
            ports=[served_port(settings)],
            readiness_probe=readiness,
            resources=client.V1ResourceRequirements(
                requests={"cpu": cfg.cpu_request, "memory": cfg.memory_request},
                limits={"cpu": cfg.cpu_limit, "memory": cfg.memory_limit},
            ),
        ),
    )
    labels = {"app.kubernetes.io/part-of": "flywheel", "flywheel.io/model": settings.model_name,
              "flywheel.io/version": model.version[:63]}
    isvc = V1beta1InferenceService(
        api_version=f"{GROUP}/{VERSION}",
        kind=KIND,
        metadata=client.V1ObjectMeta(
            name=name, namespace=cfg.namespace, labels=labels,
            annotations={DEPLOYMENT_MODE: "Serverless", TAG_ROUTING: "true",
                         "flywheel.io/model-sha256": model.sha256},
        ),
        spec=V1beta1InferenceServiceSpec(predictor=predictor),
    )
    return Manifest(GROUP, VERSION, PLURAL, name, cfg.namespace, _serialize(isvc))


def grpc_port(settings: Settings) -> int:
    """The predictor's v2 gRPC port on a cluster (serving.grpc_port; KServe's 8081 where it is off
    locally: a cluster predictor always serves gRPC)."""
    return settings.serving.grpc_port or 8081


def served_port(settings: Settings) -> Any:
    """The one container port Knative routes to: REST (``http1``) or v2 gRPC (``h2c``)."""
    from kubernetes import client

    if settings.deploy.protocol == "grpc":
        return client.V1ContainerPort(name="h2c", container_port=grpc_port(settings), protocol="TCP")
    return client.V1ContainerPort(name="http1", container_port=HTTP_PORT, protocol="TCP")


def render_serving_runtime(settings: Settings) -> Manifest:
    """The ServingRuntime that runs ``flywheel serve`` for the ``flywheel`` model format."""
    from kserve import V1alpha1ServingRuntime, V1alpha1ServingRuntimeSpec, V1alpha1SupportedModelFormat
    from kubernetes import client

    cfg = settings.deploy
    runtime = V1alpha1ServingRuntime(
        api_version=f"{GROUP}/v1alpha1",
        kind="ServingRuntime",
        metadata=client.V1ObjectMeta(name=cfg.runtime, namespace=cfg.namespace, labels={"app.kubernetes.io/part-of": "flywheel"}),
        spec=V1alpha1ServingRuntimeSpec(
            supported_model_formats=[V1alpha1SupportedModelFormat(name=MODEL_FORMAT, auto_select=True)],
            protocol_versions=["v1", "v2", "grpc-v2"],
            containers=[client.V1Container(
                name="kserve-container",
                image=settings.image,
                command=["flywheel", "serve"],
                args=["--host", "0.0.0.0", "--port", str(HTTP_PORT), "--grpc-port", str(grpc_port(settings))],
                ports=[served_port(settings)],
            )],
        ),
    )
    return Manifest(GROUP, "v1alpha1", "servingruntimes", cfg.runtime, cfg.namespace, _serialize(runtime))


def render_service_account(settings: Settings) -> dict[str, Any]:
    """The ServiceAccount that carries the S3 Secret (created separately, from the keys you hold:
    ``kubectl create secret generic <s3_secret> --from-literal=AWS_ACCESS_KEY_ID=...``)."""
    from kubernetes import client

    cfg = settings.deploy
    account = client.V1ServiceAccount(
        api_version="v1", kind="ServiceAccount",
        metadata=client.V1ObjectMeta(name=cfg.service_account, namespace=cfg.namespace),
        secrets=[client.V1ObjectReference(name=cfg.s3_secret)],
    )
    return _serialize(account)


def render_all(settings: Settings, model: ModelVersion, canary_percent: int | None = None) -> str:
    """Every object of the deployment as one multi-document YAML (what `flywheel deploy --render` prints)."""
    docs = [render_service_account(settings), render_serving_runtime(settings).body,
            render_inference_service(settings, model, canary_percent).body]
    return manifest_yaml(*docs)


# ------------------------------------------------------------------ applying and watching
@dataclass
class ServiceStatus:
    """What the InferenceService reported when the watch ended."""

    name: str
    ready: bool
    seconds: float
    conditions: list[dict[str, Any]] = field(default_factory=list)
    traffic: list[dict[str, Any]] = field(default_factory=list)  # per revision: percent, tag, url
    url: str = ""

    def tag_url(self, tag: str) -> str:
        """The tag-routed URL of one revision (``latest``: the canary, ``prev``: the stable one)."""
        for target in self.traffic:
            if target.get("tag") == tag and target.get("url"):
                return str(target["url"])
        raise DeployError(f"InferenceService {self.name} has no '{tag}' route (is tag routing enabled?): {self.traffic}")


class KServeClient:
    """Create or patch an InferenceService, and watch it until Ready, failed, or a timeout."""

    def __init__(self, settings: Settings, api_client: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        from kubernetes import client

        self.settings = settings
        self.custom = client.CustomObjectsApi(api_client or _api_client_from_environment())
        self.clock = clock

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return fn()
        except ApiException as exc:
            hint = {
                404: f"is KServe installed (the {PLURAL}.{GROUP} CRD), and does namespace {self.settings.deploy.namespace} exist?",
                403: f"the service account may not change {PLURAL}.{GROUP} in {self.settings.deploy.namespace}: grant it RBAC",
                422: "the API server refused the manifest (see `flywheel deploy --target kserve --render`)",
            }.get(exc.status, "")
            raise DeployError(f"could not {what}: HTTP {exc.status} {exc.reason}: {_api_message(exc)}. {hint}".rstrip(". ") + ".") from None
        except Exception as exc:  # urllib3's MaxRetryError, a refused connection
            raise DeployError(f"could not {what}: the Kubernetes API is unreachable ({type(exc).__name__}: {exc})") from None

    def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        ns = self.settings.deploy.namespace
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise DeployError(f"could not read InferenceService {ns}/{name}: HTTP {exc.status} {exc.reason}: {_api_message(exc)}") from None
        except Exception as exc:  # a refused connection: no API server at that address
            raise DeployError(f"could not read InferenceService {ns}/{name}: the Kubernetes API is unreachable "
                              f"({type(exc).__name__}: {exc})") from None

    def apply(self, manifest: Manifest) -> dict[str, Any]:
        """Create the InferenceService, or merge-patch its spec when it exists. Returns the object."""
        where = f"InferenceService {manifest.namespace}/{manifest.name}"
        if self.get(manifest.name) is None:
            log.info("deploy: creating %s", where)
            return self._call(f"create {where}", lambda: self.custom.create_namespaced_custom_object(
                GROUP, VERSION, manifest.namespace, PLURAL, manifest.body))
        log.info("deploy: patching %s", where)
        patch = {"metadata": {"labels": manifest.body["metadata"].get("labels", {}),
                              "annotations": manifest.body["metadata"].get("annotations", {})},
                 "spec": manifest.body["spec"]}
        return self.patch(manifest.name, patch)

    def patch(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        ns = self.settings.deploy.namespace
        return self._call(f"patch InferenceService {ns}/{name}", lambda: self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, name, body))

    def set_canary_percent(self, name: str, percent: int) -> dict[str, Any]:
        """Move traffic: ``percent`` to the latest revision, the rest to the previous one."""
        return self.patch(name, {"spec": {"predictor": {"canaryTrafficPercent": percent}}})

    def wait_ready(self, name: str, generation: int | None = None) -> ServiceStatus:
        """Poll the status until the InferenceService (at ``generation`` or later) is Ready; a failed
        revision or ``ready_timeout_s`` raises :class:`DeployError` naming the condition."""
        cfg, ns = self.settings.deploy, self.settings.deploy.namespace
        where = f"InferenceService {ns}/{name}"
        started = self.clock()
        while True:
            obj = self.get(name)
            if obj is None:
                raise DeployError(f"{where} disappeared while it was watched (deleted by someone else?)")
            status = obj.get("status") or {}
            conditions = status.get("conditions") or []
            current = generation is None or int(status.get("observedGeneration") or 0) >= generation
            by_type = {c.get("type"): c for c in conditions}
            failed = _failure(status, conditions)
            if current and failed:
                raise DeployError(f"{where} failed: {failed}")
            latest = by_type.get("LatestDeploymentReady")
            if current and by_type.get("Ready", {}).get("status") == "True" and (latest is None or latest.get("status") == "True"):
                seconds = self.clock() - started
                log.info("deploy: %s ready in %.0fs", where, seconds)
                return ServiceStatus(name, True, seconds, conditions,
                                     ((status.get("components") or {}).get("predictor") or {}).get("traffic") or [],
                                     str(status.get("url") or ""))
            elapsed = self.clock() - started
            if elapsed >= cfg.ready_timeout_s:
                state = "; ".join(f"{c.get('type')}={c.get('status')}" + (f" ({c.get('reason')})" if c.get("reason") else "")
                                  for c in conditions) or "no conditions yet"
                raise DeployError(f"{where} not ready after {elapsed:.0f}s (deploy.ready_timeout_s={cfg.ready_timeout_s}; {state})")
            time.sleep(cfg.poll_interval_s)


def _failure(status: dict[str, Any], conditions: list[dict[str, Any]]) -> str:
    """Why the latest revision failed, or "" while it may still become ready."""
    model_status = status.get("modelStatus") or {}
    if model_status.get("transitionStatus") in FAILED_TRANSITIONS:
        info = model_status.get("lastFailureInfo") or {}
        return f"model {model_status['transitionStatus']}: {info.get('reason', '')} {info.get('message', '')}".strip()
    for condition in conditions:
        if condition.get("status") == "False" and condition.get("reason") in FAILED_REASONS:
            return f"{condition.get('type')} is False ({condition.get('reason')}: {condition.get('message', '')})"
    return ""


def _api_client_from_environment() -> Any:
    return api_client_from_environment(DeployError, "deploy to", "use --target local")


def _api_message(exc: Any) -> str:
    try:
        return str(json.loads(exc.body).get("message", exc.body))
    except (TypeError, ValueError, AttributeError):
        return str(exc.body or "")
