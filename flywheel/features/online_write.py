"""Streaming materialization: the latest offline row of every entity into Feast's online store, in
bounded memory, several times faster than Feast's own ``materialize``.

Feast's local engine reads the whole window into pandas, sorts it, builds a protobuf per value in
Python and writes one SQL statement per (entity, feature) (SQLite) or one HSET per entity after a
timestamp check (Redis). Here DuckDB keeps the latest row per entity within the window (event time,
then created time, as Feast's dedup orders them), the result is streamed in chunks of
``features.materialize_chunk_rows`` entities, the values are encoded column by column with numpy, and
the rows go to the store in bulk (``executemany``; one pipelined round trip per chunk) in Feast's
exact layout, which tests/unit/test_online_layout.py and tests/integration/test_materialize.py check
against Feast's own functions and Feast's own materialize. Reads through Feast
(``get_online_features``) and through :class:`flywheel.features.store.OnlineReader` are unchanged.

The interval is recorded in the Feast registry as Feast records it (``apply_materialization``), so
the next run starts where this one ended (``materialize-incremental`` semantics), and Feast's own
``feast materialize-incremental`` continues from it too.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import sqlite3
import time
from itertools import chain, repeat
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from flywheel.errors import FeatureStoreError
from flywheel.features.store import VALUE_TYPE_STRING, entity_key_bytes, feature_hash_key, redis_client

log = logging.getLogger(__name__)

# Feast type name -> (protobuf tag byte of its Value field, how the value is encoded).
_DOUBLE_TAG, _INT64_TAG, _INT32_TAG, _FLOAT_TAG, _BOOL_TAG = 0x29, 0x20, 0x18, 0x35, 0x38
_TIMESTAMP_SECONDS_TAG, _TIMESTAMP_NANOS_TAG = 0x08, 0x10
SUPPORTED_TYPES = ("Int64", "Int32", "Float64", "Float32", "Bool")

Progress = Callable[[str, int, int], None]  # (view, entities written so far, entities in the window)


@dataclasses.dataclass(frozen=True)
class ViewMaterialized:
    """What one feature view's materialization did."""

    view: str
    start: dt.datetime
    end: dt.datetime
    source_rows: int  # offline rows inside the window
    entities: int  # latest rows written (one per entity)
    skipped: int  # entities whose stored row was as new or newer (Redis, as Feast skips them)
    seconds: float


# ---------------------------------------------------------------- values in Feast's protobuf layout
def _varint_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each uint64 as protobuf varint bytes: a (n, 10) byte matrix with continuation bits set, and
    each value's length in bytes (1 to 10)."""
    groups = np.empty((len(values), 10), dtype=np.uint8)
    lengths = np.ones(len(values), dtype=np.int64)
    for index in range(10):
        groups[:, index] = (values >> np.uint64(7 * index)) & np.uint64(0x7F)
        if index:
            lengths += values >= np.uint64(1 << (7 * index))
    more = np.arange(10) < (lengths - 1)[:, None]  # every byte but the last has its high bit set
    groups |= more.astype(np.uint8) << 7
    return groups, lengths


def _tagged_varints(tag: int, values: np.ndarray, omit_zero: bool = False) -> np.ndarray:
    """``tag`` + varint of each value (int64 as two's complement, as protobuf writes it), as an
    object array of bytes; with ``omit_zero``, a zero is no bytes at all (a proto3 default)."""
    unsigned = values.astype(np.int64).view(np.uint64)
    groups, lengths = _varint_rows(unsigned)
    out = np.empty(len(values), dtype=object)
    for length in np.unique(lengths):
        rows = np.flatnonzero(lengths == length)
        packed = np.empty((len(rows), length + 1), dtype=np.uint8)
        packed[:, 0] = tag
        packed[:, 1:] = groups[rows, :length]
        out[rows] = packed.view(f"V{length + 1}").ravel().astype(object)
    if omit_zero:
        out[unsigned == 0] = b""
    return out


def _fixed(tag: int, values: np.ndarray, kind: str) -> np.ndarray:
    """``tag`` + a little-endian fixed-width value (double, float), as an object array of bytes."""
    packed = np.empty(len(values), dtype=[("tag", "u1"), ("value", kind)])
    packed["tag"], packed["value"] = tag, values
    return packed.view(f"V{packed.dtype.itemsize}").astype(object)


