"""Ingest: raw transaction files (csv, parquet, jsonl; local or s3://) into a date-partitioned lake.

The lake looks like::

    <lake>/transactions/date=YYYY-MM-DD/part-<first 16 hex of the raw file's sha256>.parquet
    <lake>/_snapshots/<snapshot sha256>.json     one manifest per lake state (immutable)
    <lake>/_snapshots/latest.json                the newest manifest

Every raw file is held to :data:`flywheel.schema.TRANSACTION_SCHEMA` (missing columns, bad values and
nulls are refused with a :class:`~flywheel.errors.DataError` naming the file), and every file is
checked before any part is written, so bad input leaves the lake untouched. A part is named after
the raw file it came from, so re-ingesting the same files writes nothing new and yields the same
snapshot sha256. The manifest is written last: it is the publication point readers go through.

``transaction_id`` is unique in the lake. A row whose id is already in the lake, in an earlier file
of the same batch, or earlier in the same file is a re-delivery when its content is identical (it is
dropped, so overlapping exports and re-sent files are idempotent) and a conflict when it is not (the
whole batch is refused with a DataError naming the file, the ids and where the other row lives).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flywheel import lineage
from flywheel.errors import ArtifactNotFound, DataError, StorageError
from flywheel.schema import TIMESTAMP, TRANSACTION_SCHEMA
from flywheel.storage import ObjectRef, Storage, join, sha256_bytes

log = logging.getLogger(__name__)

SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")
TRANSACTIONS = "transactions"
SNAPSHOTS = "_snapshots"
LATEST = "latest.json"
UTC_MICROS = pa.timestamp("us", tz="UTC")

# Arrow errors a cast or a parse can raise on bad data; anything else is a bug and should surface.
_BAD_DATA = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError, TypeError, OverflowError)


@dataclass
class LakeSnapshot:
    """The lake's parts at one moment, identified by the hash of their contents."""

    uri: str
    sha256: str
    rows: int
    parts: list[dict[str, Any]]
    new_parts: list[str] = field(default_factory=list)
    source_files: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LakeSnapshot":
        try:
            return cls(
                uri=data["uri"],
                sha256=data["sha256"],
                rows=int(data["rows"]),
                parts=[dict(p) for p in data["parts"]],
                new_parts=list(data.get("new_parts", [])),
                source_files=[dict(s) for s in data.get("source_files", [])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"not a lake snapshot manifest: missing or bad field {exc}") from None


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


def snapshot_sha256(part_shas: list[str]) -> str:
    """The identity of a lake state: sha256 over its parts' sha256s, sorted, one per line."""
    return sha256_bytes("\n".join(sorted(part_shas)).encode())


def ingest(storage: Storage, source_uri: str, lake_uri: str, run_id: str) -> LakeSnapshot:
    """Read every raw file under ``source_uri``, enforce the schema, write new date partitions into
    ``lake_uri`` and publish a snapshot manifest of the whole lake.

    Files and folders whose names start with '_' or '.' are skipped. Raises :class:`DataError` when
    there is nothing to ingest or any file is unreadable or breaks the schema; in that case nothing
    is written. A raw file whose parts are already in the published lake is hashed but not parsed
    again, so a re-run with the same files does no new work.
    """
    started = time.perf_counter()
    uris = list(storage.iter_objects(source_uri, SUFFIXES))
    if not uris:
        raise DataError(
            f"no csv/parquet/jsonl files under {source_uri} (names starting with '_' or '.' are skipped); "
            "check the source URI"
        )
    published = _published_parts(storage, lake_uri)

    # Phase 1: read and check everything before writing anything.
    raw_files = [_read_raw(storage, uri, published) for uri in uris]
    total_rows = sum(f.rows for f in raw_files)
    log.info(
        "ingest: read %d files (%d already in the lake), %d rows from %s in %.2fs",
        len(raw_files), sum(f.table is None for f in raw_files), total_rows, source_uri,
        time.perf_counter() - started,
    )
    if total_rows == 0:
        raise DataError(f"the files under {source_uri} hold no rows: {', '.join(uris)}")

    # Byte-identical files share a part name: the first one stands for all.
    seen_shas: dict[str, str] = {}
    unique_files = []
    for raw in raw_files:
        if raw.sha256 in seen_shas:
            log.warning("ingest: %s has the same content as %s; ingested once", raw.uri, seen_shas[raw.sha256])
            continue
        seen_shas[raw.sha256] = raw.uri
        unique_files.append(raw)
    # transaction_id stays unique: drop re-delivered rows, refuse conflicting ones (nothing written yet).
    _drop_redeliveries(storage, lake_uri, [f for f in unique_files if f.table is not None])

    # Phase 2: write the parts that are not in the lake yet.
    write_started = time.perf_counter()
    written: dict[str, dict[str, Any]] = {}
    for raw in unique_files:
        for date, part in _partition_by_date(raw.table):
            part_uri = join(lake_uri, TRANSACTIONS, f"date={date}", _part_name(raw.sha256))
            if storage.exists(part_uri):  # left by a run that stopped before publishing
                continue
            ref = storage.write_parquet(part_uri, part)
            written[part_uri] = {"uri": part_uri, "sha256": ref.sha256, "rows": part.num_rows, "date": date}
            lineage.record(
                storage,
                ref,
                step="ingest",
                run_id=run_id,
                inputs=[ObjectRef(raw.uri, raw.sha256, raw.size)],
                params={
                    "date": date,
                    "rows": part.num_rows,
                    "source_uri": source_uri,
                    **({"duplicates_dropped": raw.duplicates} if raw.duplicates else {}),
                },
            )
    log.info("ingest: wrote %d new parts in %.2fs", len(written), time.perf_counter() - write_started)

    # Phase 3: publish the manifest of the whole lake, last.
    snapshot = _publish(
        storage, lake_uri, run_id, {**published, **written},
        new_parts=sorted(written), source_files=[f.summary() for f in raw_files], source_uri=source_uri,
    )
    log.info(
        "ingest: snapshot %s (%d parts, %d rows, %d new) published in %.2fs total",
        snapshot.sha256[:12], len(snapshot.parts), snapshot.rows, len(written), time.perf_counter() - started,
    )
    return snapshot


def publish_snapshot(storage: Storage, lake_uri: str, run_id: str) -> LakeSnapshot:
    """Publish a manifest of the parts now under ``<lake>/transactions`` (and move ``latest``).

    :func:`ingest` does this after writing; on its own it serves a lake whose parts were written or
    repaired by other means, e.g. a test that needs a lake ``ingest`` would refuse. Parts are taken
    as they are: nothing is checked against the schema or for unique transaction ids.
    """
    return _publish(storage, lake_uri, run_id, _published_parts(storage, lake_uri))


def _publish(
    storage: Storage,
    lake_uri: str,
    run_id: str,
    known: dict[str, dict[str, Any]],
    *,
    new_parts: list[str] | None = None,
    source_files: list[dict[str, Any]] | None = None,
    source_uri: str | None = None,
) -> LakeSnapshot:
    parts = _lake_parts(storage, lake_uri, known)
    sha = snapshot_sha256([p["sha256"] for p in parts])
    manifest_uri = join(lake_uri, SNAPSHOTS, f"{sha}.json")
    snapshot = LakeSnapshot(
        uri=manifest_uri,
        sha256=sha,
        rows=sum(p["rows"] for p in parts),
        parts=parts,
        new_parts=new_parts or [],
        source_files=source_files or [],
    )
    # A manifest is named by its content hash, so an existing one already describes this lake state:
    # keep it (it records which run first produced that state) and only move `latest` along.
    if not storage.exists(manifest_uri):
        ref = storage.write_json(manifest_uri, snapshot.to_dict())
        lineage.record(
            storage,
            ref,
            step="ingest",
            run_id=run_id,
            inputs=[{"uri": p["uri"], "sha256": p["sha256"]} for p in parts],
            params={"rows": snapshot.rows, "parts": len(parts), "source_uri": source_uri},
        )
    storage.write_json(latest_snapshot_uri(lake_uri), snapshot.to_dict())
    return snapshot


def load_snapshot(storage: Storage, manifest_uri: str) -> LakeSnapshot:
    """The snapshot a manifest describes (``<lake>/_snapshots/latest.json`` for the newest)."""
    return LakeSnapshot.from_dict(storage.read_json(manifest_uri))


def latest_snapshot_uri(lake_uri: str) -> str:
    """Where the newest manifest of a lake is published."""
    return join(lake_uri, SNAPSHOTS, LATEST)


def read_snapshot(storage: Storage, snapshot: LakeSnapshot, columns: list[str] | None = None) -> pa.Table:
    """All rows of a snapshot as one table (parts in URI order), checking each part's sha256."""
    schema = TRANSACTION_SCHEMA if columns is None else pa.schema([TRANSACTION_SCHEMA.field(c) for c in columns])
    tables = []
    for part in snapshot.parts:
        data = storage.read_bytes(part["uri"])
        if sha256_bytes(data) != part["sha256"]:
            raise DataError(
                f"{part['uri']} changed since snapshot {snapshot.uri} was taken (sha256 mismatch); re-run ingest"
            )
        tables.append(pq.read_table(io.BytesIO(data), columns=columns).cast(schema))
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)


