"""Ingest: raw files (csv, parquet, jsonl; local or s3://) staged as a batch of the use case's lake.

Every raw file is streamed a chunk at a time (bounded memory, whatever the file's size), held to
the use case's contract (:mod:`flywheel.contract`, :mod:`flywheel.rawfiles`) and written to local date partitions (by a thread pool, while
the main thread reads the next chunk or file: a few chunks in memory at most); nothing is written to
the lake's storage until every file passed, so bad input leaves no trace. A file whose sha256 is
already in the lake is skipped unread. With policy ``quarantine``, rows that break the schema or the
suite's row-level expectations are set aside (with their reason) instead of rejecting the batch. The batch's rows are split into date partitions named after
the raw file they came from, and staged (:func:`flywheel.lake.stage`) next to the latest published
snapshot: nothing a reader sees changes until the validate step publishes the batch, and a batch
that validation rejects is discarded. Re-ingesting files whose parts are already published stages
no new part and yields the same snapshot sha256.

The contract's ``id`` (when it names one) is unique in the lake. A row whose id is already in the published lake, in an
earlier file of the same batch, or earlier in the same file is a re-delivery when its content is
identical (it is dropped, so overlapping exports and re-sent files are idempotent) and a conflict
when it is not (the whole batch is refused with a DataError naming the file, the ids and where the
other row lives). The lake side is checked through its id index (:func:`flywheel.lake.id_hashes`):
only a hit reads rows back.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import logging
import os
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flywheel import lake
from flywheel.contract import Contract
from flywheel.errors import DataError
from flywheel.lake import LakeSnapshot, NewPart
from flywheel.rawfiles import ROW_COUNT, SUFFIXES, check_columns, conform, conform_rows, iter_tables
from flywheel.storage import ObjectRef, Storage

log = logging.getLogger(__name__)


@dataclass
class _RawFile:
    uri: str
    sha256: str
    size: int
    rows: int  # rows this file puts into the lake (re-delivered rows not counted)
    table: pa.Table | None  # None: already in the published lake, nothing to write
    duplicates: int = 0  # re-delivered rows dropped: already in the lake, the batch or the file
    skipped: str = ""  # why the file was not read: "already ingested" or "same content as <uri>"
    quarantined: int = 0  # rows set aside (policy quarantine)
    unlabelled: int = 0  # rows without a label, dropped (the contract's unlabelled: drop)
    parts: dict[str, tuple[str, int]] = field(default_factory=dict)  # date -> (local parquet, rows)
    hashes: np.ndarray | None = None  # the id hashes of its rows (in part order)
    part_hashes: dict[str, np.ndarray] = field(default_factory=dict)  # date -> the id hashes of that part

    def summary(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"uri": self.uri, "sha256": self.sha256, "rows": self.rows}
        if self.duplicates:
            entry["duplicates"] = self.duplicates
        if self.skipped:
            entry["skipped"] = self.skipped
        if self.quarantined:
            entry["quarantined"] = self.quarantined
        if self.unlabelled:
            entry["unlabelled_dropped"] = self.unlabelled
        return entry


# Threads that write a chunk's date parts (and hash their ids) while the next chunk is read.
_THREADS = min(8, os.cpu_count() or 1)

# A row check: (a boolean mask of a chunk's bad rows, each bad row's reason). Validation supplies it.
RowCheck = Callable[[pa.Table], "tuple[np.ndarray, list[str]]"]


@dataclass
class IngestOptions:
    """How a batch is read: the bad-row policy and the bounded-memory chunk size."""

    policy: str = "fail"  # "fail": a bad value rejects the batch; "quarantine": its row is set aside
    max_quarantine_fraction: float = 0.01  # policy quarantine: the batch is rejected above this share
    chunk_rows: int = 1_000_000
    row_check: RowCheck | None = None  # policy quarantine: the row-level expectations, per chunk


def ingest(
    storage: Storage, source_uri: str, lake_uri: str, run_id: str, options: IngestOptions | None = None, *,
    contract: Contract, sources: dict[str, LakeSnapshot] | None = None,
) -> LakeSnapshot:
    """Read every raw file under ``source_uri``, enforce the schema, drop re-delivered rows and stage
    the new date partitions as a batch of ``lake_uri``; returns the staged snapshot (the published
    lake plus the batch), which :func:`flywheel.lake.publish_staged` publishes once validated.

    ``source_uri`` is a file, a folder or a glob (``*``, ``?``, ``[...]`` in the last segments).
    Files are streamed a chunk at a time into local date partitions, so memory stays bounded by the
    chunk size, not the file. A file whose content (sha256) is already in the lake is skipped
    unread. The contract's id is checked against the lake through its id index. With policy
    ``quarantine``, rows that break the schema or ``options.row_check`` are set aside with their
    reason instead of rejecting the batch, as long as their share is at most the threshold.

    Files and folders whose names start with '_' or '.' are skipped. Raises :class:`DataError` when
    there is nothing to ingest or any file is unreadable, breaks the contract or reuses a row id with
    other content; then nothing is written. ``sources`` are the snapshots of the contract's further
    sources that go with the batch (:func:`ingest_sources`).
    """
    options = options or IngestOptions()
    started = time.perf_counter()
    uris = source_files(storage, source_uri)
    parent = lake.latest_snapshot(storage, lake_uri)
    published = parent.parts if parent else []

    with (
        tempfile.TemporaryDirectory(prefix="flywheel-ingest-") as scratch,
        ThreadPoolExecutor(_THREADS, thread_name_prefix="ingest-write") as pool,
        ThreadPoolExecutor(1, thread_name_prefix="ingest-hash") as hasher,
    ):
        quarantine = _Quarantine(Path(scratch) / "quarantine", contract)
        raw_files = _read_files(storage, uris, published, Path(scratch), options, contract, quarantine, pool, hasher)
        read = [f for f in raw_files if not f.skipped]
        new_rows = sum(f.rows for f in read)
        bad_rows = sum(f.quarantined for f in read)
        log.info(
            "ingest: read %d files (%d skipped), %d rows (%d set aside) from %s in %.2fs",
            len(raw_files), len(raw_files) - len(read), new_rows, bad_rows, source_uri, time.perf_counter() - started,
        )
        if read and new_rows + bad_rows == 0:
            raise DataError(
                f"{ROW_COUNT}(table): the files under {source_uri} hold no rows: {', '.join(f.uri for f in read)}"
            )
        if bad_rows:
            quarantine.decide(source_uri, new_rows + bad_rows, options.max_quarantine_fraction)
        # The id stays unique: drop re-delivered rows, refuse conflicting ones (nothing written yet).
        _hold_ids_unique(storage, published, read, Path(scratch), contract)

        stage_started = time.perf_counter()
        new_parts = [part for raw in read for part in _new_parts(raw, source_uri)]
        staged = lake.stage(
            storage, lake_uri, run_id, parent, new_parts, contract, [f.summary() for f in raw_files], quarantine.files(),
            sources,
        )
    log.info(
        "ingest: staged %d new parts in %.2fs; snapshot %s (%d parts, %d rows) at %s, %.2fs total",
        len(new_parts), time.perf_counter() - stage_started, staged.sha256[:12], len(staged.parts), staged.rows,
        staged.uri, time.perf_counter() - started,
    )
    return staged


def source_folder(source_uri: str) -> str:
    """The folder a source URI is in: the URI itself for a folder, the folder above a file, and the
    part before the first wildcard segment of a glob."""
    segments = source_uri.rstrip("/").split("/")
    wild = next((i for i, seg in enumerate(segments) if any(ch in seg for ch in "*?[")), None)
    if wild is not None:
        return "/".join(segments[:wild]) or "/"
    if segments[-1].lower().endswith(SUFFIXES) or any(segments[-1].lower().endswith(s + ".gz") for s in SUFFIXES):
        return "/".join(segments[:-1]) or "/"
    return source_uri.rstrip("/")


def further_source_uri(source_uri: str, name: str, files: str) -> str:
    """Where the raw files of the contract's further source ``name`` are: ``files`` (a URI, or a path
    relative to the main source's folder), by default ``<that folder>/_sources/<name>``. Names starting
    with '_' are skipped by the main source's listing, so its files never read as main rows."""
    files = files or f"{lake.SOURCES}/{name}"
    if files.startswith(("s3://", "/")):
        return files
    return f"{source_folder(source_uri)}/{files}"


