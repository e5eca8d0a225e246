"""`flywheel ingest` from s3:// raw deliveries into an s3:// lake, on the suite's S3 server over HTTP."""

from __future__ import annotations

import hashlib
import io
import uuid
from typing import Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel.cli import main
from flywheel.config import load_settings
from flywheel.storage import Storage
from tests import factories


def parquet(df: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buffer)
    return buffer.getvalue()


def lake_bytes(storage: Storage, lake_uri: str) -> dict[str, str]:
    return {uri: hashlib.sha256(storage.read_bytes(uri)).hexdigest() for uri in storage.list(lake_uri)}


def test_ingest_from_s3_raw_into_an_s3_lake(
    s3_env: Callable[..., dict[str, str]], aws_env: None, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    bucket = f"flywheel-ingest-{uuid.uuid4().hex[:10]}"
    env = s3_env(f"s3://{bucket}/flywheel")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    storage = Storage.from_settings(load_settings())
    storage.s3.ensure_bucket(bucket)
    raw, lake_uri = f"s3://{bucket}/raw", f"s3://{bucket}/lake"
    monday = factories.make_transactions(1000, seed=1, id_prefix="a", start="2026-10-01", days=3, cards=200, merchants=60)
    tuesday = factories.make_transactions(1000, seed=2, id_prefix="b", start="2026-10-04", days=3, cards=200, merchants=60)
    storage.write_bytes(f"{raw}/monday/tx.parquet", parquet(monday))
    tuesday_csv = tuesday.assign(ts=tuesday["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")).to_csv(index=False)
    storage.write_bytes(f"{raw}/tuesday/tx.csv", tuesday_csv.encode())

    assert main(["ingest", f"{raw}/monday", "--lake", lake_uri]) == 0
    assert main(["ingest", f"{raw}/*/*", "--lake", lake_uri]) == 0
    out = capsys.readouterr().out
    assert "2 file(s) seen, 1 skipped as already ingested, 1,000 rows accepted" in out, out
    latest = storage.read_json(f"{lake_uri}/_snapshots/latest.json")
    assert latest["rows"] == 2000 and all(p["ids"].startswith(f"{lake_uri}/_index/") for p in latest["parts"])

    before = lake_bytes(storage, lake_uri)
    shifted = tuesday.assign(amount=tuesday["amount"] * 100, transaction_id=tuesday["transaction_id"].str.replace("b", "c"))
    storage.write_bytes(f"{raw}/wednesday/tx.parquet", parquet(shifted))
    assert main(["ingest", f"{raw}/wednesday/tx.parquet", "--lake", lake_uri]) == 1
    assert "expect_column_quantile_values_to_be_between(amount)" in capsys.readouterr().err
    assert lake_bytes(storage, lake_uri) == before, "a rejected batch leaves no object behind in the S3 lake"
