"""The train step: fit the feature spec, run DDP workers through torchrun, publish the model."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from flywheel.errors import TrainingError
from flywheel.features.transform import FeatureSpec
from flywheel.storage import Storage

if TYPE_CHECKING:
    from flywheel.registry import ModelVersion

log = logging.getLogger(__name__)
LOG_TAIL_LINES = 30


@dataclass
class TrainResult:
    model: ModelVersion
    reused: bool
    seconds: float
    epochs: list[dict[str, Any]]


def training_params(settings: Any) -> dict[str, Any]:
    cfg = settings.training
    return {
        "nproc": cfg.nproc,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "hidden": list(cfg.hidden),
        "seed": cfg.seed,
    }


def training_code_hash() -> str:
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for path in sorted(here.glob("*.py")) + [here.parent / "features" / "transform.py"]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def torchrun_command(settings: Any, data: Path, spec: Path, out: Path) -> list[str]:
    """The local launch: torchrun on this machine (a PyTorchJob runs the same worker module)."""
    cfg = settings.training
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={cfg.nproc}",
        "--max-restarts=1",
        "-m",
        "flywheel.training.worker",
        "--data", str(data),
        "--spec", str(spec),
        "--out", str(out),
        "--epochs", str(cfg.epochs),
        "--batch-size", str(cfg.batch_size),
        "--lr", str(cfg.learning_rate),
        "--hidden", ",".join(str(h) for h in cfg.hidden),
        "--seed", str(cfg.seed),
    ]


def run_torchrun(command: list[str], log_path: Path, threads: int, timeout_s: int) -> None:
    """Run torchrun, streaming its output to a log; a failure carries the log's last lines."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    with open(log_path, "w") as handle:
        try:
            result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise TrainingError(f"training did not finish within {timeout_s}s; last lines:\n{_tail(log_path)}") from None
    if result.returncode != 0:
        raise TrainingError(f"torchrun exited with code {result.returncode}; last lines:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def train(storage: Storage, settings: Any, training_set: Any, run_id: str) -> TrainResult:
    """Train on a training set and publish the model; the same inputs reuse the existing version."""
    from flywheel.registry import Registry

    registry = Registry(storage, settings.model_name)
    params = training_params(settings)
    key = hashlib.sha256(json.dumps([training_set.sha256, params, training_code_hash()], sort_keys=True).encode()).hexdigest()
    existing = registry.find_by_key(key)
    if existing is not None:
        log.info("train: model %s was already trained from these inputs; reusing it", existing.version)
        return TrainResult(existing, True, 0.0, existing.meta.get("epochs", []))

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flywheel-train-") as tmp:
        work = Path(tmp)
        data = storage.local_copy(training_set.train_uri, work)
        frame = pd.read_parquet(data)
        spec = FeatureSpec.fit(frame)
        (work / "spec.json").write_text(json.dumps(spec.to_dict()))
        out = work / "out"
        command = torchrun_command(settings, data, work / "spec.json", out)
        log.info("train: %s", " ".join(command))
        run_torchrun(command, work / "torchrun.log", settings.training.threads_per_worker, settings.training.timeout_s)
        epochs = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line]
        seconds = time.perf_counter() - started

        from flywheel.training.model import FraudMLP, FraudModel
        import torch

        module = FraudMLP(spec.width, params["hidden"])
        module.load_state_dict(torch.load(out / "model.pt", map_location="cpu", weights_only=True))
        meta = {
            "hidden": params["hidden"],
            "params": params,
            "epochs": epochs,
            "train_seconds": round(seconds, 2),
            "training_set": {"uri": training_set.uri, "sha256": training_set.sha256, "rows": training_set.train_rows},
            "run_id": run_id,
        }
        saved = work / "model"
        FraudModel(module, spec, meta).save(saved)
        inputs = [storage.stat(training_set.train_uri).to_dict(), storage.stat(training_set.manifest_uri).to_dict()]
        model = registry.publish(saved, training_key=key, run_id=run_id, inputs=inputs, meta=meta)
    log.info("train: published %s in %.1fs", model.version, seconds)
    return TrainResult(model, False, seconds, epochs)
