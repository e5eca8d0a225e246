"""One typed settings object, from a YAML file plus ``FLYWHEEL_*`` environment variables.

Precedence (lowest first): defaults, the YAML file, environment variables. The YAML file is the one
named by ``FLYWHEEL_CONFIG`` (or passed explicitly), else ``$FLYWHEEL_HOME/flywheel.yaml`` if present.

Environment variables map onto fields with ``__`` between levels, for example
``FLYWHEEL_TRAINING__EPOCHS=5`` or ``FLYWHEEL_STORAGE__ROOT=s3://bucket/flywheel``. ``FLYWHEEL_HOME``
sets ``home``. Credentials are never read from YAML: S3 keys come from ``FLYWHEEL_S3_ACCESS_KEY`` /
``FLYWHEEL_S3_SECRET_KEY`` (or the standard ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``).
"""

from __future__ import annotations

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
NOT_SETTINGS_ENV = {"FLYWHEEL_CONFIG", "FLYWHEEL_CODE_VERSION"}
SECRET_ENV = {
    "access_key": ("FLYWHEEL_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
    "secret_key": ("FLYWHEEL_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
}


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
    max_restarts: int = Field(1, ge=0)  # relaunches after a fault (a killed worker); never after an exception
    process_group_timeout_s: int = Field(300, ge=1)  # a collective or rendezvous waiting longer fails
    # Rank 0 checkpoints to <out>/checkpoint.pt every this many optimizer steps (0: at epoch ends only)
    # and at every epoch's end; a relaunched group resumes at the step after the latest one.
    checkpoint_every_steps: int = Field(200, ge=0)
    launcher: Literal["local", "pytorchjob", "trainjob"] = "local"
    cluster: ClusterTrainingSettings = Field(default_factory=ClusterTrainingSettings)


class GateSettings(_Section):
    """The blessing: absolute floors AND no worse than production on rows neither model trained on."""

    min_roc_auc: float = Field(0.80, ge=0, le=1)
    min_pr_auc: float = Field(0.20, ge=0, le=1)
    recall_at_fpr: float = Field(0.01, gt=0, lt=1)  # the false-positive rate at which recall is compared
    max_pr_auc_regression: float = Field(0.01, ge=0, le=1)  # allowed drops against production
    max_roc_auc_regression: float = Field(0.01, ge=0, le=1)
    max_recall_regression: float = Field(0.02, ge=0, le=1)
    # Fewer fraud cases than this among the rows neither model trained on: no comparison is
    # possible (the metrics would be noise), and the gate falls back to the floors.
    min_comparison_positives: int = Field(30, ge=1)


class ServingSettings(_Section):
    """The KServe predictor."""

    host: str = "127.0.0.1"  # KServe alone binds every interface; flywheel binds this address
    port: int = Field(8080, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)  # server processes, each with its own model copy
    torch_threads: int = Field(1, ge=1)  # per worker: more oversubscribes the cores
    reload_interval_s: float = Field(10.0, gt=0)  # how often a worker asks the registry for a new production version
    max_body_bytes: int = Field(1_048_576, ge=1024)  # a larger request body is refused (413) before it is read
    max_batch: int = Field(1000, ge=1)  # transactions per request


class Settings(_Section):
    """Everything flywheel needs to know, in one place."""

    home: Path = Path(".flywheel")
    model_name: str = "fraud"
    image: str = "ghcr.io/flywheel-ml/flywheel:0.1.0"
    storage: StorageSettings = Field(default_factory=StorageSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)

    @model_validator(mode="after")
    def _fill_defaults_under_home(self) -> "Settings":
        self.home = self.home.expanduser().resolve()
        if not self.storage.root:
            self.storage.root = str(self.home / "store")
        if not self.features.dir:
            self.features.dir = str(self.home / "feast")
        return self


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
        if not name.startswith(ENV_PREFIX) or name in secret_names or name in NOT_SETTINGS_ENV:
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


def load_settings(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from defaults, an optional YAML file and ``FLYWHEEL_*`` variables.

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
    for field, names in SECRET_ENV.items():
        for name in names:
            if env.get(name):
                storage = data.get("storage")
                storage = {} if storage is None else storage
                if isinstance(storage, Mapping):  # anything else: validation reports it below
                    data["storage"] = {**storage, field: env[name]}
                break
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        # err["msg"] never quotes the input, so a rejected secret is not echoed.
        problems = "; ".join(_describe_error(err) for err in exc.errors())
        source = f"{config_path} and FLYWHEEL_* variables" if config_path else "FLYWHEEL_* variables"
        raise ConfigError(f"invalid settings ({source}): {problems}") from None
