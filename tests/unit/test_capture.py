"""The capture's bounded queue and writer thread, and its Parquet parts (serving/capture.py,
flywheel/monitoring/capture.py): a stalled writer never blocks the request path, a full queue
drops and counts, a failing write counts and says why, closing writes what waits."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from flywheel.monitoring.capture import capture_parts, capture_table, input_array, read_capture, write_parts
from flywheel.storage import Storage
from serving import metrics
from serving.capture import CaptureQueue


def counted(outcome: str) -> float:
    return metrics.CAPTURE_ROWS.labels(outcome)._value.get()


def test_a_stalled_writer_drops_and_counts_without_blocking_the_offer():
    release, taken = threading.Event(), []

    def stalled(items, closing):
        if items:
            taken.append(items)
            release.wait(10)
        return sum(rows for rows in items), 0

    before = {o: counted(o) for o in ("queued", "dropped", "written")}
    queue = CaptureQueue(stalled, max_rows=10, batch_rows=4, drain_s=0.01)
    try:
        assert queue.offer(4, 4)
        deadline = time.monotonic() + 5
        while not taken and time.monotonic() < deadline:
            time.sleep(0.01)
        assert taken == [[4]], "the writer took the first batch and is stuck writing it"
        slowest, outcomes = 0.0, []
        for _ in range(5):
            started = time.perf_counter()
            outcomes.append(queue.offer(3, 3))
            slowest = max(slowest, time.perf_counter() - started)
        # 4 rows being written + 3 + 3 = 10: the bound counts rows until the sink took them.
        assert outcomes == [True, True, False, False, False]
        assert slowest < 0.01, f"an offer took {slowest * 1000:.1f} ms while the writer was stuck"
        assert counted("dropped") - before["dropped"] == 9
        assert counted("queued") - before["queued"] == 10
        release.set()
    finally:
        release.set()
        queue.close()
    assert counted("written") - before["written"] == 10
    assert queue.pending_rows == 0


def test_a_failing_write_counts_its_rows_failed_and_logs_the_cause(caplog):
    def broken(items, closing):
        if items:
            raise OSError("disk on fire")
        return 0, 0

    before = counted("failed")
    queue = CaptureQueue(broken, max_rows=100, batch_rows=100, drain_s=60)
    with caplog.at_level(logging.ERROR, logger="serving.capture"):
        queue.offer("x", 7)
        queue.close()
    assert counted("failed") - before == 7
    assert "7 rows were not written: OSError: disk on fire" in caplog.text
    assert queue.pending_rows == 0, "failed rows leave the queue: never retried forever"


def test_close_writes_what_waits_before_the_flush_interval():
    taken, written = [], []

    def sink(items, closing):
        taken.extend(items)
        if closing:
            written.extend(taken)
            return len(taken), 0
        return 0, 0

    queue = CaptureQueue(sink, max_rows=100, batch_rows=100, drain_s=3600)
    queue.offer("a", 1)
    queue.offer("b", 1)
    queue.close()
    assert written == ["a", "b"]
    assert not queue.offer("c", 1), "a closed queue takes nothing"


def test_batches_hold_at_most_batch_rows():
    batches = []
    queue = CaptureQueue(lambda items, closing: (batches.append(list(items)), (sum(items), 0))[1], max_rows=1000, batch_rows=5, drain_s=3600)
    for _ in range(6):
        queue.offer(2, 2)
    queue.close()
    taken = [sum(batch) for batch in batches if batch]
    assert sum(taken) == 12 and max(taken) <= 5, taken


def test_inputs_are_typed_as_the_layout_says():
    assert input_array(np.array([1.5, np.nan]), "number").to_pylist() == [1.5, None]
    integers = input_array(np.array([3.0, np.nan]), "integer")
    assert integers.type == pa.int64() and integers.to_pylist() == [3, None]
    flags = input_array(np.array([1.0, 0.0, np.nan]), "bool")
    assert flags.type == pa.bool_() and flags.to_pylist() == [True, False, None]
    times = input_array(np.array(["2026-11-01T12:00:00", "NaT"], dtype="datetime64[ns]"), "timestamp")
    assert times.type == pa.timestamp("us", "UTC")
    assert times.to_pylist() == [dt.datetime(2026, 11, 1, 12, tzinfo=dt.timezone.utc), None]
    assert input_array(np.array(["a", ""], dtype=object), "string", empty_is_null=True).to_pylist() == ["a", None]
    assert input_array(np.array(["a", ""], dtype=object), "string").to_pylist() == ["a", ""]


def test_parts_are_partitioned_by_the_rows_own_hour_and_read_back(tmp_path):
    storage = Storage(str(tmp_path))
    times = np.array(["2026-11-01T12:59:59", "2026-11-01T13:00:00", "2026-11-01T12:00:00"], dtype="datetime64[ns]")
    now = np.full(3, np.datetime64("2026-12-08T01:00:00", "ns"))
    table = capture_table(
        request_ids=np.array(["r1", "r2", "r2"], dtype=object), captured_at=now, model_version="v7", row_time=times,
        inputs={"amount": input_array(np.array([1.0, 2.0, 3.0]), "number")},
        features={"card_count_1h": np.array([1.0, np.nan, 2.0]), "merchant_category": np.array(["a", "", "b"], dtype=object)},
        known={"card_id": np.array([True, False, True])}, outputs={"fraud_probability": np.array([0.1, 0.2, 0.3], dtype=np.float32)},
    )
    uris = write_parts(storage, table)
    assert len(uris) == 2 and {uri.split("/")[-3:-1] == ["date=2026-11-01", "hour=12"] for uri in uris} == {True, False}
    assert all(uri.rsplit("/", 1)[1].startswith("part-") and uri.endswith(".parquet") for uri in uris)
    assert len(capture_parts(storage)) == 2
    hour = read_capture(storage, since=dt.datetime(2026, 11, 1, 12, tzinfo=dt.timezone.utc),
                        until=dt.datetime(2026, 11, 1, 13, tzinfo=dt.timezone.utc))
    assert sorted(hour["input.amount"].to_pylist()) == [1.0, 3.0]
    everything = read_capture(storage)
    assert everything.schema.field("captured_at").type == pa.timestamp("us", "UTC")
    assert everything.schema.field("output.fraud_probability").type == pa.float64()
    features = everything["feature.card_count_1h"]
    assert features.null_count == 0 and sum(np.isnan(v) for v in features.to_pylist()) == 1, "an unknown entity's feature is NaN, not null"