def ingest_sources(
    storage: Storage, source_uri: str, lake_uri: str, run_id: str, options: IngestOptions | None, contract: Contract,
) -> dict[str, LakeSnapshot]:
    """Each further source of ``contract`` (:class:`flywheel.contract.Source`) ingested into its own
    lake, as the main rows are (schema enforced, re-delivered files skipped, staged until published):
    its staged snapshot, or its lake's latest when no file of it is beside this batch. A source with
    neither is a DataError naming where its files were looked for."""
    out: dict[str, LakeSnapshot] = {}
    plain = dataclasses.replace(options or IngestOptions(), row_check=None)  # the row check is the main rows' suite
    for name, source in contract.sources.items():
        raw_uri = further_source_uri(source_uri, name, source.files)
        own_lake = lake.source_lake_uri(lake_uri, name)
        try:
            source_files(storage, raw_uri)
        except DataError:
            latest = lake.latest_snapshot(storage, own_lake)
            if latest is None:
                raise DataError(
                    f"the contract's source {name!r} has no files at {raw_uri} and nothing in its lake yet: put its "
                    f"csv/parquet/jsonl files there (or say where in the contract: sources.{name}.files)"
                ) from None
            log.info("ingest: no new files for source %s at %s; using its lake's snapshot %s", name, raw_uri, latest.sha256[:12])
            out[name] = latest
            continue
        out[name] = ingest(storage, raw_uri, own_lake, run_id, plain, contract=source.contract())
    return out


