"""The cluster engine (``features.offline_store: ray``: Feast's Ray offline store and compute engine,
flywheel/features/ray_store.py) in local mode, against the embedded path on the same tables.

One local Ray serves the module (started by the first Ray call, shut down after). The tables are
the point-in-time edge cases of tests/unit/test_point_in_time.py plus random rows with event-time
ties; the training set must equal the embedded store's (DuckDB as-of) and a merge_asof oracle row
for row, and the online store must hold the same values after materialization, read back through
the serving path's reader.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from pandas.testing import assert_frame_equal

from flywheel.config import load_settings
from flywheel.features import store as feast_store
from tests.factories import FRAUD_CONTRACT, FRAUD_VIEWS, fraud_tables
from tests.unit.test_point_in_time import (
    CARD_TABLE, CARDS, MERCHANT_TABLE, MERCHANTS, T0, TRANSACTIONS, card_row, merchant_row, oracle, typed,
)


def random_tables(seed: int = 11) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Cards and merchants with rows on an hourly grid (so event times tie, created times differ),
    and transactions on the same grid."""
    rng = np.random.default_rng(seed)
    hours = lambda n: T0 - pd.to_timedelta(rng.integers(0, 24 * 40, n), unit="h")  # noqa: E731
    # Created times are all distinct: a tie on both times has no defined winner.
    card_times, card_created = hours(600), rng.permutation(600)
    cards = [card_row(f"r-card-{rng.integers(40)}", at, float(i), created=at + pd.Timedelta(seconds=int(c)))
             for i, (at, c) in enumerate(zip(card_times, card_created))]
    merchants = [merchant_row(f"r-m-{rng.integers(15)}", at, float(i)) for i, at in enumerate(hours(300))]
    tx = pd.DataFrame({
        "transaction_id": [f"r-{i}" for i in range(400)],
        "card_id": [f"r-card-{i}" for i in rng.integers(0, 45, 400)],  # 40..44: cards with no rows
        "merchant_id": [f"r-m-{i}" for i in rng.integers(0, 15, 400)],
        "ts": hours(400) + pd.Timedelta(hours=1),
    }).astype({"ts": "datetime64[us, UTC]"}).assign(amount=1.0)
    merchants = typed(merchants).assign(created_timestamp=lambda f: f.event_timestamp + pd.to_timedelta(rng.permutation(len(f)), unit="s"))
    return typed(cards), merchants, tx


@pytest.fixture(scope="module")
def both_paths(tmp_path_factory) -> dict:
    """The same apply, training-set join and materialization on the embedded path and on Ray."""
    import ray

    extra_cards, extra_merchants, extra_tx = random_tables()
    card_table = pd.concat([CARD_TABLE, extra_cards], ignore_index=True)
    merchant_table = pd.concat([MERCHANT_TABLE, extra_merchants], ignore_index=True)
    transactions = pd.concat([TRANSACTIONS, extra_tx], ignore_index=True)
    start = (card_table.event_timestamp.min() - pd.Timedelta(days=1)).to_pydatetime()
    end = (card_table.event_timestamp.max() + pd.Timedelta(days=1)).to_pydatetime()
    result: dict = {"cards": card_table, "merchants": merchant_table, "transactions": transactions, "seconds": {}}
    try:
        for engine in ("duckdb-asof", "ray"):
            home = tmp_path_factory.mktemp(engine)
            card_table.to_parquet(home / "card.parquet")
            merchant_table.to_parquet(home / "merchant.parquet")
            settings = load_settings(env={"FLYWHEEL_HOME": str(home), "FLYWHEEL_FEATURES__OFFLINE_STORE": engine})
            store = feast_store.open_store(settings, "dist")
            feast_store.apply_definitions(store, FRAUD_VIEWS, fraud_tables(str(home / "card.parquet"), str(home / "merchant.parquet")))
            began = time.perf_counter()
            joined = feast_store.historical_features(store, transactions, FRAUD_VIEWS, FRAUD_CONTRACT)
            feast_store.materialize(store, start, end)
            result["seconds"][engine] = round(time.perf_counter() - began, 1)
            reader = feast_store.open_online_reader(settings, "dist")
            result[engine] = {"store": store, "joined": joined,
                              "online": reader.read({"card_id": list(card_table.card_id.unique()) + ["r-card-44"], "merchant_id": list(merchant_table.merchant_id.unique()) * 3})}
    finally:
        ray.shutdown()
    print(f"seconds for join + materialize: {result['seconds']}")
    return result


def test_ray_training_set_equals_the_embedded_path_and_the_oracle_row_for_row(both_paths):
    """Bugs caught: Feast's Ray store ignoring the TTL (ttl-2, ttl-3 got 3.0), breaking an
    event-time tie by something other than the created time (tie-1 got 7), losing or reordering
    entity rows."""
    ray_joined, embedded = both_paths["ray"]["joined"], both_paths["duckdb-asof"]["joined"]
    assert list(ray_joined.transaction_id) == list(both_paths["transactions"].transaction_id)
    assert_frame_equal(ray_joined, embedded)
    indexed = ray_joined.set_index("transaction_id")
    for key, table, names in (("card_id", both_paths["cards"], CARDS), ("merchant_id", both_paths["merchants"], MERCHANTS)):
        want = oracle(both_paths["transactions"], table, key, names).loc[indexed.index]
        assert_frame_equal(indexed[names], want, check_names=False)
    assert np.isnan(indexed.loc["ttl-2", CARDS[0]]) and indexed.loc["tie-1", CARDS[0]] == 6
    assert indexed[CARDS[0]].notna().sum() > 300  # the random rows did find features


def test_ray_materialization_writes_the_same_online_values_as_the_embedded_path(both_paths):
    """Bugs caught: Feast's Ray engine dropping rows older than now minus the TTL (it wrote nothing
    for these tables), writing only the first chunk of each batch (1 card of 5), or a tie on event
    time written in the wrong order."""
    (ray_values, ray_known), (values, known) = both_paths["ray"]["online"], both_paths["duckdb-asof"]["online"]
    for name in values:
        np.testing.assert_array_equal(ray_values[name], values[name], err_msg=name)
    for key in known:
        np.testing.assert_array_equal(ray_known[key], known[key], err_msg=key)
    cards = list(both_paths["cards"].card_id.unique())
    latest = (both_paths["cards"].sort_values(["event_timestamp", "created_timestamp"]).groupby("card_id").tail(1)
              .set_index("card_id").loc[cards, CARDS[0]])
    np.testing.assert_array_equal(ray_values[CARDS[0]][: len(cards)], latest.to_numpy(dtype="float64"))
    assert ray_known["card_id"][: len(cards)].all() and not ray_known["card_id"][-1]  # r-card-44 has no row
