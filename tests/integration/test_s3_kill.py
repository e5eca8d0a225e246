"""The S3 server SIGKILLed in the middle of a write during `flywheel ingest` from s3://raw/... to
s3://lake/...: the step retries with backoff, then fails with a clear error; a reader never sees part
of the batch; after a restart on the same data, the rerun leaves the lake an undisturbed run leaves.

The server is a SeaweedFS of this test's own (it is killed), behind the test proxy, which forwards
the chosen PUT's headers and half its body, then kills the server while that write is in flight."""

from __future__ import annotations

import hashlib
import io
import json
import os
import urllib.parse
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel import lake
from flywheel.cli import main
from flywheel.config import load_settings
from flywheel.storage import Storage
from tests import factories
from tests.factories import FRAUD_SCHEMA
from tests.s3_server import FaultProxy, SeaweedS3

LAKE = "s3://lake/tx"
RUN_SPECIFIC = ("run_id", "report_uri", "html_uri")  # the manifest names the run whose report let it in


def parquet(df: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buffer)
    return buffer.getvalue()


def lake_contents(storage: Storage) -> dict[str, object]:
    """Every object of the lake by its path in the lake: the sha256 of its bytes, or for a snapshot
    manifest its JSON less the validating run's name (the only run-specific field)."""
    out: dict[str, object] = {}
    for uri in storage.list(LAKE):
        data = storage.read_bytes(uri)
        if "/_snapshots/" in uri:
            manifest = json.loads(data)
            manifest["validated_by"] = {k: v for k, v in manifest["validated_by"].items() if k not in RUN_SPECIFIC}
            out[uri[len(LAKE):]] = manifest
        else:
            out[uri[len(LAKE):]] = hashlib.sha256(data).hexdigest()
    return out


def what_a_reader_sees(storage: Storage) -> dict[str, object]:
    """A reader of the lake: the latest snapshot, every part it lists read whole (sha256-checked)."""
    snapshot = lake.latest_snapshot(storage, LAKE)
    assert snapshot is not None
    table = lake.read_snapshot(storage, snapshot, FRAUD_SCHEMA)
    return {"sha256": snapshot.sha256, "rows": table.num_rows, "ids": sorted(table.column("transaction_id").to_pylist())}


@pytest.fixture()
def killable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aws_env: None):
    """A SeaweedFS of this test's own behind the fault proxy; settings point at the proxy, with short
    retries. Yields (server, proxy, storage through the proxy, storage straight to the server)."""
    weed = SeaweedS3(tmp_path / "weed")
    server = weed.start()
    proxy = FaultProxy(server.endpoint)
    for name in [n for n in os.environ if n.startswith("FLYWHEEL_")]:
        monkeypatch.delenv(name)
    env = {
        "FLYWHEEL_HOME": str(tmp_path / "home"),
        "FLYWHEEL_STORAGE__ROOT": "s3://flywheel/store",
        "FLYWHEEL_STORAGE__S3_ENDPOINT": proxy.endpoint,
        "FLYWHEEL_STORAGE__S3_SECURE": "false",
        "FLYWHEEL_STORAGE__S3_REGION": server.region,
        "FLYWHEEL_S3_ACCESS_KEY": server.access_key,
        "FLYWHEEL_S3_SECRET_KEY": server.secret_key,
        "FLYWHEEL_STORAGE__RETRIES": "3",
        "FLYWHEEL_STORAGE__RETRY_BACKOFF_S": "0.05",
        "FLYWHEEL_STORAGE__TIMEOUT_S": "10",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    through_proxy = Storage.from_settings(load_settings())
    direct = Storage.from_settings(load_settings(env={**env, "FLYWHEEL_STORAGE__S3_ENDPOINT": server.endpoint}))
    for bucket in ("raw", "lake", "flywheel"):
        direct.s3.ensure_bucket(bucket)
    try:
        yield weed, proxy, through_proxy, direct
    finally:
        proxy.close()
        weed.stop()


def test_sigkill_mid_write_retries_then_fails_clearly_and_the_rerun_after_a_restart_equals_an_undisturbed_run(
    killable, capsys
) -> None:
    weed, proxy, _, direct = killable
    monday = factories.make_transactions(1000, seed=1, id_prefix="a", start="2026-10-01", days=3, cards=200, merchants=60)
    tuesday = factories.make_transactions(1000, seed=2, id_prefix="b", start="2026-10-04", days=3, cards=200, merchants=60)
    direct.write_bytes("s3://raw/deliveries/monday/tx.parquet", parquet(monday))
    direct.write_bytes("s3://raw/deliveries/tuesday/tx.parquet", parquet(tuesday))

    # The undisturbed run, for reference; then the same lake again from nothing.
    assert main(["ingest", "s3://raw/deliveries/monday", "--lake", LAKE]) == 0
    assert main(["ingest", "s3://raw/deliveries/tuesday", "--lake", LAKE]) == 0
    undisturbed = lake_contents(direct)
    assert sum(1 for path in undisturbed if path.startswith("/transactions/")) == 6  # 3 days a delivery
    direct.delete_tree(LAKE)
    assert main(["ingest", "s3://raw/deliveries/monday", "--lake", LAKE]) == 0
    before = what_a_reader_sees(direct)
    assert before["rows"] == 1000

    # Publishing tuesday: its second part's PUT is half sent when the server is SIGKILLed.
    seen_during: list[object] = []

    def read_then_kill() -> None:
        try:
            seen_during.append(what_a_reader_sees(direct))
            seen_during.append(direct.list(f"{LAKE}/transactions"))
        except Exception as exc:  # recorded, asserted below (this runs in the proxy's thread)
            seen_during.append(exc)
        finally:
            weed.stop()  # SIGKILL

    proxy.kill_during("PUT", "/lake/tx/transactions/", 2, read_then_kill)
    proxy.requests.clear()
    capsys.readouterr()
    assert main(["ingest", "s3://raw/deliveries/tuesday", "--lake", LAKE]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert "failed: the batch from s3://raw/deliveries/tuesday did not complete" in out.out, out.out
    assert "failed after 4 tries: cannot reach" in out.err and "/lake/tx/transactions/date=" in out.err, out.err
    part_puts = [r for r in proxy.requests if r.startswith("PUT /lake/tx/transactions/")]
    interrupted = part_puts[1]
    assert part_puts.count(part_puts[0]) == 1 and part_puts.count(interrupted) == 4, (
        "the interrupted write is tried 1 + storage.retries times", part_puts)

    def uri_of(request: str) -> str:
        return "s3:/" + urllib.parse.unquote(request.split(" ")[1].split("?")[0])

    # During the write: the reader saw the snapshot before the batch, whole; the half-written part
    # was nowhere (only the part published before it was, and no manifest named it).
    assert len(seen_during) == 2 and not any(isinstance(x, Exception) for x in seen_during), seen_during
    assert seen_during[0] == before
    assert uri_of(part_puts[0]) in seen_during[1] and uri_of(interrupted) not in seen_during[1]

    # After a restart on the same data: still the old snapshot, every part of it intact.
    weed.restart()
    assert what_a_reader_sees(direct) == before

    # The rerun completes, and the lake is the undisturbed run's: the same objects, the same bytes.
    assert main(["ingest", "s3://raw/deliveries/tuesday", "--lake", LAKE]) == 0
    after = what_a_reader_sees(direct)
    assert after["rows"] == 2000 and after["ids"] == sorted([*monday["transaction_id"], *tuesday["transaction_id"]])
    assert lake_contents(direct) == undisturbed
