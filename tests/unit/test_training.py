"""torchrun + DDP (gloo, 2 processes) on tiny data: learning, sharding, resuming, and failures.

Every test runs the real torchrun with the real worker module: the failures are real worker
exceptions and a real SIGKILL, read back through torch's error files.
"""

import json
import os
import re
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from flywheel.config import Settings, load_settings
from flywheel.errors import DataError, IntegrityError, TrainingError
from flywheel.features.build import TrainingSet, split_by_time
from flywheel.features.transform import FeatureSpec
from tests.factories import FRAUD
from flywheel.storage import Storage
from flywheel.training import launcher
from flywheel.training.launcher import OK, launch
from flywheel.training.split import split_validation
from flywheel.training.train import train
from tests.unit.test_transform import frame

FAST = {"FLYWHEEL_TRAINING__PROCESS_GROUP_TIMEOUT_S": "30", "FLYWHEEL_TRAINING__TIMEOUT_S": "120"}
ROW_GROUP = 50  # rows per row group of the test files: the workers can read a part of them


def transactions(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    base = pd.concat([frame()] * rows, ignore_index=True)
    base["transaction_id"] = [f"t{i}" for i in range(rows)]
    # One a minute: the validation split (the end of the training span by time) needs time to cut.
    base["ts"] = pd.Timestamp("2026-10-01T00:00:00Z") + pd.to_timedelta(np.arange(rows), unit="min")
    base["amount"] = rng.lognormal(3, 1, rows)
    base["is_fraud"] = (base["amount"] > np.quantile(base["amount"], 0.9)).astype("int8")
    return base


def tiny_training_set(storage: Storage, rows: int = 400, table: pd.DataFrame | None = None) -> TrainingSet:
    base = transactions(rows) if table is None else table
    ref = storage.write_parquet(storage.uri("ds", "train.parquet"), base)
    storage.write_json(storage.uri("ds", "manifest.json"), {})
    positives = int(base["is_fraud"].sum()) if "is_fraud" in base else 0
    return TrainingSet(
        uri=storage.uri("ds"), key="k" * 64, sha256=ref.sha256, train_uri=ref.uri, holdout_uri=ref.uri,
        rows=rows, train_rows=rows, holdout_rows=rows, positives=positives,
        holdout_positives=positives, cutoff="", snapshot_sha256="s", files={ref.uri: ref.sha256},
    )


def settings_at(home: Path, **training: object) -> Settings:
    env = {"FLYWHEEL_HOME": str(home), **FAST}
    env.update({f"FLYWHEEL_TRAINING__{k.upper()}": str(v) for k, v in training.items()})
    return load_settings(env=env)


def write_inputs(folder: Path, rows: int) -> tuple[Path, Path]:
    """A training parquet file and its fitted spec, as the train step hands them to the workers."""
    folder.mkdir(parents=True, exist_ok=True)
    table = transactions(rows)
    table.to_parquet(folder / "train.parquet", row_group_size=ROW_GROUP)
    (folder / "spec.json").write_text(json.dumps(FeatureSpec.fit(table, FRAUD).to_dict()))
    return folder / "train.parquet", folder / "spec.json"


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line]


@pytest.fixture
def count_launches(monkeypatch):
    """How many times torchrun was started (the real run_torchrun still runs)."""
    calls = []
    real = launcher.run_torchrun

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(launcher, "run_torchrun", counting)
    return calls


# A run long enough to kill a worker in the middle, and its uninterrupted reference. Patience as long
# as the run: every epoch runs, and the final weights are still the best epoch's, whose state the
# checkpoint must carry across a restart.
RESUME_ROWS, RESUME_EPOCHS, RESUME_BATCH = 2000, 12, 32
# A checkpoint every 10 optimizer steps (27 steps an epoch: 850 fit rows per rank in batches of 32).
RESUME = {"epochs": RESUME_EPOCHS, "batch_size": RESUME_BATCH, "patience": RESUME_EPOCHS, "checkpoint_every_steps": 10}
STEPS_PER_EPOCH = 27
RESUMED = re.compile(r"resuming from epoch (\d+) step (\d+) \(global step (\d+)\)")


