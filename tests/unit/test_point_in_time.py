"""Feast's point-in-time join on the DuckDB offline store, case by case, against a merge_asof oracle.

Hand-made card and merchant tables (in the offline tables' schema) hold one card per edge case; one
apply and one ``historical_features`` call join them all. The oracle is written here, naively, with
pandas ``merge_asof``; each case also states its expected values by hand.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pandas.testing import assert_frame_equal

from flywheel.config import load_settings
from flywheel.errors import FeatureStoreError
from flywheel.features import oracle as build_oracle
from flywheel.features import store as feast_store
from tests.fraud_tables import CARD_FEATURES, MERCHANT_FEATURES
from tests.factories import FRAUD_CONTRACT, FRAUD_VIEWS, fraud_tables

T0 = pd.Timestamp("2026-10-10 12:00", tz="UTC")
CARDS = list(CARD_FEATURES)
MERCHANTS = list(MERCHANT_FEATURES)


def card_row(card: str, at: pd.Timestamp, value: float, created: pd.Timestamp | None = None) -> dict:
    """A card feature row whose every feature is ``value`` (so a test can tell rows apart)."""
    return {"card_id": card, "event_timestamp": at, "created_timestamp": created if created is not None else at,
            **{name: value for name in CARDS}}


def merchant_row(merchant: str, at: pd.Timestamp, value: float) -> dict:
    return {"merchant_id": merchant, "event_timestamp": at, "created_timestamp": at, **{name: value for name in MERCHANTS}}


def typed(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame = frame.astype({"event_timestamp": "datetime64[us, UTC]", "created_timestamp": "datetime64[us, UTC]"})
    return frame.astype({name: "int64" for name in (*CARDS, *MERCHANTS) if name.endswith(("_1h", "_24h")) and name in frame})


CARD_TABLE = typed([
    card_row("c-after", T0 - pd.Timedelta(hours=2), 1),
    card_row("c-after", T0 + pd.Timedelta(hours=1), 2),  # after the first transaction, equal to the second's time
    card_row("c-ttl", T0 - pd.Timedelta(days=31), 3),  # exactly one 30-day TTL before T0 - 1 day
    card_row("c-tie", T0 - pd.Timedelta(hours=1), 5, created=T0 - pd.Timedelta(minutes=30)),
    card_row("c-tie", T0 - pd.Timedelta(hours=1), 6, created=T0 - pd.Timedelta(minutes=10)),  # created last: wins
    card_row("c-tie", T0 - pd.Timedelta(hours=1), 7, created=T0 - pd.Timedelta(minutes=20)),
    card_row("c-dup", T0 - pd.Timedelta(hours=3), 8),
    card_row("c-new", T0 + pd.Timedelta(hours=5), 9),  # only after its transaction: no row yet
])
MERCHANT_TABLE = typed([
    merchant_row("m-1", T0 - pd.Timedelta(days=1), 10),
    merchant_row("m-1", T0 + pd.Timedelta(hours=3), 11),
    merchant_row("m-2", T0 - pd.Timedelta(days=2), 12),
])
TRANSACTIONS = pd.DataFrame(
    [
        ("after-1", "c-after", "m-1", T0),
        ("after-2", "c-after", "m-1", T0 + pd.Timedelta(hours=1)),  # a row at exactly its time: not yet
        ("after-3", "c-after", "m-1", T0 + pd.Timedelta(hours=1, microseconds=1)),
        ("ttl-1", "c-ttl", "m-2", T0 - pd.Timedelta(days=1) + pd.Timedelta(microseconds=1)),  # as of 1 µs before: TTL old
        ("ttl-2", "c-ttl", "m-2", T0 - pd.Timedelta(days=1) + pd.Timedelta(microseconds=2)),  # 1 µs older than the TTL
        ("ttl-3", "c-ttl", "m-2", T0 + pd.Timedelta(days=2)),
        ("tie-1", "c-tie", "m-1", T0),
        ("dup-1", "c-dup", "m-2", T0),
        ("dup-2", "c-dup", "m-2", T0),  # same card, merchant and time as dup-1
        ("dup-3", "c-dup", "m-2", T0),
        ("new-1", "c-new", "m-1", T0),
        ("new-2", "c-unknown", "m-2", T0),  # a card with no row at all
    ],
    columns=["transaction_id", "card_id", "merchant_id", "ts"],
).astype({"ts": "datetime64[us, UTC]"}).assign(amount=lambda f: np.arange(len(f), dtype="float64"))


def oracle(tx: pd.DataFrame, table: pd.DataFrame, key: str, names: list[str]) -> pd.DataFrame:
    """Naive: per transaction, its entity's latest row strictly before it, newest created on an
    event-time tie, dropped when older than 30 days; written here, not shared with flywheel."""
    left = tx[["transaction_id", key, "ts"]].astype({"ts": "datetime64[ns, UTC]"}).sort_values("ts")
    right = (table.astype({"event_timestamp": "datetime64[ns, UTC]", "created_timestamp": "datetime64[ns, UTC]"})
             .sort_values(["event_timestamp", "created_timestamp"]))
    merged = pd.merge_asof(left, right, left_on="ts", right_on="event_timestamp", by=key,
                           allow_exact_matches=False, tolerance=pd.Timedelta(days=30, microseconds=1))
    return merged.set_index("transaction_id")[names].astype("float64")


def test_the_default_offline_store_is_the_as_of_duckdb_store(tmp_path):
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path)})
    assert settings.features.offline_store == "duckdb-asof"
    assert feast_store.open_store(settings, "w").config.offline_store.type == "flywheel.features.asof_store.AsofDuckDBOfflineStore"


# The store flywheel builds training sets with and Feast's own DuckDB store (a baseline that
# benchmarks/features.py measures): every case holds on both. (Feast's file store fails two: entity
# rows sharing a key and a time lose their values, here after-1, after-2, new-1 and dup-2, dup-3.)
@pytest.fixture(scope="module", params=["duckdb-asof", "duckdb"])
def joined(request, tmp_path_factory) -> pd.DataFrame:
    home = tmp_path_factory.mktemp("pit")
    settings = load_settings(env={"FLYWHEEL_HOME": str(home), "FLYWHEEL_FEATURES__OFFLINE_STORE": request.param})
    CARD_TABLE.to_parquet(home / "card.parquet")
    MERCHANT_TABLE.to_parquet(home / "merchant.parquet")
    store = feast_store.open_store(settings, "pitcases")
    feast_store.apply_definitions(store, FRAUD_VIEWS, fraud_tables(str(home / "card.parquet"), str(home / "merchant.parquet")))
    return feast_store.historical_features(store, TRANSACTIONS, FRAUD_VIEWS, FRAUD_CONTRACT).set_index("transaction_id")


def card_value(joined: pd.DataFrame, transaction: str) -> float:
    values = joined.loc[transaction, CARDS].astype("float64")
    assert values.nunique(dropna=False) == 1, values  # every feature of one row carries the same value
    return values.iloc[0]


def merchant_value(joined: pd.DataFrame, transaction: str) -> float:
    return float(joined.loc[transaction, MERCHANTS[-1]])


def test_whole_join_equals_the_merge_asof_oracle_and_keeps_the_transactions(joined):
    assert list(joined.index) == list(TRANSACTIONS.transaction_id)  # every row, once, in order
    assert_frame_equal(joined[["card_id", "merchant_id", "ts", "amount"]].reset_index(drop=True),
                       TRANSACTIONS.drop(columns="transaction_id"))
    for key, table, names in (("card_id", CARD_TABLE, CARDS), ("merchant_id", MERCHANT_TABLE, MERCHANTS)):
        want = oracle(TRANSACTIONS, table, key, names).loc[joined.index]
        assert_frame_equal(joined[names].astype("float64"), want, check_names=False)


def test_feature_row_after_event_time_is_not_used(joined):
    """Bug caught: a join that uses the latest row overall (leaking the future), or one at the
    transaction's own time (a row that includes the transaction itself)."""
    assert card_value(joined, "after-1") == 1
    assert card_value(joined, "after-2") == 1
    assert card_value(joined, "after-3") == 2
    assert merchant_value(joined, "after-1") == 10 and merchant_value(joined, "after-3") == 10


