"""The train step: fit the feature spec, run DDP workers through the launcher, publish the model.

The workers run where ``training.launcher`` says: torchrun on this machine (``local``), or a
PyTorchJob or TrainJob on Kubernetes. Every launcher shares the content key: a model already
trained from the same inputs is reused and nothing is launched, on any backend.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from flywheel.config import Settings
from flywheel.errors import ConfigError, TrainingError
from flywheel.features.transform import FeatureSpec
from flywheel.fingerprint import code_fingerprint
from flywheel.storage import Storage, is_s3
from flywheel.training.cluster import ClusterJob, JobInputs, cluster_world, render
from flywheel.training.failures import clear_failure
from flywheel.training.launcher import WORKER_MODULE, launch
from flywheel.training.split import split_validation
from flywheel.features.views import views_of
from flywheel.usecase import load_usecase

if TYPE_CHECKING:
    from flywheel.features.build import TrainingSet
    from flywheel.registry import ModelVersion

log = logging.getLogger(__name__)
TRAINING_KEY_FILE = "training-key.json"  # in a run's train/out: whose checkpoints these are


@dataclass
class TrainResult:
    model: ModelVersion
    reused: bool
    seconds: float
    epochs: list[dict[str, Any]]


# Training settings that only decide how a run is operated, not what it produces. Every other
# training setting shapes the model (a new setting does too, until it is listed here).
# Where the workers run is operational too, but not the world they form: on a cluster, the nodes
# and processes per node replace the local ``nproc`` (the data's sharding and the global batch).
# How often a checkpoint is written is operational too: a resumed run ends with the same weights.
OPERATIONAL = {"threads_per_worker", "timeout_s", "max_restarts", "process_group_timeout_s", "launcher", "cluster",
               "checkpoint_every_steps"}


def training_params(settings: Settings) -> dict[str, Any]:
    """The settings that shape the model (part of its content key and of its card)."""
    params = settings.training.model_dump(mode="json", exclude=OPERATIONAL)
    if settings.training.launcher != "local":
        del params["nproc"]
        params["cluster_world"] = cluster_world(settings)
    return params


def training_code_hash() -> str:
    """The code that makes a model: this step, the worker torchrun runs, and all they import."""
    return code_fingerprint(__name__, WORKER_MODULE)


def training_key(training_set: TrainingSet, settings: Settings) -> str:
    """The model's content key: the training data, the settings that shape it, the training code."""
    params = training_params(settings)
    usecase = load_usecase(settings.usecase).digest  # its model, task and metrics shape the model
    return hashlib.sha256(json.dumps([training_set.sha256, params, training_code_hash(), usecase], sort_keys=True).encode()).hexdigest()


def train(storage: Storage, settings: Settings, training_set: TrainingSet, run_id: str, triggered_by: str = "") -> TrainResult:
    """Train on a training set and publish the model; the same inputs reuse the existing version.
    ``triggered_by`` (a monitor's decision record) joins the model's lineage inputs and its card."""
    from flywheel.registry import Registry
    from flywheel.training.worker import HISTORY

    usecase = load_usecase(settings.usecase)
    registry = Registry(storage, settings.model_name)
    training_set.verify(storage)  # the data must be what its sha256 (part of the key) says
    key = training_key(training_set, settings)
    existing = registry.find_by_key(key)
    if existing is not None:
        log.info("train: model %s was already trained from these inputs; reusing it", existing.version)
        return TrainResult(existing, True, 0.0, existing.meta.get("epochs", []))

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flywheel-train-") as tmp:
        work = Path(tmp)
        # The workers read the training set, the spec, and write to out, all in storage: out holds the
        # checkpoints, so nothing this step deletes does, and a rerun of the same run resumes.
        inputs = job_inputs(storage, training_set, run_id)
        # Fitted on the rows the workers fit on: the validation rows stay unseen, like the holdout.
        rows = storage.read_parquet(training_set.train_uri).to_pandas()
        fit_rows, _ = split_validation(rows, settings.training.validation_fraction, usecase.contract.timestamp)
        spec = FeatureSpec.fit(fit_rows, usecase)
        first_event = pd.to_datetime(rows[usecase.contract.timestamp], utc=True).min() if len(rows) else None
        del rows, fit_rows
        storage.write_bytes(inputs.spec, json.dumps(spec.to_dict()).encode())
        claim_out(storage, inputs.out, key)
        clear_failure(storage, inputs.out)  # an earlier launch's exception must not stop this one's restarts
        if settings.training.launcher == "local":
            attempts = len(launch(settings, storage, run_id, inputs.data, inputs.spec, inputs.out, work / "logs").attempts)
        else:
            attempts = train_on_cluster(settings, training_set, storage, run_id)
        out = fetch_outputs(storage, inputs.out, work / "out", attempts)
        epochs = [json.loads(line) for line in (out / HISTORY).read_text().splitlines() if line]
        seconds = time.perf_counter() - started
        meta = {
            "hidden": list(settings.training.hidden),
            "params": training_params(settings),
            "epochs": epochs,
            "best_epoch": epochs[-1].get("best_epoch") if epochs else None,
            "attempts": attempts,
            "launcher": settings.training.launcher,
            "train_seconds": round(seconds, 2),
            "training_set": {"uri": training_set.uri, "sha256": training_set.sha256, "rows": training_set.train_rows},
            # Production comparisons use only rows after this window; serving reads this feature world.
            # (the model card says it in words: start to end, days and rows).
            "training_window": {"start": first_event.isoformat() if first_event is not None else None,
                                "end": training_set.cutoff, "rows": training_set.train_rows},
            "feature_world": training_set.world,
            "task": usecase.task.model_dump(mode="json"),
            "target_scale": spec.target[1],  # a regression label's spread (the canary's default margins)
            # What serving reads for this model, as it was trained: the request (the contract) and
            # the feature views of its world.
            "contract": usecase.contract.model_dump(mode="json"),
            "views": [{"name": view.name, "entity": view.entity, "join_key": view.join_key, "key_type": view.key_type,
                       "features": view.features, "ttl_s": view.ttl.total_seconds(),
                       "aggregations": [[name, a.model_dump(mode="json")] for name, a in view.aggregations]}
                      for view in views_of(usecase)],
            "usecase": {"name": usecase.name, "digest": usecase.digest},
            # The aggregation engine's code: live updates of this model's world must run the same.
            "engine_code": code_fingerprint("flywheel.features.engine"),
            "run_id": run_id,
        }
        if triggered_by:
            meta["triggered_by"] = triggered_by
        saved = save_model(spec, out, work / "model", meta)
        inputs = [storage.stat(training_set.train_uri).to_dict(), storage.stat(training_set.manifest_uri).to_dict()]
        if triggered_by:  # the evidence that asked for this model: `flywheel lineage` walks to it
            inputs.append(storage.stat(triggered_by).to_dict())
        model = registry.publish(saved, training_key=key, run_id=run_id, inputs=inputs, meta=meta)
    log.info("train: published %s in %.1fs (%d attempt(s))", model.version, seconds, attempts)
    return TrainResult(model, False, seconds, epochs)


