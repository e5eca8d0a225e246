"""A point-in-time join written a second way (pandas ``merge_asof``), that every training set is
checked against on a sample of its rows.

Feast's offline store does the real join (see :func:`flywheel.features.store.historical_features`);
this one shares none of its code, only the contract: a transaction sees, per feature view, the
row of its entity with the latest event time strictly before the transaction (an event-time tie
goes to the row created last), provided that row is within the view's TTL; otherwise nothing.
A mismatch means the training set would teach the model features it will never be served (or
leak the future): the build stops.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from flywheel.errors import FeatureStoreError
from flywheel.features.definitions import CARD_FEATURES, CREATED_COLUMN, FEATURE_TTL, MERCHANT_FEATURES
from flywheel.features.store import JOIN_OFFSET

log = logging.getLogger(__name__)


def as_of_join(transactions: pd.DataFrame, table: pd.DataFrame, key: str, names: list[str]) -> pd.DataFrame:
    """Each transaction's latest row of ``table`` for its ``key`` as of just before it (within the
    TTL), as float64 columns ``names`` indexed by transaction id."""
    left = pd.DataFrame(
        {
            "transaction_id": transactions["transaction_id"].to_numpy(),
            key: transactions[key].to_numpy(),
            "as_of": (pd.to_datetime(transactions["ts"], utc=True) - JOIN_OFFSET).astype("datetime64[ns, UTC]"),
        }
    ).sort_values("as_of", kind="stable")
    # merge_asof takes the last of the rows sharing an event time: sorted by creation, that is the newest.
    right = table[[key, "event_timestamp", CREATED_COLUMN, *names]].astype(
        {"event_timestamp": "datetime64[ns, UTC]", CREATED_COLUMN: "datetime64[ns, UTC]"}
    ).sort_values(["event_timestamp", CREATED_COLUMN], kind="stable")
    merged = pd.merge_asof(
        left, right, left_on="as_of", right_on="event_timestamp", by=key, allow_exact_matches=True, tolerance=pd.Timedelta(FEATURE_TTL)
    )
    return merged.set_index("transaction_id")[names].astype("float64")


def check_sample(joined: pd.DataFrame, card_table: pd.DataFrame, merchant_table: pd.DataFrame, rows: int, seed: int = 0) -> int:
    """Re-join ``rows`` sampled transactions of ``joined`` (a training set) with the oracle and
    raise :class:`FeatureStoreError` naming the first mismatches; returns how many were checked."""
    if rows <= 0 or joined.empty:
        return 0
    sample = joined.sample(n=min(rows, len(joined)), random_state=seed)
    got = sample.set_index("transaction_id")
    problems: list[str] = []
    for key, table, names in (
        ("card_id", card_table, list(CARD_FEATURES)),
        ("merchant_id", merchant_table, list(MERCHANT_FEATURES)),
    ):
        want = as_of_join(sample, table[table[key].isin(sample[key].unique())], key, names).loc[got.index]
        have = got[names].astype("float64")
        same = np.isclose(have.to_numpy(), want.to_numpy(), rtol=1e-9, atol=1e-9, equal_nan=True)
        for row, column in zip(*np.nonzero(~same)):
            problems.append(
                f"{got.index[row]} {names[column]}: training set {float(have.iat[row, column])!r}, oracle {float(want.iat[row, column])!r}"
            )
    if problems:
        raise FeatureStoreError(
            f"the point-in-time join disagrees with the merge_asof oracle on {len(problems)} value(s) of {len(sample)} "
            f"sampled transactions (first: {'; '.join(problems[:5])}): the offline store's join is wrong; "
            "the training set is not published"
        )
    log.info("features: %d sampled training rows equal the merge_asof oracle", len(sample))
    return len(sample)


__all__ = ["as_of_join", "check_sample"]
