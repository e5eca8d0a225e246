"""The retraining loop as a KFP v2 DAG: ingest -> validate -> features -> train -> evaluate -> deploy (if blessed)."""

# No `from __future__ import annotations` here: KFP reads the pipeline function's real annotations.

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from kfp import compiler, dsl

import components
from flywheel.config import Settings, load_settings, write_settings

PIPELINE_NAME = "flywheel-training"
S3_SECRET = "flywheel-s3"  # Kubernetes Secret with keys `accesskey` and `secretkey`


# Steps whose failures can be transient beyond what the storage layer retries: reading the source,
# Feast's online store, the Kubernetes API (training jobs), the registry's promotion. Validation and
# evaluation are not retried: their refusals are verdicts on the data, the same on every attempt.
NETWORK_STEPS = {"ingest", "features", "train", "deploy", "score"}
# Steps that read "latest" state outside their inputs (the raw files behind a URI, the lake, the
# production model): a cache hit would replay a stale answer.
READS_LATEST = {"ingest", "validate", "evaluate", "deploy", "plan_scoring", "summarize", "monitor", "trigger"}


def configure(task: Any, display_name: str, settings: Settings, step: str) -> Any:
    """Every task: its display name, the project image and pull policy, its CPU/memory requests and
    limits, retries with backoff where it touches the network, no caching where it reads "latest"
    state, and, on a cluster, where the store is (from the pipeline) and its credentials (from a
    Kubernetes Secret, never the YAML). kfp.local ignores the Kubernetes parts."""
    from kfp import kubernetes

    task.set_display_name(display_name)
    if settings.storage.root.startswith("s3://"):
        task.set_env_variable("FLYWHEEL_STORAGE__ROOT", settings.storage.root)
        task.set_env_variable("FLYWHEEL_STORAGE__S3_ENDPOINT", settings.storage.s3_endpoint)
        task.set_env_variable("FLYWHEEL_STORAGE__S3_SECURE", str(settings.storage.s3_secure).lower())
        kubernetes.use_secret_as_env(
            task,
            secret_name=S3_SECRET,
            secret_key_to_env={"accesskey": "FLYWHEEL_S3_ACCESS_KEY", "secretkey": "FLYWHEEL_S3_SECRET_KEY"},
        )
    task.set_env_variable("FLYWHEEL_MODEL_NAME", settings.model_name)
    if settings.usecase_uri:  # the use case's published folder: each step fetches and checks it
        task.set_env_variable("FLYWHEEL_USECASE_URI", settings.usecase_uri)
    task.set_container_image(settings.image)
    kubernetes.set_image_pull_policy(task, settings.kfp.image_pull_policy)
    resources = settings.kfp.resources[step]
    task.set_cpu_request(resources.cpu_request).set_cpu_limit(resources.cpu_limit)
    task.set_memory_request(resources.memory_request).set_memory_limit(resources.memory_limit)
    if step in NETWORK_STEPS and settings.kfp.retries:
        task.set_retry(
            num_retries=settings.kfp.retries,
            backoff_duration=settings.kfp.retry_backoff,
            backoff_factor=settings.kfp.retry_backoff_factor,
            backoff_max_duration=settings.kfp.retry_backoff_max,
        )
    if step in READS_LATEST:
        task.set_caching_options(False)
    if step == "train":
        configure_training(task, settings)
    return task


def configure_training(task: Any, settings: Settings) -> None:
    """The train step. With the local launcher, torchrun runs inside the step's own pod: it gets the
    GPUs, and the GPU pool's node selector and tolerations. With a cluster launcher the step only
    creates and watches a PyTorchJob/TrainJob (whose pods get the GPUs, see flywheel.training.cluster):
    it needs the launcher's settings and the run's service account, which may create those jobs."""
    from kfp import kubernetes

    cluster = settings.training.cluster
    if settings.training.launcher == "local":
        if cluster.gpus_per_replica:
            task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(cluster.gpus_per_replica)
            for key, value in sorted(cluster.node_selector.items()):
                kubernetes.add_node_selector(task, label_key=key, label_value=value)
            for toleration in cluster.tolerations:
                kubernetes.add_toleration(
                    task, key=toleration.get("key"), operator=toleration.get("operator"),  # type: ignore[arg-type]
                    value=toleration.get("value"), effect=toleration.get("effect"),  # type: ignore[arg-type]
                )
        return
    task.set_env_variable("FLYWHEEL_TRAINING__LAUNCHER", settings.training.launcher)
    task.set_env_variable("FLYWHEEL_TRAINING__CLUSTER__NAMESPACE", cluster.namespace)
    task.set_env_variable("FLYWHEEL_TRAINING__CLUSTER__SERVICE_ACCOUNT", cluster.service_account)
    task.set_env_variable("FLYWHEEL_TRAINING__CLUSTER__GPUS_PER_REPLICA", str(cluster.gpus_per_replica))
    task.set_env_variable("FLYWHEEL_TRAINING__CLUSTER__WORKER_REPLICAS", str(cluster.worker_replicas))
    task.set_env_variable("FLYWHEEL_IMAGE", settings.image)