def job_inputs(storage: Storage, training_set: TrainingSet, run_id: str) -> JobInputs:
    """Where a cluster job reads the data and spec and writes its outputs: storage URIs of this run."""
    return JobInputs(
        data=training_set.train_uri,
        spec=storage.uri("runs", run_id, "train", "spec.json"),
        out=storage.uri("runs", run_id, "train", "out"),
    )


def render_training_job(storage: Storage, settings: Settings, training_set: TrainingSet, run_id: str) -> ClusterJob:
    """The PyTorchJob or TrainJob (``training.launcher``) that training this set in this run creates."""
    if not is_s3(storage.root):
        raise ConfigError(
            f"training.launcher={settings.training.launcher} runs the workers in pods, which cannot read "
            f"this machine's storage root {storage.root}: set storage.root to s3://bucket/prefix (MinIO or S3)"
        )
    key = training_key(training_set, settings)
    return render(settings, settings.training.launcher, job_inputs(storage, training_set, run_id), run_id, key)


def claim_out(storage: Storage, out: str, key: str) -> None:
    """Mark ``out`` as this model's (its content key): a checkpoint there of another key (the same
    run id with other inputs or settings) is cleared rather than resumed from."""
    marker = f"{out}/{TRAINING_KEY_FILE}"
    if storage.exists(marker) and storage.read_json(marker).get("key") == key:
        return  # the same model: its checkpoint, if any, is resumed
    if storage.list(out):
        log.info("train: %s holds another model's outputs; clearing it", out)
        storage.delete_tree(out)
    storage.write_json(marker, {"key": key})


def train_on_cluster(settings: Settings, training_set: TrainingSet, storage: Storage, run_id: str) -> int:
    """Run the job on the cluster until it ends (it reads the spec and writes its outputs in storage).
    Returns the number of attempts (1 + pod restarts)."""
    from flywheel.training.watch import run_cluster_job

    job = render_training_job(storage, settings, training_set, run_id)
    outcome = run_cluster_job(settings, job)
    return 1 + outcome.restarts


def fetch_outputs(storage: Storage, out_uri: str, folder: Path, attempts: int) -> Path:
    """The final weights and history the workers wrote to ``out_uri``, copied into ``folder``."""
    from flywheel.training.model import WEIGHTS_FILE
    from flywheel.training.worker import HISTORY

    folder.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_FILE, HISTORY):
        uri = f"{out_uri}/{name}"
        if not storage.exists(uri):
            raise TrainingError(f"training succeeded ({attempts} attempt(s)) but wrote no {uri}")
        storage.download_file(uri, folder / name)
    return folder


def save_model(spec: FeatureSpec, out: Path, folder: Path, meta: dict[str, Any]) -> Path:
    """The workers' final weights with their spec and card, and the serving exports (a torch.export
    program and an INT8 copy), in the registry's layout."""
    import torch

    from flywheel.training.export import write_exports
    from flywheel.training.model import WEIGHTS_FILE, Model, build_network

    module = build_network(spec, meta["hidden"])
    module.load_state_dict(torch.load(out / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    module.eval()
    model = Model(module, spec, meta)
    model.save(folder)
    write_exports(model, folder)
    return folder
