"""The training job as a Kubernetes object: a PyTorchJob (Training Operator v1) or a TrainJob
(Kubeflow Trainer v2), built from settings with the engines' own typed models.

Both run the same command as the local launcher, ``torchrun -m flywheel.training.worker ...``, with
storage URIs for ``--data``/``--spec``/``--out`` (a pod cannot read this machine's paths). torchrun
takes its topology from the ``PET_*`` variables the operator injects (``PET_NNODES``,
``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_NPROC_PER_NODE``; with an elasticPolicy,
``PET_RDZV_*`` and ``PET_MAX_RESTARTS``), so the command names none. S3 keys reach the pods as env
from a Kubernetes Secret (``valueFrom.secretKeyRef``): the manifest never holds a credential.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from flywheel.config import Settings
from flywheel.kube import manifest_yaml
from flywheel.training.launcher import RESTART_SAFE_ENV, worker_args

BACKENDS = ("local", "pytorchjob", "trainjob")
CLUSTER_BACKENDS = ("pytorchjob", "trainjob")
TORCHRUN = ["python", "-m", "torch.distributed.run"]  # torchrun, through the image's python
GPU = "nvidia.com/gpu"
PATCH_MANAGER = "flywheel.io/launcher"  # who owns the TrainJob's runtime patch
TRAINJOB_NODE = "node"  # the replicated job and container of Trainer's torch runtimes
PYTORCHJOB_CONTAINER = "pytorch"  # the Training Operator requires this container name
LABEL = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class JobInputs:
    """What the job reads and writes, as storage URIs."""

    data: str  # the training parquet file
    spec: str  # the fitted FeatureSpec (JSON)
    out: str  # the folder for checkpoints, final weights and history


@dataclass(frozen=True)
class ClusterJob:
    """A rendered training job: the object to create and how to find it and its pods again."""

    backend: str
    group: str
    version: str
    plural: str
    name: str
    namespace: str
    pod_selector: str  # label selector of the job's pods
    container: str  # the training container in each pod
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    def to_yaml(self) -> str:
        return manifest_yaml(self.body)


def job_name(run_id: str) -> str:
    """A DNS-1123 name for the run's job: ``flywheel-train-<run id>``, at most 63 characters."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-") or "run"
    return f"flywheel-train-{slug}"[:63].rstrip("-")


def _label_value(text: str) -> str:
    return LABEL.sub("-", text)[:63].strip("-_.")


def job_labels(settings: Settings, run_id: str, key: str) -> dict[str, str]:
    """Labels that say what made the job: the model, the run, the model's content key (first 16)."""
    return {
        "app.kubernetes.io/name": "flywheel",
        "app.kubernetes.io/component": "training",
        "flywheel.io/model": _label_value(settings.model_name),
        "flywheel.io/run-id": _label_value(run_id),
        "flywheel.io/training-key": key[:16],
    }


def procs_per_node(settings: Settings) -> int:
    """One torchrun process per GPU; one on a CPU pod."""
    return max(settings.training.cluster.gpus_per_replica, 1)


def cluster_world(settings: Settings) -> dict[str, int]:
    """The topology a cluster job trains with (part of the model's content key, as ``nproc`` is locally)."""
    cfg = settings.training.cluster
    return {"nodes": cfg.worker_replicas + 1, "nproc_per_node": procs_per_node(settings)}


def container_command(settings: Settings, inputs: JobInputs) -> list[str]:
    """torchrun running the worker module with the same flags as the local launch."""
    return [*TORCHRUN, *worker_args(settings, inputs.data, inputs.spec, inputs.out)]


def _env(settings: Settings) -> list[dict[str, Any]]:
    """Where storage is (plain values) and its keys (from the Secret, never inline)."""
    store = settings.storage
    secret = settings.training.cluster.s3_secret
    env: list[dict[str, Any]] = [
        {"name": "FLYWHEEL_STORAGE__ROOT", "value": store.root},
        {"name": "FLYWHEEL_STORAGE__S3_ENDPOINT", "value": store.s3_endpoint},
        {"name": "FLYWHEEL_STORAGE__S3_SECURE", "value": str(store.s3_secure).lower()},
        {"name": "FLYWHEEL_STORAGE__S3_REGION", "value": store.s3_region},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *({"name": name, "value": value} for name, value in RESTART_SAFE_ENV.items()),
    ]
    for name, key in (("FLYWHEEL_S3_ACCESS_KEY", "accesskey"), ("FLYWHEEL_S3_SECRET_KEY", "secretkey")):
        env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    return [e for e in env if e.get("value") != ""]  # an unset endpoint or region: the worker's default


