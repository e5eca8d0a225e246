"""Incremental feature computation: only days whose inputs changed are computed, and the tables
equal a whole recomputation, frame for frame."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pyarrow as pa
import pytest
from pandas.testing import assert_frame_equal

from flywheel.config import load_settings
from flywheel.features import compute, incremental
from flywheel.lake import LakeSnapshot, read_snapshot, snapshot_sha256
from flywheel.schema import TRANSACTION_SCHEMA
from flywheel.storage import Storage
from tests import factories

USECASE = factories.FRAUD
DELAY = dt.timedelta(days=3)
LOOKBACK = compute.lookback_days(DELAY)  # 33 days


@pytest.fixture
def storage(tmp_path) -> Storage:
    return Storage.from_settings(load_settings(env={"FLYWHEEL_HOME": str(tmp_path)}))


@pytest.fixture(scope="module")
def transactions() -> pd.DataFrame:
    """45 days (more than the 33-day lookback) of a few cards and merchants, a fraud every 9th row."""
    return factories.make_transactions(450, seed=3, start="2026-09-01", days=45, cards=8, merchants=3, in_time_order=True, fraud_every=9)


def snapshot_of(storage: Storage, tx: pd.DataFrame, name: str) -> LakeSnapshot:
    """A published-looking lake snapshot holding ``tx``, one part per UTC date (as ingest lays it out)."""
    parts = []
    for date, rows in tx.groupby(tx.ts.dt.strftime("%Y-%m-%d"), sort=True):
        table = pa.Table.from_pandas(rows.reset_index(drop=True), schema=TRANSACTION_SCHEMA, preserve_index=False)
        ref = storage.write_parquet(storage.uri("lake", name, "transactions", f"date={date}", "part-0.parquet"), table)
        parts.append({"uri": ref.uri, "sha256": ref.sha256, "rows": len(rows), "date": date})
    sha = snapshot_sha256([p["sha256"] for p in parts])
    return LakeSnapshot(uri=storage.uri("lake", name, "_snapshots", f"{sha}.json"), sha256=sha, rows=len(tx), parts=parts)


def build(storage: Storage, snapshot: LakeSnapshot, delay: dt.timedelta = DELAY) -> incremental.DayTables:
    rows = read_snapshot(storage, snapshot, factories.FRAUD_SCHEMA).to_pandas()
    return incremental.feature_tables(storage, rows, snapshot, delay, run_id="test", usecase_digest=USECASE.digest)


def whole(storage: Storage, snapshot: LakeSnapshot, delay: dt.timedelta = DELAY) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The oracle: every feature row computed at once from the whole snapshot."""
    rows = read_snapshot(storage, snapshot, factories.FRAUD_SCHEMA).to_pandas()
    return compute.card_feature_table(rows), compute.merchant_feature_table(rows, delay)


def dates(tx: pd.DataFrame) -> list[str]:
    return sorted(tx.ts.dt.strftime("%Y-%m-%d").unique())


def test_a_new_day_computes_only_that_day_and_equals_a_whole_recomputation(storage, transactions):
    all_dates = dates(transactions)
    first = build(storage, snapshot_of(storage, transactions[transactions.ts.dt.strftime("%Y-%m-%d") < all_dates[-1]], "a"))
    assert first.reused == [] and first.computed == all_dates[:-1]
    later = snapshot_of(storage, transactions, "b")
    second = build(storage, later)
    assert second.computed == all_dates[-1:] and second.reused == all_dates[:-1]
    card, merchant = whole(storage, later)
    assert_frame_equal(second.card, card, check_exact=True)
    assert_frame_equal(second.merchant, merchant, check_exact=True)


def test_a_changed_earlier_day_recomputes_every_day_whose_lookback_reaches_it(storage, transactions):
    """Bug caught: a stale reuse, a day's rows kept after a part in its lookback changed (a late
    label, a corrected amount), so they no longer equal what the lake says."""
    all_dates = dates(transactions)
    build(storage, snapshot_of(storage, transactions, "a"))
    changed_date = all_dates[5]
    changed = transactions.copy()
    on_that_day = changed.index[changed.ts.dt.strftime("%Y-%m-%d") == changed_date]
    changed.loc[on_that_day, "is_fraud"] = 1  # labels that arrived late for that day
    changed.loc[on_that_day, "amount"] *= 3
    snapshot = snapshot_of(storage, changed, "b")
    again = build(storage, snapshot)
    horizon = (dt.date.fromisoformat(changed_date) + dt.timedelta(days=LOOKBACK)).isoformat()
    assert again.computed == [d for d in all_dates if changed_date <= d <= horizon]
    assert again.reused == [d for d in all_dates if d < changed_date or d > horizon] and again.reused
    card, merchant = whole(storage, snapshot)
    assert_frame_equal(again.card, card, check_exact=True)
    assert_frame_equal(again.merchant, merchant, check_exact=True)


def test_a_changed_label_delay_reuses_nothing(storage, transactions):
    snapshot = snapshot_of(storage, transactions[transactions.ts < "2026-09-08"], "a")
    build(storage, snapshot)
    other = build(storage, snapshot, dt.timedelta(days=5))
    assert other.reused == []
    assert_frame_equal(other.merchant, whole(storage, snapshot, dt.timedelta(days=5))[1], check_exact=True)


def test_a_stored_day_that_changed_on_disk_is_refused(storage, transactions):
    snapshot = snapshot_of(storage, transactions[transactions.ts < "2026-09-08"], "a")
    build(storage, snapshot)
    key = incremental.day_keys(snapshot, DELAY, usecase_digest=USECASE.digest)[dates(transactions)[5]]
    uri = f"{incremental.day_uri(storage, key)}/card_features.parquet"
    storage.write_bytes(uri, storage.read_bytes(uri) + b"x")
    with pytest.raises(Exception, match="sha256 mismatch"):
        build(storage, snapshot)