def _read_files(
    storage: Storage, uris: list[str], published: list[dict[str, Any]], scratch: Path, options: IngestOptions,
    contract: Contract, quarantine: _Quarantine, pool: ThreadPoolExecutor, hasher: ThreadPoolExecutor,
) -> list[_RawFile]:
    """Hash each raw file, skip those already in the lake (or repeated in the batch), stream the
    others into local date partitions. Pipelined: the next file is hashed, and the previous file's
    parts are written, while a file is read."""
    done = {p["uri"].rsplit("/", 1)[-1] for p in published}
    raw_files: list[_RawFile] = []
    seen: dict[str, str] = {}
    writing: list[_DateParts] = []
    next_hash = hasher.submit(_hash, storage, uris[0])
    try:
        for index, uri in enumerate(uris):
            sha, size = next_hash.result()
            if index + 1 < len(uris):
                next_hash = hasher.submit(_hash, storage, uris[index + 1])
            in_lake = [p for p in published if p["uri"].endswith("/" + lake.part_name(sha))]
            if lake.part_name(sha) in done or in_lake:
                # A batch is published whole, so a file with a part in the manifest is in the lake in full.
                rows = sum(p["rows"] for p in in_lake)
                raw_files.append(_RawFile(uri, sha, size, rows, None, skipped="already ingested"))
            elif sha in seen:
                log.warning("ingest: %s has the same content as %s; ingested once", uri, seen[sha])
                raw_files.append(_RawFile(uri, sha, size, 0, None, skipped=f"same content as {seen[sha]}"))
            else:
                seen[sha] = uri
                raw, parts = _stream_file(storage, uri, sha, size, scratch / str(index), options, contract, quarantine, pool)
                raw_files.append(raw)
                writing.append(parts)
                while len(writing) > 1:  # the previous file's parts were written while this one was read
                    writing.pop(0).close()
        while writing:
            writing.pop(0).close()
    finally:
        next_hash.cancel()
        for parts in writing:  # an error: let the writes end before the scratch folder goes
            parts.abort()
    return raw_files


def source_files(storage: Storage, source_uri: str) -> list[str]:
    """The raw files a source names: a file, every csv/parquet/jsonl file below a folder, or the
    files matching a glob. Raises :class:`DataError` when it names none."""
    if any(ch in source_uri for ch in "*?["):
        pattern = source_uri if source_uri.startswith("s3://") else str(Path(source_uri).absolute())
        segments = pattern.split("/")
        fixed = next(i for i, seg in enumerate(segments) if any(ch in seg for ch in "*?["))
        base = "/".join(segments[:fixed]) or "/"
        # A wildcard stays within its path segment (as in a shell): "raw/*/*.csv" is not "raw/**".
        uris = [
            u for u in storage.iter_objects(base if source_uri.startswith("s3://") else str(Path(base)), SUFFIXES)
            if len(u.split("/")) == len(segments)
            and all(fnmatch.fnmatchcase(a, b) for a, b in zip(u.split("/"), segments))
        ]
    else:
        uris = list(storage.iter_objects(source_uri, SUFFIXES))
    if not uris:
        raise DataError(
            f"no csv/parquet/jsonl files under {source_uri} (names starting with '_' or '.' are skipped); "
            "check the source URI"
        )
    return uris