def run_until_step(settings: Settings, data: object, spec: object, out: object, work: Path, step: int) -> None:
    """One torchrun attempt that stops cleanly after global step ``step``, leaving its checkpoint."""
    command = launcher.torchrun_command(settings, data, spec, out, work / "torchelastic") + ["--stop-at-step", str(step)]
    run = launcher.run_torchrun(command, work, 1, 120, env=launcher.storage_env(settings))
    assert run.outcome == OK, launcher.describe(run)


def same_weights(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 2-worker run: its history and final weights."""
    root = tmp_path_factory.mktemp("reference")
    data, spec = write_inputs(root / "in", RESUME_ROWS)
    settings = settings_at(root, **RESUME)
    launch(settings, Storage.from_settings(settings), "ref", data, spec, root / "out", root / "logs")
    return data, spec, history(root / "out"), root / "out" / "model.pt"


def test_ddp_training_learns_and_a_rerun_reuses_the_model(tmp_path):
    settings = settings_at(tmp_path, epochs=4, batch_size=64)
    storage = Storage.from_settings(settings)
    training_set = tiny_training_set(storage)
    first = train(storage, settings, training_set, "r1")
    assert not first.reused
    assert [e["epoch"] for e in first.epochs] == [0, 1, 2, 3]
    assert first.epochs[-1]["loss"] < first.epochs[0]["loss"]
    assert storage.exists(storage.uri("runs", "r1", "train", "torchrun.log"))
    assert storage.exists(storage.uri("runs", "r1", "train", "attempt-1", "rank-1", "stderr.log"))
    second = train(storage, settings, training_set, "r2")
    assert second.reused and second.model.version == first.model.version
    # A setting that shapes the model retrains; an operational one does not.
    assert train(storage, settings_at(tmp_path, epochs=4, batch_size=64, timeout_s=900), training_set, "r3").reused
    third = train(storage, settings_at(tmp_path, epochs=3, batch_size=64), training_set, "r4")
    assert not third.reused and third.model.version != first.model.version


def test_a_tampered_training_set_is_refused_not_trained_on(tmp_path):
    settings = settings_at(tmp_path, epochs=1, batch_size=64)
    storage = Storage.from_settings(settings)
    training_set = tiny_training_set(storage)
    frame = pd.read_parquet(training_set.train_uri)
    frame.loc[0, "is_fraud"] = 1 - frame.loc[0, "is_fraud"]  # one label flipped after publication
    frame.to_parquet(training_set.train_uri)
    with pytest.raises(IntegrityError, match="train.parquet does not match the sha256 recorded"):
        train(storage, settings, training_set, "r1")


def test_two_workers_each_train_a_disjoint_half_of_the_samples(tmp_path):
    """Catches a worker that trains on the whole file, or a group that is really one process."""
    data, spec = write_inputs(tmp_path / "in", 400)
    settings = settings_at(tmp_path, epochs=2, batch_size=64, nproc=2, validation_fraction=0)
    launch(settings, Storage.from_settings(settings), "r1", data, spec, tmp_path / "out", tmp_path / "logs")
    for epoch in history(tmp_path / "out"):
        assert epoch["world_size"] == 2
        assert epoch["samples_per_rank"] == [200, 200]
        assert epoch["distinct_samples"] == 400  # together the shards cover every row once
        # Each rank read the row groups of its own half, not the whole file.
        assert epoch["rows_read_per_rank"] == [200, 200]
        assert all(0 < read for read in epoch["bytes_read_per_rank"])


def test_a_missing_data_file_fails_at_once_naming_the_file_and_the_workers_traceback(tmp_path, count_launches):
    """Catches torchrun's bare summary as the error, a deleted log, and a bug retried as a fault."""
    _, spec = write_inputs(tmp_path / "in", 50)
    missing = tmp_path / "in" / "no-such-file.parquet"
    settings = settings_at(tmp_path, epochs=1, max_restarts=2)
    storage = Storage.from_settings(settings)
    with pytest.raises(TrainingError) as caught:
        launch(settings, storage, "r1", missing, spec, tmp_path / "out", tmp_path / "logs")
    message = str(caught.value)
    assert "FileNotFoundError" in message and str(missing) in message
    assert 'flywheel/training/worker.py", line' in message and "load_shard" in message
    assert "not retried" in message and "(attempt 1)" in message
    kept = storage.uri("runs", "r1", "train", "torchrun.log")
    assert f"full log: {kept}" in message
    assert "worker pid" in Path(kept).read_text()  # the workers' own output is in the kept log
    assert "FileNotFoundError" in Path(storage.uri("runs", "r1", "train", "attempt-1", "rank-0", "error.json")).read_text()
    assert len(count_launches) == 1 and "--max-restarts=2" in count_launches[0]
    # torchrun restarted the group (it cannot tell a bug from a fault), and the restarted workers
    # stopped at once, before joining a group or reading anything, repeating the first exception.
    for attempt in (2, 3):
        restarted = Path(storage.uri("runs", "r1", "train", f"attempt-{attempt}", "rank-0", "error.json")).read_text()
        assert "EarlierAttemptFailed" in restarted and "FileNotFoundError" in restarted
        assert "worker pid" not in Path(storage.uri("runs", "r1", "train", f"attempt-{attempt}", "rank-0", "stderr.log")).read_text()


def test_a_missing_label_column_fails_the_train_step_at_once_with_the_workers_exception(tmp_path, count_launches):
    """Through the whole step: the log of the failed attempt survives the step's work folder."""
    settings = settings_at(tmp_path, epochs=1, max_restarts=1)
    storage = Storage.from_settings(settings)
    training_set = tiny_training_set(storage, 50, transactions(50).drop(columns=["is_fraud"]))
    with pytest.raises(TrainingError) as caught:
        train(storage, settings, training_set, "r1")
    message = str(caught.value)
    assert "rank 0 raised KeyError: 'is_fraud'" in message
    assert 'flywheel/training/worker.py", line' in message
    kept = storage.uri("runs", "r1", "train", "torchrun.log")
    assert f"full log: {kept}" in message and "KeyError" in Path(kept).read_text()
    assert len(count_launches) == 1
    assert "worker pid" not in Path(storage.uri("runs", "r1", "train", "attempt-2", "rank-0", "stderr.log")).read_text()


def test_a_spec_naming_an_input_its_code_does_not_derive_fails_once_and_is_not_retried(tmp_path, count_launches):
    """A spec naming one input more than its inputs code derives: the transform says which, once."""
    data, spec = write_inputs(tmp_path / "in", 50)
    corrupt = json.loads(spec.read_text())
    corrupt["numeric"].append("not_a_derived_input")  # the width grows; the transform's output does not
    spec.write_text(json.dumps(corrupt))
    settings = settings_at(tmp_path, epochs=1, max_restarts=1)
    with pytest.raises(TrainingError) as caught:
        launch(settings, Storage.from_settings(settings), "r1", data, spec, tmp_path / "out", tmp_path / "logs")
    message = str(caught.value)
    assert re.search(r"rank \d raised UseCaseError: the model's input not_a_derived_input is not one its inputs derive",
                     message), message
    assert 'flywheel/features/transform.py", line' in message and "deterministic failure" in message
    assert len(count_launches) == 1


def test_resuming_from_a_checkpoint_starts_after_it_and_ends_with_the_uninterrupted_weights(tmp_path, reference_run):
    """Catches a resume that restarts at epoch 0, skips an epoch, or loses the optimizer's state."""
    data, spec, reference_history, reference_weights = reference_run
    out = tmp_path / "out"
    storage = Storage.from_settings(settings_at(tmp_path))
    stop_after = 4  # the first run leaves checkpoint.pt at epoch 3
    first = settings_at(tmp_path, **{**RESUME, "epochs": stop_after})
    launch(first, storage, "r1", data, spec, out, tmp_path / "logs1")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == stop_after - 1
    rest = settings_at(tmp_path, **RESUME)
    run = launch(rest, storage, "r2", data, spec, out, tmp_path / "logs2")
    assert f"resuming from epoch {stop_after}" in run.log.read_text()
    assert [e["epoch"] for e in history(out)] == list(range(RESUME_EPOCHS))
    # Same seed, same shards, same optimizer state: the same arithmetic, so the same weights.
    resumed, uninterrupted = torch.load(out / "model.pt"), torch.load(reference_weights)
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted)