def encode_values(column: pa.Array, feast_type: str) -> tuple[np.ndarray, list[str | None]]:
    """A column of feature values as Feast writes them: serialized ``feast.types.Value`` messages
    (a null or NaN is an empty message) and the SQLite ``value_text`` (``str`` of the value, None
    for a null), each built for the whole column at once."""
    if feast_type not in SUPPORTED_TYPES:
        raise FeatureStoreError(f"flywheel's materialization writes {', '.join(SUPPORTED_TYPES)} features, not {feast_type}: "
                                "use --engine feast (features.materialize_engine: feast) for this feature view")
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    if feast_type in ("Float64", "Float32"):
        numbers = column.to_numpy(zero_copy_only=False).astype(np.float64 if feast_type == "Float64" else np.float32)
        valid = valid & ~np.isnan(numbers)  # Feast writes NaN as a missing value (pd.isnull)
        encoded = _fixed(_DOUBLE_TAG, numbers, "<f8") if feast_type == "Float64" else _fixed(_FLOAT_TAG, numbers, "<f4")
        python = numbers.astype(np.float64).tolist()
    else:
        filled = column.fill_null(False if feast_type == "Bool" else 0).to_numpy(zero_copy_only=False)
        tag = {"Int64": _INT64_TAG, "Int32": _INT32_TAG, "Bool": _BOOL_TAG}[feast_type]
        encoded = _tagged_varints(tag, filled.astype(np.int64))
        python = filled.astype(bool).tolist() if feast_type == "Bool" else filled.astype(np.int64).tolist()
    encoded[~valid] = b""
    texts = [str(value) if ok else None for value, ok in zip(python, valid.tolist())]
    return encoded, texts


def timestamp_bytes(micros: np.ndarray) -> np.ndarray:
    """Serialized ``google.protobuf.Timestamp`` messages (what Feast's Redis store keeps under
    ``_ts:<view>``) of UTC instants given in microseconds since the epoch."""
    seconds, remainder = np.divmod(micros.astype(np.int64), 1_000_000)
    return _tagged_varints(_TIMESTAMP_SECONDS_TAG, seconds, omit_zero=True) + _tagged_varints(
        _TIMESTAMP_NANOS_TAG, remainder * 1000, omit_zero=True
    )