def _hash(storage: Storage, uri: str) -> tuple[str, int]:
    """A raw file's sha256 and size, read in blocks."""
    digest, size = hashlib.sha256(), 0
    with storage.open_input(uri) as stream:
        while block := stream.read(8 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


class _Quarantine:
    """Rows a batch sets aside: their raw values (as text), the source file and row, and the reason."""

    def __init__(self, folder: Path, contract: Contract) -> None:
        self.folder = folder
        self.names = list(contract.columns)
        self.schema = pa.schema([("source_uri", pa.string()), ("source_row", pa.int64()), ("reason", pa.string()),
                                 *[(name, pa.string()) for name in self.names]])
        self.written: dict[str, tuple[pq.ParquetWriter, Path]] = {}
        self.counts: dict[str, int] = {}
        self.reasons: dict[str, list[Any]] = {}  # "expectation(column)" -> [count, examples]

    def add(self, uri: str, name: str, chunk: pa.Table, rows: np.ndarray, offset: int, reasons: list[str]) -> None:
        """Set aside ``rows`` of ``chunk`` (whose first row is row ``offset`` of the file at ``uri``)."""
        if not len(rows):
            return
        columns = {"source_uri": pa.array([uri] * len(rows)), "source_row": pa.array(rows + offset, pa.int64()),
                   "reason": pa.array(reasons, pa.string())}
        for field_name in self.names:
            values = chunk.column(field_name).take(pa.array(rows))
            columns[field_name] = values.cast(pa.string()) if not pa.types.is_string(values.type) else values
        table = pa.table(columns, schema=self.schema)
        if name not in self.written:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / name
            self.written[name] = (pq.ParquetWriter(path, self.schema, compression="zstd"), path)
        self.written[name][0].write_table(table)
        self.counts[name] = self.counts.get(name, 0) + len(rows)
        for reason in reasons:
            key, _, example = reason.partition(": ")
            entry = self.reasons.setdefault(key, [0, []])
            entry[0] += 1
            if len(entry[1]) < 3:
                entry[1].append(example)

    def decide(self, source_uri: str, rows: int, threshold: float) -> None:
        """Refuse the batch when the share of bad rows is above ``threshold``, naming each reason."""
        bad = sum(self.counts.values())
        if bad / rows <= threshold:
            return
        lines = [f"  - {key}: {count} rows, e.g. {', '.join(examples)}" for key, (count, examples) in self.reasons.items()]
        raise DataError(
            f"{bad} of {rows} rows under {source_uri} ({bad / rows:.2%}) fail row-level checks, more than the "
            f"{threshold:.2%} policy quarantine allows (ingest.max_quarantine_fraction); nothing was written:\n"
            + "\n".join(lines)
        )

    def files(self) -> list[tuple[str, str, int]]:
        for writer, _ in self.written.values():
            writer.close()
        return [(str(path), name, self.counts[name]) for name, (_, path) in self.written.items()]


def _stream_file(
    storage: Storage, uri: str, sha: str, size: int, folder: Path, options: IngestOptions, contract: Contract,
    quarantine: _Quarantine, pool: ThreadPoolExecutor,
) -> tuple[_RawFile, _DateParts]:
    """Read one raw file a chunk at a time into local date partitions (sorted by event time within a chunk).

    The main thread reads, checks and orders a chunk; ``pool`` writes and hashes each of its date
    parts (pyarrow and numpy let go of the GIL there) while the main thread reads on: the returned
    parts may still be being written; :meth:`_DateParts.close` finishes them.
    """
    raw = _RawFile(uri=uri, sha256=sha, size=size, rows=0, table=None)
    if size == 0:
        raise DataError(f"{uri} is empty (0 bytes): {ROW_COUNT}(table) expects at least 1 row")
    offset = 0
    quarantine_name = f"{lake.part_name(sha)[:-8]}-{uri.rsplit('/', 1)[-1].rsplit('.', 1)[0][:40]}.parquet"
    limit = max(1, int(options.max_quarantine_fraction * options.chunk_rows) + 1)
    parts = _DateParts(raw, folder, pool, contract)
    schema = contract.arrow_schema()
    try:
        with storage.open_input(uri) as stream:
            for chunk in iter_tables(uri, stream, options.chunk_rows, schema):
                check_columns(uri, chunk.column_names, schema)
                if options.policy == "quarantine":
                    good, bad_mask, reasons = conform_rows(chunk, limit, schema)
                    bad_rows = np.flatnonzero(bad_mask.to_numpy(zero_copy_only=False))
                    if options.row_check is not None and good.num_rows:
                        failing, more = options.row_check(good)
                        if failing.any():
                            good_rows = np.flatnonzero(~bad_mask.to_numpy(zero_copy_only=False))
                            extra = good_rows[failing]
                            order = np.argsort(np.concatenate([bad_rows, extra]), kind="stable")
                            bad_rows = np.concatenate([bad_rows, extra])[order]
                            reasons = [(reasons + list(more))[i] for i in order]
                            good = good.filter(pa.array(~failing))
                    quarantine.add(uri, quarantine_name, chunk, bad_rows, offset, reasons)
                    raw.quarantined += len(bad_rows)
                    if raw.quarantined > limit * 4 and raw.quarantined > options.max_quarantine_fraction * (offset + chunk.num_rows):
                        quarantine.decide(uri, offset + chunk.num_rows, options.max_quarantine_fraction)
                else:
                    good = conform(uri, chunk, schema)
                offset += chunk.num_rows
                if contract.unlabelled == "drop":  # not a row of this use case: it never enters the lake
                    labelled = functools.reduce(pc.and_, [_has_value(good.column(label)) for label in contract.labels])
                    raw.unlabelled += good.num_rows - pc.sum(labelled).as_py() if good.num_rows else 0
                    good = good.filter(labelled)
                parts.add(_partition_by_date(good, contract.timestamp, pool))
    except BaseException:
        parts.abort()
        raise
    return raw, parts


class _DateParts:
    """A raw file's local date partitions, appended to a chunk at a time by a thread pool."""

    def __init__(self, raw: _RawFile, folder: Path, pool: ThreadPoolExecutor, contract: Contract) -> None:
        self.raw, self.folder, self.pool = raw, folder, pool
        self.schema, self.options, self.id = contract.arrow_schema(), lake.part_write_options(contract), contract.id
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.hashes: dict[str, list[Future[np.ndarray]]] = {}
        self.pending: list[Future[np.ndarray]] = []
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, parts: list[tuple[str, pa.Table]]) -> None:
        """Queue one chunk's rows of each date (after the previous chunk's: stable bytes)."""
        _finish(self.pending)
        for date, part in parts:
            if date not in self.writers:
                path = self.folder / f"date={date}.parquet"
                self.writers[date] = pq.ParquetWriter(path, self.schema, **self.options)
                self.hashes[date] = []
            self.pending.append(self.pool.submit(_write_part, self.writers[date], part, self.id))
            self.hashes[date].append(self.pending[-1])
            self.raw.rows += part.num_rows

    def close(self) -> None:
        """Wait for the writes and close the files; the raw file gets its parts and their id hashes."""
        try:
            _finish(self.pending)
        finally:
            self.abort()
        # Each chunk's hashes of a date are sorted: the part's are a few sorted runs (cheap to merge).
        raw = self.raw
        raw.part_hashes = {date: np.concatenate([f.result() for f in self.hashes[date]]) for date in sorted(self.hashes)}
        raw.parts = {date: (str(self.folder / f"date={date}.parquet"), len(h)) for date, h in raw.part_hashes.items()}
        raw.hashes = np.concatenate(list(raw.part_hashes.values())) if raw.part_hashes else np.zeros(0, np.uint64)

    def abort(self) -> None:
        """Close the files once no task still writes to them (on an error: what they hold is discarded)."""
        wait(self.pending)
        for writer in self.writers.values():
            writer.close()
        self.writers = {}