# --- reading raw files -------------------------------------------------------------------------


def _read_raw(storage: Storage, uri: str, published: dict[str, dict[str, Any]]) -> _RawFile:
    data = storage.read_bytes(uri)
    sha = sha256_bytes(data)
    # Every part of a raw file is written before the manifest that lists any of them, so a file
    # with a part in the published manifest was checked and written in full by an earlier run.
    name = _part_name(sha)
    done = [p for p in published.values() if p["uri"].endswith("/" + name)]
    if done and all(storage.exists(p["uri"]) for p in done):
        return _RawFile(uri=uri, sha256=sha, size=len(data), rows=sum(p["rows"] for p in done), table=None)
    table = _conform(uri, _parse(uri, data))
    return _RawFile(uri=uri, sha256=sha, size=len(data), rows=table.num_rows, table=table)


def _parse(uri: str, data: bytes) -> pa.Table:
    """Bytes to an Arrow table, by file suffix; an unreadable file is a DataError naming it."""
    kind = uri.rsplit(".", 1)[-1].lower()
    try:
        if kind == "parquet":
            return pq.read_table(io.BytesIO(data))
        if kind == "csv":
            import pyarrow.csv as pcsv

            # Read the schema's columns as text and cast them ourselves: type inference would turn
            # ids like "0042" into integers and gives worse messages on bad values.
            convert = pcsv.ConvertOptions(
                column_types={f.name: pa.string() for f in TRANSACTION_SCHEMA},
                strings_can_be_null=True,
            )
            return pcsv.read_csv(io.BytesIO(data), convert_options=convert)
        # .jsonl / .json: newline-delimited records, or one JSON array of records.
        if data.lstrip()[:1] == b"[":
            records = json.loads(data)
            if not all(isinstance(r, dict) for r in records):
                raise ValueError("a JSON array of objects was expected")
            return pa.Table.from_pylist(records)
        import pyarrow.json as pjson

        return pjson.read_json(io.BytesIO(data))
    except (*_BAD_DATA, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{uri} could not be read as {kind}: {_first_line(exc)}") from None


def _conform(uri: str, table: pa.Table) -> pa.Table:
    """Hold a parsed table to TRANSACTION_SCHEMA: extra columns dropped, values cast, nulls refused."""
    missing = [f.name for f in TRANSACTION_SCHEMA if f.name not in table.column_names]
    if missing:
        raise DataError(
            f"{uri} is missing required columns {missing} (it has {table.column_names}); "
            f"expected the columns of TRANSACTION_SCHEMA: {TRANSACTION_SCHEMA.names}"
        )
    columns = []
    for target in TRANSACTION_SCHEMA:
        values = table.column(target.name)
        convert = _timestamp if target.name == TIMESTAMP else _caster(target.type)
        try:
            column = convert(values)
        except _BAD_DATA as exc:
            example = _first_bad_value(values, convert)
            raise DataError(
                f"{uri}: column {target.name!r} cannot be read as {target.type}: "
                f"bad value {example!r} ({_first_line(exc)})"
            ) from None
        if not target.nullable:
            missing_count = column.null_count
            if pa.types.is_floating(column.type):
                missing_count += pc.sum(pc.is_nan(column)).as_py() or 0
            if missing_count:
                raise DataError(
                    f"{uri}: column {target.name!r} has {missing_count} null values of {len(column)} "
                    "but may not be null"
                )
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=TRANSACTION_SCHEMA)