def _epoch_seconds(micros: np.ndarray) -> list[int]:
    """The SQLite store's ``event_ts``/``created_ts``: whole seconds, truncated as ``int(datetime.timestamp())``."""
    micros = micros.astype(np.int64)
    return np.where(micros >= 0, micros // 1_000_000, -((-micros) // 1_000_000)).tolist()


# ---------------------------------------------------------------- the window's latest rows, streamed
@dataclasses.dataclass(frozen=True)
class _View:
    name: str
    join_key: str
    features: list[tuple[str, str]]  # (name, Feast type name)
    path: str
    timestamp: str
    created: str | None
    feature_view: Any


def _view_of(feature_view: Any) -> _View:
    source = feature_view.batch_source
    path = getattr(source, "path", None)
    if path is None or type(source).__name__ != "FileSource":
        raise FeatureStoreError(f"feature view {feature_view.name} reads {type(source).__name__}: flywheel's materialization "
                                "reads FileSource parquet tables; use --engine feast")
    keys = list(feature_view.entity_columns)
    if len(keys) != 1 or keys[0].dtype.to_value_type().value != VALUE_TYPE_STRING:
        raise FeatureStoreError(f"feature view {feature_view.name} must have one string join key for flywheel's "
                                f"materialization (it has {[key.name for key in keys]}); use --engine feast")
    features = [(field.name, str(field.dtype)) for field in feature_view.features]
    for name, kind in features:
        if kind not in SUPPORTED_TYPES:
            raise FeatureStoreError(f"feature {feature_view.name}:{name} is {kind}: flywheel's materialization writes "
                                    f"{', '.join(SUPPORTED_TYPES)}; use --engine feast")
    return _View(feature_view.name, keys[0].name, features, str(path), source.timestamp_field,
                 source.created_timestamp_column or None, feature_view)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def latest_rows(view: _View, start: dt.datetime, end: dt.datetime, chunk_rows: int,
                memory_mib: int) -> tuple[int, int, Iterator[pa.RecordBatch]]:
    """(offline rows in [start, end], entities among them, their latest rows in record batches of at
    most ``chunk_rows``). The latest row of an entity is the one with the latest event time, then
    the latest created time (Feast's dedup order); both ends of the window are included, as Feast
    filters them. DuckDB reads the parquet table in its own row groups within ``memory_mib``
    (spilling to a temporary folder beyond it), so the source's size never has to fit in memory."""
    import shutil
    import tempfile

    import duckdb

    if not Path(view.path).is_file():
        raise FeatureStoreError(f"the offline table of {view.name} is missing: {view.path}")
    spill = tempfile.mkdtemp(prefix="flywheel-materialize-")  # not DuckDB's default: .tmp in the working folder
    connection = duckdb.connect(config={"memory_limit": f"{memory_mib}MB", "preserve_insertion_order": "false",
                                        "temp_directory": spill})
    ts, created, key = _quote(view.timestamp), _quote(view.created) if view.created else None, _quote(view.join_key)
    order = f"{ts} DESC" + (f", {created} DESC" if created else "")
    columns = ", ".join([key, ts] + ([created] if created else []) + [_quote(name) for name, _ in view.features])
    window = f"{ts} >= $start AND {ts} <= $end"
    # Parameters as UTC timestamps: the table's column is timestamptz (or naive UTC), compared as instants.
    params = {"start": start.astimezone(dt.timezone.utc), "end": end.astimezone(dt.timezone.utc)}
    try:
        connection.execute(
            f"CREATE TEMP TABLE latest AS SELECT {columns} FROM read_parquet($path) WHERE {window} "
            f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY {order}) = 1",
            {**params, "path": view.path},
        )
        source_rows = connection.execute(f"SELECT count(*) FROM read_parquet($path) WHERE {window}",
                                         {**params, "path": view.path}).fetchall()[0][0]
        entities = connection.execute("SELECT count(*) FROM latest").fetchall()[0][0]
        # In the order of the stores' keys (the serialized key's length byte, then the id): SQLite
        # appends to its indexes instead of touching pages all over them.
        reader = connection.sql(f"SELECT * FROM latest ORDER BY strlen({key}), {key}").to_arrow_reader(chunk_rows)
    except duckdb.Error as exc:
        connection.close()
        shutil.rmtree(spill, ignore_errors=True)
        raise FeatureStoreError(f"reading the latest rows of {view.name} from {view.path} failed: {type(exc).__name__}: {exc}") from exc

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            yield from reader
        finally:
            connection.close()
            shutil.rmtree(spill, ignore_errors=True)

    return int(source_rows), int(entities), batches()


def _micros(column: pa.Array) -> np.ndarray:
    return column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy(zero_copy_only=False)


# ---------------------------------------------------------------- the writers, in Feast's layout
class _SqliteWriter:
    """Feast's SQLite online store table ``<project>_<view>``: one row per (entity, feature), upserted."""

    def __init__(self, config: Any, view: _View) -> None:
        online = config.online_store
        if getattr(online, "vector_enabled", False) or getattr(online, "enable_openai_compatible_store", False):
            raise FeatureStoreError("the SQLite online store has vector or value_num columns on: use --engine feast")
        path = Path(online.path)
        if not path.is_absolute():
            path = Path(config.repo_path or ".") / path
        if not path.is_file():
            raise FeatureStoreError(f"the SQLite online store {path} does not exist: apply the feature views first")
        self.connection = sqlite3.connect(path)
        self.table = _quote(f"{config.project}_{view.name}")
        self.view = view
        self.statement = (
            f"INSERT INTO {self.table} (entity_key, feature_name, value, value_text, event_ts, created_ts) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
            "value = excluded.value, value_text = excluded.value_text, event_ts = excluded.event_ts, "
            "created_ts = excluded.created_ts"
        )
        exists = self.connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                         (f"{config.project}_{view.name}",)).fetchone()
        if not exists:
            self.connection.close()
            raise FeatureStoreError(f"the SQLite online store {path} has no table for {view.name}: apply the feature views first")

    def write(self, batch: pa.RecordBatch, keys: list[bytes]) -> int:
        event = _epoch_seconds(_micros(batch.column(self.view.timestamp)))
        created = _epoch_seconds(_micros(batch.column(self.view.created))) if self.view.created else [None] * len(keys)
        rows = []
        for name, kind in self.view.features:
            values, texts = encode_values(batch.column(name), kind)
            rows.append(zip(keys, repeat(name), values.tolist(), texts, event, created))
        with self.connection:  # one transaction per chunk
            self.connection.executemany(self.statement, chain.from_iterable(rows))
        return 0

    def close(self) -> None:
        self.connection.close()