def _resources(settings: Settings) -> tuple[dict[str, str], dict[str, str]]:
    cfg = settings.training.cluster
    requests = {"cpu": cfg.cpu_request, "memory": cfg.memory_request}
    limits = {"cpu": cfg.cpu_limit, "memory": cfg.memory_limit}
    if cfg.gpus_per_replica:
        limits[GPU] = str(cfg.gpus_per_replica)
    return requests, limits


def prune(value: Any) -> Any:
    """Drop None and empty maps/lists that serialisation leaves behind (a real server would prune or refuse them)."""
    if isinstance(value, dict):
        pruned = {k: prune(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in (None, {}, [])}
    if isinstance(value, list):
        return [prune(v) for v in value if v is not None]
    return value


def render_pytorchjob(settings: Settings, inputs: JobInputs, run_id: str, key: str) -> ClusterJob:
    """A PyTorchJob: a Master and ``worker_replicas`` Workers running torchrun, elastic within
    min..max replicas; the GPU pool's nodeSelector and tolerations; S3 keys from the Secret."""
    from kubeflow.training import models
    from kubernetes import client

    cfg = settings.training.cluster
    name, labels = job_name(run_id), job_labels(settings, run_id, key)
    requests, limits = _resources(settings)
    env = [client.V1EnvVar(name=e["name"], value=e.get("value"), value_from=_k8s_env_source(e)) for e in _env(settings)]
    container = client.V1Container(
        name=PYTORCHJOB_CONTAINER,
        image=settings.image,
        command=container_command(settings, inputs),
        env=env,
        resources=client.V1ResourceRequirements(requests=requests, limits=limits),
    )
    template = client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(labels=labels),
        spec=client.V1PodSpec(
            containers=[container],
            node_selector=dict(cfg.node_selector) or None,
            tolerations=[client.V1Toleration(**_snake(t)) for t in cfg.tolerations] or None,
            service_account_name=cfg.service_account or None,
        ),
    )
    # ExitCode: a pod whose container was killed (exit >= 128: OOM, a lost node) is restarted; an
    # exception in the worker (exit 1) fails the job at once, as the local launcher decides.
    replicas = {"Master": models.KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="ExitCode", template=template)}
    if cfg.worker_replicas:
        replicas["Worker"] = models.KubeflowOrgV1ReplicaSpec(
            replicas=cfg.worker_replicas, restart_policy="ExitCode", template=template
        )
    job = models.KubeflowOrgV1PyTorchJob(
        api_version="kubeflow.org/v1",
        kind="PyTorchJob",
        metadata=client.V1ObjectMeta(name=name, namespace=cfg.namespace, labels=labels),
        spec=models.KubeflowOrgV1PyTorchJobSpec(
            pytorch_replica_specs=replicas,
            nproc_per_node=str(procs_per_node(settings)),
            elastic_policy=models.KubeflowOrgV1ElasticPolicy(
                min_replicas=cfg.elastic_min_replicas,
                max_replicas=cfg.elastic_max_replicas,
                max_restarts=cfg.elastic_max_restarts,
                rdzv_backend="c10d",
            ),
            run_policy=models.KubeflowOrgV1RunPolicy(
                clean_pod_policy="None",  # keep failed pods for their logs; cleanup deletes the job itself
                active_deadline_seconds=cfg.watch_timeout_s,  # the cluster stops it even if the launcher dies
            ),
        ),
    )
    body = prune(client.ApiClient().sanitize_for_serialization(job))
    return ClusterJob("pytorchjob", "kubeflow.org", "v1", "pytorchjobs", name, cfg.namespace,
                      f"training.kubeflow.org/job-name={name}", PYTORCHJOB_CONTAINER, body)


