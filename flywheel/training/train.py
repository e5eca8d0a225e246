"""The train step: fit the feature spec, run DDP workers through the launcher, publish the model."""

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
from flywheel.features.transform import FeatureSpec
from flywheel.fingerprint import code_fingerprint
from flywheel.storage import Storage
from flywheel.training.launcher import WORKER_MODULE, launch
from flywheel.training.split import split_validation

if TYPE_CHECKING:
    from flywheel.features.build import TrainingSet
    from flywheel.registry import ModelVersion

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: ModelVersion
    reused: bool
    seconds: float
    epochs: list[dict[str, Any]]


# Training settings that only decide how a run is operated, not what it produces. Every other
# training setting shapes the model (a new setting does too, until it is listed here).
OPERATIONAL = {"threads_per_worker", "timeout_s", "max_restarts", "process_group_timeout_s"}


def training_params(settings: Settings) -> dict[str, Any]:
    """The settings that shape the model (part of its content key and of its card)."""
    return settings.training.model_dump(mode="json", exclude=OPERATIONAL)


def training_code_hash() -> str:
    """The code that makes a model: this step, the worker torchrun runs, and all they import."""
    return code_fingerprint(__name__, WORKER_MODULE)


def training_key(training_set: TrainingSet, settings: Settings) -> str:
    """The model's content key: the training data, the settings that shape it, the training code."""
    params = training_params(settings)
    return hashlib.sha256(json.dumps([training_set.sha256, params, training_code_hash()], sort_keys=True).encode()).hexdigest()


def train(storage: Storage, settings: Settings, training_set: TrainingSet, run_id: str) -> TrainResult:
    """Train on a training set and publish the model; the same inputs reuse the existing version."""
    from flywheel.registry import Registry
    from flywheel.training.worker import HISTORY

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
        data = storage.local_copy(training_set.train_uri, work)
        # Fitted on the rows the workers fit on: the validation rows stay unseen, like the holdout.
        fit_rows, _ = split_validation(pd.read_parquet(data), settings.training.validation_fraction)
        spec = FeatureSpec.fit(fit_rows)
        (work / "spec.json").write_text(json.dumps(spec.to_dict()))
        out = work / "out"  # kept across attempts: a relaunched group resumes from its checkpoint
        attempts = launch(settings, storage, run_id, data, work / "spec.json", out, work / "logs")
        epochs = [json.loads(line) for line in (out / HISTORY).read_text().splitlines() if line]
        seconds = time.perf_counter() - started
        meta = {
            "hidden": list(settings.training.hidden),
            "params": training_params(settings),
            "epochs": epochs,
            "best_epoch": epochs[-1].get("best_epoch") if epochs else None,
            "attempts": len(attempts),
            "train_seconds": round(seconds, 2),
            "training_set": {"uri": training_set.uri, "sha256": training_set.sha256, "rows": training_set.train_rows},
            # Production comparisons use only rows after this window; serving reads this feature world.
            "training_window": {"end": training_set.cutoff},
            "feature_world": training_set.world,
            "run_id": run_id,
        }
        saved = save_model(spec, out, work / "model", meta)
        inputs = [storage.stat(training_set.train_uri).to_dict(), storage.stat(training_set.manifest_uri).to_dict()]
        model = registry.publish(saved, training_key=key, run_id=run_id, inputs=inputs, meta=meta)
    log.info("train: published %s in %.1fs (%d attempt(s))", model.version, seconds, len(attempts))
    return TrainResult(model, False, seconds, epochs)


def save_model(spec: FeatureSpec, out: Path, folder: Path, meta: dict[str, Any]) -> Path:
    """The workers' final weights with their spec and card, in the registry's layout."""
    import torch

    from flywheel.training.model import WEIGHTS_FILE, FraudMLP, FraudModel

    module = FraudMLP(spec.width, meta["hidden"])
    module.load_state_dict(torch.load(out / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    FraudModel(module, spec, meta).save(folder)
    return folder