def test_resuming_mid_epoch_skips_the_steps_done_and_ends_with_the_uninterrupted_weights(tmp_path, reference_run):
    """Catches a mid-epoch resume that replays the epoch from its start, skips too many batches, or
    loses the epoch's RNG or optimizer state: the weights would differ from the uninterrupted run's."""
    data, spec, reference_history, reference_weights = reference_run
    out = tmp_path / "out"
    settings = settings_at(tmp_path, **RESUME)
    stop = STEPS_PER_EPOCH + 13  # epoch 1, step 13 (global step 40)
    run_until_step(settings, data, spec, out, tmp_path / "logs1", stop)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["global_step"], state["complete"]) == (1, 13, stop, False)
    assert not (out / "model.pt").exists()
    run = launch(settings, Storage.from_settings(settings), "r2", data, spec, out, tmp_path / "logs2")
    assert RESUMED.search(run.log.read_text()).groups() == ("1", "13", str(stop))
    epochs = history(out)
    assert [e["epoch"] for e in epochs] == list(range(RESUME_EPOCHS))
    assert epochs[1]["samples_per_rank"] == reference_history[1]["samples_per_rank"]  # the whole epoch, counted once
    assert epochs[1]["distinct_samples"] == reference_history[1]["distinct_samples"]
    assert epochs[1]["loss"] == pytest.approx(reference_history[1]["loss"], rel=1e-5)
    assert same_weights(torch.load(out / "model.pt"), torch.load(reference_weights))