def _write_part(writer: pq.ParquetWriter, part: pa.Table, id_column: str | None) -> np.ndarray:
    """Append rows to a date part; returns their id hashes, sorted (as the index keeps them), or as
    many zeros when the contract names no id (nothing is looked up then)."""
    writer.write_table(part)
    if id_column is None:
        return np.zeros(part.num_rows, dtype=np.uint64)
    return np.sort(lake.id_hashes(part.column(id_column)))


def _finish(tasks: list[Future[Any]]) -> None:
    """Wait for ``tasks``, raising the first error; the list is emptied."""
    for task in tasks:
        task.result()
    tasks.clear()


def _new_parts(raw: _RawFile, source_uri: str) -> list[NewPart]:
    """A raw file's rows as date partitions, each with the lineage it gets once published."""
    inputs = [ObjectRef(raw.uri, raw.sha256, raw.size).to_dict()]
    return [
        NewPart(
            date=date,
            name=lake.part_name(raw.sha256),
            table=None,
            path=path,
            rows=rows,
            id_hashes=raw.part_hashes.get(date),
            inputs=inputs,
            params={
                "date": date,
                "rows": rows,
                "source_uri": source_uri,
                **({"duplicates_dropped": raw.duplicates} if raw.duplicates else {}),
                **({"quarantined": raw.quarantined} if raw.quarantined else {}),
            },
        )
        for date, (path, rows) in raw.parts.items()
        if rows
    ]


