"""The lake: how a use case's rows are laid out, identified, staged, published and read.

The lake looks like::

    <lake>/transactions/date=YYYY-MM-DD/part-<first 16 hex of the raw file's sha256>.parquet
    <lake>/_snapshots/<snapshot sha256>.json     one manifest per published lake state (immutable)
    <lake>/_snapshots/latest.json                the newest published manifest: what readers read
    <lake>/_staging/<run id>/...                 a batch that is not published yet (invisible); an area
                                                 staged on an older lake state is removed at the next publish
    <lake>/_index/id/<batch index sha>.u64       each part's row ids as sorted 64-bit hashes
    <lake>/quarantine/<batch>/<file>.parquet     rows a batch set aside (policy quarantine), with reasons

The rows are held to the use case's contract (:mod:`flywheel.contract`): its columns, in its order.
The id index lets ingest hold the contract's id unique against the whole lake without reading its
parts: a batch's id hashes are looked up in the hashes of the parts the latest manifest lists (8
bytes an id); only a hit (a re-delivery, a conflict or, rarely, a hash collision) reads the parts
that hold it. Each manifest also keeps its batch's profile (row count, shares, quantiles), which the
drift gate compares the next batches with.

Readers follow manifests only: nothing lists ``transactions/`` to decide what is in the lake, so a
part that no published manifest names (left by an interrupted publish, or written by hand) is never
read. A batch is first staged: its new parts and a staged manifest (the published parts plus the
new ones) go below ``_staging/``, where validation reads them. Publishing copies the new parts into
``transactions/`` (verifying each sha256), writes the immutable manifest, and moves ``latest.json``
last; run again after an interruption, it completes. A rejected batch is discarded: its staging area
is removed and nothing under ``transactions/`` or ``_snapshots/`` has changed.

A snapshot's identity is the sha256 over its parts' sha256s, so a staged snapshot and the one it
becomes when published have the same sha256.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flywheel import lineage
from flywheel.errors import ArtifactNotFound, DataError, StorageError, first_line
from flywheel.contract import Contract
from flywheel.storage import ObjectRef, Storage, join, sha256_bytes

log = logging.getLogger(__name__)

TRANSACTIONS = "transactions"
SNAPSHOTS = "_snapshots"
STAGING = "_staging"
LATEST = "latest.json"
SOURCES = "_sources"  # the lakes of a contract's further sources
STAGED_MANIFEST = "snapshot.json"
STAGING_MARKER = "staging.json"
INDEX = "_index"
QUARANTINE = "quarantine"



def part_write_options(contract: Contract) -> dict[str, Any]:
    """How a part is written: zstd, and dictionary pages only for the columns whose values repeat
    (:meth:`~flywheel.contract.Contract.dictionary_columns`)."""
    return {"compression": "zstd", "use_dictionary": contract.dictionary_columns()}


# What reading a part that is not parquet of the contract's schema can raise.
_UNREADABLE = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, KeyError, ValueError, OSError)


@dataclass
class LakeSnapshot:
    """The lake's parts at one moment, identified by the hash of their contents.

    A *staged* snapshot (``staging_uri`` set) is a candidate: its new parts carry a ``staged_uri``
    where their bytes are until :func:`publish_staged` copies them to their ``uri``. A published
    snapshot has ``staging_uri == ""`` and every part at its ``uri``.
    """

    uri: str
    sha256: str
    rows: int
    parts: list[dict[str, Any]]
    new_parts: list[str] = field(default_factory=list)
    source_files: list[dict[str, Any]] = field(default_factory=list)
    lake_uri: str = ""
    parent: str = ""  # sha256 of the published snapshot this one extends ("" for a new lake)
    staging_uri: str = ""
    validated_by: dict[str, Any] = field(default_factory=dict)  # the report that let it in
    profile: dict[str, Any] = field(default_factory=dict)  # the new rows' statistics (drift baseline)
    quarantine: dict[str, Any] = field(default_factory=dict)  # rows set aside: {"uri", "rows", "files"}
    # The contract's further sources: name -> the snapshot of its own lake that goes with this one
    # (staged with a staged batch, published with it). Their sha256s are part of this one's.
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def staged(self) -> bool:
        return bool(self.staging_uri)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LakeSnapshot":
        try:
            uri = data["uri"]
            return cls(
                uri=uri,
                sha256=data["sha256"],
                rows=int(data["rows"]),
                parts=[dict(p) for p in data["parts"]],
                new_parts=list(data.get("new_parts", [])),
                source_files=[dict(s) for s in data.get("source_files", [])],
                # Manifests from before these fields: the lake is the folder above _snapshots/.
                lake_uri=data.get("lake_uri") or uri.rsplit(f"/{SNAPSHOTS}/", 1)[0],
                parent=data.get("parent", ""),
                staging_uri=data.get("staging_uri", ""),
                validated_by=dict(data.get("validated_by") or {}),
                profile=dict(data.get("profile") or {}),
                quarantine=dict(data.get("quarantine") or {}),
                sources={name: dict(snap) for name, snap in (data.get("sources") or {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"not a lake snapshot manifest: missing or bad field {exc}") from None


@dataclass
class NewPart:
    """A part a batch adds: where it goes, its rows (a table, or a local parquet file of the
    contract's rows), and the lineage it gets once published."""

    date: str
    name: str
    table: pa.Table | None
    inputs: list[dict[str, Any]]  # lineage inputs (the raw file), recorded at publish time
    params: dict[str, Any]
    path: str = ""  # a local parquet file holding the rows (instead of ``table``)
    rows: int = 0  # with ``path``: how many rows it holds
    id_hashes: np.ndarray | None = None  # its ids' hashes, when already known (saves reading them back)

    @property
    def num_rows(self) -> int:
        return self.table.num_rows if self.table is not None else self.rows


# --- the row id index ------------------------------------------------------------------------------

_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_BASE = np.uint64(0x100000001B3)


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes of string ids (vectorized: a polynomial over the bytes, then a splitmix64
    finalizer). Stable across runs and versions: it is what the lake's index stores. Equal ids have
    equal hashes; a rare collision only makes ingest read the parts involved and compare rows."""
    array = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    array = array.cast(pa.large_string())
    if len(array) == 0:
        return np.zeros(0, dtype=np.uint64)
    buffers = array.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64)[array.offset: array.offset + len(array) + 1]
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, dtype=np.uint8)
    first = int(offsets[0])
    data = data[first: int(offsets[-1])]
    starts, lengths = offsets[:-1] - first, np.diff(offsets)
    width = int(lengths.max(initial=0))
    powers = np.ones(width + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(1, len(powers)):
            powers[i] = powers[i - 1] * _BASE
        if width and int(lengths.min()) == width:
            # Ids of one length (the usual case): the same sum, a column of bytes at a time (about 9x
            # cheaper than the general path's per-byte position, gather and prefix sum).
            matrix = data.reshape(len(array), width)
            h = np.zeros(len(array), dtype=np.uint64)
            for i in range(width):
                h += (matrix[:, i].astype(np.uint64) + np.uint64(1)) * powers[i]
        else:
            position = np.arange(len(data), dtype=np.int64) - np.repeat(starts, lengths)
            summed = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum((data.astype(np.uint64) + np.uint64(1)) * powers[position])])
            h = summed[starts + lengths] - summed[starts]
        h ^= lengths.astype(np.uint64) * _MIX2
        h ^= h >> np.uint64(30)
        h *= _MIX1
        h ^= h >> np.uint64(27)
        h *= _MIX2
        h ^= h >> np.uint64(31)
    return h


def index_uri(lake_uri: str, index_sha256: str) -> str:
    """Where a published batch's id index is (named by its content)."""
    return join(lake_uri, INDEX, "id", f"{index_sha256[:32]}.u64")


def read_id_index(
    storage: Storage, part: dict[str, Any], contract: Contract, cache: dict[str, np.ndarray] | None = None
) -> np.ndarray:
    """A part's sorted id hashes: its slice of its batch's index (``cache`` keeps index files read
    for other parts of the batch), or (a part from before the index, or a hand-written one) computed
    from its id column (the contract's ``id``)."""
    if contract.id is None:
        raise DataError("the use case's contract names no id column, so the lake keeps no id index")
    uri = part.get("staged_ids") or part.get("ids")
    cache = {} if cache is None else cache
    if uri and "ids_slice" in part:
        try:
            if uri not in cache:
                cache[uri] = np.frombuffer(storage.read_bytes(uri), dtype="<u8")
            start, end = part["ids_slice"]
            return cache[uri][start:end]
        except ArtifactNotFound:
            log.warning("lake: id index %s is missing; reading the ids of %s instead", uri, part["uri"])
    schema = contract.arrow_schema()
    return np.sort(id_hashes(read_part(storage, part, schema, [contract.id]).column(contract.id)))


def quarantine_uri(lake_uri: str, batch: str) -> str:
    """Where the rows a batch set aside are kept once it is published."""
    return join(lake_uri, QUARANTINE, staging_uri(lake_uri, batch).rsplit("/", 1)[-1])


def recent_profiles(storage: Storage, snapshot: LakeSnapshot | None, window: int) -> list[dict[str, Any]]:
    """The batch profiles of ``snapshot`` and its ancestors, newest first, at most ``window`` (batches
    that added no rows are passed over)."""
    profiles: list[dict[str, Any]] = []
    seen: set[str] = set()
    while snapshot is not None and len(profiles) < window and snapshot.sha256 not in seen:
        seen.add(snapshot.sha256)
        if snapshot.profile.get("rows"):
            profiles.append(snapshot.profile)
        if not snapshot.parent:
            break
        try:
            snapshot = load_snapshot(storage, manifest_uri(snapshot.lake_uri, snapshot.parent))
        except (ArtifactNotFound, DataError, StorageError):
            break
    return profiles


# --- naming -------------------------------------------------------------------------------------


def snapshot_sha256(part_shas: list[str], sources: dict[str, str] | None = None) -> str:
    """The identity of a lake state: sha256 over its parts' sha256s, sorted, one per line, and the
    snapshot sha256 of each further source's lake (``name:sha256``), when the contract has any."""
    lines = sorted(part_shas) + [f"source {name}:{sha}" for name, sha in sorted((sources or {}).items())]
    return sha256_bytes("\n".join(lines).encode())


def source_lake_uri(lake_uri: str, name: str) -> str:
    """The lake of a contract's further source ``name``, beside the main lake's tables."""
    return join(lake_uri, SOURCES, name)


def source_snapshots(snapshot: LakeSnapshot) -> dict[str, LakeSnapshot]:
    """The further sources' snapshots that go with ``snapshot``."""
    return {name: LakeSnapshot.from_dict(data) for name, data in snapshot.sources.items()}


def part_name(raw_sha256: str) -> str:
    """A part is named after the raw file it came from: re-ingesting that file adds nothing."""
    return f"part-{raw_sha256[:16]}.parquet"


def part_uri(lake_uri: str, date: str, name: str) -> str:
    return join(lake_uri, TRANSACTIONS, f"date={date}", name)


def manifest_uri(lake_uri: str, sha256: str) -> str:
    return join(lake_uri, SNAPSHOTS, f"{sha256}.json")


def latest_snapshot_uri(lake_uri: str) -> str:
    """Where the newest published manifest of a lake is."""
    return join(lake_uri, SNAPSHOTS, LATEST)


def staging_uri(lake_uri: str, stage_id: str) -> str:
    """The staging area of one batch (named after its run id, made path-safe)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", stage_id).strip(".-") or "batch"
    return join(lake_uri, STAGING, safe)


# --- reading ------------------------------------------------------------------------------------


def load_snapshot(storage: Storage, uri: str) -> LakeSnapshot:
    """The snapshot a manifest describes (``<lake>/_snapshots/latest.json`` for the newest)."""
    return LakeSnapshot.from_dict(storage.read_json(uri))


def latest_snapshot(storage: Storage, lake_uri: str) -> LakeSnapshot | None:
    """The newest published snapshot, or None for a lake nothing was published into."""
    uri = latest_snapshot_uri(lake_uri)
    try:
        return load_snapshot(storage, uri)
    except ArtifactNotFound:
        return None
    except (StorageError, DataError) as exc:
        # Guessing the lake's contents from its files could publish parts nobody validated.
        raise DataError(
            f"{uri} is unreadable ({exc}); copy the newest good manifest from {join(lake_uri, SNAPSHOTS)}/ "
            "over it, or ingest into a fresh lake"
        ) from None


def read_part(
    storage: Storage, part: dict[str, Any], schema: pa.Schema, columns: list[str] | None = None, *, of: str = ""
) -> pa.Table:
    """One part's rows (``columns`` of ``schema``, the contract's, or all), after checking its sha256.

    A staged part is read where it is staged or, once a publish has moved it, at its lake URI.
    ``of`` names the snapshot in error messages.
    """
    uri = part.get("staged_uri") or part["uri"]
    try:
        data = storage.read_bytes(uri)
    except ArtifactNotFound:
        if uri == part["uri"]:
            raise DataError(
                f"lake part {uri} is missing{f' (listed by {of})' if of else ''}: restore it, or ingest into a fresh lake"
            ) from None
        uri, data = part["uri"], _read_or_explain(storage, part["uri"], part["staged_uri"])
    if sha256_bytes(data) != part["sha256"]:
        raise DataError(f"{uri} changed since snapshot {of or '?'} was taken (sha256 mismatch); re-run ingest")
    names = columns or schema.names
    try:
        table = pq.read_table(io.BytesIO(data), columns=columns)
        return table.select(names).cast(pa.schema([schema.field(n) for n in names]))
    except _UNREADABLE as exc:
        raise DataError(
            f"lake part {uri} is not parquet of the use case's contract ({first_line(exc)}): a part written "
            "under another contract, or by hand? Ingest into a fresh lake, or remove the part and re-run"
        ) from None


def _read_or_explain(storage: Storage, uri: str, staged: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except ArtifactNotFound:
        raise DataError(
            f"staged part {staged} is gone and was never published to {uri} (its batch was discarded?); re-run ingest"
        ) from None


def read_snapshot(storage: Storage, snapshot: LakeSnapshot, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """All rows of a snapshot as one table (parts in URI order), checking each part's sha256."""
    tables = [read_part(storage, part, schema, columns, of=snapshot.uri) for part in snapshot.parts]
    if not tables:
        return (schema if columns is None else pa.schema([schema.field(c) for c in columns])).empty_table()
    return pa.concat_tables(tables)


