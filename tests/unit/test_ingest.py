"""Ingest: raw csv/parquet/jsonl files become a schema-enforced, date-partitioned, idempotent lake.

Most tests publish what ingest stages right away (`ingest_and_publish`): they are about ingest itself;
the validated path (stage, validate, publish or discard) is tested in test_lake.py."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel import lineage
from flywheel.errors import DataError
from flywheel.ingest import IngestOptions, ingest
from flywheel.lake import LakeSnapshot, id_hashes, load_snapshot, publish_snapshot, publish_staged, read_id_index, read_snapshot, snapshot_sha256
from flywheel.lake import part_name as lake_part_name
from flywheel.storage import Storage
from tests import factories
from tests.factories import FRAUD_CONTRACT, FRAUD_SCHEMA

DATES = ["2026-03-01", "2026-03-02", "2026-03-03"]


def make_transactions(rows: int = 300, seed: int = 0, id_prefix: str = "t") -> pd.DataFrame:
    """Rows matching FRAUD_SCHEMA, spread over DATES, in shuffled time order."""
    return factories.make_transactions(rows, seed=seed, id_prefix=id_prefix, start=DATES[0], days=len(DATES), fraud_every=33)


def ingest_and_publish(storage: Storage, source: str, lake: str, run_id: str) -> LakeSnapshot:
    """Ingest a batch and publish it without validation."""
    return publish_staged(storage, ingest(storage, source, lake, run_id, contract=FRAUD_CONTRACT), run_id)


def write_parquet(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return path


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = df.copy()
    if "ts" in out and pd.api.types.is_datetime64_any_dtype(out["ts"]):
        out["ts"] = out["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    out.to_csv(path, index=False)
    return path


def write_jsonl(df: pd.DataFrame, path: Path, ts_format: str = "offset") -> Path:
    """ts as ISO strings with a +02:00 offset (the same instants), to exercise offset parsing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = df.copy()
    if ts_format == "offset":
        out["ts"] = out["ts"].dt.tz_convert("Etc/GMT-2").map(lambda t: t.isoformat())
    out.to_json(path, orient="records", lines=True)
    return path


@pytest.fixture()
def storage(tmp_path: Path) -> Storage:
    return Storage(str(tmp_path / "root"))