def _caster(target: pa.DataType) -> Callable[[pa.ChunkedArray], pa.ChunkedArray]:
    def cast(values: pa.ChunkedArray) -> pa.ChunkedArray:
        if pa.types.is_dictionary(values.type):
            values = values.cast(values.type.value_type)
        try:
            return values.cast(target)
        except _BAD_DATA:
            # "1.0" in a csv integer column (pandas writes ints with nulls that way): via float,
            # which still refuses 1.5 (truncation) and 300 (int8 overflow).
            if pa.types.is_integer(target) and pa.types.is_string(values.type):
                return values.cast(pa.float64()).cast(target)
            raise

    return cast


def _timestamp(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """Timestamps or ISO-8601 strings (Z, offsets, or naive = UTC) to timestamp[us, UTC]."""
    kind = values.type
    if pa.types.is_dictionary(kind):
        values, kind = values.cast(kind.value_type), kind.value_type
    if pa.types.is_timestamp(kind):
        # Naive timestamps are UTC: Arrow stores UTC instants, so setting the zone only relabels them.
        # Sub-microsecond digits are dropped (the lake keeps microseconds).
        return values.cast(pa.timestamp("us", tz=kind.tz), safe=kind.unit != "ns").cast(UTC_MICROS)
    if pa.types.is_date(kind) or pa.types.is_null(kind):  # a null column fails the null check next
        return values.cast(pa.timestamp("us")).cast(UTC_MICROS)
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise TypeError(f"expected timestamps or ISO-8601 strings, got {kind}")
    # Normalise the text so one Arrow cast reads it all: naive values get "Z" (UTC), digits past
    # microseconds are dropped. (pandas.to_datetime(format="ISO8601", utc=True) is no help here: on
    # a mix of offset and naive strings it applies an earlier row's offset to the naive ones.)
    text = pc.utf8_trim_whitespace(values)
    text = pc.replace_substring_regex(text, pattern=r"(\.\d{6})\d+", replacement=r"\1")
    text = pc.replace_substring_regex(text, pattern=r"(\d)z$", replacement=r"\1Z")
    has_zone = pc.match_substring_regex(text, pattern=r"[T ]\d\d(:\d\d(:\d\d(\.\d*)?)?)?\s*(Z|[+-]\d\d(:?\d\d)?)$")
    date_only = pc.match_substring_regex(text, pattern=r"^\d{4}-\d\d-\d\d$")
    suffix = pc.if_else(has_zone, "", pc.if_else(date_only, "T00:00:00Z", "Z"))
    text = pc.binary_join_element_wise(text, suffix, "")
    try:
        return text.cast(UTC_MICROS)
    except pa.ArrowInvalid:
        raise ValueError("expected ISO-8601 timestamps, with Z, an offset, or none for UTC") from None


def _first_bad_value(values: pa.ChunkedArray, convert: Callable[[pa.ChunkedArray], Any]) -> Any:
    """The first value ``convert`` refuses, found by bisection (a handful of vectorized calls)."""
    lo, hi = 0, len(values)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            convert(values.slice(lo, mid - lo))
            lo = mid  # the left half converts: the culprit is on the right
        except _BAD_DATA:
            hi = mid
    return values[lo].as_py() if len(values) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- keeping transaction_id unique ----------------------------------------------------------------

_ID = "transaction_id"
_VALUES = [name for name in TRANSACTION_SCHEMA.names if name != _ID]
_OLD = "_old"  # suffix of the other row's columns in a comparison
_FILE, _ROW, _PART = "__file", "__row", "__part"  # helper columns: file index, batch row index, lake part index
_KEEP, _IN_FILE, _IN_BATCH, _IN_LAKE = 0, 1, 2, 3  # what happens to a batch row
_FIX = "fix the source, or ingest into a fresh lake / FLYWHEEL_HOME"


def _drop_redeliveries(storage: Storage, lake_uri: str, files: list[_RawFile]) -> None:
    """Hold ``transaction_id`` unique across the lake and the new ``files`` (modified in place).

    A row whose id appeared before (earlier in its file, in an earlier file of the batch, or in a
    lake part) is dropped when all its columns equal that row's, and refused with a DataError when
    they do not. Vectorized: one group-by over the batch, and hash joins on the ids that collide;
    of the lake, only the transaction_id column is read, plus the full parts that hold a collision.
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

    # 1. Within the batch: the first row of each id stays; any later one must repeat it exactly.
    first_rows = batch.group_by(_ID).aggregate([(_ROW, "min")]).column(f"{_ROW}_min")
    if len(first_rows) < batch.num_rows:
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

    # 2. Against the lake: parts of other raw files (a batch file's own parts, left by an interrupted
    # run, hold its own rows and are not a second copy).
    own = {_part_name(f.sha256) for f in files}
    parts = [
        uri for uri in storage.iter_objects(join(lake_uri, TRANSACTIONS), (".parquet",))
        if uri.rsplit("/", 1)[-1] not in own
    ]
    survivors = batch.filter(pa.array(fate == _KEEP))
    if parts and survivors.num_rows:
        part_ids = [_read_part(storage, uri, [_ID]).column(_ID) for uri in parts]
        lake_ids = pa.chunked_array([c for ids in part_ids for c in ids.chunks], type=pa.string())
        hit = pc.is_in(survivors.column(_ID), value_set=lake_ids)
        if pc.any(hit).as_py():
            new = survivors.filter(hit)
            hit_ids = pc.unique(new.column(_ID))
            part_of_id = np.repeat(np.arange(len(parts)), [len(ids) for ids in part_ids])
            holding = np.unique(part_of_id[pc.is_in(lake_ids, value_set=hit_ids).to_numpy(zero_copy_only=False)])
            old = []
            for index in holding:
                rows = _read_part(storage, parts[index]).filter(pc.is_in(pc.field(_ID), value_set=hit_ids))
                old.append(rows.append_column(_PART, pa.array(np.full(rows.num_rows, index, dtype=np.int32))))
            same, conflicts = _compare(new, pa.concat_tables(old))
            if conflicts.num_rows:
                first_bad = pc.min(conflicts.column(_FILE)).as_py()
                bad = conflicts.filter(pc.equal(conflicts.column(_FILE), first_bad))
                raise _conflict(
                    files[first_bad].uri, bad, lambda row: f"already in the lake (in {parts[row[_PART + _OLD]]})"
                )
            fate[same.column(_ROW).to_numpy()] = _IN_LAKE

    # 3. Keep what is new.
    for index, raw in enumerate(files):
        fates = fate[offsets[index]:offsets[index + 1]]
        dropped = int(np.count_nonzero(fates))
        if not dropped:
            continue
        raw.table = tables[index].filter(pa.array(fates == _KEEP))
        raw.rows, raw.duplicates = raw.table.num_rows, dropped
        log.info(
            "ingest: %s: dropped %d re-delivered rows (%d already in the lake, %d in an earlier file, "
            "%d repeated within the file); %d new rows remain",
            raw.uri, dropped, np.count_nonzero(fates == _IN_LAKE), np.count_nonzero(fates == _IN_BATCH),
            np.count_nonzero(fates == _IN_FILE), raw.rows,
        )
    log.info("ingest: checked transaction_id uniqueness against %d lake parts in %.2fs",
             len(parts), time.perf_counter() - started)


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


def _read_part(storage: Storage, uri: str, columns: list[str] | None = None) -> pa.Table:
    try:
        table = storage.read_parquet(uri, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"lake part {uri} is not readable parquet ({_first_line(exc)}); remove it and re-run") from None
    names = columns or TRANSACTION_SCHEMA.names
    try:
        return table.select(names).cast(pa.schema([TRANSACTION_SCHEMA.field(n) for n in names]))
    except (KeyError, *_BAD_DATA) as exc:
        raise DataError(
            f"lake part {uri} does not hold TRANSACTION_SCHEMA ({_first_line(exc)}); remove it and re-run"
        ) from None


# --- writing the lake --------------------------------------------------------------------------


def _part_name(raw_sha256: str) -> str:
    return f"part-{raw_sha256[:16]}.parquet"


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


def _published_parts(storage: Storage, lake_uri: str) -> dict[str, dict[str, Any]]:
    """The parts listed by the latest published manifest, by URI (empty for a new lake)."""
    try:
        return {p["uri"]: p for p in load_snapshot(storage, latest_snapshot_uri(lake_uri)).parts}
    except ArtifactNotFound:
        return {}
    except (StorageError, DataError) as exc:  # unreadable: describe the parts from the files instead
        log.warning("ingest: ignoring %s: %s", latest_snapshot_uri(lake_uri), exc)
        return {}


def _lake_parts(storage: Storage, lake_uri: str, known: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every part under ``<lake>/transactions`` with its sha256, rows and date, sorted by URI.

    Parts this call wrote or the previous manifest lists are ``known`` (names are content-derived
    and parts are never rewritten); any other part, e.g. left by an interrupted run, is read.
    """
    parts = []
    for uri in storage.iter_objects(join(lake_uri, TRANSACTIONS), (".parquet",)):
        part = known.get(uri) or _describe_part(storage, uri)
        parts.append(dict(part))
    return sorted(parts, key=lambda p: p["uri"])


def _describe_part(storage: Storage, uri: str) -> dict[str, Any]:
    data = storage.read_bytes(uri)
    try:
        rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"lake part {uri} is not readable parquet ({_first_line(exc)}); remove it and re-run") from None
    date = next((seg[5:] for seg in uri.split("/") if seg.startswith("date=")), "")
    return {"uri": uri, "sha256": sha256_bytes(data), "rows": rows, "date": date}