class _RedisWriter:
    """Feast's Redis layout: one hash per entity (key: entity key bytes + project), a field per feature
    (murmur3 of ``view:name``) and ``_ts:<view>`` holding the event time. As Feast does, an entity
    whose stored event time is as new or newer is not overwritten."""

    def __init__(self, config: Any, view: _View) -> None:
        online = config.online_store
        self.client = redis_client(online.connection_string)
        self.suffix = config.project.encode()
        self.ts_field = f"_ts:{view.name}".encode()
        self.fields = [feature_hash_key(view.name, name) for name, _ in view.features]
        self.ttl = getattr(online, "key_ttl_seconds", None)
        self.view = view
        self.replace_ties = False  # live updates rewrite an entity's row at the same instant (a late event at a tie)

    def write(self, batch: pa.RecordBatch, keys: list[bytes]) -> int:
        from google.protobuf.timestamp_pb2 import Timestamp

        redis_keys = [key + self.suffix for key in keys]
        micros = _micros(batch.column(self.view.timestamp))
        pipe = self.client.pipeline(transaction=False)
        for key in redis_keys:
            pipe.hget(key, self.ts_field)
        previous = pipe.execute()
        keep = np.ones(len(keys), dtype=bool)
        for index, raw in enumerate(previous):
            if raw:  # Feast skips a row whose event time is not after the stored one (nanosecond precision)
                stored = Timestamp.FromString(raw)
                new, old = micros[index] * 1000, stored.seconds * 1_000_000_000 + stored.nanos
                keep[index] = new > old or (self.replace_ties and new == old)
        stamps = timestamp_bytes(micros).tolist()
        columns = [encode_values(batch.column(name), kind)[0].tolist() for name, kind in self.view.features]
        pipe = self.client.pipeline(transaction=False)
        fields = self.fields
        for index in np.flatnonzero(keep).tolist():
            mapping = [self.ts_field, stamps[index]]
            for field, column in zip(fields, columns):
                mapping += (field, column[index])
            pipe.execute_command("HSET", redis_keys[index], *mapping)
            if self.ttl:
                pipe.expire(redis_keys[index], self.ttl)
        pipe.execute()
        return int(len(keys) - keep.sum())

    def close(self) -> None:
        self.client.close()


def _entity_keys(column: pa.Array, join_key: str) -> list[bytes]:
    """Feast's serialized entity keys (version 3) of a column of string ids."""
    prefix = entity_key_bytes(join_key, "")[:-4]  # everything before the value's length
    return [prefix + len(value).to_bytes(4, "little") + value for value in (entity.encode() for entity in column.to_pylist())]


# ---------------------------------------------------------------- the entry point
def materialize_views(store: Any, end: dt.datetime, start: dt.datetime | None = None, *, chunk_rows: int,
                      memory_mib: int, progress: Progress | None = None, views: list[str] | None = None) -> list[ViewMaterialized]:
    """Load each feature view's latest row per entity in [start, end] into the store's online store
    and record the interval in its registry.

    Without ``start``, each view continues from the end of its last materialization (Feast's
    ``materialize_incremental``), or from the start of its offline table when it was never
    materialized. ``chunk_rows`` entities are encoded and written at a time; DuckDB works within
    ``memory_mib``."""
    if chunk_rows < 1:
        raise FeatureStoreError(f"materialize chunk_rows must be at least 1, not {chunk_rows}")
    end = _aware(end, "end")
    config = store.config
    if config.online_store.type not in ("sqlite", "redis"):
        raise FeatureStoreError(f"flywheel's materialization writes SQLite and Redis online stores, not "
                                f"{config.online_store.type}: use --engine feast")
    try:
        feature_views = store.list_feature_views()
    except Exception as exc:
        raise FeatureStoreError(f"cannot read the Feast registry: {type(exc).__name__}: {exc}") from exc
    known = {view.name: view for view in feature_views}
    unknown = sorted(set(views or []) - set(known))
    if unknown:
        raise FeatureStoreError(f"no feature view named {', '.join(unknown)} in the registry (it has {sorted(known)})")
    done = []
    for name in views or sorted(known):
        view = _view_of(known[name])
        view_start = _aware(start, "start") if start is not None else _resume_point(store, view)
        if view_start > end:
            raise FeatureStoreError(f"materialize {view.name}: start {view_start} is after end {end}")
        done.append(_materialize_view(store, view, view_start, end, chunk_rows, memory_mib, progress))
    return done


