"""Feast definitions: the card and merchant entities and their feature views.

They are built by a function, not at import time, because the offline tables' location changes with
every lake snapshot (the tables are content-addressed). `feature_repo/features.py` calls this for the `feast` CLI.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

# Feature name -> Feast type name; the order is the order of the offline table's columns.
CARD_FEATURES = {
    "card_txn_count_1h": "Int64",  # transactions of the card in the hour up to and including this one
    "card_txn_count_24h": "Int64",  # ... in the last 24 hours
    "card_txn_count_7d": "Int64",  # ... in the last 7 days
    "card_amount_mean_30d": "Float64",  # the card's mean amount over 30 days: its own normal
    "card_amount_std_30d": "Float64",  # ... and its spread
    "card_lat_mean_30d": "Float64",  # where the card is usually used (a proxy for home)
    "card_lon_mean_30d": "Float64",
    "card_distinct_merchants_24h": "Int64",  # how many different merchants the card paid in 24 hours
    "card_last_txn_unix": "Float64",  # when the card was last used (seconds since the epoch): the
    # seconds since the previous transaction are the request's time minus this (transform.py)
}
MERCHANT_FEATURES = {
    "merchant_txn_count_24h": "Int64",  # the merchant's transactions in the 24 hours up to and including this one
    "merchant_amount_mean_30d": "Float64",  # the merchant's typical ticket over 30 days
    # Labels arrive features.label_delay after their transaction: only labels known by then count.
    "merchant_labelled_count_30d": "Int64",  # transactions in the 30 days before the label horizon
    "merchant_fraud_rate_30d": "Float64",  # ... the share of them labelled fraud (null: none yet)
}
# Each feature row's creation time: a tie on event time goes to the row created last (a recomputed
# row appended beside the one it corrects wins, in training sets and online alike).
CREATED_COLUMN = "created_timestamp"
CARD_VIEW = "card_features"
MERCHANT_VIEW = "merchant_features"
FEATURE_TTL = dt.timedelta(days=30)  # older feature rows are not used: a dormant card has no recent history


def feature_refs() -> list[str]:
    """Every feature as 'view:name', as Feast's retrieval calls want them."""
    return [f"{CARD_VIEW}:{name}" for name in CARD_FEATURES] + [
        f"{MERCHANT_VIEW}:{name}" for name in MERCHANT_FEATURES
    ]


def build_definitions(card_table_path: str, merchant_table_path: str) -> list[Any]:
    """The Feast objects to apply, reading the offline tables at the given paths."""
    from feast import Entity, FeatureView, Field, FileSource, ValueType
    from feast import types as feast_types

    def fields(spec: dict[str, str]) -> list[Any]:
        return [Field(name=name, dtype=getattr(feast_types, kind)) for name, kind in spec.items()]

    card = Entity(name="card", join_keys=["card_id"], value_type=ValueType.STRING, description="A payment card")
    merchant = Entity(
        name="merchant", join_keys=["merchant_id"], value_type=ValueType.STRING, description="A merchant"
    )
    card_source = FileSource(
        name="card_features_source", path=card_table_path, timestamp_field="event_timestamp", created_timestamp_column=CREATED_COLUMN
    )
    merchant_source = FileSource(
        name="merchant_features_source", path=merchant_table_path, timestamp_field="event_timestamp",
        created_timestamp_column=CREATED_COLUMN,
    )
    card_view = FeatureView(
        name=CARD_VIEW,
        entities=[card],
        ttl=FEATURE_TTL,
        schema=fields(CARD_FEATURES),
        source=card_source,
        online=True,
        description="Rolling aggregates of a card's own history",
    )
    merchant_view = FeatureView(
        name=MERCHANT_VIEW,
        entities=[merchant],
        ttl=FEATURE_TTL,
        schema=fields(MERCHANT_FEATURES),
        source=merchant_source,
        online=True,
        description="Rolling aggregates of a merchant's traffic",
    )
    return [card, merchant, card_view, merchant_view]
