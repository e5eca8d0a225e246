"""Feature computation and Feast's point-in-time join, checked against naive oracles."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from pandas.testing import assert_frame_equal

from flywheel.config import load_settings
from flywheel.features.build import materialize_window, split_by_time
from flywheel.features import store as feast_store
from tests.fraud_tables import CARD_FEATURES, MERCHANT_FEATURES
from tests import factories
from tests.factories import FRAUD_CONTRACT, FRAUD_VIEWS, fraud_tables
from tests import fraud_tables as compute  # fraud's hand-written tables: a second oracle


def make_transactions(n: int = 600, cards: int = 12, merchants: int = 5, days: int = 6, seed: int = 0) -> pd.DataFrame:
    return factories.make_transactions(n, seed=seed, days=days, cards=cards, merchants=merchants, in_time_order=True)


LABEL_DELAY = pd.Timedelta(days=3)  # the setting's default


def oracle_card_features(tx: pd.DataFrame) -> pd.DataFrame:
    """Naive: for each transaction, aggregate the card's transactions in the trailing windows, itself included."""
    rows = []
    for _, row in tx.iterrows():
        same = tx[tx.card_id == row.card_id]
        def window(delta):
            return same[(same.ts > row.ts - delta) & (same.ts <= row.ts)]
        w30 = window(pd.Timedelta(days=30))
        rows.append(
            {
                "card_id": row.card_id,
                "event_timestamp": row.ts,
                "card_txn_count_1h": len(window(pd.Timedelta(hours=1))),
                "card_txn_count_24h": len(window(pd.Timedelta(hours=24))),
                "card_txn_count_7d": len(window(pd.Timedelta(days=7))),
                "card_amount_mean_30d": w30.amount.mean(),
                "card_amount_std_30d": w30.amount.std() if len(w30) > 1 else 0.0,
                "card_lat_mean_30d": w30.lat.mean(),
                "card_lon_mean_30d": w30.lon.mean(),
                "card_distinct_merchants_24h": window(pd.Timedelta(hours=24)).merchant_id.nunique(),
                "card_last_txn_unix": row.ts.timestamp(),
            }
        )
    return pd.DataFrame(rows)


