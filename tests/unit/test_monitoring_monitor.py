"""The monitor's own rules, hermetic: how skew is counted feature by feature, when a realised metric
is judged and when it crosses, and how a capture window is read."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from flywheel.config import MonitoringSettings
from flywheel.monitoring import performance
from flywheel.monitoring.capture import capture_parts, part_uri, read_capture
from flywheel.monitoring.monitor import MIN_CLASS_ROWS, _limit, _realised
from flywheel.monitoring.skew import compare_feature
from flywheel.storage import Storage


def test_skew_counts_mismatch_missing_and_extra_separately():
    online = np.array([1.0, 2.0, np.nan, 4.0, 5.0000001, np.nan])
    offline = np.array([1.0, 2.5, 3.0, np.nan, 5.0, np.nan])
    mismatch, missing, extra = compare_feature(online, offline)
    assert mismatch.tolist() == [False, True, False, False, False, False]  # 5.0000001 is float rounding, not skew
    assert missing.tolist() == [False, False, True, False, False, False]
    assert extra.tolist() == [False, False, False, True, False, False]


def test_skew_of_text_features_treats_empty_as_absent():
    online = np.array(["grocery", "", "travel", "gas"], dtype=object)
    offline = np.array(["grocery", "gas", "", "crypto"], dtype=object)
    mismatch, missing, extra = compare_feature(online, offline)
    assert (mismatch.tolist(), missing.tolist(), extra.tolist()) == (
        [False, False, False, True], [False, True, False, False], [False, False, True, False])


def calibrated(rows: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = rng.beta(1, 30, rows)
    labels = (rng.random(rows) < np.clip(scores + shift, 0, 1)).astype(float)
    return scores, labels


def test_a_realised_pr_auc_from_too_few_positives_is_shown_never_judged():
    scores, labels = calibrated(600, 1)
    assert labels.sum() < MIN_CLASS_ROWS
    out = _realised(performance.realised_binary, "pr_auc", True, 0.99, scores, labels, MonitoringSettings())
    assert out["judged"] is False and "positives" in out["why"] and "crossed" not in out


def test_a_realised_metric_crosses_only_when_its_whole_interval_is_past_the_limit():
    """Bug caught: a noisy day (its point estimate under the limit, its interval across it) retraining
    a model."""
    scores, labels = calibrated(20_000, 2)
    value = performance.realised_binary(scores, labels)["pr_auc"]
    cfg = MonitoringSettings()
    inside = _realised(performance.realised_binary, "pr_auc", True, value * 1.02, scores, labels, cfg)
    assert inside["judged"] and inside["realised"] < value * 1.02 and not inside["crossed"]
    low, high = inside["interval"]
    assert low < value < high
    beyond = _realised(performance.realised_binary, "pr_auc", True, high * 1.01, scores, labels, cfg)
    assert beyond["crossed"]
    # Lower is better for an error: the interval must lie above the limit.
    preds, truth = np.zeros(500), np.full(500, 20.0)
    mae = _realised(performance.realised_regression, "mae", False, _limit(10.0, False, 0.1), preds, truth, cfg)
    assert mae["realised"] == 20.0 and mae["crossed"]


def part(rows: int, start: dt.datetime, version: str = "v1") -> pa.Table:
    times = pa.array([start + dt.timedelta(minutes=i) for i in range(rows)], pa.timestamp("us", "UTC"))
    return pa.table({"request_id": [f"r{i}" for i in range(rows)], "captured_at": times, "model_version": [version] * rows,
                     "row_time": times, "output.score": np.linspace(0, 1, rows)})


def test_a_window_reads_only_its_hours_and_rows(tmp_path):
    storage = Storage(str(tmp_path), None)
    day = dt.datetime(2026, 10, 18, tzinfo=dt.timezone.utc)
    for hour in (0, 1, 23):
        when = day + dt.timedelta(hours=hour)
        storage.write_parquet(part_uri(storage, when, "part-1.parquet"), part(60, when))
    storage.write_bytes(f"{tmp_path}/monitoring/capture/date=2026-10-18/hour=00/_tmp.parquet", b"half")  # never read
    since, until = day + dt.timedelta(minutes=30), day + dt.timedelta(hours=1, minutes=10)
    assert len(capture_parts(storage, since, until)) == 2
    table = read_capture(storage, since, until)
    assert table.num_rows == 30 + 10
    assert min(table["row_time"].to_pylist()) == since


@pytest.mark.parametrize("higher,expected", [(True, 0.45), (False, 0.55)])
def test_the_limit_moves_against_the_metric(higher, expected):
    assert _limit(0.5, higher, 0.1) == pytest.approx(expected)
