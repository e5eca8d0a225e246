"""From a transaction plus its Feast features to the model's input vector.

One code path for training, evaluation and serving, so the model sees at serving time exactly what
it saw in training. Missing features (a new card, a new merchant) get neutral values: the
transaction is compared with itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from flywheel.features.compute import unix_seconds
from flywheel.geo import haversine_km
from flywheel.schema import CHANNELS, MERCHANT_CATEGORIES

MAX_GAP_S = 30 * 24 * 3600.0  # "never seen before" is treated as a 30-day gap

NUMERIC_INPUTS = [
    "log_amount",
    "amount_vs_card_log",  # how far the amount is from the card's own normal
    "amount_z_card",
    "card_count_1h_log",  # velocity
    "card_count_24h_log",
    "seconds_since_last_log",
    "hour_sin",
    "hour_cos",
    "is_night",
    "distance_from_usual_km_log",  # how far from where the card is usually used
    "merchant_count_24h_log",
    "amount_vs_merchant_log",
]
# One-hot blocks, in this order (a list, not a dict: the order is part of the model's input layout).
CATEGORY_INPUTS = [("merchant_category", MERCHANT_CATEGORIES), ("channel", CHANNELS)]


def _column(df: pd.DataFrame, name: str, default: float = np.nan) -> np.ndarray:
    if name not in df:
        return np.full(len(df), default, dtype="float64")
    return pd.to_numeric(df[name], errors="coerce").to_numpy(dtype="float64")


def derive_inputs(df: pd.DataFrame) -> pd.DataFrame:
    """Derived numeric inputs from a frame of transactions joined with their features."""
    amount = _column(df, "amount")
    card_mean = _column(df, "card_amount_mean_30d")
    card_mean = np.where(np.isnan(card_mean), amount, card_mean)
    card_std = np.nan_to_num(_column(df, "card_amount_std_30d"), nan=0.0)
    ts = pd.to_datetime(df["ts"], utc=True)
    now = unix_seconds(ts)
    gap = np.clip(np.nan_to_num(now - _column(df, "card_last_txn_unix"), nan=MAX_GAP_S), 0, MAX_GAP_S)
    hour = (ts.dt.hour + ts.dt.minute / 60.0).to_numpy()
    lat, lon = _column(df, "lat", 0.0), _column(df, "lon", 0.0)
    usual_lat, usual_lon = _column(df, "card_lat_mean_30d"), _column(df, "card_lon_mean_30d")
    distance = np.nan_to_num(haversine_km(lat, lon, usual_lat, usual_lon), nan=0.0)
    merchant_mean = _column(df, "merchant_amount_mean_30d")
    merchant_mean = np.where(np.isnan(merchant_mean), amount, merchant_mean)
    out = pd.DataFrame(
        {
            "log_amount": np.log1p(amount),
            "amount_vs_card_log": np.log1p(amount) - np.log1p(card_mean),
            "amount_z_card": np.clip((amount - card_mean) / (card_std + 1.0), -10, 50),
            "card_count_1h_log": np.log1p(np.nan_to_num(_column(df, "card_txn_count_1h"), nan=0.0)),
            "card_count_24h_log": np.log1p(np.nan_to_num(_column(df, "card_txn_count_24h"), nan=0.0)),
            "seconds_since_last_log": np.log1p(gap),
            "hour_sin": np.sin(2 * np.pi * hour / 24),
            "hour_cos": np.cos(2 * np.pi * hour / 24),
            "is_night": (hour < 6).astype("float64"),
            "distance_from_usual_km_log": np.log1p(distance),
            "merchant_count_24h_log": np.log1p(np.nan_to_num(_column(df, "merchant_txn_count_24h"), nan=0.0)),
            "amount_vs_merchant_log": np.log1p(amount) - np.log1p(merchant_mean),
        },
        index=df.index,
    )
    return out[NUMERIC_INPUTS]


@dataclass
class FeatureSpec:
    """How to turn a frame into model inputs: the numeric inputs' scaling and the categories' vocabularies."""

    numeric: list[str] = field(default_factory=lambda: list(NUMERIC_INPUTS))
    means: list[float] = field(default_factory=list)
    stds: list[float] = field(default_factory=list)
    categories: list[tuple[str, list[str]]] = field(default_factory=lambda: [(k, list(v)) for k, v in CATEGORY_INPUTS])

    @property
    def input_names(self) -> list[str]:
        names = list(self.numeric)
        for column, vocab in self.categories:
            names += [f"{column}={value}" for value in vocab] + [f"{column}=<other>"]
        return names

    @property
    def width(self) -> int:
        return len(self.input_names)

    @classmethod
    def fit(cls, df: pd.DataFrame) -> "FeatureSpec":
        """Learn the numeric inputs' mean and spread from training rows."""
        derived = derive_inputs(df)
        spec = cls()
        spec.means = [float(x) for x in derived.mean().to_numpy()]
        spec.stds = [float(x) if x > 1e-9 else 1.0 for x in derived.std(ddof=0).to_numpy()]
        return spec

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """The model's input matrix (float32, one row per transaction)."""
        if not self.means:
            raise ValueError("FeatureSpec.transform called before fit")
        numeric = (derive_inputs(df).to_numpy() - np.asarray(self.means)) / np.asarray(self.stds)
        blocks = [numeric]
        for column, vocab in self.categories:
            values = df[column].astype("string").fillna("").to_numpy() if column in df else np.full(len(df), "")
            index = {v: i for i, v in enumerate(vocab)}
            codes = np.array([index.get(v, len(vocab)) for v in values], dtype=np.int64)
            blocks.append(np.eye(len(vocab) + 1)[codes])
        return np.nan_to_num(np.hstack(blocks), nan=0.0).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureSpec":
        data = dict(data)
        data["categories"] = [(column, list(vocab)) for column, vocab in data["categories"]]
        return cls(**data)