def oracle_merchant_features(tx: pd.DataFrame, label_delay: pd.Timedelta) -> pd.DataFrame:
    """Naive: per transaction, the merchant's trailing windows, and its fraud rate over the labels of
    transactions at least ``label_delay`` old, within 30 days before that horizon."""
    rows = []
    for _, row in tx.iterrows():
        same = tx[tx.merchant_id == row.merchant_id]
        day = same[(same.ts > row.ts - pd.Timedelta(hours=24)) & (same.ts <= row.ts)]
        month = same[(same.ts > row.ts - pd.Timedelta(days=30)) & (same.ts <= row.ts)]
        horizon = row.ts - label_delay
        known = same[(same.ts <= horizon) & (same.ts > horizon - pd.Timedelta(days=30))]
        rows.append(
            {
                "merchant_id": row.merchant_id,
                "event_timestamp": row.ts,
                "merchant_txn_count_24h": len(day),
                "merchant_amount_mean_30d": month.amount.mean(),
                "merchant_labelled_count_30d": len(known),
                "merchant_fraud_rate_30d": known.is_fraud.mean() if len(known) else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def test_card_features_match_naive_windows():
    tx = make_transactions(300, days=12, merchants=4)
    got = compute.card_feature_table(tx).sort_values(["card_id", "event_timestamp"]).reset_index(drop=True)
    assert (got.pop("created_timestamp") == got["event_timestamp"]).all()
    want = oracle_card_features(tx).sort_values(["card_id", "event_timestamp"]).reset_index(drop=True)
    assert want.card_txn_count_7d.nunique() > 5 and (want.card_distinct_merchants_24h < want.card_txn_count_24h).any()
    assert_frame_equal(got, want, check_dtype=False, atol=1e-6)


def test_distinct_merchants_count_each_merchant_once_and_forget_it_after_24_hours():
    at = pd.Timestamp("2026-10-01", tz="UTC")
    hours = [0, 1, 2, 3, 20, 26]
    tx = pd.DataFrame({
        "card_id": "c1", "merchant_id": ["m1", "m2", "m1", "m3", "m1", "m1"],
        "ts": [at + pd.Timedelta(hours=h) for h in hours], "amount": 10.0, "lat": 0.0, "lon": 0.0,
    })
    table = compute.card_feature_table(tx)
    # At 26h the window (2h, 26h] holds m1 (20h, 26h) and m3 (3h): m2 (1h) has left it.
    assert table.card_distinct_merchants_24h.tolist() == [1, 2, 2, 3, 3, 2]


def test_merchant_features_match_naive_windows():
    """Bugs caught: a daily count instead of a trailing 24 hours, a fraud rate that reads labels
    newer than the delay allows (or a window anchored at the row instead of the label horizon)."""
    tx = factories.make_transactions(400, seed=1, days=40, cards=30, merchants=4, in_time_order=True, fraud_every=7)
    table = compute.merchant_feature_table(tx, LABEL_DELAY)
    assert list(table.columns) == ["merchant_id", "event_timestamp", "created_timestamp", *MERCHANT_FEATURES]
    got = table.sort_values(["merchant_id", "event_timestamp"]).reset_index(drop=True)
    assert (got.pop("created_timestamp") == got["event_timestamp"]).all()
    want = oracle_merchant_features(tx, LABEL_DELAY).sort_values(["merchant_id", "event_timestamp"]).reset_index(drop=True)
    assert want.merchant_fraud_rate_30d.isna().any() and want.merchant_fraud_rate_30d.nunique() > 10
    assert_frame_equal(got, want, check_dtype=False, atol=1e-9)


def test_fraud_label_inside_the_delay_is_never_used():
    """A fraud whose transaction is within the label delay of a row's time changes nothing in that
    row (its label was not known yet: using it is leakage); moved just outside the delay, it counts."""
    at = pd.Timestamp("2026-10-10", tz="UTC")
    def merchant_rate(fraud_at: pd.Timestamp) -> float:
        tx = pd.DataFrame({
            "merchant_id": "m1",
            "ts": [at - pd.Timedelta(days=d) for d in (20, 10, 5)] + [fraud_at, at],
            "amount": 10.0, "is_fraud": [0, 0, 0, 1, 0],
        })
        table = compute.merchant_feature_table(tx, LABEL_DELAY)
        return table.set_index("event_timestamp").loc[at, "merchant_fraud_rate_30d"]

    inside = merchant_rate(at - LABEL_DELAY + pd.Timedelta(minutes=1))
    assert inside == 0.0  # three known labels, none fraud: the fraud's label is still to come
    outside = merchant_rate(at - LABEL_DELAY - pd.Timedelta(minutes=1))
    assert outside == pytest.approx(1 / 4)


def test_transactions_of_a_card_at_one_instant_give_one_row_with_all_of_them():
    """Bug caught: two feature rows at one event time, the first counting only part of the instant:
    which one a join or the online store picks is then arbitrary."""
    tx = make_transactions(40, cards=2)
    tx.loc[5, ["card_id", "ts"]] = tx.loc[4, ["card_id", "ts"]].to_numpy()
    table = compute.card_feature_table(tx)
    assert not table.duplicated(["card_id", "event_timestamp"]).any()
    got = table[(table.card_id == tx.card_id[4]) & (table.event_timestamp == tx.ts[4])]
    naive = oracle_card_features(tx)
    want = naive[(naive.card_id == tx.card_id[4]) & (naive.event_timestamp == tx.ts[4])].iloc[[0]]
    assert want.card_txn_count_1h.iloc[0] >= 2
    assert_frame_equal(got.drop(columns="created_timestamp").reset_index(drop=True), want.reset_index(drop=True),
                       check_dtype=False, atol=1e-6)


@pytest.fixture(scope="module")
def feast_join(tmp_path_factory):
    """Apply the real feature views to Feast (SQLite online store) and run the point-in-time join."""
    home = tmp_path_factory.mktemp("feast")
    settings = load_settings(env={"FLYWHEEL_HOME": str(home)})
    tx = make_transactions()
    card_table, merchant_table = compute.card_feature_table(tx), compute.merchant_feature_table(tx, LABEL_DELAY)
    card_table.to_parquet(home / "card.parquet")
    merchant_table.to_parquet(home / "merchant.parquet")
    store = feast_store.open_store(settings, "testworld")
    feast_store.apply_definitions(store, FRAUD_VIEWS, fraud_tables(str(home / "card.parquet"), str(home / "merchant.parquet")))
    joined = feast_store.historical_features(store, tx, FRAUD_VIEWS, FRAUD_CONTRACT, chunk_rows=250)
    return tx, card_table, merchant_table, joined, store


def oracle_join(tx: pd.DataFrame, table: pd.DataFrame, key: str, columns: list[str]) -> pd.DataFrame:
    """pandas merge_asof: the latest feature row strictly before each transaction, within 30 days."""
    left = tx[["transaction_id", key, "ts"]].sort_values("ts").astype({"ts": "datetime64[ns, UTC]"})
    right = table.sort_values("event_timestamp").astype({"event_timestamp": "datetime64[ns, UTC]"})
    merged = pd.merge_asof(
        left, right, left_on="ts", right_on="event_timestamp", by=key,
        allow_exact_matches=False, tolerance=pd.Timedelta(days=30),
    )
    return merged.set_index("transaction_id")[columns].sort_index()


def test_point_in_time_join_matches_merge_asof_oracle(feast_join):
    tx, card_table, merchant_table, joined, _ = feast_join
    got = joined.set_index("transaction_id").sort_index()
    for key, table, columns in (
        ("card_id", card_table, list(CARD_FEATURES)),
        ("merchant_id", merchant_table, list(MERCHANT_FEATURES)),
    ):
        want = oracle_join(tx, table, key, columns)
        assert_frame_equal(got[columns].astype("float64"), want.astype("float64"), check_names=False, atol=1e-6)


def test_join_keeps_every_transaction_once_and_its_fields(feast_join):
    tx, _, _, joined, _ = feast_join
    assert len(joined) == len(tx)
    assert joined.transaction_id.is_unique
    assert_frame_equal(joined[tx.columns].reset_index(drop=True), tx.reset_index(drop=True))


def test_own_transaction_is_not_in_its_features(feast_join):
    tx, _, _, joined, _ = feast_join
    # The card's last-use time seen by a transaction is always strictly before it.
    seen = joined.dropna(subset=["card_last_txn_unix"])
    assert (seen.card_last_txn_unix < (seen.ts - pd.Timestamp(0, tz="UTC")).dt.total_seconds()).all()


def test_feature_row_after_event_time_is_not_used(feast_join):
    tx, card_table, _, joined, _ = feast_join
    # Every transaction that has later feature rows of its card (all but each card's last) must see
    # the card's last row strictly BEFORE it: recomputed here from the table with a plain loop.
    rows = joined.set_index("transaction_id")
    stamps = {card: sorted(group.event_timestamp) for card, group in card_table.groupby("card_id")}
    checked = 0
    for txn in tx.itertuples():
        times = stamps[txn.card_id]
        if times[-1] <= txn.ts:
            continue  # no feature row after this transaction
        earlier = [t for t in times if t < txn.ts]
        seen = rows.loc[txn.transaction_id, "card_last_txn_unix"]
        if not earlier:
            assert pd.isna(seen), txn.transaction_id  # a card's first transaction has no features yet
        else:
            assert seen == pytest.approx(earlier[-1].timestamp()), txn.transaction_id
        checked += 1
    assert checked > len(tx) / 2


def test_online_store_serves_latest_values_after_materialize(feast_join):
    tx, card_table, _, _, store = feast_join
    feast_store.materialize(store, tx.ts.min().to_pydatetime(), tx.ts.max().to_pydatetime() + pd.Timedelta(seconds=1))
    card = tx.card_id.iloc[0]
    latest = card_table[card_table.card_id == card].sort_values("event_timestamp").iloc[-1]
    online = feast_store.online_features(store, [{"card_id": card, "merchant_id": "m-unknown"}], FRAUD_VIEWS)
    assert online["card_txn_count_24h"][0] == latest.card_txn_count_24h
    assert online["card_amount_mean_30d"][0] == pytest.approx(latest.card_amount_mean_30d)
    assert online["merchant_amount_mean_30d"][0] is None  # an unknown merchant has no features



def test_materialize_window_loads_every_merchants_day_end_row(feast_join, tmp_path):
    """Bug caught: a window that misses some entity's latest feature row, so serving reads an older
    one (the window is taken from the tables' own rows, not from the transactions' span)."""
    _, card_table, merchant_table, _, store = feast_join
    paths = [str(tmp_path / "card.parquet"), str(tmp_path / "merchant.parquet")]
    card_table.to_parquet(paths[0])
    merchant_table.to_parquet(paths[1])
    feast_store.materialize(store, *materialize_window(paths))
    latest = merchant_table.sort_values("event_timestamp").groupby("merchant_id").tail(1).set_index("merchant_id")
    rows = [{"card_id": "c-unknown", "merchant_id": m} for m in latest.index]
    online = pd.DataFrame(feast_store.online_features(store, rows, FRAUD_VIEWS)).set_index("merchant_id")
    assert_frame_equal(online[list(MERCHANT_FEATURES)].astype("float64"), latest[list(MERCHANT_FEATURES)].astype("float64"), atol=1e-9)

def test_split_by_time_holds_out_the_last_fraction():
    tx = make_transactions(500)
    train, holdout, cutoff = split_by_time(tx, 0.25, "ts")
    assert len(train) + len(holdout) == len(tx)
    assert train.ts.max() < cutoff <= holdout.ts.min()
    span = tx.ts.max() - tx.ts.min()
    assert cutoff == tx.ts.min() + span * 0.75


def test_serving_refuses_a_missing_or_empty_feature_world(tmp_path):
    """An absent world would otherwise answer every read with "no features" (all cold starts)."""
    from flywheel.errors import FeatureStoreError

    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path)})
    with pytest.raises(FeatureStoreError, match="feature world abc123 is missing"):
        feast_store.open_served_store(settings, "abc123")
    feast_store.open_store(settings, "abc123").apply([])  # a registry with nothing applied
    (feast_store.world_dir(settings, "abc123") / "online.db").touch()
    with pytest.raises(FeatureStoreError, match="has views"):
        feast_store.open_served_store(settings, "abc123")


def test_a_served_world_opens_when_its_views_are_applied(feast_join):
    *_, store = feast_join
    settings = load_settings(env={"FLYWHEEL_HOME": str(Path(store.config.repo_path))})
    (feast_store.world_dir(settings, "testworld") / "online.db").touch()
    assert feast_store.open_served_store(settings, "testworld").list_feature_views()