def _kill_rank_after_first_checkpoint(work: Path, out: Path, rank: int, deadline: float) -> int:
    """Wait for the first checkpoint, then SIGKILL the worker of ``rank`` (its pid from its log line)."""
    pattern = re.compile(rf"rank{rank} worker pid (\d+) started")
    while time.monotonic() < deadline:
        log = work / "torchrun.log"
        found = pattern.search(log.read_text()) if log.exists() else None
        if found and (out / "checkpoint.pt").exists():
            pid = int(found.group(1))
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared: nothing to kill")


def launch_killing_rank_1(settings: Settings, storage: Storage, data: object, spec: object, out: Path, work: Path):
    """A launch (run id ``r1``) whose rank-1 worker is SIGKILLed after the first checkpoint; its
    result once the launch ends. Fails if training hangs or the launch raises."""
    result: dict = {}

    def run() -> None:
        try:
            result["run"] = launch(settings, storage, "r1", data, spec, out, work)
        except Exception as exc:  # reported by the assertions below
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    _kill_rank_after_first_checkpoint(work, out, rank=1, deadline=time.monotonic() + 60)
    thread.join(timeout=150)
    assert not thread.is_alive(), "training hung after a worker was killed"
    assert "error" not in result, result.get("error")
    return result["run"]


def test_a_worker_killed_mid_epoch_under_torchrun_max_restarts_1_resumes_from_the_checkpoint(
        tmp_path, reference_run, count_launches):
    """Catches a fault treated as fatal, a restart that starts over, a restarted gloo group that
    cannot connect (torch's shared rendezvous store), and a hang after the kill."""
    data, spec, reference_history, _ = reference_run
    settings = settings_at(tmp_path, **RESUME, max_restarts=1)
    storage = Storage.from_settings(settings)
    out = tmp_path / "out"
    run = launch_killing_rank_1(settings, storage, data, spec, out, tmp_path / "logs")
    # One torchrun, which restarted the group itself.
    assert len(count_launches) == 1 and "--max-restarts=1" in count_launches[0]
    assert run.outcome == OK and [a.number for a in run.attempts] == [1, 2]
    assert 1 in run.attempts[0].silent_ranks and not run.attempts[0].own_errors  # killed: no exception of its own
    # It resumed from the latest checkpoint (one every 10 steps), in the middle of an epoch, not from the start.
    epoch, step, global_step = map(int, RESUMED.search(run.attempts[1].text()).groups())
    assert global_step > 0 and global_step == epoch * STEPS_PER_EPOCH + step and epoch < RESUME_EPOCHS
    epochs = history(out)
    assert [e["epoch"] for e in epochs] == list(range(RESUME_EPOCHS))
    assert epochs[-1]["loss"] == pytest.approx(reference_history[-1]["loss"], rel=1e-4)
    assert storage.exists(storage.uri("runs", "r1", "train", "torchrun.log"))
    assert storage.exists(storage.uri("runs", "r1", "train", "attempt-2", "rank-1", "stderr.log"))
    assert same_weights(torch.load(out / "model.pt"), torch.load(reference_run[3]))


