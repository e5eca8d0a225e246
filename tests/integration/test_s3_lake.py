"""The lake's staging lifecycle on S3 (SeaweedFS over HTTP on 127.0.0.1): staged objects are removed on
discard and on publish, and a publish moves latest only after the parts are in place."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flywheel import lake
from flywheel.ingest import ingest
from flywheel.storage import Storage
from tests import factories
from tests.factories import FRAUD_CONTRACT, FRAUD_SCHEMA


def test_stage_discard_and_publish_on_s3(s3_storage: Storage, tmp_path: Path) -> None:
    lake_uri = s3_storage.uri("lake")
    for name, prefix in (("first", "a"), ("second", "b")):
        df = factories.make_transactions(60, seed=len(name), id_prefix=prefix, start="2026-05-01", days=2)
        s3_storage.write_bytes(s3_storage.uri("raw", name, "tx.parquet"), _parquet(df))
    first = lake.publish_staged(s3_storage, ingest(s3_storage, s3_storage.uri("raw", "first"), lake_uri, "run-1", contract=FRAUD_CONTRACT), "run-1")
    before = {uri: s3_storage.read_bytes(uri) for uri in s3_storage.list(lake_uri)}
    assert not any("/_staging/" in uri for uri in before)

    rejected = ingest(s3_storage, s3_storage.uri("raw", "second"), lake_uri, "run-2", contract=FRAUD_CONTRACT)
    assert any("/_staging/run-2/" in uri for uri in s3_storage.list(lake_uri))
    lake.discard_staged(s3_storage, rejected)
    assert {uri: s3_storage.read_bytes(uri) for uri in s3_storage.list(lake_uri)} == before

    published = lake.publish_staged(s3_storage, ingest(s3_storage, s3_storage.uri("raw", "second"), lake_uri, "run-3", contract=FRAUD_CONTRACT), "run-3")
    assert published.rows == 120 and published.parent == first.sha256
    assert lake.latest_snapshot(s3_storage, lake_uri).sha256 == published.sha256
    assert not any("/_staging/" in uri for uri in s3_storage.list(lake_uri))
    assert lake.read_snapshot(s3_storage, published, FRAUD_SCHEMA).num_rows == 120


def _parquet(df) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), sink)
    return sink.getvalue().to_pybytes()