def test_feature_row_older_than_ttl_gives_null(joined):
    """Bug caught: a join without the view's TTL, feeding a dormant card's months-old state."""
    assert np.isnan(card_value(joined, "ttl-2")) and np.isnan(card_value(joined, "ttl-3"))
    assert merchant_value(joined, "ttl-2") == 12 and merchant_value(joined, "ttl-3") == 12  # within the merchant's TTL
    # The TTL is inclusive: a row exactly 30 days before the as-of time is still used.
    assert card_value(joined, "ttl-1") == 3


def test_equal_timestamps_resolved_by_created_time(joined):
    """Bug caught: a tie on event time broken arbitrarily (or by file order) instead of by the
    row created last, a correction losing to the row it corrects."""
    assert card_value(joined, "tie-1") == 6


def test_entity_rows_sharing_key_and_timestamp_are_all_kept(joined):
    """Bug caught: entity rows deduplicated on (key, time), dropping transactions from the training set."""
    dups = joined.loc[["dup-1", "dup-2", "dup-3"]]
    assert len(dups) == 3
    assert [card_value(joined, t) for t in dups.index] == [8, 8, 8]
    assert list(dups.amount) == [7.0, 8.0, 9.0]


def test_entity_with_no_feature_row_yet_keeps_other_views_values(joined):
    """Bug caught: Feast's file store drops every view's values of an entity row that one view has
    no row for (measured), making new cards look like unknown merchants too."""
    assert np.isnan(card_value(joined, "new-1")) and merchant_value(joined, "new-1") == 10
    assert np.isnan(card_value(joined, "new-2")) and merchant_value(joined, "new-2") == 12


def test_the_builds_oracle_check_passes_the_join_and_catches_a_wrong_value(joined):
    """Bug caught: a sample check that cannot fail, or misses a leaked future value."""
    frame = joined.reset_index()
    assert build_oracle.check_sample(frame, FRAUD_VIEWS, fraud_tables(CARD_TABLE, MERCHANT_TABLE), FRAUD_CONTRACT, rows=len(frame)) == len(frame)
    leaked = frame.copy()
    leaked.loc[leaked.transaction_id == "after-1", CARDS] = 2.0  # the row after its time
    with pytest.raises(FeatureStoreError, match="transaction_id 'after-1' card_txn_count_1h: training set 2.0, oracle 1.0"):
        build_oracle.check_sample(leaked, FRAUD_VIEWS, fraud_tables(CARD_TABLE, MERCHANT_TABLE), FRAUD_CONTRACT, rows=len(frame))
