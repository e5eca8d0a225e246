"""The lake's staging lifecycle: nothing of a batch is visible until validation passes; a rejected
batch leaves the lake byte-identical; an interrupted publish leaves readers on the old snapshot and
completes when run again; readers follow published manifests, never the files they find."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel import lake, lineage, steps
from flywheel.config import Settings
from flywheel.errors import DataError, ValidationFailed
from flywheel.ingest import ingest
from flywheel.storage import Storage
from tests import factories
from tests.factories import FRAUD_CONTRACT, FRAUD_SCHEMA


def batch(rows: int, prefix: str, seed: int, **kwargs) -> pd.DataFrame:
    """Transactions over two days with a 5% fraud rate (the suite allows 0.05% to 20%)."""
    return factories.make_transactions(rows, seed=seed, id_prefix=prefix, start="2026-05-01", days=2, **kwargs)


def deliver(df: pd.DataFrame, folder: Path, name: str = "tx.parquet") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), folder / name)
    return str(folder)


def crash(*args, **kwargs):
    """Stands in for a lake function to stop a publish midway, as a killed process would."""
    raise RuntimeError("power cut")


def lake_state(lake_dir: Path) -> dict[str, bytes | None]:
    """Every path under the lake (folders too) with its bytes: names and contents."""
    return {p.relative_to(lake_dir).as_posix(): p.read_bytes() if p.is_file() else None for p in lake_dir.rglob("*")}


def latest_ids(storage: Storage, lake_uri: str) -> set[str]:
    snapshot = lake.latest_snapshot(storage, lake_uri)
    return set(lake.read_snapshot(storage, snapshot, FRAUD_SCHEMA, ["transaction_id"]).column("transaction_id").to_pylist())


@pytest.fixture()
def clean_lake(flywheel_home: Settings, tmp_path: Path) -> tuple[Settings, Storage, str, str, dict]:
    """A lake with one validated, published batch of 400 clean rows (ingest_step + validate_step)."""
    storage = Storage.from_settings(flywheel_home)
    source = deliver(batch(400, "a", 1), tmp_path / "deliveries" / "clean")
    published = steps.validate_step(steps.ingest_step(source, "run-1", flywheel_home), "run-1", flywheel_home)
    return flywheel_home, storage, storage.uri("lake"), source, published


def fraud_jump(tmp_path: Path) -> str:
    """A delivery whose fraud rate jumped to 60%: every row is schema-valid, the batch is not."""
    df = batch(600, "f", 2)
    df["is_fraud"] = (pd.Series(range(600)) % 5 < 3).astype("int8")
    return deliver(df, tmp_path / "deliveries" / "fraud-jump")


def negative_amounts(tmp_path: Path) -> str:
    """A delivery with a row-level failure: five negative amounts."""
    df = batch(100, "n", 3)
    df.loc[:4, "amount"] = -5.0
    return deliver(df, tmp_path / "deliveries" / "negative")


@pytest.mark.parametrize(
    ("delivery", "expectation"),
    [
        (fraud_jump, "expect_column_mean_to_be_between(is_fraud)"),
        (negative_amounts, "expect_column_values_to_be_between(amount)"),
    ],
)
def test_a_rejected_batch_leaves_the_lake_byte_identical_and_the_next_runs_succeed(
    clean_lake, tmp_path: Path, delivery, expectation: str
) -> None:
    settings, storage, lake_uri, clean_source, first = clean_lake
    lake_dir = Path(lake_uri)
    before = lake_state(lake_dir)
    latest_before = (lake_dir / "_snapshots" / "latest.json").read_bytes()

    staged = steps.ingest_step(delivery(tmp_path), "run-2", settings)
    with pytest.raises(ValidationFailed) as info:
        steps.validate_step(staged, "run-2", settings)

    assert expectation in str(info.value) and "discarded" in str(info.value)
    # The message names what was refused (the delivered files, the lake), not a manifest that is gone.
    assert staged["source_files"][0]["uri"] in str(info.value) and lake_uri in str(info.value)
    assert "_staging" not in str(info.value)
    assert lake_state(lake_dir) == before, "nothing of a rejected batch may stay in the lake"
    assert (lake_dir / "_snapshots" / "latest.json").read_bytes() == latest_before
    assert Path(storage.uri("reports", "validation", "run-2", "validation.json")).is_file()  # the evidence stays
    assert all(lineage.lookup(storage, uri) is None for uri in staged["new_parts"])

    # The earlier clean source validates again (the bug: it failed every time from now on) ...
    again = steps.validate_step(steps.ingest_step(clean_source, "run-3", settings), "run-3", settings)
    assert again["sha256"] == first["sha256"] and again["new_parts"] == []
    # ... and so does a new clean batch, which the lake then holds.
    fresh = deliver(batch(200, "b", 4), tmp_path / "deliveries" / "next")
    grown = steps.validate_step(steps.ingest_step(fresh, "run-4", settings), "run-4", settings)
    assert grown["rows"] == 600 and grown["parent"] == first["sha256"]
    assert lake.load_snapshot(storage, lake.latest_snapshot_uri(lake_uri)).sha256 == grown["sha256"]


def test_readers_never_see_a_staged_batch(clean_lake, tmp_path: Path) -> None:
    settings, storage, lake_uri, _, first = clean_lake
    staged = steps.ingest_step(deliver(batch(50, "s", 5), tmp_path / "deliveries" / "s"), "run-2", settings)

    assert staged["staging_uri"] and all("/_staging/" not in p["uri"] for p in staged["parts"])
    assert lake.latest_snapshot(storage, lake_uri).sha256 == first["sha256"]
    assert not any(i.startswith("s") for i in latest_ids(storage, lake_uri))
    with pytest.raises(DataError, match="staged, not published"):
        steps.features_step(staged, "run-2", settings)


@pytest.mark.parametrize("crash_in", ["_write_manifest", "_move_latest"])
def test_an_interrupted_publish_leaves_readers_on_the_old_snapshot_and_a_rerun_completes_it(
    clean_lake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_in: str
) -> None:
    settings, storage, lake_uri, _, first = clean_lake
    staged = steps.ingest_step(deliver(batch(80, "i", 6), tmp_path / "deliveries" / "i"), "run-2", settings)

    with monkeypatch.context() as patch:
        patch.setattr(lake, crash_in, crash)
        with pytest.raises(RuntimeError, match="power cut"):
            steps.validate_step(staged, "run-2", settings)

    assert all(Path(uri).is_file() for uri in staged["new_parts"])  # copied into transactions/ ...
    assert lake.latest_snapshot(storage, lake_uri).sha256 == first["sha256"]  # ... but not published
    assert not any(i.startswith("i") for i in latest_ids(storage, lake_uri))

    published = steps.validate_step(staged, "run-2", settings)  # the step, run again

    assert published["sha256"] == staged["sha256"] and published["rows"] == 480
    assert lake.latest_snapshot(storage, lake_uri).sha256 == staged["sha256"]
    assert len([i for i in latest_ids(storage, lake_uri) if i.startswith("i")]) == 80
    assert not Path(staged["staging_uri"]).exists()
    part = staged["new_parts"][0]
    assert lineage.lookup(storage, part)["inputs"][0]["uri"].endswith("/deliveries/i/tx.parquet")


def test_parts_no_manifest_names_are_never_published(clean_lake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, storage, lake_uri, _, first = clean_lake
    # Leftovers of a publish that died before its manifest, of a batch that was then given up ...
    abandoned = steps.ingest_step(deliver(batch(30, "x", 7), tmp_path / "deliveries" / "x"), "run-2", settings)
    with monkeypatch.context() as patch:
        patch.setattr(lake, "_write_manifest", crash)
        with pytest.raises(RuntimeError):
            lake.publish_staged(storage, lake.LakeSnapshot.from_dict(abandoned), "run-2")
    lake.discard_staged(storage, lake.LakeSnapshot.from_dict(abandoned))
    # ... and a part someone copied in by hand.
    stray = Path(lake_uri) / "transactions" / "date=2026-05-01" / "part-stray.parquet"
    pq.write_table(pa.Table.from_pandas(batch(10, "h", 8), preserve_index=False).cast(FRAUD_SCHEMA), stray)
    leftovers = {*abandoned["new_parts"], str(stray)}
    assert all(Path(uri).is_file() for uri in leftovers)

    staged = steps.ingest_step(deliver(batch(40, "y", 9), tmp_path / "deliveries" / "y"), "run-3", settings)
    published = steps.validate_step(staged, "run-3", settings)

    assert not leftovers & {p["uri"] for p in published["parts"]}
    assert published["rows"] == 440
    assert not any(i.startswith(("x", "h")) for i in latest_ids(storage, lake_uri))


def test_a_batch_staged_on_an_older_lake_is_refused(storage_and_lake) -> None:
    storage, lake_uri, tmp_path = storage_and_lake
    first = ingest(storage, deliver(batch(40, "p", 1), tmp_path / "p"), lake_uri, "run-1", contract=FRAUD_CONTRACT)
    second = ingest(storage, deliver(batch(40, "q", 2), tmp_path / "q"), lake_uri, "run-2", contract=FRAUD_CONTRACT)  # staged on the same (empty) lake
    lake.publish_staged(storage, first, "run-1")
    before = lake_state(Path(lake_uri) / "_snapshots")

    with pytest.raises(DataError, match="re-run ingest"):
        lake.publish_staged(storage, second, "run-2")

    assert lake_state(Path(lake_uri) / "_snapshots") == before
    assert lake.publish_staged(storage, ingest(storage, str(tmp_path / "q"), lake_uri, "run-3", contract=FRAUD_CONTRACT), "run-3").rows == 80


def test_a_staged_snapshot_has_the_identity_it_is_published_under(storage_and_lake) -> None:
    storage, lake_uri, tmp_path = storage_and_lake
    staged = ingest(storage, deliver(batch(40, "p", 1), tmp_path / "p"), lake_uri, "run-1", contract=FRAUD_CONTRACT)
    assert staged.uri == f"{lake_uri}/_staging/run-1/snapshot.json" and staged.staged
    assert all(p["staged_uri"].startswith(f"{lake_uri}/_staging/run-1/transactions/date=") for p in staged.parts)
    assert lake.latest_snapshot(storage, lake_uri) is None and not (Path(lake_uri) / "transactions").exists()

    published = lake.publish_staged(storage, staged, "run-1")

    assert published.sha256 == staged.sha256 == lake.snapshot_sha256([p["sha256"] for p in published.parts])
    assert published.uri == f"{lake_uri}/_snapshots/{staged.sha256}.json" and not published.staged
    assert [p["uri"] for p in published.parts] == [p["uri"] for p in staged.parts]
    assert all(set(p) == {"uri", "sha256", "rows", "date", "ids", "ids_slice"} for p in published.parts)
    assert all(Path(p["ids"]).is_file() and p["ids"].startswith(f"{lake_uri}/_index/") for p in published.parts)
    for part in published.parts:  # each part's slice of the batch's id index holds exactly its ids
        ids = pq.read_table(part["uri"]).column("transaction_id")
        assert lake.read_id_index(storage, part, FRAUD_CONTRACT).tolist() == sorted(lake.id_hashes(ids).tolist())
    assert len(set(lake.id_hashes(pa.array([f"t{i}" for i in range(100_000)])).tolist())) == 100_000
    assert lake.publish_staged(storage, staged, "run-1") == published  # idempotent
    assert lake.read_snapshot(storage, published, FRAUD_SCHEMA).num_rows == 40


@pytest.fixture()
def storage_and_lake(tmp_path: Path) -> tuple[Storage, str, Path]:
    return Storage(str(tmp_path / "root")), str(tmp_path / "lake"), tmp_path


def _id_hash_by_hand(text: str) -> int:
    """The index's documented hash, one byte at a time: sum of (byte + 1) * 0x100000001B3**i mod
    2**64, the length mixed in, then splitmix64's finalizer."""
    mask, value, power = (1 << 64) - 1, 0, 1
    data = text.encode()
    for byte in data:
        value, power = (value + (byte + 1) * power) & mask, (power * 0x100000001B3) & mask
    value ^= (len(data) * 0x94D049BB133111EB) & mask
    value ^= value >> 30
    value = (value * 0xBF58476D1CE4E5B9) & mask
    value ^= value >> 27
    value = (value * 0x94D049BB133111EB) & mask
    return value ^ (value >> 31)


@pytest.mark.parametrize("ids", [
    ["t7-0000000001", "t7-0000000002", "x9-9999999999"],  # one length: the column-at-a-time path
    ["a", "bb", "", "héllo", "t7-0000000001"],  # mixed lengths (and non-ASCII): the general path
])
def test_id_hashes_stay_the_values_the_index_stores(ids: list[str]) -> None:
    """A changed hash (e.g. in a faster path for ids of one length) would make every published index
    miss re-delivered ids: both paths, sliced arrays too, must equal the hash computed by hand."""
    array = pa.chunked_array([pa.array(["zz"] + ids[:1]).slice(1), pa.array(ids[1:])])
    assert lake.id_hashes(array).tolist() == [_id_hash_by_hand(i) for i in ids]
    assert lake.id_hashes(pa.array(ids).slice(1)).tolist() == [_id_hash_by_hand(i) for i in ids[1:]]