def create_pipeline(settings: Optional[Settings] = None) -> Callable[..., Any]:
    """The training pipeline for these settings (cluster wiring follows the storage root)."""
    settings = settings or load_settings()

    def configure_task(task: Any, display_name: str, step: str) -> Any:
        return configure(task, display_name, settings, step)

    @dsl.pipeline(name=PIPELINE_NAME, description="Ingest, validate, build features, train, gate and deploy the fraud model.")
    def training_pipeline(source_uri: str, run_id: str = "", truth_uri: str = "", lake_uri: str = "", triggered_by: str = "") -> None:
        """source_uri: raw files to ingest. run_id: empty for the KFP job id. truth_uri: true fraud
        probabilities, when known (generated data). lake_uri: empty for the settings' lake.
        triggered_by: the monitor's decision record that asked for this run (the model's lineage names it)."""
        # Ingest always re-reads its source: the files behind a URI can change, so it is never cached.
        # It also settles the run id: the caller's (flywheel run) or else the KFP job's.
        ingest = configure_task(
            components.ingest(
                source_uri=source_uri, lake_uri=lake_uri, run_id=run_id, job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER
            ),
            "Ingest raw files", "ingest",
        )
        run_id = ingest.outputs["run_id"]
        # Great Expectations gate: publishes the staged batch, or discards it and stops the run here.
        # It changes the lake, so it is never skipped as cached.
        validate = configure_task(components.validate(staged=ingest.outputs["staged"], run_id=run_id), "Validate (Great Expectations)", "validate")
        # Aggregates -> feast apply + materialize -> point-in-time training set (content-addressed),
        # from the published snapshot only.
        features = configure_task(components.features(snapshot=validate.outputs["snapshot"], run_id=run_id), "Features (Feast)", "features")
        # DDP training; the same inputs reuse the model already trained from them.
        train = configure_task(components.train(training_set=features.outputs["training_set"], run_id=run_id, triggered_by=triggered_by), "Train (DDP)", "train")
        # Holdout metrics; blessed = above the floors and no worse than production.
        evaluate = configure_task(
            components.evaluate(
                training_set=features.outputs["training_set"], model=train.outputs["model"], run_id=run_id, truth_uri=truth_uri
            ),
            "Evaluate and gate", "evaluate",
        )
        blessed = evaluate.outputs["Output"]
        with dsl.If(blessed == True, name="blessed"):  # noqa: E712 - KFP condition syntax
            # Release the blessed version: a canary against production (two `flywheel serve` processes behind the
            # splitting proxy locally, the InferenceService on KServe), then promote or roll back, with a decision record.
            configure_task(
                components.deploy(model=train.outputs["model"], evaluation=evaluate.outputs["evaluation"], run_id=run_id),
                "Deploy", "deploy",
            )

    return training_pipeline


def compile_pipeline(out_dir: "str | os.PathLike[str]", settings: Optional[Settings] = None) -> Path:
    """Write the pipeline's KFP IR YAML and return its path."""
    return write_package(create_pipeline(settings), PIPELINE_NAME, out_dir)


def write_package(pipeline: Callable[..., Any], name: str, out_dir: "str | os.PathLike[str]") -> Path:
    """Compile a pipeline to ``<out_dir>/<name>.yaml`` (KFP IR) and return the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}.yaml"
    compiler.Compiler().compile(pipeline, package_path=str(target))
    return target


@contextlib.contextmanager
def local_steps(settings: Settings, run_id: str) -> Iterator[None]:
    """kfp.local set up for a run: steps run as subprocesses of this Python, loading exactly these
    settings (whatever file, variables and defaults made them) from a file written for the run;
    credentials stay in the environment."""
    from kfp import local

    kfp_root = settings.home / "kfp"
    kfp_root.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(kfp_root / "outputs"),
        raise_on_error=True,
    )
    # Each step leaves a temporary folder behind (kfp.local's mktemp): keep them in one place, then remove it.
    scratch = Path(tempfile.mkdtemp(prefix="steps-", dir=kfp_root))
    settings_file = write_settings(settings, settings.home / "runs" / run_id / "settings.yaml")
    step_env = {"FLYWHEEL_HOME": str(settings.home), "FLYWHEEL_CONFIG": str(settings_file), "TMPDIR": str(scratch)}
    previous = {name: os.environ.get(name) for name in step_env}
    os.environ.update(step_env)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(scratch, ignore_errors=True)


def run_locally(settings: Settings, source_uri: str, run_id: str, truth_uri: str = "", lake_uri: str = "",
                triggered_by: str = "") -> Any:
    """Run the DAG with kfp.local (SubprocessRunner in this Python environment)."""
    with local_steps(settings, run_id):
        # No step retries here: kfp.local honours them with real backoff sleeps, and on one machine a
        # failed step is a bug or bad data to report at once (storage already retries its requests).
        pipeline = create_pipeline(settings.model_copy(update={"kfp": settings.kfp.model_copy(update={"retries": 0})}))
        started = time.perf_counter()
        result = pipeline(source_uri=source_uri, run_id=run_id, truth_uri=truth_uri, lake_uri=lake_uri, triggered_by=triggered_by)
        return result, time.perf_counter() - started
