"""Fraud's feature tables written by hand, before features were declared (usecases/fraud/features.yaml)
and computed by flywheel's engine: kept as a second, independent oracle of the engine's semantics
(tests/unit/test_engine.py, benchmarks/engine.py).

Card and merchant aggregates computed from the lake: one card row per transaction (per card and
instant) and one merchant row per transaction (per merchant and instant).

A feature row is stamped with its transaction's time and includes that transaction: it is the state
of the card (or merchant) right after it. Training joins each transaction to the latest row strictly
before it (see :func:`flywheel.features.store.entity_frame`), which is exactly what the online store
holds when that transaction is scored.

Merchant rows are per transaction, not per day, so that "transactions in the last 24 hours" means
that (a daily row is up to a day stale) and the fraud rate moves as labels arrive. The cost, measured
on 200k transactions (README, "Features"), is a merchant table as long as the card table.

The merchant's fraud rate uses only labels that were known at the row's time: a fraud label arrives
``label_delay`` after its transaction (``features.label_delay``), so the row stamped ``t`` counts the
merchant's transactions in ``(t - label_delay - 30 days, t - label_delay]``. A label of a transaction
with ``ts + label_delay > t`` is never used: that would be leakage.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Iterator

import numpy as np
import pandas as pd

from flywheel.features.definitions import CREATED_COLUMN
from tests.factories import FRAUD_LABEL as LABEL

LONGEST_WINDOW = pd.Timedelta(days=30)  # the 30-day statistics

# The fraud use case's feature names and types as the hand-written tables below write them (equal to
# what usecases/fraud/features.yaml declares: tests/unit/test_engine.py).
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
CARD_VIEW = "card_features"
MERCHANT_VIEW = "merchant_features"
FEATURE_TTL = dt.timedelta(days=30)  # older feature rows are not used: a dormant card has no recent history


def lookback_days(label_delay: dt.timedelta) -> int:
    """Whole days of raw data before a day that its feature rows read: the longest window plus the
    label delay (the fraud rate's window ends ``label_delay`` before the row), rounded up."""
    return LONGEST_WINDOW.days + math.ceil(pd.Timedelta(label_delay) / pd.Timedelta(days=1))


EPOCH = pd.Timestamp(0, tz="UTC")


def unix_seconds(ts: pd.Series) -> np.ndarray:
    """UTC timestamps as float seconds since the epoch, whatever their resolution."""
    return (ts - EPOCH).dt.total_seconds().to_numpy()


def _rolling(df: pd.DataFrame, key: str, column: str, window: str, how: str) -> np.ndarray:
    """A trailing time-window aggregate per key, aligned with df's rows (df sorted by key, ts)."""
    rolled = df.groupby(key, sort=False).rolling(window, on="ts")[column]
    return getattr(rolled, how)().to_numpy()


def _walk_back(window_rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For rows whose windows are rows ``i - window_rows[i] + 1 .. i``: yields (rows, rows - back)
    for back = 0, 1, ...: the rows whose window still reaches that far back, and the row it reaches.
    Rows are visited longest window first, so each step touches only the rows still active."""
    order = np.argsort(-window_rows, kind="stable")
    longest_first = window_rows[order]
    for back in range(int(longest_first[0]) if len(order) else 0):
        active = order[: np.searchsorted(-longest_first, -back, side="left")]
        yield active, active - back


def _window_mean_std(values: np.ndarray, window_rows: np.ndarray, spread: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Each row's mean and sample spread (NaN for one row) of ``values`` over its window, summed
    newest row first in a fixed order: the same window gives the same bits wherever a computation
    starts. (A running sum, as pandas' rolling keeps, rounds differently depending on the rows before
    the window; then an incremental build would not equal a whole one.)"""
    total = np.zeros(len(values))
    for rows, reached in _walk_back(window_rows):
        total[rows] += values[reached]
    mean = total / np.maximum(window_rows, 1)
    if not spread:
        return mean, np.full(len(values), np.nan)
    squares = np.zeros(len(values))
    for rows, reached in _walk_back(window_rows):
        squares[rows] += (values[reached] - mean[rows]) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.where(window_rows > 1, np.sqrt(squares / np.maximum(window_rows - 1, 1)), np.nan)
    return mean, std


def _distinct_in_window(key_sorted: np.ndarray, other: np.ndarray, window_rows: np.ndarray) -> np.ndarray:
    """Per row, how many distinct ``other`` values the window's rows hold: the window of row i being
    rows ``i - window_rows[i] + 1 .. i`` (rows sorted by key and time, windows within one key).

    A row j of the window is counted when it is the last row of its value up to row i, i.e. the
    next row with the same (key, value) comes after i."""
    rows = len(key_sorted)
    pairs = pd.DataFrame({"key": key_sorted, "other": other, "position": np.arange(rows)})
    next_same = pairs.groupby(["key", "other"], sort=False)["position"].shift(-1).fillna(rows).to_numpy(dtype=np.int64)
    distinct = np.zeros(rows, dtype=np.int64)
    for active, reached in _walk_back(window_rows):
        distinct[active] += next_same[reached] > active
    return distinct


def card_feature_table(transactions: pd.DataFrame) -> pd.DataFrame:
    """Per-transaction card aggregates: velocity, the card's normal amount and location, the
    merchants it visited, last use."""
    df = transactions[["card_id", "merchant_id", "ts", "amount", "lat", "lon"]].sort_values(["card_id", "ts"], kind="stable")
    df = df.reset_index(drop=True).assign(one=1.0)
    out = pd.DataFrame({"card_id": df["card_id"], "event_timestamp": df["ts"]})
    out["card_txn_count_1h"] = _rolling(df, "card_id", "one", "1h", "count").astype("int64")
    count_24h = _rolling(df, "card_id", "one", "24h", "count").astype("int64")
    out["card_txn_count_24h"] = count_24h
    out["card_txn_count_7d"] = _rolling(df, "card_id", "one", "7D", "count").astype("int64")
    count_30d = _rolling(df, "card_id", "one", "30D", "count").astype("int64")
    amount_mean, amount_std = _window_mean_std(df["amount"].to_numpy(dtype="float64"), count_30d)
    out["card_amount_mean_30d"] = amount_mean
    out["card_amount_std_30d"] = np.nan_to_num(amount_std, nan=0.0)
    out["card_lat_mean_30d"] = _window_mean_std(df["lat"].to_numpy(dtype="float64"), count_30d, spread=False)[0]
    out["card_lon_mean_30d"] = _window_mean_std(df["lon"].to_numpy(dtype="float64"), count_30d, spread=False)[0]
    out["card_distinct_merchants_24h"] = _distinct_in_window(
        df["card_id"].to_numpy(), df["merchant_id"].to_numpy(), count_24h
    )
    out["card_last_txn_unix"] = unix_seconds(df["ts"])
    # Transactions of one card at the same instant: one row, the state after all of them (the last
    # row of the tie; an earlier one would count only part of that instant).
    out = out.drop_duplicates(["card_id", "event_timestamp"], keep="last")
    out[CREATED_COLUMN] = out["event_timestamp"]  # computed in one pass: created at its event
    return out[["card_id", "event_timestamp", CREATED_COLUMN, *CARD_FEATURES]].reset_index(drop=True)


def _known_labels(df: pd.DataFrame, label_delay: pd.Timedelta) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``df`` (sorted by merchant and time): how many of the merchant's transactions, and
    how many frauds among them, had their label known at the row's time, within the 30 days before
    the label horizon, i.e. with ``ts`` in ``(t - label_delay - 30 days, t - label_delay]``."""
    position = np.arange(len(df))
    so_far = pd.DataFrame({
        "merchant_id": df["merchant_id"].to_numpy(),
        "ts": df["ts"].to_numpy(),
        "seen": df.groupby("merchant_id", sort=False).cumcount().to_numpy() + 1,
        "frauds": df.groupby("merchant_id", sort=False)[LABEL].cumsum().to_numpy(),
    }).drop_duplicates(["merchant_id", "ts"], keep="last").sort_values("ts", kind="stable")

    def as_of(horizon: pd.Series) -> tuple[np.ndarray, np.ndarray]:
        """The merchant's running totals over its transactions with ts <= horizon (0 before the first)."""
        left = pd.DataFrame({"merchant_id": df["merchant_id"].to_numpy(), "horizon": horizon.to_numpy(), "row": position})
        found = pd.merge_asof(left.sort_values("horizon", kind="stable"), so_far, left_on="horizon", right_on="ts",
                              by="merchant_id", direction="backward", allow_exact_matches=True).sort_values("row")
        return found["seen"].fillna(0).to_numpy(dtype=np.int64), found["frauds"].fillna(0).to_numpy(dtype=np.int64)

    horizon = df["ts"] - label_delay
    seen_end, frauds_end = as_of(horizon)
    seen_start, frauds_start = as_of(horizon - LONGEST_WINDOW)
    return seen_end - seen_start, frauds_end - frauds_start


def merchant_feature_table(transactions: pd.DataFrame, label_delay: dt.timedelta) -> pd.DataFrame:
    """Per-transaction merchant aggregates: volume over a trailing 24 hours, the typical ticket over
    30 days, and the fraud rate over the 30 days of labels known ``label_delay`` before each row."""
    df = transactions[["merchant_id", "ts", "amount", LABEL]].sort_values(["merchant_id", "ts"], kind="stable")
    df = df.reset_index(drop=True).assign(one=1.0)
    df[LABEL] = df[LABEL].astype("int64")
    out = pd.DataFrame({"merchant_id": df["merchant_id"], "event_timestamp": df["ts"]})
    out["merchant_txn_count_24h"] = _rolling(df, "merchant_id", "one", "24h", "count").astype("int64")
    count_30d = _rolling(df, "merchant_id", "one", "30D", "count").astype("int64")
    out["merchant_amount_mean_30d"] = _window_mean_std(df["amount"].to_numpy(dtype="float64"), count_30d, spread=False)[0]
    labelled, frauds = _known_labels(df, pd.Timedelta(label_delay))
    out["merchant_labelled_count_30d"] = labelled
    with np.errstate(invalid="ignore", divide="ignore"):
        out["merchant_fraud_rate_30d"] = np.where(labelled > 0, frauds / np.maximum(labelled, 1), np.nan)
    out = out.drop_duplicates(["merchant_id", "event_timestamp"], keep="last")  # one row per instant, as for cards
    out[CREATED_COLUMN] = out["event_timestamp"]
    return out[["merchant_id", "event_timestamp", CREATED_COLUMN, *MERCHANT_FEATURES]].reset_index(drop=True)
