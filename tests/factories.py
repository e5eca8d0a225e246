"""Small synthetic transactions matching fraud's contract, for tests that need hand-sized data, and
fraud's own generator (usecases/fraud/generator.py) for tests that need realistic data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from flywheel.features.views import views_of
from flywheel.usecase import load_module, load_usecase

REPO = Path(__file__).resolve().parents[1]
# The repository's first use case, as the platform loads it (the settings' default use case).
FRAUD = load_usecase(REPO / "usecases" / "fraud")
FRAUD_CONTRACT = FRAUD.contract
FRAUD_SCHEMA = FRAUD_CONTRACT.arrow_schema()
FRAUD_VIEWS = views_of(FRAUD)  # card_features and merchant_features, from its features.yaml
FRAUD_LABEL = FRAUD.task.label
MERCHANT_CATEGORIES = list(FRAUD_CONTRACT.columns["merchant_category"].categories)
CHANNELS = list(FRAUD_CONTRACT.columns["channel"].categories)
# What a fraud scoring request carries: the contract's request fields, in its column order.
FRAUD_REQUEST_FIELDS = list(FRAUD_CONTRACT.request_fields())
# Fraud's generator, imported as the platform imports a use case's modules (source.py does the same).
FRAUD_GENERATOR = load_module(FRAUD, "generator")
generate = FRAUD_GENERATOR.generate


def fraud_tables(card_table: object, merchant_table: object) -> dict[str, str]:
    """Fraud's offline tables by view name (paths, or frames), as the features code takes them."""
    return {"card_features": str(card_table) if not hasattr(card_table, "columns") else card_table,
            "merchant_features": str(merchant_table) if not hasattr(merchant_table, "columns") else merchant_table}


def make_transactions(
    rows: int = 300,
    *,
    seed: int = 0,
    start: str = "2026-10-01",
    days: int = 3,
    cards: int = 50,
    merchants: int = 20,
    id_prefix: str = "t",
    in_time_order: bool = False,
    fraud_every: int = 20,
) -> pd.DataFrame:
    """``rows`` transactions over ``days`` from ``start``; every ``fraud_every``-th row is fraud."""
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, days * 86_400 * 1_000_000, rows)
    if in_time_order:
        offsets = np.sort(offsets)
    return pd.DataFrame(
        {
            "transaction_id": [f"{id_prefix}{i:05d}" for i in range(rows)],
            "card_id": [f"c{i:03d}" for i in rng.integers(0, cards, rows)],
            "merchant_id": [f"m{i:03d}" for i in rng.integers(0, merchants, rows)],
            "merchant_category": rng.choice(MERCHANT_CATEGORIES, rows),
            "amount": np.maximum(rng.lognormal(3, 1, rows).round(2), 0.5),
            "ts": (pd.Timestamp(start, tz="UTC") + pd.to_timedelta(offsets, unit="us")).astype("datetime64[us, UTC]"),
            "channel": rng.choice(CHANNELS, rows),
            "lat": rng.uniform(-60, 60, rows),
            "lon": rng.uniform(-150, 150, rows),
            "is_fraud": (np.arange(rows) % fraud_every == 0).astype("int8"),
        }
    )


def request_of(frame: pd.DataFrame, schema) -> dict:
    """The v1 body a client would send for these rows: the request's fields, times as ISO 8601."""
    instances = []
    for record in frame[[spec.name for spec in schema.fields]].to_dict("records"):
        instance = {}
        for name, value in record.items():
            if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NaT:
                continue
            instance[name] = value.isoformat() if isinstance(value, pd.Timestamp) else value.item() if isinstance(value, np.generic) else value
        instances.append(instance)
    return {"instances": instances}
