"""Card and merchant aggregates computed from the lake: a card row per transaction (per card and
instant), a merchant row per active day.

A feature row is stamped with its transaction's time and includes that transaction: it is the state
of the card right after it. Training joins each transaction to the latest row strictly before it
(see :func:`flywheel.features.store.entity_frame`), which is exactly what the online store holds when
that transaction is scored.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from flywheel.features.definitions import CARD_FEATURES, CREATED_COLUMN, MERCHANT_FEATURES


EPOCH = pd.Timestamp(0, tz="UTC")


def unix_seconds(ts: pd.Series) -> np.ndarray:
    """UTC timestamps as float seconds since the epoch, whatever their resolution."""
    return (ts - EPOCH).dt.total_seconds().to_numpy()


def _rolling(df: pd.DataFrame, key: str, column: str, window: str, how: str) -> np.ndarray:
    """A trailing time-window aggregate per key, aligned with df's rows (df sorted by key, ts)."""
    rolled = df.groupby(key, sort=False).rolling(window, on="ts")[column]
    return getattr(rolled, how)().to_numpy()


def card_feature_table(transactions: pd.DataFrame) -> pd.DataFrame:
    """Per-transaction card aggregates: velocity, the card's normal amount and location, last use."""
    df = transactions[["card_id", "ts", "amount", "lat", "lon"]].sort_values(["card_id", "ts"], kind="stable")
    df = df.reset_index(drop=True)
    out = pd.DataFrame({"card_id": df["card_id"], "event_timestamp": df["ts"]})
    out["card_txn_count_1h"] = _rolling(df, "card_id", "amount", "1h", "count").astype("int64")
    out["card_txn_count_24h"] = _rolling(df, "card_id", "amount", "24h", "count").astype("int64")
    out["card_amount_mean_30d"] = _rolling(df, "card_id", "amount", "30D", "mean")
    out["card_amount_std_30d"] = np.nan_to_num(_rolling(df, "card_id", "amount", "30D", "std"), nan=0.0)
    out["card_lat_mean_30d"] = _rolling(df, "card_id", "lat", "30D", "mean")
    out["card_lon_mean_30d"] = _rolling(df, "card_id", "lon", "30D", "mean")
    out["card_last_txn_unix"] = unix_seconds(df["ts"])
    # Transactions of one card at the same instant: one row, the state after all of them (the last
    # row of the tie; an earlier one would count only part of that instant).
    out = out.drop_duplicates(["card_id", "event_timestamp"], keep="last")
    out[CREATED_COLUMN] = out["event_timestamp"]  # computed in one pass: created at its event
    return out[["card_id", "event_timestamp", CREATED_COLUMN, *CARD_FEATURES]].reset_index(drop=True)


def merchant_feature_table(transactions: pd.DataFrame) -> pd.DataFrame:
    """Daily merchant aggregates (volume, typical ticket), stamped at the end of each active day.

    Merchant statistics move slowly, so they are a daily batch feature: a transaction sees the
    aggregates as of the end of the previous active day. One row per merchant-day also keeps Feast's
    point-in-time join cheap (it compares every entity row with every feature row of its key).
    """
    df = transactions[["merchant_id", "ts", "amount"]]
    day = df["ts"].dt.floor("D")
    daily = (
        df.assign(day=day)
        .groupby(["merchant_id", "day"], sort=True)["amount"]
        .agg(["count", "sum"])
        .reset_index()
    )
    out = pd.DataFrame({"merchant_id": daily["merchant_id"]})
    out["event_timestamp"] = (daily["day"] + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1)).astype("datetime64[us, UTC]")
    out["merchant_txn_count_24h"] = daily["count"].astype("int64")
    rolling = (
        daily.set_index("day").groupby("merchant_id", sort=False)[["count", "sum"]].rolling("30D").sum().to_numpy()
    )
    out["merchant_amount_mean_30d"] = rolling[:, 1] / rolling[:, 0]
    out[CREATED_COLUMN] = out["event_timestamp"]
    return out[["merchant_id", "event_timestamp", CREATED_COLUMN, *MERCHANT_FEATURES]]