def read_new_rows(
    storage: Storage, snapshot: LakeSnapshot, schema: pa.Schema, columns: list[str], dictionary: list[str] | None = None
) -> pa.Table:
    """The rows a staged batch adds (its new parts only), ``columns`` of them, sha256-checked; the
    ``dictionary`` columns come dictionary-encoded (categoricals in pandas: compact)."""
    new = set(snapshot.new_parts)
    schema = pa.schema([
        pa.field(c, pa.dictionary(pa.int32(), pa.string()) if c in (dictionary or []) else schema.field(c).type)
        for c in columns
    ])

    def read(part: dict[str, Any]) -> pa.Table:
        uri = part.get("staged_uri") or part["uri"]
        try:
            data = storage.read_bytes(uri)
        except ArtifactNotFound:
            uri, data = part["uri"], _read_or_explain(storage, part["uri"], uri)
        if sha256_bytes(data) != part["sha256"]:
            raise DataError(f"{uri} changed since snapshot {snapshot.uri} was taken (sha256 mismatch); re-run ingest")
        return pq.read_table(io.BytesIO(data), columns=columns, read_dictionary=dictionary).cast(schema)

    # Parts are read side by side: reading, hashing and decoding release the GIL (order is kept).
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        tables = list(pool.map(read, [part for part in snapshot.parts if part["uri"] in new]))
    if not tables:
        return pa.schema([pa.field(c, schema.field(c).type) for c in columns]).empty_table()
    return pa.concat_tables(tables)


