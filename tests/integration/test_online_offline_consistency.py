"""Online/offline consistency on the SQLite online store: for sampled entities, what serving reads
equals the latest offline row (the Redis store has the same check in test_redis_online.py).

The oracle is the offline tables read with pandas: per entity, the row with the latest event time,
a tie going to the latest created time (the offline store's rule), never through Feast.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pandas.testing import assert_frame_equal

from flywheel import steps
from tests.fraud_tables import CARD_FEATURES, MERCHANT_FEATURES
from flywheel.features.store import open_online_reader, open_served_store


def latest(table: pd.DataFrame, key: str, names: list[str]) -> pd.DataFrame:
    ordered = table.sort_values([key, "event_timestamp", "created_timestamp"], kind="stable")
    return ordered.groupby(key).tail(1).set_index(key)[names].astype("float64")


def test_sampled_entities_online_features_equal_the_latest_offline_rows_sqlite(trained_loop):
    """Bug caught: a materialization that misses or mangles rows, or picks an older row of an
    entity (a window that ends early, a tie broken the other way), so serving reads features that
    the training set's latest state never had."""
    settings, storage = trained_loop["settings"], trained_loop["storage"]
    artifacts = steps.read_step_records(storage, "loop-1")["features"]["artifacts"]
    cards = latest(storage.read_parquet(artifacts["card_features"]).to_pandas(), "card_id", list(CARD_FEATURES))
    merchants = latest(storage.read_parquet(artifacts["merchant_features"]).to_pandas(), "merchant_id", list(MERCHANT_FEATURES))
    rng = np.random.default_rng(5)
    card_ids = list(rng.choice(cards.index, size=300, replace=False))
    merchant_ids = list(rng.choice(merchants.index, size=300, replace=True))

    world = trained_loop["model"]["meta"]["feature_world"]
    assert open_served_store(settings, world).config.online_store.type == "sqlite"
    features, known = open_online_reader(settings, world).read({"card_id": card_ids, "merchant_id": merchant_ids})
    assert known["card_id"].all() and known["merchant_id"].all()
    got = pd.DataFrame(features)
    assert_frame_equal(got[list(CARD_FEATURES)], cards.loc[card_ids].reset_index(drop=True), rtol=1e-9)
    assert_frame_equal(got[list(MERCHANT_FEATURES)], merchants.loc[merchant_ids].reset_index(drop=True), rtol=1e-9)