def test_early_stopping_stops_after_patience_epochs_and_publishes_the_best_epochs_weights(tmp_path):
    """Catches a run that ignores patience, keeps the last epoch's weights, or validates on fit rows."""
    data, spec = write_inputs(tmp_path / "in", 600)
    patience = 2
    settings = settings_at(tmp_path, epochs=40, batch_size=32, learning_rate=0.01, patience=patience, validation_fraction=0.2)
    storage = Storage.from_settings(settings)
    launch(settings, storage, "r1", data, spec, tmp_path / "out", tmp_path / "logs")
    epochs = history(tmp_path / "out")
    best = epochs[-1]["best_epoch"]
    figures = [e["validation_pr_auc"] for e in epochs]
    assert len(epochs) == best + patience + 1 < 40  # stopped `patience` epochs after the best one
    assert epochs[-1]["early_stop"] and not any(e["early_stop"] for e in epochs[:-1])
    assert figures[best] == max(figures) and figures.index(max(figures)) == best  # the first best
    # The workers fit on the rows before the validation cut only.
    fit, _ = split_validation(pd.read_parquet(data), 0.2, "ts")
    assert all(e["samples"] == len(fit) for e in epochs)
    # Oracle: the same run cut off at the best epoch ends with that epoch's weights.
    cut = settings_at(tmp_path, epochs=best + 1, batch_size=32, learning_rate=0.01, patience=patience, validation_fraction=0.2)
    launch(cut, storage, "r2", data, spec, tmp_path / "cut", tmp_path / "logs2")
    published, at_best = torch.load(tmp_path / "out" / "model.pt"), torch.load(tmp_path / "cut" / "model.pt")
    assert all(torch.equal(published[name], at_best[name]) for name in at_best)
    last = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["model"]
    assert not all(torch.equal(published[name], last[name]) for name in last)  # not the last epoch's


def test_two_runs_with_the_same_seed_give_identical_weights(tmp_path):
    """Catches unseeded shuffling, initialisation or validation (CPU, gloo, the same nproc)."""
    data, spec = write_inputs(tmp_path / "in", 600)
    settings = settings_at(tmp_path, epochs=3, batch_size=32)
    storage = Storage.from_settings(settings)
    for name in ("a", "b"):
        launch(settings, storage, name, data, spec, tmp_path / name, tmp_path / f"logs-{name}")
    first, second = torch.load(tmp_path / "a" / "model.pt"), torch.load(tmp_path / "b" / "model.pt")
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert history(tmp_path / "a")[-1]["loss"] == history(tmp_path / "b")[-1]["loss"]


def test_the_cpu_path_does_not_autocast_and_a_gpu_one_would_in_bf16():
    from flywheel.training.worker import autocast

    with autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... Disabling autocast" (here, no GPU)
        context = autocast(torch.device("cuda", 0))
    assert isinstance(context, torch.autocast) and context.fast_dtype == torch.bfloat16


def test_the_validation_rows_are_the_end_of_the_training_span_and_never_the_holdout():
    """Catches a random validation draw, one cut from the holdout, or one that overlaps the fit rows."""
    table = transactions(1000).sample(frac=1.0, random_state=0)  # file order is not time order
    train_rows, holdout, _ = split_by_time(table, 0.2, "ts")
    fit, validation = split_validation(train_rows, 0.15, "ts")
    assert len(fit) + len(validation) == len(train_rows)
    assert fit["ts"].max() < validation["ts"].min()
    assert validation["ts"].max() < holdout["ts"].min()
    assert not set(validation["transaction_id"]) & set(holdout["transaction_id"])
    assert len(validation) == pytest.approx(0.15 * len(train_rows), abs=2)
    assert split_validation(train_rows, 0.0, "ts")[1].empty  # 0: no validation, every row fits


def test_a_validation_split_of_rows_at_one_instant_is_refused_with_the_setting_to_change():
    one_instant = transactions(50).assign(ts=pd.Timestamp("2026-10-01T00:00:00Z"))
    with pytest.raises(DataError, match="training.validation_fraction"):
        split_validation(one_instant, 0.15, "ts")