def require_published(snapshot: LakeSnapshot) -> None:
    """Refuse a staged snapshot where only published data may be used (features, training)."""
    if snapshot.staged:
        raise DataError(
            f"snapshot {snapshot.uri} is staged, not published: only a validated snapshot may be used "
            "(pass the validate step's output, not ingest's)"
        )


# --- staging and publishing ----------------------------------------------------------------------


def stage(
    storage: Storage,
    lake_uri: str,
    run_id: str,
    parent: LakeSnapshot | None,
    new_parts: list[NewPart],
    contract: Contract,
    source_files: list[dict[str, Any]] | None = None,
    quarantined: list[tuple[str, str, int]] | None = None,
    sources: dict[str, LakeSnapshot] | None = None,
) -> LakeSnapshot:
    """Write a batch's new parts (each with its id index) and a staged manifest (``parent``'s parts
    plus the new ones) below ``<lake>/_staging/<run_id>/``; nothing readers see changes. A staging
    area left by an earlier attempt of the same run is replaced. ``quarantined`` lists the batch's
    set-aside rows as (local parquet file, name, rows): staged too, published with the batch.
    ``sources`` are the further sources' snapshots (staged or published) that go with the batch."""
    sources = sources or {}
    area = staging_uri(lake_uri, run_id)
    storage.delete_tree(area)
    # First: which lake state this area builds on, so a later publish can tell a dead area (one
    # staged on an older state, e.g. left by a run killed mid-write) from one still in use.
    storage.write_json(join(area, STAGING_MARKER), {"parent": parent.sha256 if parent else "", "run_id": run_id})
    parts = {p["uri"]: dict(p) for p in (parent.parts if parent else [])}
    added = []
    batch_hashes: list[np.ndarray] = []
    taken = set(parts)
    for new in new_parts:
        final = part_uri(lake_uri, new.date, new.name)
        if final in taken:  # names come from raw file hashes: a published file is never staged again
            raise DataError(f"{final} is already in snapshot {parent.uri if parent else '?'}; it cannot be staged again")
        taken.add(final)

    def upload(new: NewPart) -> ObjectRef:
        staged_part = join(area, TRANSACTIONS, f"date={new.date}", new.name)
        if new.table is not None:
            buffer = io.BytesIO()
            pq.write_table(new.table, buffer, **part_write_options(contract))
            return storage.write_bytes(staged_part, buffer.getvalue())
        return storage.upload_file(new.path, staged_part)

    # Parts are written side by side: copying, hashing and S3 round trips release the GIL.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        refs = list(pool.map(upload, new_parts))
    for new, ref in zip(new_parts, refs):
        final, staged_part = part_uri(lake_uri, new.date, new.name), join(area, TRANSACTIONS, f"date={new.date}", new.name)
        parts[final] = {
            "uri": final, "sha256": ref.sha256, "rows": new.num_rows, "date": new.date, "staged_uri": staged_part,
            "lineage": {"step": "ingest", "run_id": run_id, "inputs": new.inputs, "params": new.params},
        }
        added.append(final)
        if contract.id is None:
            continue  # no id column: no index (a re-delivered file is still known by its sha256)
        hashes = new.id_hashes
        if hashes is None:
            ids = new.table if new.table is not None else pq.read_table(new.path, columns=[contract.id])
            hashes = id_hashes(ids.column(contract.id))
        start = sum(len(h) for h in batch_hashes)
        batch_hashes.append(np.sort(hashes, kind="stable"))  # ingest's come sorted (timsort: one pass)
        parts[final]["ids_slice"] = [start, start + len(hashes)]
    if batch_hashes:
        # One index file per batch (each part's sorted hashes, one after the other), named by its content.
        data = np.concatenate(batch_hashes).astype("<u8").tobytes()
        staged_ids = join(area, INDEX, "ids.u64")
        storage.write_bytes(staged_ids, data)
        final_ids = index_uri(lake_uri, sha256_bytes(data))
        for uri in added:
            parts[uri].update(ids=final_ids, staged_ids=staged_ids)
    quarantine: dict[str, Any] = {}
    if quarantined:
        files = []
        for path, name, rows in quarantined:
            ref = storage.upload_file(path, join(area, QUARANTINE, name))
            files.append({"name": name, "rows": rows, "sha256": ref.sha256, "staged_uri": ref.uri})
        quarantine = {"uri": quarantine_uri(lake_uri, run_id), "rows": sum(f["rows"] for f in files), "files": files}
    ordered = sorted(parts.values(), key=lambda p: p["uri"])
    snapshot = LakeSnapshot(
        uri=join(area, STAGED_MANIFEST),
        sha256=snapshot_sha256([p["sha256"] for p in ordered], {name: s.sha256 for name, s in sources.items()}),
        rows=sum(p["rows"] for p in ordered),
        parts=ordered,
        new_parts=sorted(added),
        source_files=source_files or [],
        lake_uri=lake_uri,
        parent=parent.sha256 if parent else "",
        staging_uri=area,
        quarantine=quarantine,
        sources={name: s.to_dict() for name, s in sorted(sources.items())},
    )
    storage.write_json(snapshot.uri, snapshot.to_dict())  # last: an area without it is an unfinished stage
    return snapshot