@pytest.fixture()
def raw(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """A raw folder with one file of each format (disjoint ids) and the rows they hold."""
    folder = tmp_path / "raw"
    a, b, c = make_transactions(300, 1, "p"), make_transactions(200, 2, "c"), make_transactions(100, 3, "j")
    write_parquet(a, folder / "a.parquet")
    write_csv(b, folder / "batch" / "b.csv")
    write_jsonl(c, folder / "c.jsonl")
    return folder, pd.concat([a, b, c], ignore_index=True)


def lake_files(lake: Path) -> list[Path]:
    return sorted(p for p in lake.rglob("*") if p.is_file())


def test_ingest_partitions_by_date_with_schema_and_sorted_rows(storage: Storage, raw, tmp_path: Path) -> None:
    folder, expected = raw
    lake = tmp_path / "lake"
    snap = ingest_and_publish(storage, str(folder), str(lake), run_id="r1")

    assert snap.rows == len(expected) == 600
    assert len(snap.source_files) == 3
    assert {f["rows"] for f in snap.source_files} == {300, 200, 100}
    # 3 files x 3 dates
    assert len(snap.parts) == 9 and sorted(snap.new_parts) == [p["uri"] for p in snap.parts]
    assert [p["uri"] for p in snap.parts] == sorted(p["uri"] for p in snap.parts)
    dates = sorted({p["date"] for p in snap.parts})
    assert dates == DATES
    for part in snap.parts:
        table = pq.read_table(part["uri"])
        assert table.schema.equals(FRAUD_SCHEMA, check_metadata=False)
        assert table.num_rows == part["rows"]
        assert f"/transactions/date={part['date']}/part-" in part["uri"]
        ts = table.column("ts").to_pandas()
        assert ts.is_monotonic_increasing
        assert set(ts.dt.strftime("%Y-%m-%d")) == {part["date"]}

    table = read_snapshot(storage, snap, FRAUD_SCHEMA)
    assert table.schema.equals(FRAUD_SCHEMA, check_metadata=False)
    got = table.to_pandas().sort_values("transaction_id").reset_index(drop=True)
    want = expected.sort_values("transaction_id").reset_index(drop=True)
    # Same instants whatever the source format (csv with Z, jsonl with +02:00 offsets).
    pd.testing.assert_series_equal(got["ts"], want["ts"].astype("datetime64[us, UTC]"), check_names=False)
    pd.testing.assert_frame_equal(got.drop(columns="ts"), want.drop(columns="ts"), check_dtype=False)
    assert read_snapshot(storage, snap, FRAUD_SCHEMA, columns=["amount"]).column_names == ["amount"]


def test_manifest_is_published_and_loadable(storage: Storage, raw, tmp_path: Path) -> None:
    folder, _ = raw
    lake = tmp_path / "lake"
    snap = ingest_and_publish(storage, str(folder), str(lake), run_id="r1")

    assert snap.uri == str(lake / "_snapshots" / f"{snap.sha256}.json")
    assert snap.sha256 == snapshot_sha256([p["sha256"] for p in snap.parts])
    assert load_snapshot(storage, snap.uri) == snap
    assert load_snapshot(storage, str(lake / "_snapshots" / "latest.json")) == snap
    assert LakeSnapshot.from_dict(json.loads(json.dumps(snap.to_dict()))) == snap


def test_rerun_is_idempotent(storage: Storage, raw, tmp_path: Path) -> None:
    folder, _ = raw
    lake = tmp_path / "lake"
    first = ingest_and_publish(storage, str(folder), str(lake), run_id="r1")
    before = {p: p.stat().st_mtime_ns for p in lake_files(lake / "transactions")}

    second = ingest_and_publish(storage, str(folder), str(lake), run_id="r2")

    assert second.new_parts == []
    assert second.sha256 == first.sha256 and second.uri == first.uri
    assert second.parts == first.parts and second.rows == first.rows
    assert {p: p.stat().st_mtime_ns for p in lake_files(lake / "transactions")} == before
    # The same files, now skipped unread as already ingested (by content hash).
    assert [{k: v for k, v in f.items() if k != "skipped"} for f in second.source_files] == first.source_files
    assert {f["skipped"] for f in second.source_files} == {"already ingested"}


def test_parts_no_manifest_names_are_staged_again_not_trusted(storage: Storage, raw, tmp_path: Path) -> None:
    folder, _ = raw
    lake = tmp_path / "lake"
    first = ingest_and_publish(storage, str(folder), str(lake), run_id="r1")
    for manifest in (lake / "_snapshots").iterdir():  # the parts are there, but no manifest names them
        manifest.unlink()

    staged = ingest(storage, str(folder), str(lake), run_id="r2", contract=FRAUD_CONTRACT)
    assert sorted(staged.new_parts) == [p["uri"] for p in first.parts]  # through staging (and validation) again
    second = publish_staged(storage, staged, "r2")

    assert second.sha256 == first.sha256 and second.parts == first.parts


def test_snapshot_covers_the_whole_lake_not_only_new_files(storage: Storage, raw, tmp_path: Path) -> None:
    folder, _ = raw
    lake = tmp_path / "lake"
    first = ingest_and_publish(storage, str(folder), str(lake), run_id="r1")
    more = tmp_path / "more"
    write_parquet(make_transactions(50, 9, "n"), more / "n.parquet")

    second = ingest_and_publish(storage, str(more), str(lake), run_id="r2")

    assert second.rows == first.rows + 50
    assert {p["uri"] for p in first.parts} < {p["uri"] for p in second.parts}
    assert len(second.new_parts) == 3 and second.sha256 != first.sha256
    assert load_snapshot(storage, str(lake / "_snapshots" / "latest.json")).sha256 == second.sha256
    assert load_snapshot(storage, first.uri).sha256 == first.sha256  # the old state stays addressable


def test_single_file_source(storage: Storage, tmp_path: Path) -> None:
    path = write_parquet(make_transactions(40), tmp_path / "one.parquet")
    snap = ingest_and_publish(storage, str(path), str(tmp_path / "lake"), run_id="r1")
    assert snap.rows == 40 and [f["uri"] for f in snap.source_files] == [str(path)]


def test_underscore_and_dot_paths_are_skipped(storage: Storage, raw, tmp_path: Path) -> None:
    folder, _ = raw
    write_parquet(make_transactions(10, 5, "x"), folder / "_staging" / "x.parquet")
    write_parquet(make_transactions(10, 6, "y"), folder / "_y.parquet")
    write_csv(make_transactions(10, 7, "z"), folder / ".hidden" / "z.csv")
    (folder / "notes.txt").write_text("not data")

    snap = ingest_and_publish(storage, str(folder), str(tmp_path / "lake"), run_id="r1")

    assert snap.rows == 600
    assert all("_staging" not in f["uri"] and "_y" not in f["uri"] and ".hidden" not in f["uri"]
               for f in snap.source_files)


def test_extra_columns_are_dropped_and_naive_timestamps_are_utc(storage: Storage, tmp_path: Path) -> None:
    df = make_transactions(30)
    df["extra"] = "ignored"
    df["ts"] = df["ts"].dt.tz_localize(None)  # naive: taken as UTC
    df["is_fraud"] = df["is_fraud"].astype("int64")
    path = write_parquet(df, tmp_path / "raw" / "naive.parquet")

    snap = ingest_and_publish(storage, str(path.parent), str(tmp_path / "lake"), run_id="r1")
    table = read_snapshot(storage, snap, FRAUD_SCHEMA)

    assert table.column_names == FRAUD_SCHEMA.names
    assert sorted(table.column("ts").to_pylist()) == sorted(
        t.to_pydatetime().replace(tzinfo=dt.timezone.utc) for t in df["ts"]
    )


def test_mixed_iso_strings_parse_to_the_same_instants(storage: Storage, tmp_path: Path) -> None:
    """Z, an offset, naive (= UTC) and nanosecond digits in one file: pandas' ISO8601 parser would
    shift the naive value by the offset seen before it."""
    df = make_transactions(5)
    df["ts"] = [
        "2026-03-01T10:00:00Z",
        "2026-03-01T12:00:00+02:00",
        "2026-03-01 10:00:00",
        "2026-03-01T10:00:00.0000001Z",
        "2026-03-01T05:00:00-0500",
    ]
    path = write_csv(df, tmp_path / "raw" / "mixed.csv")
    snap = ingest_and_publish(storage, str(path.parent), str(tmp_path / "lake"), run_id="r1")
    got = read_snapshot(storage, snap, FRAUD_SCHEMA).column("ts").to_pylist()
    assert got == [dt.datetime(2026, 3, 1, 10, tzinfo=dt.timezone.utc)] * 5


def test_csv_ids_keep_leading_zeros(storage: Storage, tmp_path: Path) -> None:
    df = make_transactions(20)
    df["transaction_id"] = [f"{i:06d}" for i in range(20)]
    path = write_csv(df, tmp_path / "raw" / "ids.csv")
    snap = ingest_and_publish(storage, str(path.parent), str(tmp_path / "lake"), run_id="r1")
    assert sorted(read_snapshot(storage, snap, FRAUD_SCHEMA).column("transaction_id").to_pylist())[0] == "000000"


def _assert_refused(storage: Storage, folder: Path, lake: Path, *fragments: str) -> str:
    with pytest.raises(DataError) as info:
        ingest_and_publish(storage, str(folder), str(lake), run_id="bad")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert not lake.exists() or lake_files(lake) == [], "bad input must leave the lake untouched"
    return message


@pytest.fixture()
def good_folder(tmp_path: Path) -> Path:
    """A folder whose good file sorts first, so a bad file later must still stop every write."""
    folder = tmp_path / "raw"
    write_parquet(make_transactions(50), folder / "a_good.parquet")
    return folder


def test_missing_column_is_refused(storage: Storage, good_folder: Path, tmp_path: Path) -> None:
    write_parquet(make_transactions(20).drop(columns=["amount", "channel"]), good_folder / "b_bad.parquet")
    _assert_refused(storage, good_folder, tmp_path / "lake", "b_bad.parquet", "amount", "channel", "missing")


def test_bad_cast_is_refused_with_an_example(storage: Storage, good_folder: Path, tmp_path: Path) -> None:
    df = make_transactions(20)
    df["amount"] = df["amount"].astype(str)
    df.loc[13, "amount"] = "twelve"
    write_csv(df, good_folder / "b_bad.csv")
    _assert_refused(storage, good_folder, tmp_path / "lake", "b_bad.csv", "'amount'", "'twelve'")


def test_bad_timestamp_is_refused_with_an_example(storage: Storage, good_folder: Path, tmp_path: Path) -> None:
    df = make_transactions(20)
    df["ts"] = df["ts"].map(lambda t: t.isoformat())
    df.loc[7, "ts"] = "yesterday"
    df.to_json(good_folder / "b_bad.jsonl", orient="records", lines=True)
    _assert_refused(storage, good_folder, tmp_path / "lake", "b_bad.jsonl", "'ts'", "'yesterday'")


def test_label_out_of_range_is_refused(storage: Storage, good_folder: Path, tmp_path: Path) -> None:
    df = make_transactions(20)
    df["is_fraud"] = df["is_fraud"].astype("int64")
    df.loc[3, "is_fraud"] = 300
    write_parquet(df, good_folder / "b_bad.parquet")
    _assert_refused(storage, good_folder, tmp_path / "lake", "b_bad.parquet", "'is_fraud'", "300")


def test_nulls_are_refused_with_a_count(storage: Storage, good_folder: Path, tmp_path: Path) -> None:
    df = make_transactions(20)
    df.loc[[2, 5, 11], "card_id"] = None
    write_csv(df, good_folder / "b_bad.csv")
    _assert_refused(storage, good_folder, tmp_path / "lake", "b_bad.csv", "'card_id'", "3 null")


def test_corrupt_parquet_is_refused(storage: Storage, good_folder: Path, tmp_path: Path) -> None:
    data = write_parquet(make_transactions(20), tmp_path / "whole.parquet").read_bytes()
    (good_folder / "b_truncated.parquet").write_bytes(data[: len(data) // 2])
    _assert_refused(storage, good_folder, tmp_path / "lake", "b_truncated.parquet")


def test_invalid_csv_is_refused(storage: Storage, good_folder: Path, tmp_path: Path) -> None:
    text = write_csv(make_transactions(5), tmp_path / "x.csv").read_text()
    (good_folder / "b_broken.csv").write_text(text + "only,three,fields\n")
    _assert_refused(storage, good_folder, tmp_path / "lake", "b_broken.csv")


def test_empty_folder_is_refused(storage: Storage, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("nothing here")
    message = _assert_refused(storage, empty, tmp_path / "lake", str(empty))
    assert "csv/parquet/jsonl" in message
    _assert_refused(storage, tmp_path / "does-not-exist", tmp_path / "lake", "does-not-exist")


def test_lineage_of_a_part_names_the_raw_file(storage: Storage, raw, tmp_path: Path) -> None:
    folder, _ = raw
    snap = ingest_and_publish(storage, str(folder), str(tmp_path / "lake"), run_id="r1")
    raw_file = next(f for f in snap.source_files if f["uri"].endswith("b.csv"))
    part = next(p for p in snap.parts if raw_file["sha256"][:16] in p["uri"])

    entry = lineage.lookup(storage, part["uri"])

    assert entry["step"] == "ingest" and entry["run_id"] == "r1"
    assert entry["artifact"]["sha256"] == part["sha256"]
    assert entry["inputs"][0]["uri"] == raw_file["uri"] == str(folder / "batch" / "b.csv")
    assert entry["inputs"][0]["sha256"] == raw_file["sha256"]
    manifest = lineage.lookup(storage, snap.uri)
    assert {i["uri"] for i in manifest["inputs"]} == {p["uri"] for p in snap.parts}
    # From the snapshot, walk back to the raw files.
    leaves = {leaf["uri"] for leaf in lineage.leaves(lineage.trace(storage, snap.uri))}
    assert leaves == {f["uri"] for f in snap.source_files}


# --- transaction_id stays unique: re-deliveries are idempotent, conflicts are refused -----------


def lake_state(lake: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in lake_files(lake)}


def snapshot_ids(storage: Storage, snap: LakeSnapshot) -> list[str]:
    return read_snapshot(storage, snap, FRAUD_SCHEMA, columns=["transaction_id"]).column("transaction_id").to_pylist()


@pytest.fixture()
def lake_with_a(storage: Storage, tmp_path: Path) -> tuple[Path, pd.DataFrame, LakeSnapshot]:
    """A lake holding one file of 300 rows (ids p00000..p00299)."""
    df = make_transactions(300, 1, "p")
    write_parquet(df, tmp_path / "first" / "a.parquet")
    lake = tmp_path / "lake"
    return lake, df, ingest_and_publish(storage, str(tmp_path / "first"), str(lake), run_id="r1")


def test_identical_redelivery_under_another_name_adds_nothing(storage: Storage, lake_with_a, tmp_path: Path) -> None:
    lake, df, first = lake_with_a
    before = lake_state(lake / "transactions")
    write_csv(df, tmp_path / "resent" / "a_resent_2026-03-04.csv")  # other name, other format, same rows

    second = ingest_and_publish(storage, str(tmp_path / "resent"), str(lake), run_id="r2")

    assert second.new_parts == [] and second.rows == first.rows == 300
    assert second.sha256 == first.sha256
    assert lake_state(lake / "transactions") == before
    [source] = second.source_files
    assert source["rows"] == 0 and source["duplicates"] == 300
    assert ingest_and_publish(storage, str(tmp_path / "resent"), str(lake), run_id="r3").sha256 == first.sha256


def test_partially_overlapping_file_adds_only_new_rows(storage: Storage, lake_with_a, tmp_path: Path) -> None:
    lake, df, first = lake_with_a
    fresh = make_transactions(50, 9, "n")
    # csv: floats round-trip exactly (pandas' to_json keeps 10 digits, which is a real change of content)
    write_csv(pd.concat([df.iloc[200:], fresh], ignore_index=True), tmp_path / "overlap" / "export.csv")

    second = ingest_and_publish(storage, str(tmp_path / "overlap"), str(lake), run_id="r2")

    assert second.rows == first.rows + 50
    ids = snapshot_ids(storage, second)
    assert len(ids) == len(set(ids)) == 350
    assert set(ids) == set(df["transaction_id"]) | set(fresh["transaction_id"])
    [source] = second.source_files
    assert source["rows"] == 50 and source["duplicates"] == 100
    assert sum(p["rows"] for p in second.parts if p["uri"] in second.new_parts) == 50
    again = ingest_and_publish(storage, str(tmp_path / "overlap"), str(lake), run_id="r3")
    assert again.sha256 == second.sha256 and again.new_parts == []


def test_conflicting_redelivery_is_refused_and_the_lake_is_unchanged(
    storage: Storage, lake_with_a, tmp_path: Path
) -> None:
    lake, df, first = lake_with_a
    before = lake_state(lake)
    changed = df.iloc[:40].copy()
    changed.loc[7, "amount"] += 1.0
    folder = tmp_path / "resent"
    write_parquet(make_transactions(20, 4, "q"), folder / "a_new_rows.parquet")  # good, sorts first
    write_parquet(changed, folder / "b_changed.parquet")

    with pytest.raises(DataError) as info:
        ingest_and_publish(storage, str(folder), str(lake), run_id="bad")

    message = str(info.value)
    for fragment in ("b_changed.parquet", "1 transaction_id value", "'p00007'", "amount", "/transactions/date=",
                     "fix the source", "fresh lake"):
        assert fragment in message, message
    assert lake_state(lake) == before, "a conflict must leave the lake untouched"
    assert load_snapshot(storage, str(lake / "_snapshots" / "latest.json")).sha256 == first.sha256


def test_conflict_message_names_up_to_three_examples(storage: Storage, lake_with_a, tmp_path: Path) -> None:
    lake, df, _ = lake_with_a
    changed = df.iloc[:10].copy()
    changed["channel"] = "carrier-pigeon"
    write_parquet(changed, tmp_path / "resent" / "c.parquet")
    with pytest.raises(DataError) as info:
        ingest_and_publish(storage, str(tmp_path / "resent"), str(lake), run_id="bad")
    message = str(info.value)
    assert "10 transaction_id value(s)" in message and "'p00000', 'p00001', 'p00002', ..." in message
    assert "'p00003'" not in message


def test_identical_duplicates_within_a_file_are_collapsed(storage: Storage, tmp_path: Path) -> None:
    df = make_transactions(30)
    write_csv(pd.concat([df, df.iloc[[3, 3, 17]]], ignore_index=True), tmp_path / "raw" / "dupes.csv")

    snap = ingest_and_publish(storage, str(tmp_path / "raw"), str(tmp_path / "lake"), run_id="r1")

    ids = snapshot_ids(storage, snap)
    assert snap.rows == 30 and len(set(ids)) == 30
    assert snap.source_files[0]["rows"] == 30 and snap.source_files[0]["duplicates"] == 3


def test_conflicting_duplicates_within_a_file_are_refused(
    storage: Storage, good_folder: Path, tmp_path: Path
) -> None:
    df = make_transactions(30, 2, "d")
    twin = df.iloc[[5]].copy()
    twin["merchant_id"] = "m999"
    write_parquet(pd.concat([df, twin], ignore_index=True), good_folder / "b_dupes.parquet")
    message = _assert_refused(storage, good_folder, tmp_path / "lake", "b_dupes.parquet", "'d00005'", "merchant_id")
    assert "within the file" in message


def test_two_files_of_one_batch_sharing_an_id(storage: Storage, tmp_path: Path) -> None:
    df = make_transactions(40, 3, "s")
    folder = tmp_path / "raw"
    write_parquet(df.iloc[:25], folder / "a.parquet")
    write_csv(df.iloc[20:], folder / "b.csv")  # s00020..s00024 in both, identical

    snap = ingest_and_publish(storage, str(folder), str(tmp_path / "lake"), run_id="r1")

    ids = snapshot_ids(storage, snap)
    assert snap.rows == 40 and sorted(ids) == sorted(df["transaction_id"])
    by_name = {f["uri"].rsplit("/", 1)[-1]: f for f in snap.source_files}
    assert by_name["a.parquet"]["rows"] == 25 and "duplicates" not in by_name["a.parquet"]
    assert by_name["b.csv"]["rows"] == 15 and by_name["b.csv"]["duplicates"] == 5
    assert ingest_and_publish(storage, str(folder), str(tmp_path / "lake"), run_id="r2").sha256 == snap.sha256

    conflicting = df.iloc[20:].copy()
    conflicting.loc[22, "is_fraud"] = 1 - conflicting.loc[22, "is_fraud"]
    write_csv(conflicting, tmp_path / "bad" / "b.csv")
    write_parquet(df.iloc[:25], tmp_path / "bad" / "a.parquet")
    message = _assert_refused(storage, tmp_path / "bad", tmp_path / "lake2", "b.csv", "'s00022'", "is_fraud")
    assert str(tmp_path / "bad" / "a.parquet") in message


def test_publish_snapshot_takes_hand_written_parts_as_they_are(storage: Storage, tmp_path: Path) -> None:
    """A lake with a repeated id (built before this check, or by hand): published as is, and a later
    ingest still drops rows identical to either copy."""
    df = make_transactions(20, 5, "h")
    legacy = pd.concat([df, df.iloc[[4]]], ignore_index=True)
    legacy.loc[20, "amount"] += 1.0  # h00004 twice, with two amounts
    lake = tmp_path / "lake"
    part = lake / "transactions" / "date=2026-03-01" / "part-legacy.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(legacy, preserve_index=False).cast(FRAUD_SCHEMA), part)

    snap = publish_snapshot(storage, str(lake), run_id="hand")

    assert snap.rows == 21 and [p["uri"] for p in snap.parts] == [str(part)] and snap.new_parts == []
    assert load_snapshot(storage, str(lake / "_snapshots" / "latest.json")) == snap
    for name, rows in [("again.csv", df), ("other_amount.csv", legacy.iloc[[20]])]:
        write_csv(rows, tmp_path / name / name)
        again = ingest_and_publish(storage, str(tmp_path / name), str(lake), run_id="r2")
        assert again.sha256 == snap.sha256 and again.source_files[0]["duplicates"] == len(rows)


def test_a_file_read_in_chunks_keeps_each_chunks_rows_in_order_in_its_date_parts(storage: Storage, tmp_path: Path) -> None:
    """Files are read a chunk at a time and their date parts written by a thread pool while the next
    chunk (and file) is read: a chunk's rows written before the previous chunk's, into another file's
    part, or lost, would show here; the id index must still hold each part's ids."""
    folder, lake_dir, chunk = tmp_path / "raw", tmp_path / "lake", 200
    frames = {f"f{i}.parquet": make_transactions(700, seed=i, id_prefix=f"k{i}-") for i in range(2)}
    for name, df in frames.items():
        write_parquet(df, folder / name)
    staged = ingest(storage, str(folder), str(lake_dir), "r1", IngestOptions(chunk_rows=chunk), contract=FRAUD_CONTRACT)
    snap = publish_staged(storage, staged, "r1")

    assert snap.rows == 1400 and len(snap.parts) == 2 * len(DATES)
    for name, df in frames.items():
        # The oracle: chunk by chunk, a stable sort by ts; each chunk's rows of a date after the last chunk's.
        ordered = pd.concat([df.iloc[i:i + chunk].sort_values("ts", kind="stable") for i in range(0, len(df), chunk)])
        part = lake_part_name(hashlib.sha256((folder / name).read_bytes()).hexdigest())
        for date, rows in ordered.groupby(ordered["ts"].dt.strftime("%Y-%m-%d")):
            [entry] = [p for p in snap.parts if p["uri"] == f"{lake_dir}/transactions/date={date}/{part}"]
            ids = pq.read_table(entry["uri"]).column("transaction_id")
            assert ids.to_pylist() == rows["transaction_id"].tolist()
            assert read_id_index(storage, entry, FRAUD_CONTRACT).tolist() == sorted(id_hashes(ids).tolist())
