"""torchrun + DDP (gloo, 2 processes) on tiny data, and a failing worker's error."""

import numpy as np
import pandas as pd
import pytest

from flywheel.config import load_settings
from flywheel.errors import TrainingError
from flywheel.features.build import TrainingSet
from flywheel.storage import Storage
from flywheel.training import run_torchrun, train
from tests.unit.test_transform import frame


def tiny_training_set(storage: Storage, rows: int = 400) -> TrainingSet:
    rng = np.random.default_rng(0)
    base = pd.concat([frame()] * rows, ignore_index=True)
    base["transaction_id"] = [f"t{i}" for i in range(rows)]
    base["amount"] = rng.lognormal(3, 1, rows)
    base["is_fraud"] = (base["amount"] > np.quantile(base["amount"], 0.9)).astype("int8")
    ref = storage.write_parquet(storage.uri("ds", "train.parquet"), base)
    storage.write_json(storage.uri("ds", "manifest.json"), {})
    return TrainingSet(
        uri=storage.uri("ds"), key="k" * 64, sha256=ref.sha256, train_uri=ref.uri, holdout_uri=ref.uri,
        rows=rows, train_rows=rows, holdout_rows=rows, positives=int(base.is_fraud.sum()),
        holdout_positives=int(base.is_fraud.sum()), cutoff="", snapshot_sha256="s",
    )


def test_ddp_training_learns_and_a_rerun_reuses_the_model(tmp_path):
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_TRAINING__EPOCHS": "4",
                                  "FLYWHEEL_TRAINING__BATCH_SIZE": "64"})
    storage = Storage.from_settings(settings)
    training_set = tiny_training_set(storage)
    first = train(storage, settings, training_set, "r1")
    assert not first.reused
    assert [e["epoch"] for e in first.epochs] == [0, 1, 2, 3]
    assert first.epochs[-1]["loss"] < first.epochs[0]["loss"]
    second = train(storage, settings, training_set, "r2")
    assert second.reused and second.model.version == first.model.version


def test_a_failing_worker_becomes_a_training_error_with_its_last_log_lines(tmp_path):
    command = ["python", "-c", "import sys; print('worker exploded: bad shard'); sys.exit(3)"]
    with pytest.raises(TrainingError, match="(?s)exited with code 3.*worker exploded: bad shard"):
        run_torchrun(command, tmp_path / "log.txt", threads=1, timeout_s=60)