def render_trainjob(settings: Settings, inputs: JobInputs, run_id: str, key: str) -> ClusterJob:
    """A TrainJob on the ``trainjob_runtime`` ClusterTrainingRuntime: master plus workers as
    ``numNodes``, the same command, image, resources and env; nodeSelector, tolerations and the
    service account as a runtime patch (the TrainJob spec has no pod fields of its own)."""
    from kubeflow_trainer_api import models as m

    cfg = settings.training.cluster
    name, labels = job_name(run_id), job_labels(settings, run_id, key)
    requests, limits = _resources(settings)
    quantity = m.IoK8sApimachineryPkgApiResourceQuantity
    pod_patch = m.TrainerV1alpha1PodSpecPatch(
        node_selector=dict(cfg.node_selector) or None,
        tolerations=[m.IoK8sApiCoreV1Toleration(**_snake(t)) for t in cfg.tolerations] or None,
        service_account_name=cfg.service_account or None,
    )
    job = m.TrainerV1alpha1TrainJob(
        api_version="trainer.kubeflow.org/v1alpha1",
        kind="TrainJob",
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(name=name, namespace=cfg.namespace, labels=labels),
        spec=m.TrainerV1alpha1TrainJobSpec(
            runtime_ref=m.TrainerV1alpha1RuntimeRef(name=cfg.trainjob_runtime),
            active_deadline_seconds=cfg.watch_timeout_s,
            trainer=m.TrainerV1alpha1Trainer(
                image=settings.image,
                command=container_command(settings, inputs),
                env=[m.IoK8sApiCoreV1EnvVar.from_dict(e) for e in _env(settings)],
                num_nodes=cfg.worker_replicas + 1,
                num_proc_per_node=procs_per_node(settings),
                resources_per_node=m.IoK8sApiCoreV1ResourceRequirements(
                    requests={k: quantity(v) for k, v in requests.items()},
                    limits={k: quantity(v) for k, v in limits.items()},
                ),
            ),
            runtime_patches=[
                m.TrainerV1alpha1RuntimePatch(
                    manager=PATCH_MANAGER,
                    training_runtime_spec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
                        template=m.TrainerV1alpha1JobSetTemplatePatch(
                            spec=m.TrainerV1alpha1JobSetSpecPatch(
                                replicated_jobs=[
                                    m.TrainerV1alpha1ReplicatedJobPatch(
                                        name=TRAINJOB_NODE,
                                        template=m.TrainerV1alpha1JobTemplatePatch(
                                            spec=m.TrainerV1alpha1JobSpecPatch(
                                                template=m.TrainerV1alpha1PodTemplatePatch(
                                                    metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(labels=labels),
                                                    spec=pod_patch,
                                                )
                                            )
                                        ),
                                    )
                                ]
                            )
                        )
                    ),
                )
            ],
        ),
    )
    body = prune(job.to_dict())
    # The TrainJob's JobSet has the TrainJob's name; its pods carry the JobSet's label.
    return ClusterJob("trainjob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", name, cfg.namespace,
                      f"jobset.sigs.k8s.io/jobset-name={name}", TRAINJOB_NODE, body)


def render(settings: Settings, backend: str, inputs: JobInputs, run_id: str, key: str) -> ClusterJob:
    """The job ``backend`` (pytorchjob or trainjob) would create for this run."""
    if backend == "pytorchjob":
        return render_pytorchjob(settings, inputs, run_id, key)
    if backend == "trainjob":
        return render_trainjob(settings, inputs, run_id, key)
    raise ValueError(f"no cluster job for backend {backend!r}: choose one of {', '.join(CLUSTER_BACKENDS)}")


def _snake(mapping: dict[str, Any]) -> dict[str, Any]:
    """``tolerationSeconds`` → ``toleration_seconds``: settings use the manifest's spelling, models Python's."""
    return {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): v for k, v in mapping.items()}


def _k8s_env_source(env: dict[str, Any]) -> Any:
    from kubernetes import client

    ref = (env.get("valueFrom") or {}).get("secretKeyRef")
    if ref is None:
        return None
    return client.V1EnvVarSource(secret_key_ref=client.V1SecretKeySelector(name=ref["name"], key=ref["key"]))
