"""Ingest: raw transaction files (csv, parquet, jsonl; local or s3://) staged as a batch of the lake.

Every raw file is read and held to the schema (:mod:`flywheel.rawfiles`) before anything is
written, so bad input leaves no trace. The batch's rows are split into date partitions named after
the raw file they came from, and staged (:func:`flywheel.lake.stage`) next to the latest published
snapshot: nothing a reader sees changes until the validate step publishes the batch, and a batch
that validation rejects is discarded. Re-ingesting files whose parts are already published stages
no new part and yields the same snapshot sha256.

``transaction_id`` is unique in the lake. A row whose id is already in the published lake, in an
earlier file of the same batch, or earlier in the same file is a re-delivery when its content is
identical (it is dropped, so overlapping exports and re-sent files are idempotent) and a conflict
when it is not (the whole batch is refused with a DataError naming the file, the ids and where the
other row lives).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flywheel import lake
from flywheel.errors import DataError
from flywheel.lake import LakeSnapshot, NewPart
from flywheel.rawfiles import SUFFIXES, read_table
from flywheel.schema import TIMESTAMP, TRANSACTION_SCHEMA
from flywheel.storage import ObjectRef, Storage, sha256_bytes

log = logging.getLogger(__name__)


@dataclass
class _RawFile:
    uri: str
    sha256: str
    size: int
    rows: int  # rows this file puts into the lake (re-delivered rows not counted)
    table: pa.Table | None  # None: already in the published lake, nothing to write
    duplicates: int = 0  # re-delivered rows dropped: already in the lake, the batch or the file

    def summary(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"uri": self.uri, "sha256": self.sha256, "rows": self.rows}
        if self.duplicates:
            entry["duplicates"] = self.duplicates
        return entry


def ingest(storage: Storage, source_uri: str, lake_uri: str, run_id: str) -> LakeSnapshot:
    """Read every raw file under ``source_uri``, enforce the schema, drop re-delivered rows and stage
    the new date partitions as a batch of ``lake_uri``; returns the staged snapshot (the published
    lake plus the batch), which :func:`flywheel.lake.publish_staged` publishes once validated.

    Files and folders whose names start with '_' or '.' are skipped. Raises :class:`DataError` when
    there is nothing to ingest or any file is unreadable, breaks the schema or reuses a transaction
    id with other content; then nothing is written. A raw file whose parts are already published is
    hashed but not parsed again, so a re-run with the same files does no new work.
    """
    started = time.perf_counter()
    uris = list(storage.iter_objects(source_uri, SUFFIXES))
    if not uris:
        raise DataError(
            f"no csv/parquet/jsonl files under {source_uri} (names starting with '_' or '.' are skipped); "
            "check the source URI"
        )
    parent = lake.latest_snapshot(storage, lake_uri)
    published = parent.parts if parent else []

    # Read and check everything before writing anything.
    raw_files = [_read_raw(storage, uri, published) for uri in uris]
    total_rows = sum(f.rows for f in raw_files)
    log.info(
        "ingest: read %d files (%d already in the lake), %d rows from %s in %.2fs",
        len(raw_files), sum(f.table is None for f in raw_files), total_rows, source_uri,
        time.perf_counter() - started,
    )
    if total_rows == 0:
        raise DataError(f"the files under {source_uri} hold no rows: {', '.join(uris)}")
    to_write = [f for f in _distinct_contents(raw_files) if f.table is not None]
    # transaction_id stays unique: drop re-delivered rows, refuse conflicting ones (nothing written yet).
    _drop_redeliveries(storage, published, to_write)

    stage_started = time.perf_counter()
    new_parts = [part for raw in to_write for part in _new_parts(raw, source_uri)]
    staged = lake.stage(storage, lake_uri, run_id, parent, new_parts, [f.summary() for f in raw_files])
    log.info(
        "ingest: staged %d new parts in %.2fs; snapshot %s (%d parts, %d rows) at %s, %.2fs total",
        len(new_parts), time.perf_counter() - stage_started, staged.sha256[:12], len(staged.parts), staged.rows,
        staged.uri, time.perf_counter() - started,
    )
    return staged


def _read_raw(storage: Storage, uri: str, published: list[dict[str, Any]]) -> _RawFile:
    data = storage.read_bytes(uri)
    sha = sha256_bytes(data)
    # A batch is published whole, so a file with a part in the published manifest is in the lake in full.
    name = lake.part_name(sha)
    done = [p for p in published if p["uri"].endswith("/" + name)]
    if done:
        return _RawFile(uri=uri, sha256=sha, size=len(data), rows=sum(p["rows"] for p in done), table=None)
    table = read_table(uri, data)
    return _RawFile(uri=uri, sha256=sha, size=len(data), rows=table.num_rows, table=table)


def _distinct_contents(raw_files: list[_RawFile]) -> list[_RawFile]:
    """Byte-identical files share a part name: the first one stands for all."""
    seen: dict[str, str] = {}
    unique = []
    for raw in raw_files:
        if raw.sha256 in seen:
            log.warning("ingest: %s has the same content as %s; ingested once", raw.uri, seen[raw.sha256])
            continue
        seen[raw.sha256] = raw.uri
        unique.append(raw)
    return unique


def _new_parts(raw: _RawFile, source_uri: str) -> list[NewPart]:
    """A raw file's rows as date partitions, each with the lineage it gets once published."""
    inputs = [ObjectRef(raw.uri, raw.sha256, raw.size).to_dict()]
    return [
        NewPart(
            date=date,
            name=lake.part_name(raw.sha256),
            table=part,
            inputs=inputs,
            params={
                "date": date,
                "rows": part.num_rows,
                "source_uri": source_uri,
                **({"duplicates_dropped": raw.duplicates} if raw.duplicates else {}),
            },
        )
        for date, part in _partition_by_date(raw.table)
    ]