def publish_staged(
    storage: Storage,
    staged: LakeSnapshot,
    run_id: str,
    validated_by: dict[str, Any] | None = None,
    profile: dict[str, Any] | None = None,
) -> LakeSnapshot:
    """Make a staged snapshot the lake's latest: new parts into ``transactions/`` (sha256-checked),
    their lineage, the immutable manifest, then ``latest.json``, then the staging area is removed.

    Idempotent: after an interruption at any point, running it again completes the publish. Refused
    with a DataError when another snapshot was published since the batch was staged (its
    de-duplication was against an older lake). A snapshot that is not staged is returned as is.
    """
    if not staged.staged:
        return staged
    current = latest_snapshot(storage, staged.lake_uri)
    current_sha = current.sha256 if current else ""
    if current_sha not in (staged.parent, staged.sha256):
        raise DataError(
            f"snapshot {current_sha[:12]} was published into {staged.lake_uri} after this batch was staged on "
            f"{staged.parent[:12] or 'an empty lake'}; re-run ingest to stage it on the current lake"
        )
    # The further sources first (each idempotent): a main lake never names a source state that is not published.
    sources = {name: publish_staged(storage, source, run_id, source.validated_by, source.profile).to_dict()
               for name, source in source_snapshots(staged).items()}
    if current is not None and current_sha == staged.sha256 and not staged.new_parts and not staged.quarantine:
        # Nothing new (every file already ingested, or only re-delivered rows): the lake stays byte for byte.
        storage.delete_tree(staged.staging_uri)
        remove_dead_stages(storage, staged.lake_uri, current.sha256)
        return dataclasses.replace(current, source_files=staged.source_files, new_parts=[])
    parts = [_publish_part(storage, part) for part in staged.parts]
    quarantine = _publish_quarantine(storage, staged.quarantine)
    published = LakeSnapshot(
        uri=manifest_uri(staged.lake_uri, staged.sha256),
        sha256=staged.sha256,
        rows=staged.rows,
        parts=parts,
        new_parts=staged.new_parts,
        source_files=staged.source_files,
        lake_uri=staged.lake_uri,
        parent=staged.parent,
        validated_by=dict(validated_by or {}),
        profile=dict(profile or staged.profile or {}),
        quarantine=quarantine,
        sources=sources,
    )
    _write_manifest(storage, published, run_id)
    _move_latest(storage, published)
    storage.delete_tree(staged.staging_uri)
    remove_dead_stages(storage, published.lake_uri, published.sha256)
    log.info("lake: published snapshot %s (%d parts, %d new, %d rows) into %s",
             published.sha256[:12], len(parts), len(published.new_parts), published.rows, published.lake_uri)
    return published