def _hold_ids_unique(
    storage: Storage, published: list[dict[str, Any]], files: list[_RawFile], scratch: Path, contract: Contract
) -> None:
    """Look the batch's id hashes up in each other and in the lake's id index; the files with a hit
    (and the parts that hold it) are read back and compared row by row (:func:`_drop_redeliveries`),
    their local partitions rewritten without the re-delivered rows. No hit, no rows read. A contract
    without an id has nothing to hold unique (a re-sent file is still known by its sha256)."""
    files = [f for f in files if f.rows]
    if not files or contract.id is None:
        return
    started = time.perf_counter()
    batch = np.concatenate([f.hashes for f in files])
    owner = np.repeat(np.arange(len(files)), [len(f.hashes) for f in files])
    # Values only (a plain sort is several times cheaper than an argsort); each part's hashes are
    # already sorted, and a stable sort (timsort) merges sorted runs in about half a quicksort's time.
    ordered = np.sort(batch, kind="stable")
    repeats = ordered[1:][ordered[1:] == ordered[:-1]]
    suspects = set(owner[np.isin(batch, repeats)].tolist()) if len(repeats) else set()
    hit_parts = []
    if published:
        cache: dict[str, np.ndarray] = {}
        indexes = [lake.read_id_index(storage, part, contract, cache) for part in published]
        lake_hashes = np.concatenate(indexes)
        known = np.sort(lake_hashes, kind="stable")  # the index's slices are sorted runs too
        # The shorter of the two sorted lists looked up in the longer (sorted needles: one pass).
        needles, haystack = (ordered, known) if len(ordered) <= len(known) else (known, ordered)
        at = np.minimum(np.searchsorted(haystack, needles), max(len(haystack) - 1, 0))
        found = needles[haystack[at] == needles] if len(haystack) else needles[:0]
        if len(found):
            suspects |= set(owner[np.isin(batch, found)].tolist())
            holder = np.repeat(np.arange(len(published)), [len(i) for i in indexes])
            hit_parts = [published[i] for i in np.unique(holder[np.isin(lake_hashes, found)])]
    log.info("ingest: checked %d ids against the id index of %d published parts in %.2fs (%d files to compare)",
             len(batch), len(published), time.perf_counter() - started, len(suspects))
    if not suspects:
        return
    chosen = [files[i] for i in sorted(suspects)]
    for raw in chosen:
        raw.table = pa.concat_tables([pq.read_table(path) for path, _ in raw.parts.values()])
        raw.rows = raw.table.num_rows
    _drop_redeliveries(storage, hit_parts, chosen, contract)
    for raw in chosen:
        if raw.duplicates:
            folder = scratch / f"{raw.sha256[:16]}-deduplicated"
            folder.mkdir(exist_ok=True)
            raw.parts, raw.part_hashes = {}, {}
            for date, part in _partition_by_date(raw.table, contract.timestamp):
                path = folder / f"date={date}.parquet"
                pq.write_table(part, path, **lake.part_write_options(contract))
                raw.parts[date] = (str(path), part.num_rows)
        raw.table = None


# --- keeping the id unique -----------------------------------------------------------------------

