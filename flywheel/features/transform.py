"""From a transaction plus its Feast features to the model's input vector.

One code path for training, evaluation and serving, so the model sees at serving time exactly what
it saw in training. Missing features (a new card, a new merchant) get neutral values: the
transaction is compared with itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np
import pandas as pd

from flywheel.features.definitions import CARD_FEATURES, MERCHANT_FEATURES
from flywheel.geo import haversine_km
from flywheel.schema import CHANNELS, MERCHANT_CATEGORIES

MAX_GAP_S = 30 * 24 * 3600.0  # "never seen before" is treated as a 30-day gap
RAPID_REPEAT_S = 600.0  # a transaction within 10 minutes of the card's previous one: part of a burst
FAR_FROM_USUAL_KM = 300.0  # farther than this from where the card is usually used: out of its region
# A merchant's fraud rate is shrunk towards this prior with the weight of this many labelled
# transactions: a merchant with 3 known labels, one of them fraud, is not a 33% merchant.
PRIOR_FRAUD_RATE = 0.02
PRIOR_LABELS = 50.0

NUMERIC_INPUTS = [
    "log_amount",
    "amount_vs_card_log",  # how far the amount is from the card's own normal
    "amount_z_card",
    "amount_excess_for_category_log",  # above the card's normal for this kind of merchant (0 if below)
    "card_count_1h_log",  # velocity
    "card_count_24h_log",
    "card_count_7d_log",
    "card_merchants_24h_log",  # how many different merchants the card paid in the last 24 hours
    "seconds_since_last_log",
    "rapid_repeat",  # within minutes of the card's previous transaction
    "burst_count",  # how many card transactions in the last hour, when this one is a rapid repeat
    "hour_sin",
    "hour_cos",
    "is_night",
    "distance_from_usual_km_log",  # how far from where the card is usually used
    "far_from_usual",
    "merchant_count_24h_log",
    "amount_vs_merchant_log",
    "merchant_fraud_logit",  # the merchant's known fraud rate (labels older than the label delay), shrunk
]
# One-hot blocks, in this order (a list, not a dict: the order is part of the model's input layout).
CATEGORY_INPUTS = [("merchant_category", MERCHANT_CATEGORIES), ("channel", CHANNELS)]
# The numeric columns a transaction joined with its features carries.
NUMBER_COLUMNS = {"amount", "lat", "lon", *CARD_FEATURES, *MERCHANT_FEATURES}


Columns = Mapping[str, np.ndarray]
"""Transactions joined with their features as one array per column (the fields of a request or of a
training row, and the Feast features): numbers as float64 (NaN where missing), ``ts`` as numpy
datetime64 in UTC, categories as strings ("" where missing). Serving builds this from a request
without pandas; training gets it from a frame through :func:`frame_columns`."""



def frame_columns(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """A frame's columns as the arrays :func:`derive_columns` reads (pandas only here, for training)."""
    columns: dict[str, np.ndarray] = {}
    for name in df.columns:
        if name == "ts":
            columns[name] = pd.to_datetime(df["ts"], utc=True).dt.tz_localize(None).to_numpy()
        elif name in ("merchant_category", "channel"):
            columns[name] = df[name].astype("string").fillna("").to_numpy(dtype=object)
        elif name in NUMBER_COLUMNS:
            columns[name] = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype="float64")
    return columns


def _number(columns: Columns, name: str, rows: int, default: float = np.nan) -> np.ndarray:
    values = columns.get(name)
    return np.full(rows, default, dtype="float64") if values is None else values


def _fill(values: np.ndarray, default: float) -> np.ndarray:
    """NaN replaced by ``default`` (what ``np.nan_to_num(values, nan=default)`` gives for the finite
    numbers these columns hold, at a fraction of its cost: serving calls this on one-row arrays)."""
    return np.where(np.isnan(values), default, values)