def remove_dead_stages(storage: Storage, lake_uri: str, latest_sha256: str) -> list[str]:
    """Remove the staging areas that can never be published: those staged on another lake state
    than ``latest_sha256`` (publish refuses a batch staged on an older state) and those without a
    marker. Such areas are what an interrupted run leaves (a step killed mid-write, a server that
    died); removing them at the next publish leaves the lake as an uninterrupted run would have.
    Returns the areas removed."""
    root = join(lake_uri, STAGING)
    areas: dict[str, list[str]] = {}
    for uri in storage.list(root):
        area, _, rest = uri[len(root) + 1:].partition("/")
        areas.setdefault(area, []).append(rest)
    removed = []
    for area, names in sorted(areas.items()):
        described = next((n for n in (STAGING_MARKER, STAGED_MANIFEST) if n in names), None)
        try:
            parent = storage.read_json(join(root, area, described)).get("parent") if described else None
        except (ArtifactNotFound, StorageError, AttributeError):
            parent = None
        if parent == latest_sha256:
            continue  # staged on the current lake: a run may still validate and publish it
        storage.delete_tree(join(root, area))
        removed.append(join(root, area))
    if removed:
        log.info("lake: removed %d staging area(s) left by interrupted runs: %s", len(removed), ", ".join(removed))
    return removed