_OLD = "_old"  # suffix of the other row's columns in a comparison
_FILE, _ROW, _PART = "__file", "__row", "__part"  # helper columns: file index, batch row index, lake part index
_KEEP, _IN_FILE, _IN_BATCH, _IN_LAKE = 0, 1, 2, 3  # what happens to a batch row
_FIX = "fix the source, or ingest into a fresh lake / FLYWHEEL_HOME"


def _drop_redeliveries(
    storage: Storage, published: list[dict[str, Any]], files: list[_RawFile], contract: Contract
) -> None:
    """Hold the contract's id unique across the published lake and the new ``files`` (modified in place).

    A row whose id appeared before (earlier in its file, in an earlier file of the batch, or in a
    published part) is dropped when all its columns equal that row's, and refused with a DataError
    when they do not. Vectorized: one group-by over the batch, and hash joins on the ids that
    collide; of the lake, only the id column is read, plus the parts that hold a collision.
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

    _mark_repeats_in_batch(batch, fate, files, contract)
    _mark_repeats_of_the_lake(storage, published, batch.filter(pa.array(fate == _KEEP)), fate, files, contract)
    for index, raw in enumerate(files):
        _keep_new_rows(raw, tables[index], fate[offsets[index]:offsets[index + 1]])
    log.info("ingest: checked %s uniqueness against %d published parts in %.2fs",
             contract.id, len(published), time.perf_counter() - started)


def _mark_repeats_in_batch(batch: pa.Table, fate: np.ndarray, files: list[_RawFile], contract: Contract) -> None:
    """The first row of each id stays; a later one must repeat it exactly (then it is dropped)."""
    first_rows = batch.group_by(contract.id).aggregate([(_ROW, "min")]).column(f"{_ROW}_min")
    if len(first_rows) == batch.num_rows:
        return
    is_first = pc.is_in(batch.column(_ROW), value_set=first_rows)
    same, conflicts = _compare(batch.filter(pc.invert(is_first)), batch.filter(is_first), contract)
    if conflicts.num_rows:
        first_bad = pc.min(conflicts.column(_FILE)).as_py()
        bad = conflicts.filter(pc.equal(conflicts.column(_FILE), first_bad))
        raise _conflict(files[first_bad].uri, bad, lambda row: (
            "more than once within the file" if row[_FILE + _OLD] == row[_FILE]
            else f"also in {files[row[_FILE + _OLD]].uri}"
        ), contract)
    rows = same.column(_ROW).to_numpy()
    within = same.column(_FILE).to_numpy() == same.column(_FILE + _OLD).to_numpy()
    fate[rows] = np.where(within, _IN_FILE, _IN_BATCH)


def _mark_repeats_of_the_lake(
    storage: Storage, parts: list[dict[str, Any]], survivors: pa.Table, fate: np.ndarray, files: list[_RawFile],
    contract: Contract,
) -> None:
    """Rows whose id a published part holds: dropped when identical, refused otherwise."""
    if not parts or not survivors.num_rows:
        return
    id_column, schema = contract.id, contract.arrow_schema()
    part_ids = [lake.read_part(storage, part, schema, [id_column]).column(id_column) for part in parts]
    lake_ids = pa.chunked_array([c for ids in part_ids for c in ids.chunks], type=schema.field(id_column).type)
    hit = pc.is_in(survivors.column(id_column), value_set=lake_ids)
    if not pc.any(hit).as_py():
        return
    new = survivors.filter(hit)
    hit_ids = pc.unique(new.column(id_column))
    part_of_id = np.repeat(np.arange(len(parts)), [len(ids) for ids in part_ids])
    holding = np.unique(part_of_id[pc.is_in(lake_ids, value_set=hit_ids).to_numpy(zero_copy_only=False)])
    old = []
    for index in holding:
        rows = lake.read_part(storage, parts[index], schema).filter(pc.is_in(pc.field(id_column), value_set=hit_ids))
        old.append(rows.append_column(_PART, pa.array(np.full(rows.num_rows, index, dtype=np.int32))))
    same, conflicts = _compare(new, pa.concat_tables(old), contract)
    if conflicts.num_rows:
        first_bad = pc.min(conflicts.column(_FILE)).as_py()
        bad = conflicts.filter(pc.equal(conflicts.column(_FILE), first_bad))
        raise _conflict(
            files[first_bad].uri, bad, lambda row: f"already in the lake (in {parts[row[_PART + _OLD]]['uri']})", contract
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


def _same(a: pa.ChunkedArray, b: pa.ChunkedArray) -> pa.ChunkedArray:
    """Row by row, whether two columns hold the same value: two nulls (or two NaNs) are the same."""
    both_missing = pc.and_(pc.is_null(a, nan_is_null=True), pc.is_null(b, nan_is_null=True))
    return pc.or_(pc.fill_null(pc.equal(a, b), False), both_missing)


def _compare(new: pa.Table, old: pa.Table, contract: Contract) -> tuple[pa.Table, pa.Table]:
    """Join ``new`` rows to the ``old`` rows with their id (old columns get ``_old``).

    Returns the joined rows where every contract column is equal (one per identical new row), and,
    for the new rows equal to none of their old rows, the joined rows (conflicts, sorted by id).
    """
    id_column = contract.id
    values = [name for name in contract.columns if name != id_column]
    old = old.rename_columns([name if name == id_column else name + _OLD for name in old.column_names])
    joined = new.join(old, keys=id_column, join_type="inner", use_threads=True)
    equal = functools.reduce(pc.and_, [_same(joined.column(n), joined.column(n + _OLD)) for n in values])
    same = joined.filter(equal)
    # Old rows may repeat an id (a lake from before this check): one equal match is enough.
    _, first = np.unique(same.column(_ROW).to_numpy(), return_index=True)
    same = same.take(pa.array(first))
    conflicts = joined.filter(pc.invert(pc.is_in(joined.column(_ROW), value_set=same.column(_ROW))))
    return same, conflicts.sort_by([(id_column, "ascending"), (_ROW, "ascending")])


def _conflict(uri: str, conflicts: pa.Table, where: Callable[[dict[str, Any]], str], contract: Contract) -> DataError:
    """The DataError for a file's rows whose id is taken by a row with other content."""
    id_column = contract.id
    ids = pc.unique(conflicts.column(id_column)).to_pylist()
    first = conflicts.slice(0, 1).to_pylist()[0]
    differs = ", ".join(f"{n} {first[n + _OLD]!r} vs {first[n]!r}" for n in contract.columns
                        if n != id_column and first[n] != first[n + _OLD])
    examples = ", ".join(repr(i) for i in ids[:3]) + (", ..." if len(ids) > 3 else "")
    return DataError(
        f"{uri}: {len(ids)} {id_column} value(s) with different content {where(first)} "
        f"(expect_column_values_to_be_unique({id_column})): {examples} "
        f"(e.g. {ids[0]!r} differs in {differs}). A {id_column} must be unique in the lake: an identical "
        f"re-delivery is skipped, a changed row is refused and nothing was written; {_FIX}"
    )