def _between(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``np.clip`` without its per-call overhead (NaN stays NaN, as with clip)."""
    return np.minimum(np.maximum(values, low), high)


def _text(columns: Columns, name: str, rows: int) -> np.ndarray:
    values = columns.get(name)
    return np.full(rows, "", dtype=object) if values is None else values


def epoch_seconds(ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UTC datetime64 values as (float seconds since the epoch, whole seconds since the epoch).

    Computed from integer nanoseconds, as pandas' ``(ts - epoch).dt.total_seconds()`` did in
    training before this function existed, so the numbers stay the same to the last bit."""
    nanoseconds = ts.astype("datetime64[ns]").astype(np.int64)
    return nanoseconds / 1_000_000_000, nanoseconds // 1_000_000_000


def derive_columns(columns: Columns, category_offsets: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Derived numeric inputs (one float64 array per name in NUMERIC_INPUTS) from transactions
    joined with their features, given as :data:`Columns`.

    ``category_offsets``: per merchant category, the usual log ratio of an amount to the card's mean
    (a card spends more at a jeweller than at a pharmacy), learnt by :meth:`FeatureSpec.fit`; an
    amount is an outlier for its card only above the card's normal for that category.
    """
    rows = len(columns["ts"])
    amount = _number(columns, "amount", rows)
    card_mean = _number(columns, "card_amount_mean_30d", rows)
    card_mean = np.where(np.isnan(card_mean), amount, card_mean)
    card_std = _fill(_number(columns, "card_amount_std_30d", rows), 0.0)
    now, whole_seconds = epoch_seconds(columns["ts"])
    gap = _between(_fill(now - _number(columns, "card_last_txn_unix", rows), MAX_GAP_S), 0, MAX_GAP_S)
    second_of_day = whole_seconds % 86_400
    hour = (second_of_day // 3_600) + (second_of_day % 3_600 // 60) / 60.0
    hour_angle = 2 * np.pi * hour / 24
    lat, lon = _number(columns, "lat", rows, 0.0), _number(columns, "lon", rows, 0.0)
    usual_lat, usual_lon = _number(columns, "card_lat_mean_30d", rows), _number(columns, "card_lon_mean_30d", rows)
    distance = _fill(haversine_km(lat, lon, usual_lat, usual_lon), 0.0)
    merchant_mean = _number(columns, "merchant_amount_mean_30d", rows)
    merchant_mean = np.where(np.isnan(merchant_mean), amount, merchant_mean)
    log_amount = np.log1p(amount)
    amount_vs_card = log_amount - np.log1p(card_mean)
    offsets = category_offsets or {}
    category_offset = np.array([offsets.get(c, 0.0) for c in _text(columns, "merchant_category", rows)], dtype="float64")
    rapid = (gap < RAPID_REPEAT_S).astype("float64")
    count_1h = _fill(_number(columns, "card_txn_count_1h", rows), 0.0)
    labelled = _fill(_number(columns, "merchant_labelled_count_30d", rows), 0.0)
    frauds = _fill(_number(columns, "merchant_fraud_rate_30d", rows), 0.0) * labelled
    fraud_rate = (frauds + PRIOR_FRAUD_RATE * PRIOR_LABELS) / (labelled + PRIOR_LABELS)
    return {
        "log_amount": log_amount,
        "amount_vs_card_log": amount_vs_card,
        "amount_z_card": _between((amount - card_mean) / (card_std + 1.0), -10, 50),
        "amount_excess_for_category_log": np.maximum(0.0, amount_vs_card - category_offset),
        "card_count_1h_log": np.log1p(count_1h),
        "card_count_24h_log": np.log1p(_fill(_number(columns, "card_txn_count_24h", rows), 0.0)),
        "card_count_7d_log": np.log1p(_fill(_number(columns, "card_txn_count_7d", rows), 0.0)),
        "card_merchants_24h_log": np.log1p(_fill(_number(columns, "card_distinct_merchants_24h", rows), 0.0)),
        "seconds_since_last_log": np.log1p(gap),
        "rapid_repeat": rapid,
        "burst_count": rapid * np.minimum(count_1h, 5.0),
        "hour_sin": np.sin(hour_angle),
        "hour_cos": np.cos(hour_angle),
        "is_night": (hour < 6).astype("float64"),
        "distance_from_usual_km_log": np.log1p(distance),
        "far_from_usual": (distance > FAR_FROM_USUAL_KM).astype("float64"),
        "merchant_count_24h_log": np.log1p(_fill(_number(columns, "merchant_txn_count_24h", rows), 0.0)),
        "amount_vs_merchant_log": log_amount - np.log1p(merchant_mean),
        "merchant_fraud_logit": np.log(fraud_rate / (1.0 - fraud_rate)),
    }


def derive_inputs(df: pd.DataFrame, category_offsets: dict[str, float] | None = None) -> pd.DataFrame:
    """:func:`derive_columns` for a frame (training and evaluation): the same code, as a frame."""
    derived = derive_columns(frame_columns(df), category_offsets)
    return pd.DataFrame(derived, index=df.index)[NUMERIC_INPUTS]


MIN_ROWS_FOR_OFFSET = 20  # fewer rows of a category with card history: no offset (0) for it


def fit_category_offsets(df: pd.DataFrame) -> list[tuple[str, float]]:
    """Per merchant category, the median of ``log1p(amount) - log1p(card mean)`` over rows whose card
    has history (a list of pairs, sorted by category: the spec's JSON keeps it as it is)."""
    if "merchant_category" not in df or not len(df):
        return []
    columns = frame_columns(df)
    card_mean = _number(columns, "card_amount_mean_30d", len(df))
    known = ~np.isnan(card_mean)
    ratio = np.log1p(_number(columns, "amount", len(df))[known]) - np.log1p(card_mean[known])
    category = df["merchant_category"].astype("string").fillna("").to_numpy()[known]
    medians = pd.Series(ratio).groupby(category).agg(["median", "size"])
    return [(str(c), float(row["median"])) for c, row in medians.sort_index().iterrows() if row["size"] >= MIN_ROWS_FOR_OFFSET]


@dataclass
class FeatureSpec:
    """How to turn a frame into model inputs: the numeric inputs' scaling and the categories' vocabularies."""

    numeric: list[str] = field(default_factory=lambda: list(NUMERIC_INPUTS))
    means: list[float] = field(default_factory=list)
    stds: list[float] = field(default_factory=list)
    categories: list[tuple[str, list[str]]] = field(default_factory=lambda: [(k, list(v)) for k, v in CATEGORY_INPUTS])
    # Per merchant category, the median log ratio of an amount to the card's mean (see derive_inputs).
    category_offsets: list[tuple[str, float]] = field(default_factory=list)

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
        """Learn the categories' amount offsets, then the numeric inputs' mean and spread, from training rows."""
        spec = cls()
        spec.category_offsets = fit_category_offsets(df)
        derived = derive_inputs(df, spec.offsets)
        spec.means = [float(x) for x in derived.mean().to_numpy()]
        spec.stds = [float(x) if x > 1e-9 else 1.0 for x in derived.std(ddof=0).to_numpy()]
        return spec

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """The model's input matrix (float32, one row per transaction) for a frame (training)."""
        return self.transform_columns(frame_columns(df))

    def transform_columns(self, columns: Columns) -> np.ndarray:
        """The model's input matrix (float32, one row per transaction) for :data:`Columns`: the one
        implementation behind both training (through :meth:`transform`) and serving."""
        if not self.means:
            raise ValueError("FeatureSpec.transform called before fit")
        derived = derive_columns(columns, self.offsets)
        rows = len(columns["ts"])
        # Only the inputs this spec was fitted with: a spec saved before an input was added keeps its layout.
        stacked = np.stack([derived[name] for name in self.numeric if name in derived], axis=1)
        blocks = [(stacked - np.asarray(self.means)) / np.asarray(self.stds)]
        for column, vocab in self.categories:
            index = {v: i for i, v in enumerate(vocab)}
            codes = np.array([index.get(v, len(vocab)) for v in _text(columns, column, rows)], dtype=np.int64)
            blocks.append(np.eye(len(vocab) + 1)[codes])
        return _fill(np.hstack(blocks), 0.0).astype(np.float32)  # as nan_to_num: infinities become float32 infinities either way

    @property
    def offsets(self) -> dict[str, float]:
        return dict(self.category_offsets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureSpec":
        data = dict(data)
        data["categories"] = [(column, list(vocab)) for column, vocab in data["categories"]]
        data["category_offsets"] = [(column, float(offset)) for column, offset in data.get("category_offsets", [])]
        return cls(**data)
