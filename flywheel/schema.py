"""The data contract: what a raw card transaction looks like, from generation to serving."""

from __future__ import annotations

import pyarrow as pa

LABEL = "is_fraud"
TIMESTAMP = "ts"
ID = "transaction_id"

# The raw transaction as it arrives (csv, parquet or jsonl) and as it is stored in the lake.
TRANSACTION_SCHEMA = pa.schema(
    [
        pa.field("transaction_id", pa.string(), nullable=False),
        pa.field("card_id", pa.string(), nullable=False),
        pa.field("merchant_id", pa.string(), nullable=False),
        pa.field("merchant_category", pa.string(), nullable=False),
        pa.field("amount", pa.float64(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("channel", pa.string(), nullable=False),
        pa.field("lat", pa.float64(), nullable=False),
        pa.field("lon", pa.float64(), nullable=False),
        pa.field(LABEL, pa.int8(), nullable=False),
    ]
)

# What a scoring request carries: the transaction's own fields, minus the label.
REQUEST_FIELDS = [f.name for f in TRANSACTION_SCHEMA if f.name != LABEL]
REQUIRED_REQUEST_FIELDS = ["card_id", "merchant_id", "amount", "ts"]

# The truth file written apart from the raw data: each row's true fraud probability.
TRUTH_SCHEMA = pa.schema(
    [
        pa.field("transaction_id", pa.string(), nullable=False),
        pa.field("fraud_probability", pa.float64(), nullable=False),
    ]
)

MERCHANT_CATEGORIES = [
    "grocery",
    "restaurant",
    "gas",
    "pharmacy",
    "retail",
    "online_retail",
    "entertainment",
    "travel",
    "electronics",
    "jewelry",
    "gift_cards",
    "crypto",
]
CHANNELS = ["chip", "contactless", "swipe", "online"]
