"""One typed settings object, from a YAML file plus ``FLYWHEEL_*`` environment variables.

Precedence (lowest first): defaults, the YAML file, environment variables. The YAML file is the one
named by ``FLYWHEEL_CONFIG`` (or passed explicitly), else ``$FLYWHEEL_HOME/flywheel.yaml`` if present.

Environment variables map onto fields with ``__`` between levels, for example
``FLYWHEEL_TRAINING__EPOCHS=5`` or ``FLYWHEEL_STORAGE__ROOT=s3://bucket/flywheel``. ``FLYWHEEL_HOME``
sets ``home``. Credentials are never read from YAML: S3 keys come from ``FLYWHEEL_S3_ACCESS_KEY`` /
``FLYWHEEL_S3_SECRET_KEY`` (or the standard ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``).
"""

from __future__ import annotations

import datetime as dt
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from flywheel.errors import ConfigError

ENV_PREFIX = "FLYWHEEL_"
# FLYWHEEL_* variables that are not settings fields.
# What feature_repo/feature_store.yaml expands for the `feast` CLI (written by the features step to
# <features dir>/latest.env, see flywheel.features.store.point_feast_cli_at): not settings.
FEAST_CLI_ENV = ("FLYWHEEL_FEAST_PROJECT", "FLYWHEEL_FEAST_WORLD", "FLYWHEEL_FEAST_OFFLINE_STORE")
NOT_SETTINGS_ENV = {"FLYWHEEL_CONFIG", "FLYWHEEL_CODE_VERSION", "FLYWHEEL_ACTOR", *FEAST_CLI_ENV}
SECRET_ENV = {
    "access_key": ("FLYWHEEL_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
    "secret_key": ("FLYWHEEL_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
}
# The Kubeflow Pipelines API's bearer token (kfp.token): from the environment only, like the S3 keys.
KFP_TOKEN_ENV = "FLYWHEEL_KFP_TOKEN"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def split_endpoint(value: str) -> tuple[str, bool | None]:
    """An S3 endpoint as (host:port, secure): "http://minio:9000" gives ("minio:9000", False); a bare
    "minio:9000" leaves ``secure`` to the settings (None). Any scheme but http(s) is a ValueError."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        return value.rstrip("/"), None
    if scheme not in ("http", "https"):
        raise ValueError(f"an S3 endpoint must be host:port or an http(s):// URL, not {value!r}")
    return rest.rstrip("/"), scheme == "https"


class StorageSettings(_Section):
    """Where every artifact lives: a local folder or ``s3://bucket/prefix`` (MinIO or S3)."""

    root: str = ""  # empty: $FLYWHEEL_HOME/store
    s3_endpoint: str = ""  # host:port of MinIO/S3; empty: AWS S3
    s3_secure: bool = True
    s3_region: str = ""
    retries: int = Field(4, ge=0, le=20)
    retry_backoff_s: float = Field(0.2, ge=0)
    timeout_s: float = Field(60.0, gt=0)  # per S3 request (the connect timeout is at most 10 s)
    access_key: SecretStr | None = Field(None, exclude=True)
    secret_key: SecretStr | None = Field(None, exclude=True)

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint_scheme(cls, value: str) -> str:
        split_endpoint(value)  # raises ValueError, reported against this field
        return value

    @model_validator(mode="after")
    def _endpoint_as_host_port(self) -> "StorageSettings":
        # People paste "http://minio:9000"; every consumer wants host:port plus s3_secure.
        self.s3_endpoint, secure = split_endpoint(self.s3_endpoint)
        if secure is not None:
            self.s3_secure = secure
        return self


class DataSettings(_Section):
    """The synthetic data that `flywheel run` generates when no source is given."""

    rows: int = Field(200_000, ge=100)
    days: int = Field(30, ge=2)
    seed: int = 7
    holdout_fraction: float = Field(0.2, gt=0, lt=0.9)


class FeatureSettings(_Section):
    """Feast: where its registries and SQLite online stores live, and which online store serves.

    Each training set has a feature world of its own (a Feast registry and online store holding the
    features it was built from), so the production model always reads the features it was trained
    with: worlds live under ``<dir>/worlds/<world>/``; in Redis a world is a Feast project
    ``<project>_<world>``. An empty ``dir`` means $FLYWHEEL_HOME/feast.
    """

    project: str = Field("flywheel", pattern=r"^[A-Za-z0-9_]+$")
    dir: str = ""
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_connection: str = "127.0.0.1:6379"
    # Feast's offline store for point-in-time training sets (benchmarks/features.py measures them):
    # duckdb-asof (Feast's DuckDB store with its join done as a DuckDB ASOF JOIN), duckdb (Feast's
    # own DuckDB/ibis join), file (Feast's dask store, one retrieval per view in chunks) or ray
    # (Feast's Ray offline store and compute engine, flywheel/features/ray_store.py: the cluster path).
    offline_store: Literal["duckdb-asof", "duckdb", "file", "ray"] = "duckdb-asof"
    # With offline_store: ray, the Ray cluster to run on (e.g. ray://raycluster-head:10001); empty:
    # a local Ray started in the process on 127.0.0.1.
    ray_address: str = ""
    # Transactions of every training set re-joined with a pandas merge_asof oracle on each build.
    oracle_sample_rows: int = Field(300, ge=0)
    # How feature values reach the online store: flywheel (streamed in chunks, several times faster,
    # benchmarks/features.py) or feast (Feast's own materialize, the baseline).
    materialize_engine: Literal["flywheel", "feast"] = "flywheel"
    # Entities encoded and written at a time, and DuckDB's memory for picking each entity's latest row
    # (beyond it, DuckDB spills to disk): together they bound materialization's memory.
    materialize_chunk_rows: int = Field(100_000, ge=1)
    materialize_memory_mib: int = Field(512, ge=64)


class ClusterTrainingSettings(_Section):
    """Training on Kubernetes: a PyTorchJob (Training Operator v1) or a TrainJob (Kubeflow Trainer v2).

    One master and ``worker_replicas`` workers (a TrainJob: that many nodes in all), each with
    ``gpus_per_replica`` GPUs and as many torchrun processes (one when there is no GPU). The job reads
    and writes storage URIs; S3 keys reach it as env from the Secret ``s3_secret`` (keys
    ``accesskey``/``secretkey``), never in the manifest. The image is ``Settings.image``.
    """

    namespace: str = Field("kubeflow", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    service_account: str = ""  # empty: the namespace's default service account
    worker_replicas: int = Field(1, ge=0, le=256)  # besides the master
    gpus_per_replica: int = Field(1, ge=0, le=16)  # nvidia.com/gpu limit; 0: CPU pods (gloo)
    cpu_request: str = "4"
    cpu_limit: str = "8"
    memory_request: str = "16Gi"
    memory_limit: str = "32Gi"
    node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list[dict[str, str | int]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    # PyTorchJob elasticPolicy: the job runs with min..max replicas and restarts the group at most
    # max_restarts times after a fault (a lost node, a killed pod).
    elastic_min_replicas: int = Field(1, ge=1)
    elastic_max_replicas: int = Field(2, ge=1)
    elastic_max_restarts: int = Field(3, ge=0)
    trainjob_runtime: str = "torch-distributed"  # the ClusterTrainingRuntime a TrainJob refers to
    s3_secret: str = "flywheel-s3"
    watch_timeout_s: int = Field(3600, ge=1)  # created → succeeded; also the job's activeDeadlineSeconds
    pending_timeout_s: int = Field(300, ge=0)  # a pod unschedulable or failing to pull its image this long fails the step
    poll_interval_s: float = Field(5.0, gt=0)
    cleanup: Literal["always", "on_success", "never"] = "on_success"  # on_success keeps a failed job to inspect

    @model_validator(mode="after")
    def _elastic_range_holds_the_replicas(self) -> "ClusterTrainingSettings":
        replicas = self.worker_replicas + 1
        if not self.elastic_min_replicas <= replicas <= self.elastic_max_replicas:
            raise ValueError(
                f"elastic_min_replicas ({self.elastic_min_replicas}) <= master + worker_replicas ({replicas}) "
                f"<= elastic_max_replicas ({self.elastic_max_replicas}) must hold"
            )
        return self


class TrainingSettings(_Section):
    """DDP training: torchrun on this machine (``launcher: local``), or a job on Kubernetes."""

    nproc: int = Field(2, ge=1, le=64)
    epochs: int = Field(20, ge=1)  # at most: early stopping usually ends a run sooner
    batch_size: int = Field(256, ge=8)  # per process
    learning_rate: float = Field(5e-4, gt=0)  # 200k rows, seeds 0-2: 0.898-0.909 of the best achievable PR-AUC (3e-4: 0.889-0.899)
    weight_decay: float = Field(1e-2, ge=0)  # AdamW's decoupled weight decay
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [64, 32])
    # The last fraction of the training rows' time span validates each epoch (never the holdout);
    # training stops after `patience` epochs without a better validation PR-AUC and keeps the best epoch.
    validation_fraction: float = Field(0.15, ge=0, lt=1)
    patience: int = Field(4, ge=1)
    seed: int = 0
    threads_per_worker: int = Field(1, ge=1)
    timeout_s: int = Field(1800, ge=10)  # one torchrun attempt, end to end
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: NCCL when the worker sees a GPU, else gloo
    max_restarts: int = Field(1, ge=0)  # torchrun's restarts after a fault (a killed worker); an exception is never retried
    process_group_timeout_s: int = Field(300, ge=1)  # a collective or rendezvous waiting longer fails
    # Rank 0 checkpoints to <out>/checkpoint.pt every this many optimizer steps (0: at epoch ends only)
    # and at every epoch's end; a restarted group resumes at the step after the latest one.
    checkpoint_every_steps: int = Field(200, ge=0)
    launcher: Literal["local", "pytorchjob", "trainjob"] = "local"
    cluster: ClusterTrainingSettings = Field(default_factory=ClusterTrainingSettings)


class GateSettings(_Section):
    """The blessing: absolute floors AND no worse than production on rows neither model trained on."""

    min_roc_auc: float = Field(0.80, ge=0, le=1)
    min_pr_auc: float = Field(0.20, ge=0, le=1)
    # Brier skill over always predicting the fraud rate. Fit to shuffled labels (30k rows, seeds 0-5):
    # -0.002 to 0.011, whatever their ranking. Fit to the real labels: 30k rows 0.07-0.20 (3-6 epochs;
    # 1 epoch 0.018), 20k rows with early stopping 0.025 (PR-AUC 0.211). A thin margin on small data.
    min_brier_skill: float = Field(0.02, ge=-1, le=1)
    recall_at_fpr: float = Field(0.01, gt=0, lt=1)  # the false-positive rate at which recall is compared
    max_pr_auc_regression: float = Field(0.01, ge=0, le=1)  # allowed drops against production
    max_roc_auc_regression: float = Field(0.01, ge=0, le=1)
    max_recall_regression: float = Field(0.02, ge=0, le=1)
    # Fewer fraud cases than this among the rows neither model trained on: no comparison is
    # possible (the metrics would be noise), and the gate falls back to the floors.
    min_comparison_positives: int = Field(30, ge=1)


class DriftSettings(_Section):
    """The drift gate: a batch against the mean profile of the last accepted batches of its lake."""

    enabled: bool = True
    window: int = Field(5, ge=1)  # how many of the last accepted batches make the baseline
    # What is compared, column by column, the use case's contract says (Contract.drift_checks).
    # Distributions (quantiles, shares, rates) are compared only for batches at least this big:
    # smaller samples are noise. Shares and rates also get 3 standard errors of slack.
    min_rows: int = Field(500, ge=1)
    quantiles: list[float] = Field(default_factory=lambda: [0.05, 0.5, 0.95])
    # Each quantile of a number may differ from the baseline's by this share of it (0.5: 50%).
    quantile_tolerance: float = Field(0.5, gt=0)
    # A vocabulary's shares: largest allowed absolute change of one value's share, and the KL
    # divergence of the whole distribution from the baseline's.
    max_share_change: float = Field(0.1, gt=0, le=1)
    max_kl_divergence: float = Field(0.1, gt=0)
    max_rate_change: float = Field(0.05, gt=0, le=1)  # a 0/1 column's rate of 1s, absolute
    # Row count against the recent mean: at least min_rows_ratio and at most max_rows_ratio times it.
    min_rows_ratio: float = Field(0.001, ge=0)
    max_rows_ratio: float = Field(1000.0, gt=0)


class IngestSettings(_Section):
    """Ingest and validation of raw deliveries (`flywheel ingest`, and the pipeline's first two steps)."""

    # fail: a batch with any bad row is rejected whole; quarantine: bad rows go to
    # <lake>/quarantine/<batch>/ with their reason, and the batch passes when their share is at most
    # max_quarantine_fraction.
    policy: Literal["fail", "quarantine"] = "fail"
    max_quarantine_fraction: float = Field(0.01, ge=0, le=1)
    chunk_rows: int = Field(1_000_000, ge=1_000)  # rows read, checked and written at a time (bounded memory)
    # Timestamps: at most this far ahead of the ingest time (clock skew) or behind it.
    max_future_minutes: float = Field(60.0, ge=0)
    max_age_days: float = Field(3650.0, gt=0)
    drift: DriftSettings = Field(default_factory=DriftSettings)


class ServingSettings(_Section):
    """The KServe predictor."""

    host: str = "127.0.0.1"  # KServe alone binds every interface; flywheel binds this address
    port: int = Field(8080, ge=1, le=65535)
    # The v2 gRPC service (KServe's GRPCInferenceService), as KServe's ModelServer serves it by
    # default; 0 turns it off. On a cluster the ServingRuntime names it as the h2c port.
    grpc_port: int = Field(8081, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)  # server processes, each with its own model copy
    torch_threads: int = Field(1, ge=1)  # per worker: more oversubscribes the cores
    reload_interval_s: float = Field(10.0, gt=0)  # how often a worker asks the registry for a new production version
    max_body_bytes: int = Field(1_048_576, ge=1024)  # a larger request body is refused (413) before it is read
    max_batch: int = Field(1000, ge=1)  # transactions per request
    # A folder of replay tables (flywheel.features.history): features are read as of each request's
    # own time from them, not from the online store. The local release sets it for the servers that
    # replay held-out rows; empty (always, for live traffic): the online store.
    replay_features: str = ""


class LiveSettings(_Section):
    """Real-time features (flywheel.features.live): events move the served worlds' online rows.

    With ``enabled``, `flywheel serve` runs the updater (`flywheel events run`, one process beside the server's)
    and, with ``write_through``, the predictor appends every row it scored to the event log (for use
    cases whose request is the event: a scored transaction is an event of its card and merchant).
    Events that are not requests (a chargeback, a landing, a further source's row) come through
    `flywheel events push`. On a cluster the log is a Redis Stream and the updater a Deployment
    (manifests/base/live-updater.yaml)."""

    enabled: bool = False
    write_through: bool = True
    # Whether `flywheel serve` runs the updater in its process. On a cluster, with several predictor
    # replicas, one updater (`flywheel events run`, a Deployment of one replica) applies the log for
    # all of them: a live state is one buffer, and two updaters would each see half of the events.
    run_updater: bool = True
    log: Literal["sqlite", "redis"] = "sqlite"  # sqlite: a file beside the feature worlds; redis: a stream
    redis_connection: str = ""  # the stream's Redis (host:port[,options]); empty: features.redis_connection
    batch_max: int = Field(1000, ge=1)  # events applied in one batch
    # How long the updater lets events gather before it applies them (and waits for one when there
    # are none): fewer, larger batches under load (benchmarks/live.py), at most this much staler.
    poll_ms: int = Field(50, ge=1)
    attempts: int = Field(5, ge=1)  # tries of a failed update before it is left in the log for later
    claim_idle_s: float = Field(30.0, gt=0)  # Redis: an entry unacknowledged this long is claimed by another updater
    refresh_s: float = Field(10.0, gt=0)  # how often the updater asks the registry which worlds are served
    # wall: each world's watermark follows the wall clock between batches, so a window read at a
    # request's time counts the events of the window ending then, however long ago the last event
    # was (an event leaving a window is written when it does); events: the watermark moves with the
    # events' own times only, for a use case whose events carry past times (a replay of history).
    clock: Literal["wall", "events"] = "wall"
    # How long an event stays in the log after it arrived (the updater trims it every 5 minutes);
    # empty: the served worlds' longest reach (longest window plus label and source delays) and a day.
    retention_days: float | None = Field(None, gt=0)


class GcSettings(_Section):
    """`flywheel gc`: what stays besides production and the canary (flywheel/gc.py)."""

    keep_previous: int = Field(2, ge=0)  # versions that were production last: rollback targets
    keep_newest: int = Field(3, ge=0)  # the newest versions, which a person may still promote
    keep_days: float = Field(7.0, ge=0)  # whatever was made this recently (a run in progress)


class ScoringSettings(_Section):
    """Batch scoring of a date range of the lake (`flywheel-scoring` pipeline)."""

    chunk_days: int = Field(1, ge=1, le=366)  # days per chunk: each chunk is one task, in parallel on a cluster
    alert_threshold: float = Field(0.5, gt=0, lt=1)  # a probability at or above it is counted as flagged
    max_parallel_chunks: int = Field(4, ge=1, le=64)


class MonitoringSettings(_Section):
    """Closing the loop (flywheel/monitoring): what the predictor captures, what the monitor compares
    and when it asks for a new model. A use case's own settings.yaml may set its capture rate."""

    # The share of scored rows the predictor keeps (0: none, 1: every row), with the features it read
    # and its outputs, as partitioned Parquet under <use case>/monitoring/capture/.
    capture_rate: float = Field(0.0, ge=0, le=1)
    capture_queue_rows: int = Field(100_000, ge=1)  # rows waiting to be written; beyond, rows are dropped and counted
    capture_batch_rows: int = Field(20_000, ge=1)  # rows per Parquet file at most
    capture_flush_s: float = Field(10.0, gt=0)  # a part is written at least this often while rows wait
    window_days: float = Field(1.0, gt=0)  # what `flywheel monitor` reads when no --since is given
    min_rows: int = Field(500, ge=1)  # a window with fewer captured rows is reported, never judged
    bins: int = Field(10, ge=2, le=100)  # baseline quantile bins of a number (the drift histograms)
    drift_metric: Literal["psi", "js"] = "psi"
    max_psi: float = Field(0.2, gt=0)  # population stability index: 0.1 a change worth a look, 0.2 a shift
    max_js: float = Field(0.1, gt=0, le=1)  # Jensen-Shannon distance (base 2)
    max_category_linf: float = Field(0.1, gt=0, le=1)  # the largest change of one category's share
    max_null_rate_change: float = Field(0.1, gt=0, le=1)  # absolute
    max_skew_mismatch: float = Field(0.05, ge=0, le=1)  # a feature's online/offline mismatch rate
    sample_rows: int = Field(500_000, ge=1000)  # rows the estimates and labels' join read (a uniform sample of a larger window)
    skew_sample_rows: int = Field(5_000, ge=1)  # captured rows replayed through the offline path
    max_metric_drop: float = Field(0.1, gt=0)  # the model's key metric worse than its evaluation by this share
    min_labelled_rows: int = Field(200, ge=1)  # a day's realised metric needs this many labelled rows
    trigger: bool = False  # submit the training pipeline when something crosses (also `flywheel monitor --trigger`)
    cooldown_h: float = Field(24.0, ge=0)  # no new triggered run this soon after the last one
    schedule: str = "0 0 * * * *"  # the monitoring pipeline's KFP cron (six fields, seconds first): hourly
    retrain_source: str = ""  # the raw files a triggered training run ingests (its landing folder); needed to trigger
    trigger_target: Literal["local", "kfp"] = "local"  # local: `flywheel run`; kfp: the training pipeline on kfp.host
    pushgateway: str = ""  # a Prometheus Pushgateway (host:port) the monitor pushes its gauges to; empty: none


class StepResources(_Section):
    """CPU and memory requests and limits of one pipeline step's pod (Kubernetes quantities)."""

    cpu_request: str = "500m"
    cpu_limit: str = "2"
    memory_request: str = "1Gi"
    memory_limit: str = "4Gi"


def _default_step_resources() -> dict[str, StepResources]:
    # Feature building and evaluation hold a whole training set in memory; the train step only
    # launches and watches a job when training.launcher is a cluster one.
    return {
        "ingest": StepResources(),
        "validate": StepResources(memory_request="2Gi", memory_limit="8Gi"),
        "features": StepResources(cpu_request="2", cpu_limit="4", memory_request="4Gi", memory_limit="16Gi"),
        "train": StepResources(cpu_request="2", cpu_limit="8", memory_request="4Gi", memory_limit="16Gi"),
        "evaluate": StepResources(cpu_request="1", cpu_limit="4", memory_request="2Gi", memory_limit="8Gi"),
        "deploy": StepResources(),
        "plan_scoring": StepResources(),
        "score": StepResources(cpu_request="2", cpu_limit="4", memory_request="4Gi", memory_limit="16Gi"),
        "summarize": StepResources(),
        "monitor": StepResources(cpu_request="1", cpu_limit="2", memory_request="2Gi", memory_limit="8Gi"),
        "trigger": StepResources(),
    }


class KfpSettings(_Section):
    """Kubeflow Pipelines: where the API is, whose namespace, and how compiled steps run on the cluster.

    Auth: a bearer token from ``FLYWHEEL_KFP_TOKEN`` (never from YAML), else the in-cluster service
    account token at ``token_path`` (multi-user Kubeflow projects it into notebook pods), else none
    (a port-forwarded single-user deployment).
    """

    host: str = ""  # e.g. http://localhost:8080 (port-forwarded ml-pipeline-ui); empty: no cluster commands
    namespace: str = ""  # the Kubeflow profile namespace on multi-user Kubeflow; empty: single-user
    experiment: str = "flywheel"
    token: SecretStr | None = Field(None, exclude=True)
    token_path: str = "/var/run/secrets/kubeflow/pipelines/token"
    pipeline_root: str = ""  # empty: the deployment's default (its MinIO bucket)
    schedule_cron: str = "0 0 2 * * *"  # six fields, seconds first (KFP's cron): every day at 02:00
    # How compiled steps run on the cluster.
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    # The runs' service account (KFP v2 sets one per run, not per step): manifests/ binds it to a Role
    # that may create PyTorchJobs/TrainJobs and InferenceServices and nothing more. Empty: the profile's default.
    service_account: str = "flywheel-pipeline"
    retries: int = Field(3, ge=0, le=10)  # on steps that touch the network
    retry_backoff: str = "30s"
    retry_backoff_factor: float = Field(2.0, ge=1)
    retry_backoff_max: str = "600s"
    resources: dict[str, StepResources] = Field(default_factory=_default_step_resources)

    @field_validator("resources", mode="before")
    @classmethod
    def _merge_onto_step_defaults(cls, value: Any) -> Any:
        # A file that sets one step's cpu_limit keeps every other step's and field's default.
        if not isinstance(value, Mapping):
            return value
        merged = {step: resources.model_dump() for step, resources in _default_step_resources().items()}
        for step, given in value.items():
            if step not in merged:
                raise ValueError(f"{step!r} is not a pipeline step; steps: {', '.join(merged)}")
            if isinstance(given, Mapping):  # quantities like 4 arrive as numbers from YAML or env
                given = {key: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for key, v in given.items()}
                merged[step] = {**merged[step], **given}
            else:
                merged[step] = given
        return merged

    @field_validator("host")
    @classmethod
    def _host_has_scheme(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, like http://localhost:8080 (got {value!r})")
        return value.rstrip("/")

    @field_validator("schedule_cron")
    @classmethod
    def _six_field_cron(cls, value: str) -> str:
        if len(value.split()) != 6:
            raise ValueError(f"KFP cron has six fields, seconds first ('0 0 2 * * *' is 02:00 daily), not {value!r}")
        return value


class CanarySettings(_Section):
    """Canary analysis, the same judge for both targets (:mod:`flywheel.deploy.analysis`).

    KServe: the candidate gets ``traffic_percent`` of the InferenceService's traffic; ``windows``
    windows of ``window_requests`` held-out requests, each sent to both tag-routed revisions, are
    judged. Locally (`flywheel deploy --target local`): two `flywheel serve` processes behind the
    splitting proxy, the canary's share ramped through ``steps``, one window per step, each window
    as many replayed held-out requests as give the canary ``window_requests`` of them. The first bad
    window rolls back; passing them all promotes."""

    traffic_percent: int = Field(10, ge=1, le=99)
    windows: int = Field(3, ge=1)
    window_requests: int = Field(200, ge=10)
    steps: list[Annotated[int, Field(ge=1, le=100)]] = Field(default_factory=lambda: [10, 50], min_length=1)  # local ramp, in percent
    concurrency: int = Field(8, ge=1)  # local: replayed requests in flight
    server_start_timeout_s: float = Field(180.0, gt=0)  # local: each `flywheel serve` until it answers
    # local: each server reads a replayed held-out request's features as of the request's time, and
    # the canary is held to the difference the evaluation measured (flywheel/deploy/replay.py); off:
    # both read their online stores (the present) and the canary is held to stable's scores.
    replay_point_in_time: bool = True
    min_requests: int = Field(50, ge=1)  # a window with fewer canary requests judges nothing: rollback
    max_error_rate: float = Field(0.01, ge=0, le=1)  # the candidate's failed requests / requests
    max_error_rate_increase: float = Field(0.005, ge=0, le=1)  # above the stable version's
    max_p99_latency_ms: float = Field(250.0, gt=0)  # the candidate's p99, absolute
    max_p99_latency_ratio: float = Field(2.0, ge=1)  # the candidate's p99 / the stable version's
    max_p50_latency_ratio: float = Field(3.0, ge=1)  # its median / stable's (a stall moves a p99, not a median)
    score_tolerance: float = Field(0.1, gt=0, le=1)  # scores closer than this agree
    min_score_agreement: float = Field(0.9, ge=0, le=1)  # share of requests on which both agree
    max_mean_score_difference: float = Field(0.05, ge=0, le=1)  # mean |p_stable - p_canary|
    decision_threshold: float = Field(0.5, gt=0, lt=1)  # a score at or above it is a fraud decision
    min_decision_agreement: float = Field(0.95, ge=0, le=1)  # share of requests with the same decision

    @model_validator(mode="after")
    def _steps_rise(self) -> "CanarySettings":
        if self.steps != sorted(set(self.steps)):
            raise ValueError(f"steps must rise, each once: got {self.steps}")
        return self


class DeploySettings(_Section):
    """Where a blessed model goes: ``local`` (the registry's production version, which `flywheel
    serve` follows) or ``kserve`` (an InferenceService in Serverless mode: Knative scales it to zero).

    The predictor reads its model version from ``storageUri`` with the credentials of the Secret
    ``s3_secret`` (keys ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, KServe's S3 annotations),
    attached to the ServiceAccount ``service_account``; the manifest never holds a key.
    """

    target: Literal["local", "kserve"] = "local"
    namespace: str = Field("kubeflow", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    service_name: str = Field("", pattern=r"^([a-z]([-a-z0-9]*[a-z0-9])?)?$")  # empty: model_name
    runtime: str = Field("flywheel", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # the ServingRuntime
    # The port the InferenceService exposes. The predictor serves REST and v2 gRPC either way, but
    # Knative (KServe's Serverless mode) routes one port per container: http (REST, port 8080,
    # named http1) or grpc (v2 gRPC, serving.grpc_port, named h2c: HTTP/2 cleartext). The release's
    # canary replays held-out requests over REST, so a gRPC-exposed service is released without one.
    protocol: Literal["http", "grpc"] = "http"
    service_account: str = Field("flywheel-kserve", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    s3_secret: str = Field("flywheel-kserve-s3", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    min_replicas: int = Field(0, ge=0)  # 0: scale to zero when idle
    max_replicas: int = Field(4, ge=1)
    scale_metric: Literal["concurrency", "rps", "cpu", "memory"] = "concurrency"
    scale_target: int = Field(8, ge=1)  # in-flight requests per replica (for concurrency)
    container_concurrency: int = Field(16, ge=0)  # hard limit per replica; 0: unlimited
    cpu_request: str = "1"
    cpu_limit: str = "2"
    memory_request: str = "2Gi"
    memory_limit: str = "4Gi"
    ready_timeout_s: int = Field(600, ge=1)  # applied → Ready
    poll_interval_s: float = Field(5.0, gt=0)
    canary: CanarySettings = Field(default_factory=CanarySettings)

    @model_validator(mode="after")
    def _replicas_in_order(self) -> "DeploySettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self


DEFAULT_USECASE = Path("usecases") / "fraud"


def default_usecase() -> Path:
    """``usecases/fraud`` below the working directory (the project image's, or a checkout's) when it
    is there, else the one in the checkout this flywheel is imported from (commands run from another
    folder, as the README's examples are), else the first (a clear error names it when it is used)."""
    here = Path.cwd() / DEFAULT_USECASE
    checkout = Path(__file__).resolve().parents[1] / DEFAULT_USECASE
    return checkout if not here.is_dir() and checkout.is_dir() else here


class Settings(_Section):
    """Everything flywheel needs to know, in one place."""

    home: Path = Path(".flywheel")
    # The use case the loop runs: a folder holding its contract.yaml (flywheel.usecase), relative to
    # the working directory unless absolute. Also FLYWHEEL_USECASE or --usecase. Default: see
    # default_usecase (the repository's first use case, so `make run` in a checkout runs it).
    usecase: Path = Field(default_factory=lambda: default_usecase())
    # On a cluster: the use case's folder as published in storage (flywheel.usecase_store:
    # ``<root>/<use case>/usecases/<digest>/<use case>``). `flywheel compile|upload|submit|schedule
    # --usecase PATH` publish it and set this in the pipeline; each step fetches it, checks its digest
    # and runs it, so a team's use case reaches the pods without an image of its own.
    usecase_uri: str = ""
    model_name: str = ""  # what clients name the model in URLs, and its registry's name; empty: the use case's name
    image: str = "ghcr.io/flywheel-ml/flywheel:0.1.0"
    storage: StorageSettings = Field(default_factory=StorageSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    live: LiveSettings = Field(default_factory=LiveSettings)
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)
    kfp: KfpSettings = Field(default_factory=KfpSettings)
    deploy: DeploySettings = Field(default_factory=DeploySettings)
    gc: GcSettings = Field(default_factory=GcSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)

    @model_validator(mode="after")
    def _fill_defaults_under_home(self) -> "Settings":
        self.home = self.home.expanduser().resolve()
        self.usecase = self.usecase.expanduser().resolve()
        if not self.model_name:
            self.model_name = self.namespace
        if not self.storage.root:
            self.storage.root = str(self.home / "store")
        if not self.features.dir:
            self.features.dir = str(self.home / "feast")
        return self


    @property
    def namespace(self) -> str:
        """The use case's name (its folder's): every artifact of the use case lives below this folder
        of the storage root and of the Feast folder, so several use cases share one storage root."""
        if self.usecase_uri:
            return self.usecase_uri.rstrip("/").rsplit("/", 1)[-1]
        return self.usecase.name


def write_settings(settings: Settings, path: str | os.PathLike[str]) -> Path:
    """Write the effective settings as YAML (credentials are never written: they stay in the
    environment), so that other processes, such as pipeline steps, load exactly these settings."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=True))
    return target


def _is_text_field(path: list[str]) -> bool:
    """Whether the settings field at ``path`` holds text (str, Path, SecretStr), which env values
    must reach verbatim: parsed as YAML, "no" would become False, "1:30" an int, "0123" a number."""
    model: Any = Settings
    annotation: Any = None
    for part in path:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return False  # unknown field: validation names it
        annotation = model.model_fields[part].annotation
        model = annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = options[0] if len(options) == 1 else None
    return isinstance(annotation, type) and issubclass(annotation, (str, Path, SecretStr))


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """Turn FLYWHEEL_A__B=v into {"a": {"b": v}}; non-text values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    secret_names = {name for names in SECRET_ENV.values() for name in names}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in secret_names or name in NOT_SETTINGS_ENV or name == KFP_TOKEN_ENV:
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        if _is_text_field(path):
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name} conflicts with another FLYWHEEL_ variable")
        node[path[-1]] = value
    return out


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"settings file {path} does not exist (named by FLYWHEEL_CONFIG or --config)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"settings file {path} is not valid YAML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"settings file {path} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"settings file {path} must hold a mapping at the top level, not {type(data).__name__}")
    storage = data.get("storage") or {}
    if isinstance(storage, dict) and ({"access_key", "secret_key"} & set(storage)):
        raise ConfigError(
            f"settings file {path} holds S3 credentials; remove them and set "
            "FLYWHEEL_S3_ACCESS_KEY / FLYWHEEL_S3_SECRET_KEY in the environment instead"
        )
    kfp = data.get("kfp") or {}
    if isinstance(kfp, dict) and "token" in kfp:
        raise ConfigError(f"settings file {path} holds the KFP token; remove it and set {KFP_TOKEN_ENV} in the environment instead")
    return data


def _describe_error(err: Any) -> str:
    """One validation problem, naming the field; an unknown field also names the valid ones."""
    path = [str(p) for p in err["loc"]]
    where = ".".join(path) or "settings"
    if err["type"] != "extra_forbidden":
        return f"{where}: {err['msg']}"
    model: Any = Settings
    for part in path[:-1]:
        model = model.model_fields[part].annotation if part in getattr(model, "model_fields", {}) else None
    valid = ", ".join(sorted(model.model_fields)) if isinstance(model, type) and issubclass(model, BaseModel) else ""
    env = ENV_PREFIX + "__".join(path).upper()
    return f"{where} is not a setting (from {env} or the settings file){f'; valid here: {valid}' if valid else ''}"


USECASE_SETTINGS = "settings.yaml"
# What a use case's settings.yaml may not set: where it is, and where everything is stored.
NOT_USECASE_SETTINGS = {"usecase", "usecase_uri", "home", "storage", "kfp", "image"}


def _usecase_settings_file(data: Mapping[str, Any]) -> Path | None:
    """The chosen use case's ``settings.yaml``, when it has one."""
    chosen = data.get("usecase")
    if chosen is not None and not isinstance(chosen, (str, os.PathLike)):
        return None  # validation names the bad value
    folder = Path(chosen).expanduser() if chosen else default_usecase()
    path = folder / USECASE_SETTINGS
    return path if path.is_file() else None


def _read_usecase_settings(path: Path) -> dict[str, Any]:
    data = _read_yaml(path)
    refused = sorted(NOT_USECASE_SETTINGS & set(data))
    if refused:
        raise ConfigError(f"use case settings {path} sets {', '.join(refused)}: a use case's settings.yaml holds what "
                          "its loop needs (ingest, features, training, gate, ...), not where things are; remove them")
    return data


def load_settings(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from defaults, the chosen use case's ``settings.yaml`` (what its loop needs,
    such as a timestamp window for historical data), an optional YAML file and ``FLYWHEEL_*``
    variables, each over the one before.

    ``env`` replaces ``os.environ`` (tests pass a dict). Raises :class:`ConfigError` naming the
    offending field when a value is invalid, and when the YAML file is missing, unreadable, not a
    mapping, or holds credentials.
    """
    env = os.environ if env is None else env
    overrides = _env_overrides(env)
    home = Path(str(overrides.get("home") or ".flywheel")).expanduser()
    named = path or env.get("FLYWHEEL_CONFIG")
    config_path: Path | None = Path(named) if named else None
    if config_path is None and (home / "flywheel.yaml").is_file():
        config_path = home / "flywheel.yaml"
    data: dict[str, Any] = _read_yaml(config_path) if config_path else {}
    data = _deep_merge(data, overrides)
    usecase_file = _usecase_settings_file(data)
    if usecase_file is not None:
        data = _deep_merge(_read_usecase_settings(usecase_file), data)
    for field, names in SECRET_ENV.items():
        for name in names:
            if env.get(name):
                storage = data.get("storage")
                storage = {} if storage is None else storage
                if isinstance(storage, Mapping):  # anything else: validation reports it below
                    data["storage"] = {**storage, field: env[name]}
                break
    if env.get(KFP_TOKEN_ENV):
        kfp = data.get("kfp")
        kfp = {} if kfp is None else kfp
        if isinstance(kfp, Mapping):
            data["kfp"] = {**kfp, "token": env[KFP_TOKEN_ENV]}
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        # err["msg"] never quotes the input, so a rejected secret is not echoed.
        problems = "; ".join(_describe_error(err) for err in exc.errors())
        source = f"{config_path} and FLYWHEEL_* variables" if config_path else "FLYWHEEL_* variables"
        raise ConfigError(f"invalid settings ({source}): {problems}") from None