# --- keeping transaction_id unique ----------------------------------------------------------------

_ID = "transaction_id"
_VALUES = [name for name in TRANSACTION_SCHEMA.names if name != _ID]
_OLD = "_old"  # suffix of the other row's columns in a comparison
_FILE, _ROW, _PART = "__file", "__row", "__part"  # helper columns: file index, batch row index, lake part index
_KEEP, _IN_FILE, _IN_BATCH, _IN_LAKE = 0, 1, 2, 3  # what happens to a batch row
_FIX = "fix the source, or ingest into a fresh lake / FLYWHEEL_HOME"


def _drop_redeliveries(storage: Storage, published: list[dict[str, Any]], files: list[_RawFile]) -> None:
    """Hold ``transaction_id`` unique across the published lake and the new ``files`` (modified in place).

    A row whose id appeared before (earlier in its file, in an earlier file of the batch, or in a
    published part) is dropped when all its columns equal that row's, and refused with a DataError
    when they do not. Vectorized: one group-by over the batch, and hash joins on the ids that
    collide; of the lake, only the transaction_id column is read, plus the parts that hold a collision.
    """
    files = [f for f in files if f.table is not None and f.table.num_rows]
    if not files:
        return
    started = time.perf_counter()
    tables: list[pa.Table] = [f.table for f in files]
    sizes = np.array([t.num_rows for t in tables], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    batch = pa.concat_tables(tables)
    batch = batch.append_column(_FILE, pa.array(np.repeat(np.arange(len(files), dtype=np.int32), sizes)))
    batch = batch.append_column(_ROW, pa.array(np.arange(offsets[-1], dtype=np.int64)))
    fate = np.full(offsets[-1], _KEEP, dtype=np.int8)

    _mark_repeats_in_batch(batch, fate, files)
    _mark_repeats_of_the_lake(storage, published, batch.filter(pa.array(fate == _KEEP)), fate, files)
    for index, raw in enumerate(files):
        _keep_new_rows(raw, tables[index], fate[offsets[index]:offsets[index + 1]])
    log.info("ingest: checked transaction_id uniqueness against %d published parts in %.2fs",
             len(published), time.perf_counter() - started)


def _mark_repeats_in_batch(batch: pa.Table, fate: np.ndarray, files: list[_RawFile]) -> None:
    """The first row of each id stays; a later one must repeat it exactly (then it is dropped)."""
    first_rows = batch.group_by(_ID).aggregate([(_ROW, "min")]).column(f"{_ROW}_min")
    if len(first_rows) == batch.num_rows:
        return
    is_first = pc.is_in(batch.column(_ROW), value_set=first_rows)
    same, conflicts = _compare(batch.filter(pc.invert(is_first)), batch.filter(is_first))
    if conflicts.num_rows:
        first_bad = pc.min(conflicts.column(_FILE)).as_py()
        bad = conflicts.filter(pc.equal(conflicts.column(_FILE), first_bad))
        raise _conflict(files[first_bad].uri, bad, lambda row: (
            "more than once within the file" if row[_FILE + _OLD] == row[_FILE]
            else f"also in {files[row[_FILE + _OLD]].uri}"
        ))
    rows = same.column(_ROW).to_numpy()
    within = same.column(_FILE).to_numpy() == same.column(_FILE + _OLD).to_numpy()
    fate[rows] = np.where(within, _IN_FILE, _IN_BATCH)


def _mark_repeats_of_the_lake(
    storage: Storage, parts: list[dict[str, Any]], survivors: pa.Table, fate: np.ndarray, files: list[_RawFile]
) -> None:
    """Rows whose id a published part holds: dropped when identical, refused otherwise."""
    if not parts or not survivors.num_rows:
        return
    part_ids = [lake.read_part(storage, part, [_ID]).column(_ID) for part in parts]
    lake_ids = pa.chunked_array([c for ids in part_ids for c in ids.chunks], type=pa.string())
    hit = pc.is_in(survivors.column(_ID), value_set=lake_ids)
    if not pc.any(hit).as_py():
        return
    new = survivors.filter(hit)
    hit_ids = pc.unique(new.column(_ID))
    part_of_id = np.repeat(np.arange(len(parts)), [len(ids) for ids in part_ids])
    holding = np.unique(part_of_id[pc.is_in(lake_ids, value_set=hit_ids).to_numpy(zero_copy_only=False)])
    old = []
    for index in holding:
        rows = lake.read_part(storage, parts[index]).filter(pc.is_in(pc.field(_ID), value_set=hit_ids))
        old.append(rows.append_column(_PART, pa.array(np.full(rows.num_rows, index, dtype=np.int32))))
    same, conflicts = _compare(new, pa.concat_tables(old))
    if conflicts.num_rows:
        first_bad = pc.min(conflicts.column(_FILE)).as_py()
        bad = conflicts.filter(pc.equal(conflicts.column(_FILE), first_bad))
        raise _conflict(
            files[first_bad].uri, bad, lambda row: f"already in the lake (in {parts[row[_PART + _OLD]]['uri']})"
        )
    fate[same.column(_ROW).to_numpy()] = _IN_LAKE


def _keep_new_rows(raw: _RawFile, table: pa.Table, fates: np.ndarray) -> None:
    dropped = int(np.count_nonzero(fates))
    if not dropped:
        return
    raw.table = table.filter(pa.array(fates == _KEEP))
    raw.rows, raw.duplicates = raw.table.num_rows, dropped
    log.info(
        "ingest: %s: dropped %d re-delivered rows (%d already in the lake, %d in an earlier file, "
        "%d repeated within the file); %d new rows remain",
        raw.uri, dropped, np.count_nonzero(fates == _IN_LAKE), np.count_nonzero(fates == _IN_BATCH),
        np.count_nonzero(fates == _IN_FILE), raw.rows,
    )


def _compare(new: pa.Table, old: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Join ``new`` rows to the ``old`` rows with their transaction_id (old columns get ``_old``).

    Returns the joined rows where every schema column is equal (one per identical new row), and,
    for the new rows equal to none of their old rows, the joined rows (conflicts, sorted by id).
    """
    old = old.rename_columns([name if name == _ID else name + _OLD for name in old.column_names])
    joined = new.join(old, keys=_ID, join_type="inner", use_threads=True)
    equal = functools.reduce(pc.and_, [pc.equal(joined.column(n), joined.column(n + _OLD)) for n in _VALUES])
    same = joined.filter(equal)
    # Old rows may repeat an id (a lake from before this check): one equal match is enough.
    _, first = np.unique(same.column(_ROW).to_numpy(), return_index=True)
    same = same.take(pa.array(first))
    conflicts = joined.filter(pc.invert(pc.is_in(joined.column(_ROW), value_set=same.column(_ROW))))
    return same, conflicts.sort_by([(_ID, "ascending"), (_ROW, "ascending")])


def _conflict(uri: str, conflicts: pa.Table, where: Callable[[dict[str, Any]], str]) -> DataError:
    """The DataError for a file's rows whose transaction_id is taken by a row with other content."""
    ids = pc.unique(conflicts.column(_ID)).to_pylist()
    first = conflicts.slice(0, 1).to_pylist()[0]
    differs = ", ".join(f"{n} {first[n + _OLD]!r} vs {first[n]!r}" for n in _VALUES if first[n] != first[n + _OLD])
    examples = ", ".join(repr(i) for i in ids[:3]) + (", ..." if len(ids) > 3 else "")
    return DataError(
        f"{uri}: {len(ids)} transaction id(s) with different content {where(first)}: {examples} "
        f"(e.g. {ids[0]!r} differs in {differs}). A transaction_id must be unique in the lake: an identical "
        f"re-delivery is skipped, a changed row is refused and nothing was written; {_FIX}"
    )


def _partition_by_date(table: pa.Table | None) -> list[tuple[str, pa.Table]]:
    """Split rows by their UTC date; each part sorted by ts (then transaction_id, for stable bytes)."""
    if table is None or table.num_rows == 0:
        return []
    table = table.sort_by([(TIMESTAMP, "ascending"), ("transaction_id", "ascending")])
    days = pc.cast(table.column(TIMESTAMP), pa.date32())
    # Sorted by ts, so each date is one contiguous run of rows.
    day_numbers = days.cast(pa.int32()).to_numpy()
    starts = np.concatenate([[0], np.flatnonzero(np.diff(day_numbers)) + 1])
    ends = np.concatenate([starts[1:], [len(day_numbers)]])
    return [
        (days[int(start)].as_py().isoformat(), table.slice(int(start), int(end - start)))
        for start, end in zip(starts, ends)
    ]