def discard_staged(storage: Storage, staged: LakeSnapshot) -> None:
    """Remove a staged batch; the published lake is untouched (a published snapshot: nothing to do)."""
    for source in source_snapshots(staged).values():
        discard_staged(storage, source)
    if staged.staged:
        storage.delete_tree(staged.staging_uri)
        log.info("lake: discarded staged batch %s", staged.staging_uri)


def _publish_part(storage: Storage, part: dict[str, Any]) -> dict[str, Any]:
    """Copy a staged part to its lake URI (unless an identical copy is there) and record its lineage;
    returns the part as a published manifest lists it. A published part passes through."""
    if "staged_uri" not in part:
        return part
    if part.get("staged_ids") and not storage.exists(part["ids"]):  # the id index first: a published part has one
        # (An index is a pure function of the part's ids, named by the part's sha256: one that exists is right.)
        storage.write_bytes(part["ids"], _read_or_explain(storage, part["staged_ids"], part["ids"]))
    final = part["uri"]
    ref = storage.stat(final) if storage.exists(final) else None
    if ref is None or ref.sha256 != part["sha256"]:
        # A file at `final` with other bytes is a leftover no manifest names (the parent, which is
        # the latest, does not list it): replace it.
        data = _read_or_explain(storage, part["staged_uri"], part["staged_uri"])
        if sha256_bytes(data) != part["sha256"]:
            raise DataError(f"staged part {part['staged_uri']} changed since it was staged (sha256 mismatch); re-run ingest")
        ref = storage.write_bytes(final, data)
    plan = part.get("lineage") or {}
    lineage.record(
        storage, ref, step=plan.get("step", "ingest"), run_id=plan.get("run_id", ""),
        inputs=plan.get("inputs", []), params=plan.get("params", {}),
    )
    return {k: v for k, v in part.items() if k not in ("staged_uri", "staged_ids", "lineage")}


