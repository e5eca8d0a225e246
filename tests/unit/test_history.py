"""The replay's reader (flywheel/features/history.py): each request's features as of its own time,
from the engine's rows held in memory, must be exactly what the training join gives the same row.
Checked against the merge_asof oracle (flywheel/features/oracle.py, pandas' own as-of join) on
random tables: ties, rows at the request's very time, the TTL's edge, unknown entities, no time."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from flywheel.errors import DataError
from flywheel.features.history import PointInTimeReader, open_replay_reader, write_replay_tables
from flywheel.features.oracle import as_of_join
from flywheel.features.views import View
from flywheel.storage import Storage

TTL = dt.timedelta(hours=2)
VIEW = View("thing_features", "thing", "thing_id", "string", {"thing_count": "Int64", "thing_mean": "Float64",
                                                              "thing_last": "String"}, (), TTL)
START = pd.Timestamp("2026-01-01", tz="UTC")


def random_table(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = 400
    minutes = rng.integers(0, 600, n)
    minutes[:40] = minutes[40:80]  # ties: two rows of one key at one instant, told apart by their creation
    times = START + pd.to_timedelta(minutes, unit="min")
    return pd.DataFrame({
        "thing_id": rng.choice(["a", "b", "c", "d", "e"], n).astype(object),
        "event_timestamp": times.astype("datetime64[us, UTC]"),
        "created_timestamp": (times + pd.to_timedelta(rng.integers(0, 5, n), unit="s")).astype("datetime64[us, UTC]"),
        "thing_count": rng.integers(0, 9, n).astype("int64"),
        "thing_mean": np.where(rng.random(n) < 0.1, np.nan, rng.normal(size=n)),
        "thing_last": rng.choice(["x", "y", None], n).astype(object),
    })


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_request_reads_what_the_training_join_reads_for_it(seed):
    table = random_table(seed)
    rng = np.random.default_rng(100 + seed)
    # Requests at random minutes, exactly at rows' instants, a microsecond after, and exactly at the TTL's edge.
    at = list(START + pd.to_timedelta(rng.integers(-30, 800, 200), unit="min"))
    at += list(table["event_timestamp"].iloc[:60]) + list(table["event_timestamp"].iloc[:30] + pd.Timedelta(microseconds=1))
    at += list(table["event_timestamp"].iloc[:30] + TTL) + list(table["event_timestamp"].iloc[:30] + TTL + pd.Timedelta(microseconds=1))
    keys = list(rng.choice(["a", "b", "c", "d", "e", "unknown"], len(at)))
    rows = pd.DataFrame({"thing_id": keys, "ts": pd.to_datetime(at, utc=True)})

    features, known = PointInTimeReader([VIEW], {VIEW.name: table}).read(
        {"thing_id": keys}, at=rows["ts"].to_numpy(dtype="datetime64[us]"))

    want = as_of_join(rows, table, "thing_id", list(VIEW.features), "ts", pd.Timedelta(TTL))
    np.testing.assert_array_equal(features["thing_count"], want["thing_count"].to_numpy(dtype=float, na_value=np.nan))
    np.testing.assert_array_equal(features["thing_mean"], want["thing_mean"].to_numpy(dtype=float, na_value=np.nan))
    assert list(features["thing_last"]) == ["" if pd.isna(v) else v for v in want["thing_last"]]
    np.testing.assert_array_equal(known["thing_id"], want["thing_count"].notna().to_numpy())
    assert not known["thing_id"][[k == "unknown" for k in keys]].any()
    assert known["thing_id"].sum() > 100 and (~known["thing_id"]).sum() > 10  # both cases occur


def test_a_row_at_the_requests_own_time_is_not_read_and_one_a_microsecond_before_is():
    table = pd.DataFrame({"thing_id": ["a", "a"], "event_timestamp": pd.to_datetime(["2026-01-01 10:00", "2026-01-01 11:00"], utc=True),
                          "thing_count": [1, 2], "thing_mean": [0.5, 0.7], "thing_last": ["x", "y"]})
    table["created_timestamp"] = table["event_timestamp"]
    reader = PointInTimeReader([VIEW], {VIEW.name: table})
    at = pd.to_datetime(["2026-01-01 11:00", "2026-01-01 11:00:00.000001", "2026-01-01 13:00:00.000001",
                         "2026-01-01 13:00:00.000002", "2026-01-01 09:00"], utc=True, format="ISO8601").to_numpy(dtype="datetime64[us]")
    features, known = reader.read({"thing_id": ["a"] * 5}, at=at)
    # At 11:00 the 11:00 row is the request's own moment: the 10:00 row. 13:00:00.000001 is the TTL's
    # edge of the 11:00 row (as of a microsecond before: exactly two hours), one microsecond later it is gone.
    np.testing.assert_array_equal(features["thing_count"], [1, 2, 2, np.nan, np.nan])
    assert list(known["thing_id"]) == [True, True, True, False, False]
    latest, _ = reader.read({"thing_id": ["a"]}, at=None)  # no time: the latest row, as the online store holds
    assert latest["thing_count"][0] == 2


def test_written_tables_are_read_back_for_their_version_only(tmp_path):
    storage = Storage(str(tmp_path))
    folder = write_replay_tables(storage, str(tmp_path / "replay" / "v1"), {VIEW.name: random_table(0)}, "v1")
    reader = open_replay_reader(storage, folder, [VIEW], "v1")
    features, _ = reader.read({"thing_id": ["a"]}, at=np.array([np.datetime64("2026-01-02T00:00")], dtype="datetime64[us]"))
    assert features["thing_count"].shape == (1,)
    with pytest.raises(DataError, match="version v1's, not v2's"):
        open_replay_reader(storage, folder, [VIEW], "v2")
    with pytest.raises(DataError, match="holds no replay tables"):
        open_replay_reader(storage, str(tmp_path / "nowhere"), [VIEW], "v1")