def _aware(moment: dt.datetime, what: str) -> dt.datetime:
    if not isinstance(moment, dt.datetime):
        raise FeatureStoreError(f"materialize {what} must be a datetime, not {moment!r}")
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.timezone.utc)


def online_store_holds(config: Any, view_name: str, join_key: str) -> bool:
    """Whether the online store holds any row of a view of this project. The registry's record of
    what was materialized lives beside it, not in it: a world's registry can say "done" for a store
    that never got the rows (the same world written to SQLite, then to Redis) or lost them (a Redis
    restarted without persistence). Then an incremental run must start from the beginning."""
    try:
        if config.online_store.type == "sqlite":
            path = Path(config.online_store.path)
            if not path.is_absolute():
                path = Path(config.repo_path or ".") / path
            if not path.is_file():
                return False
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
                table = f"{config.project}_{view_name}"
                if not connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchall():
                    return False
                return bool(connection.execute(f"SELECT 1 FROM {_quote(table)} LIMIT 1").fetchall())
        client = redis_client(config.online_store.connection_string)
        try:
            # An entity's key holds its join key's name and ends with the project (see entity_key_bytes).
            pattern = b"*" + join_key.encode() + b"*" + config.project.encode()
            return any(client.hexists(key, f"_ts:{view_name}") for key in client.scan_iter(match=pattern, count=1000))
        finally:
            client.close()
    except Exception as exc:  # the store is down or unreadable: name it rather than guess
        raise FeatureStoreError(f"cannot read the {config.online_store.type} online store: {type(exc).__name__}: {exc}") from exc


def _recorded_end(store: Any, feature_view: Any) -> dt.datetime | None:
    """The end of the view's last materialization, if the online store still holds its rows."""
    last = feature_view.most_recent_end_time
    if last is None or not online_store_holds(store.config, feature_view.name, _view_of(feature_view).join_key):
        return None
    return _aware(last, "start")


def _resume_point(store: Any, view: _View) -> dt.datetime:
    """Where an incremental run starts: the end of the last materialized interval (if the online
    store holds it), else the offline table's earliest row (every entity's latest row is loaded)."""
    last = _recorded_end(store, view.feature_view)
    if last is not None:
        return last
    import duckdb

    if not Path(view.path).is_file():
        raise FeatureStoreError(f"the offline table of {view.name} is missing: {view.path}")
    with duckdb.connect() as connection:  # min() of a parquet column comes from its statistics
        earliest = connection.execute(f"SELECT min({_quote(view.timestamp)}) FROM read_parquet($path)",
                                      {"path": view.path}).fetchall()[0][0]
    if earliest is None:
        raise FeatureStoreError(f"the offline table of {view.name} holds no rows: {view.path}")
    return _aware(earliest, "start")


def _materialize_view(store: Any, view: _View, start: dt.datetime, end: dt.datetime, chunk_rows: int,
                      memory_mib: int, progress: Progress | None) -> ViewMaterialized:
    started = time.perf_counter()
    config = store.config
    writer = _SqliteWriter(config, view) if config.online_store.type == "sqlite" else _RedisWriter(config, view)
    try:
        source_rows, entities, batches = latest_rows(view, start, end, chunk_rows, memory_mib)
    except BaseException:
        writer.close()
        raise
    written = skipped = 0
    try:
        if progress:
            progress(view.name, 0, entities)
        for batch in batches:
            skipped += writer.write(batch, _entity_keys(batch.column(view.join_key), view.join_key))
            written += batch.num_rows
            if progress:
                progress(view.name, written, entities)
    except FeatureStoreError:
        raise
    except Exception as exc:  # the store is down, full or locked
        raise FeatureStoreError(f"writing {view.name} to the {config.online_store.type} online store failed: "
                                f"{type(exc).__name__}: {exc}") from exc
    finally:
        batches.close()  # DuckDB's connection and spill folder go with the stream
        writer.close()
    store.registry.apply_materialization(view.feature_view, config.project, start, end)
    seconds = time.perf_counter() - started
    log.info("materialized %s: %d offline rows in %s..%s, %d entities written (%d not newer than the store's) in %.1f s",
             view.name, source_rows, start, end, written - skipped, skipped, seconds)
    return ViewMaterialized(view.name, start, end, source_rows, written - skipped, skipped, seconds)