def _publish_quarantine(storage: Storage, quarantine: dict[str, Any]) -> dict[str, Any]:
    """Copy a batch's set-aside rows from staging to ``<lake>/quarantine/<batch>/``."""
    if not quarantine:
        return {}
    files = []
    for entry in quarantine["files"]:
        final = join(quarantine["uri"], entry["name"])
        if "staged_uri" in entry:
            if not (storage.exists(final) and storage.stat(final).sha256 == entry["sha256"]):
                storage.write_bytes(final, _read_or_explain(storage, entry["staged_uri"], final))
        files.append({"uri": final, "rows": entry["rows"], "sha256": entry["sha256"]})
    return {"uri": quarantine["uri"], "rows": quarantine["rows"], "files": files}


def _write_manifest(storage: Storage, snapshot: LakeSnapshot, run_id: str) -> None:
    # A manifest is named by its content hash, so an existing one already describes this lake state:
    # keep it (it records which run first produced that state).
    if not storage.exists(snapshot.uri):
        ref = storage.write_json(snapshot.uri, snapshot.to_dict())
    elif lineage.lookup(storage, snapshot.uri) is None:
        ref = storage.stat(snapshot.uri)
    else:
        return
    lineage.record(
        storage, ref, step="publish", run_id=run_id,
        inputs=[{"uri": p["uri"], "sha256": p["sha256"]} for p in snapshot.parts],
        params={"rows": snapshot.rows, "parts": len(snapshot.parts), "parent": snapshot.parent,
                "validation_report": snapshot.validated_by.get("report_uri")},
    )


def _move_latest(storage: Storage, snapshot: LakeSnapshot) -> None:
    """The publication point: readers see the new snapshot from this write on."""
    storage.write_json(latest_snapshot_uri(snapshot.lake_uri), snapshot.to_dict())


def publish_snapshot(storage: Storage, lake_uri: str, run_id: str) -> LakeSnapshot:
    """Adopt every part now under ``<lake>/transactions`` into a published snapshot (and move latest).

    A repair tool for a lake whose parts were written by other means (a test that needs a lake
    ingest would refuse, a hand-restored lake): the parts are taken as they are, unvalidated, and
    nothing is checked against the schema or for unique transaction ids. Ingest never does this.
    """
    current = latest_snapshot(storage, lake_uri)
    known = {p["uri"]: p for p in (current.parts if current else [])}
    parts = [
        dict(known.get(uri) or _describe_part(storage, uri))
        for uri in storage.iter_objects(join(lake_uri, TRANSACTIONS), (".parquet",))
    ]
    sha = snapshot_sha256([p["sha256"] for p in parts])
    snapshot = LakeSnapshot(
        uri=manifest_uri(lake_uri, sha), sha256=sha, rows=sum(p["rows"] for p in parts),
        parts=sorted(parts, key=lambda p: p["uri"]), lake_uri=lake_uri,
        parent=current.sha256 if current else "",
    )
    _write_manifest(storage, snapshot, run_id)
    _move_latest(storage, snapshot)
    return snapshot


def _describe_part(storage: Storage, uri: str) -> dict[str, Any]:
    data = storage.read_bytes(uri)
    try:
        rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
    except _UNREADABLE as exc:
        raise DataError(f"lake part {uri} is not readable parquet ({first_line(exc)}); remove it and re-run") from None
    date = next((seg[5:] for seg in uri.split("/") if seg.startswith("date=")), "")
    return {"uri": uri, "sha256": sha256_bytes(data), "rows": rows, "date": date}
