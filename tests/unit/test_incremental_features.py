"""Incremental feature computation: only days whose inputs changed are computed, and the tables
equal a whole recomputation, frame for frame."""

from __future__ import annotations

import datetime as dt
import shutil

import pandas as pd
import pyarrow as pa
import pytest
from pandas.testing import assert_frame_equal

from flywheel.config import load_settings
from flywheel.features import engine, incremental
from flywheel.features.views import views_of
from flywheel.lake import LakeSnapshot, read_snapshot, snapshot_sha256
from tests.factories import FRAUD_SCHEMA
from flywheel.storage import Storage
from flywheel.usecase import UseCase, load_usecase
from tests import factories
from tests import fraud_tables as compute  # fraud's hand-written tables: a second oracle

USECASE = factories.FRAUD
LOOKBACK = incremental.lookback_days(USECASE)  # 30-day windows and the 3-day label delay: 33 days


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
        table = pa.Table.from_pandas(rows.reset_index(drop=True), schema=FRAUD_SCHEMA, preserve_index=False)
        ref = storage.write_parquet(storage.uri("lake", name, "transactions", f"date={date}", "part-0.parquet"), table)
        parts.append({"uri": ref.uri, "sha256": ref.sha256, "rows": len(rows), "date": date})
    sha = snapshot_sha256([p["sha256"] for p in parts])
    return LakeSnapshot(uri=storage.uri("lake", name, "_snapshots", f"{sha}.json"), sha256=sha, rows=len(tx), parts=parts)


def build(storage: Storage, snapshot: LakeSnapshot, usecase: UseCase = USECASE) -> incremental.DayTables:
    rows = read_snapshot(storage, snapshot, factories.FRAUD_SCHEMA).to_pandas()
    return incremental.feature_tables(storage, rows, snapshot, usecase, run_id="test")


def whole(storage: Storage, snapshot: LakeSnapshot, usecase: UseCase = USECASE) -> dict[str, pd.DataFrame]:
    """The oracle: every feature row computed at once from the whole snapshot, up to its last day."""
    rows = read_snapshot(storage, snapshot, factories.FRAUD_SCHEMA).to_pandas()
    until = pd.Timestamp(max(p["date"] for p in snapshot.parts), tz="UTC") + pd.Timedelta(days=1)
    return {view.name: engine.entity_table(rows, usecase.contract, view.entity, list(view.aggregations), until=until)
            for view in views_of(usecase)}


def assert_tables_equal(got: incremental.DayTables, want: dict[str, pd.DataFrame]) -> None:
    assert set(got.tables) == set(want) == {"card_features", "merchant_features"}
    for name, table in want.items():
        assert_frame_equal(got.tables[name], table, check_exact=True)


def dates(tx: pd.DataFrame) -> list[str]:
    return sorted(tx.ts.dt.strftime("%Y-%m-%d").unique())


def test_a_new_day_computes_only_that_day_and_equals_a_whole_recomputation(storage, transactions):
    all_dates = dates(transactions)
    first = build(storage, snapshot_of(storage, transactions[transactions.ts.dt.strftime("%Y-%m-%d") < all_dates[-1]], "a"))
    assert first.reused == [] and first.computed == all_dates[:-1]
    later = snapshot_of(storage, transactions, "b")
    second = build(storage, later)
    assert second.computed == all_dates[-1:] and second.reused == all_dates[:-1]
    assert_tables_equal(second, whole(storage, later))
    # At each transaction the card table is also what the hand-written card table was (compute.py: a
    # second oracle, which has no rows for transactions leaving windows).
    rows = read_snapshot(storage, later, factories.FRAUD_SCHEMA).to_pandas()
    card, hand = second.tables["card_features"], compute.card_feature_table(rows)
    at_transactions = pd.MultiIndex.from_frame(card[["card_id", "event_timestamp"]]).isin(
        pd.MultiIndex.from_frame(hand[["card_id", "event_timestamp"]]))
    assert at_transactions.sum() == len(hand) < len(card)
    assert_frame_equal(card[at_transactions].reset_index(drop=True), hand, check_exact=False, rtol=1e-12)


def test_no_row_is_stamped_after_the_lakes_last_day(storage, transactions):
    """Bug caught: a label that becomes known after the lake's present (a chargeback due in three
    days) written as a row of the future, which the online store would serve before it is true."""
    snapshot = snapshot_of(storage, transactions, "a")
    last = pd.Timestamp(dates(transactions)[-1], tz="UTC") + pd.Timedelta(days=1)
    for table in build(storage, snapshot).tables.values():
        assert table[engine.EVENT_TIMESTAMP].max() < last


def test_a_day_without_events_still_gets_the_labels_that_arrive_on_it(storage, transactions):
    gap = dates(transactions)[20]
    holed = transactions[transactions.ts.dt.strftime("%Y-%m-%d") != gap]
    snapshot = snapshot_of(storage, holed, "a")
    built = build(storage, snapshot)
    assert gap in built.computed
    merchant = built.tables["merchant_features"]
    assert (merchant[engine.EVENT_TIMESTAMP].dt.strftime("%Y-%m-%d") == gap).any()
    assert_tables_equal(built, whole(storage, snapshot))


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
    assert_tables_equal(again, whole(storage, snapshot))


def test_a_changed_use_case_reuses_nothing(storage, transactions, tmp_path):
    """A longer label delay in the contract shapes every merchant row: nothing stored may be reused."""
    snapshot = snapshot_of(storage, transactions[transactions.ts < "2026-09-08"], "a")
    build(storage, snapshot)
    folder = tmp_path / "fraud"
    shutil.copytree(factories.REPO / "usecases" / "fraud", folder)
    contract = folder / "contract.yaml"
    contract.write_text(contract.read_text().replace("label_known: {delay: P3D}", "label_known: {delay: P5D}"))
    slower = load_usecase(folder)
    assert slower.contract.label_known.delay == dt.timedelta(days=5)
    other = build(storage, snapshot, slower)
    assert other.reused == []
    assert_tables_equal(other, whole(storage, snapshot, slower))


def test_a_stored_day_that_changed_on_disk_is_refused(storage, transactions):
    snapshot = snapshot_of(storage, transactions[transactions.ts < "2026-09-08"], "a")
    build(storage, snapshot)
    key = incremental.day_keys(snapshot, USECASE)[dates(transactions)[5]]
    uri = f"{incremental.day_uri(storage, key)}/card_features.parquet"
    storage.write_bytes(uri, storage.read_bytes(uri) + b"x")
    with pytest.raises(Exception, match="sha256 mismatch"):
        build(storage, snapshot)