def materialize_world(store: Any, settings: Any, start: dt.datetime, end: dt.datetime, engine: str | None = None,
                      progress: Progress | None = None) -> list[ViewMaterialized] | None:
    """Materialize a feature world with the chosen engine (``features.materialize_engine`` unless
    given): ``flywheel`` continues each view from its last materialized end (from ``start`` the first
    time) up to ``end``; ``feast`` is Feast's own ``materialize`` of [start, end], the baseline (it
    reports nothing back). With ``features.offline_store: ray`` the step's engine is Feast's
    materialize, which runs on the Ray compute engine (the cluster path: its workers write)."""
    from flywheel.features import store as feast_store

    if engine is None:
        engine = "feast" if settings.features.offline_store == "ray" else settings.features.materialize_engine
    if engine == "feast":
        started = time.perf_counter()
        feast_store.materialize(store, start, end)
        log.info("materialized with Feast's own materialize from %s to %s in %.1f s", start, end, time.perf_counter() - started)
        return None
    if engine != "flywheel":
        raise FeatureStoreError(f"unknown materialize engine {engine!r}: expected flywheel or feast")
    start = _aware(start, "start")
    known = {view.name: view for view in store.list_feature_views()}
    done = []
    for name in sorted(known):
        resume = _recorded_end(store, known[name])
        done += materialize_views(store, end, resume if resume is not None else start,
                                  chunk_rows=settings.features.materialize_chunk_rows,
                                  memory_mib=settings.features.materialize_memory_mib, progress=progress, views=[name])
    return done


# ---------------------------------------------------------------- live writes (flywheel.features.live)
class OnlineWriter:
    """Writes entity rows computed by the engine (:func:`flywheel.features.engine.entity_table`'s
    columns) into one feature world's online store, in Feast's layout, without the Feast SDK: the
    writers above, one per view. For SQLite, the database is switched to write-ahead logging, so that
    the served read-only connections read while it writes instead of waiting for its lock."""

    def __init__(self, settings: Any, world: str, views: list[Any]) -> None:
        from types import SimpleNamespace

        from flywheel.features.engine import CREATED_TIMESTAMP, EVENT_TIMESTAMP
        from flywheel.features.store import _check_world_files, feast_project, world_dir

        _check_world_files(settings, world)
        features = settings.features
        online = SimpleNamespace(type=features.online_store, path=str(world_dir(settings, world) / "online.db"),
                                 connection_string=features.redis_connection, key_ttl_seconds=None)
        config = SimpleNamespace(project=feast_project(settings, world), repo_path=None, online_store=online)
        self.writers: dict[str, Any] = {}
        for view in views:
            unsupported = [f"{name} ({kind})" for name, kind in view.features.items() if kind not in SUPPORTED_TYPES]
            if unsupported:
                raise FeatureStoreError(f"live updates write {', '.join(SUPPORTED_TYPES)} features; {view.name} has "
                                        f"{', '.join(unsupported)}")
            shape = _View(view.name, view.join_key, list(view.features.items()), "", EVENT_TIMESTAMP, CREATED_TIMESTAMP, None)
            if features.online_store == "sqlite":
                writer = _SqliteWriter(config, shape)
                writer.connection.execute("PRAGMA journal_mode=WAL")
            else:
                writer = _RedisWriter(config, shape)
                writer.replace_ties = True
            self.writers[view.name] = writer
        self.columns = {view.name: [view.join_key, EVENT_TIMESTAMP, CREATED_TIMESTAMP, *view.features] for view in views}

    def write(self, view: Any, frame: Any) -> None:
        """Store each row of ``frame`` (one per entity) as its entity's row of ``view``."""
        batch = pa.RecordBatch.from_pandas(frame[self.columns[view.name]], preserve_index=False)
        self.writers[view.name].write(batch, _entity_keys(batch.column(0), view.join_key))

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
