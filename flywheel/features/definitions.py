"""Feast definitions: the use case's entities and feature views (:mod:`flywheel.features.views`).

They are built by a function, not at import time, because the offline tables' location changes with
every lake snapshot (the tables are content-addressed). `feature_repo/features.py` calls this for the `feast` CLI.

The card and merchant names below are the fraud model's inputs as its input transform and the
predictor still read them (issue 19 moves those into the use case); tests/unit/test_engine.py holds
them equal to the views that usecases/fraud/features.yaml declares.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from flywheel.features.views import View

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


def build_definitions(views: list[View], tables: dict[str, str]) -> list[Any]:
    """The Feast objects to apply: each view's entity and feature view, reading the offline table at
    ``tables[view.name]``."""
    from feast import Entity, FeatureView, Field, FileSource, ValueType
    from feast import types as feast_types

    objects: list[Any] = []
    entities: dict[str, Any] = {}
    for view in views:
        if view.entity not in entities:
            # Join keys are text in the feature store, whatever their type in the contract (engine.join_key_text).
            entities[view.entity] = Entity(name=view.entity, join_keys=[view.join_key], value_type=ValueType.STRING,
                                           description=f"the use case's {view.entity} (join key {view.join_key})")
            objects.append(entities[view.entity])
    for view in views:
        source = FileSource(name=f"{view.name}_source", path=tables[view.name], timestamp_field="event_timestamp",
                            created_timestamp_column=CREATED_COLUMN)
        objects.append(FeatureView(
            name=view.name,
            entities=[entities[view.entity]],
            ttl=view.ttl,
            schema=[Field(name=name, dtype=getattr(feast_types, kind)) for name, kind in view.features.items()],
            source=source,
            online=True,
            description=f"windowed aggregations of each {view.entity}'s events (the use case's features.yaml)",
        ))
    return objects
