"""The DDP worker against S3 (SeaweedFS on 127.0.0.1): it reads the training set and spec from s3://,
writes its checkpoints, history and weights to s3://, and resumes from an S3 checkpoint mid-epoch."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import torch

from flywheel.config import load_settings
from flywheel.features.transform import FeatureSpec
from tests.factories import FRAUD
from flywheel.storage import Storage
from flywheel.training.launcher import OK, launch
from tests.unit.test_training import FAST, run_until_step, transactions

# 8,500 fit rows per rank (15% validation): 17 steps an epoch. Big enough (about 0.7 MB) that
# pyarrow's first read of a file (its last 64 KiB, for the footer) is not most of it.
ROWS, BATCH, ROW_GROUP = 20_000, 512, 1000


def test_the_worker_trains_from_s3_checkpoints_mid_epoch_there_and_resumes_from_it(s3_storage: Storage, s3_env, tmp_path: Path):
    """Catches a worker that reads local paths only, copies the whole file per rank, writes its
    checkpoint to a local folder, or cannot resume from one in S3."""
    storage = s3_storage
    env = s3_env(storage.settings_root, FLYWHEEL_HOME=str(tmp_path / "home"), **FAST, FLYWHEEL_TRAINING__EPOCHS="3",
                 FLYWHEEL_TRAINING__BATCH_SIZE=str(BATCH), FLYWHEEL_TRAINING__CHECKPOINT_EVERY_STEPS="4")
    settings = load_settings(env=env)
    table = transactions(ROWS)
    data = storage.write_parquet(storage.uri("ds", "train.parquet"), table, row_group_size=ROW_GROUP).uri
    spec = storage.uri("runs", "r1", "train", "spec.json")
    storage.write_bytes(spec, json.dumps(FeatureSpec.fit(table, FRAUD).to_dict()).encode())
    out = storage.uri("runs", "r1", "train", "out")

    run_until_step(settings, data, spec, out, tmp_path / "logs1", 20)  # epoch 1, step 3
    state = torch.load(io.BytesIO(storage.read_bytes(f"{out}/checkpoint.pt")), weights_only=True)
    assert (state["epoch"], state["step"], state["complete"]) == (1, 3, False)
    assert not storage.exists(f"{out}/model.pt")

    run = launch(settings, storage, "r1", data, spec, out, tmp_path / "logs2")
    assert run.outcome == OK and len(run.attempts) == 1
    assert re.search(r"resuming from epoch 1 step 3 \(global step 20\)", run.log.read_text())
    epochs = [json.loads(line) for line in storage.read_bytes(f"{out}/history.jsonl").decode().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    weights = torch.load(io.BytesIO(storage.read_bytes(f"{out}/model.pt")), weights_only=True)
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    # Each rank fetched its own row groups (its half of the fit rows, rank 0 the validation rows too)
    # with ranged reads: neither read the whole file.
    size = storage.stat(data).size
    rows_read, bytes_read = epochs[-1]["rows_read_per_rank"], epochs[-1]["bytes_read_per_rank"]
    assert all(rows < ROWS for rows in rows_read), rows_read
    assert rows_read[1] <= 8500 + 2 * ROW_GROUP  # rank 1: its half of the fit rows, a row group of slack each side
    # Rank 1 fetched less than the file (footer, the time and label columns of every row group, then
    # its own row groups). Not much less here: the test rows repeat one row but for their time and
    # amount, so the time column is most of the file's bytes.
    assert 0 < bytes_read[1] < size, (bytes_read, size)
    assert not list(Path(tmp_path).rglob("*.parquet"))  # no local copy of the training set