def _has_value(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """Row by row, whether a value is there (not null, and not NaN for a float)."""
    present = pc.is_valid(values)
    return pc.and_(present, pc.invert(pc.fill_null(pc.is_nan(values), False))) if pa.types.is_floating(values.type) else present


def _partition_by_date(
    table: pa.Table | None, timestamp: str, pool: ThreadPoolExecutor | None = None
) -> list[tuple[str, pa.Table]]:
    """Split rows by the UTC date of their event time (the contract's ``timestamp``); each part sorted
    by it (ties in file order, for stable bytes).
    With ``pool``, the columns are put in order in parallel."""
    if table is None or table.num_rows == 0:
        return []
    # One numeric sort key: Arrow's sort is stable, so rows with equal ts keep their file order and
    # the same file always gives the same bytes (a string tie-break doubled the cost of ingest).
    order = pc.sort_indices(table.column(timestamp))
    if pool is None:
        table = table.take(order)
    else:  # one take of the whole chunk per column (taking each date's rows apart costs 1.5x)
        table = pa.Table.from_arrays(list(pool.map(lambda column: column.take(order), table.columns)), schema=table.schema)
    days = pc.cast(table.column(timestamp), pa.date32())
    # Sorted by ts, so each date is one contiguous run of rows.
    day_numbers = days.cast(pa.int32()).to_numpy()
    starts = np.concatenate([[0], np.flatnonzero(np.diff(day_numbers)) + 1])
    ends = np.concatenate([starts[1:], [len(day_numbers)]])
    return [
        (days[int(start)].as_py().isoformat(), table.slice(int(start), int(end - start)))
        for start, end in zip(starts, ends)
    ]
