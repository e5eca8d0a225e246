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
"""

from __future__ import annotations

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
    rows: int
    table: pa.Table | None  # None: already in the published lake, nothing to write


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

    # Phase 2: write the parts that are not in the lake yet.
    write_started = time.perf_counter()
    written: dict[str, dict[str, Any]] = {}
    seen_shas: dict[str, str] = {}
    for raw in raw_files:
        if raw.sha256 in seen_shas:
            log.warning("ingest: %s has the same content as %s; ingested once", raw.uri, seen_shas[raw.sha256])
            continue
        seen_shas[raw.sha256] = raw.uri
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
                params={"date": date, "rows": part.num_rows, "source_uri": source_uri},
            )
    log.info("ingest: wrote %d new parts in %.2fs", len(written), time.perf_counter() - write_started)

    # Phase 3: publish the manifest of the whole lake, last.
    parts = _lake_parts(storage, lake_uri, {**published, **written})
    sha = snapshot_sha256([p["sha256"] for p in parts])
    manifest_uri = join(lake_uri, SNAPSHOTS, f"{sha}.json")
    snapshot = LakeSnapshot(
        uri=manifest_uri,
        sha256=sha,
        rows=sum(p["rows"] for p in parts),
        parts=parts,
        new_parts=sorted(written),
        source_files=[{"uri": f.uri, "sha256": f.sha256, "rows": f.rows} for f in raw_files],
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
    log.info(
        "ingest: snapshot %s (%d parts, %d rows, %d new) published in %.2fs total",
        sha[:12], len(parts), snapshot.rows, len(written), time.perf_counter() - started,
    )
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
