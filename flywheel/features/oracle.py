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
from typing import Any

import numpy as np
import pandas as pd

from flywheel.errors import FeatureStoreError
from flywheel.features.definitions import CREATED_COLUMN
from flywheel.features.engine import join_key_text
from flywheel.features.store import JOIN_OFFSET
from flywheel.features.views import View

log = logging.getLogger(__name__)
ROW = "__oracle_row"


def as_of_join(rows: pd.DataFrame, table: pd.DataFrame, key: str, names: list[str], timestamp: str,
               ttl: pd.Timedelta) -> pd.DataFrame:
    """Each row's latest row of ``table`` for its ``key`` as of just before it (within the TTL), as
    columns ``names`` indexed like ``rows``."""
    left = pd.DataFrame(
        {
            ROW: np.arange(len(rows)),
            key: rows[key].to_numpy(),
            "as_of": (pd.to_datetime(rows[timestamp], utc=True) - JOIN_OFFSET).astype("datetime64[ns, UTC]").to_numpy(),
        }
    ).sort_values("as_of", kind="stable")
    # merge_asof takes the last of the rows sharing an event time: sorted by creation, that is the newest.
    right = table[[key, "event_timestamp", CREATED_COLUMN, *names]].astype(
        {"event_timestamp": "datetime64[ns, UTC]", CREATED_COLUMN: "datetime64[ns, UTC]"}
    ).sort_values(["event_timestamp", CREATED_COLUMN], kind="stable")
    merged = pd.merge_asof(
        left, right, left_on="as_of", right_on="event_timestamp", by=key, allow_exact_matches=True, tolerance=ttl
    )
    return merged.sort_values(ROW).set_index(pd.Index(rows.index))[names]


def _differ(have: pd.Series, want: pd.Series, kind: str) -> np.ndarray:
    if kind == "String":
        pairs = zip(have.to_numpy(dtype=object), want.to_numpy(dtype=object))
        return np.array([not ((pd.isna(a) and pd.isna(b)) or a == b) for a, b in pairs], dtype=bool)
    return ~np.isclose(have.to_numpy(dtype="float64", na_value=np.nan), want.to_numpy(dtype="float64", na_value=np.nan),
                       rtol=1e-9, atol=1e-9, equal_nan=True)


def _shown(value: Any) -> str:
    return repr(float(value)) if isinstance(value, (int, float, np.number)) else repr(value)


def check_sample(joined: pd.DataFrame, views: list[View], tables: dict[str, pd.DataFrame], contract: Any,
                 rows: int, seed: int = 0) -> int:
    """Re-join ``rows`` sampled rows of ``joined`` (a training set) with the oracle, view by view,
    and raise :class:`FeatureStoreError` naming the first mismatches; returns how many were checked."""
    if rows <= 0 or joined.empty:
        return 0
    sample = joined.sample(n=min(rows, len(joined)), random_state=seed)
    problems: list[str] = []
    name_of = (lambda i: f"{contract.id} {sample[contract.id].iloc[i]!r}") if contract.id else (lambda i: f"row {sample.index[i]}")
    for view in views:
        table = tables[view.name]
        names = list(view.features)
        keyed = sample.assign(**{view.join_key: join_key_text(sample[view.join_key])})  # the store's keys are text
        want = as_of_join(keyed, table[table[view.join_key].isin(keyed[view.join_key].unique())], view.join_key, names,
                          contract.timestamp, pd.Timedelta(view.ttl))
        for name in names:
            bad = np.flatnonzero(_differ(sample[name], want[name], view.features[name]))
            problems += [f"{name_of(i)} {name}: training set {_shown(sample[name].iloc[i])}, oracle {_shown(want[name].iloc[i])}"
                         for i in bad]
    if problems:
        raise FeatureStoreError(
            f"the point-in-time join disagrees with the merge_asof oracle on {len(problems)} value(s) of {len(sample)} "
            f"sampled rows (first: {'; '.join(problems[:5])}): the offline store's join is wrong; "
            "the training set is not published"
        )
    log.info("features: %d sampled training rows equal the merge_asof oracle", len(sample))
    return len(sample)


__all__ = ["as_of_join", "check_sample"]
