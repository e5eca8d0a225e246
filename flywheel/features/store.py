"""Feast, configured from the settings: apply, materialize, point-in-time joins and online reads.

Every training set gets a *feature world*: its own Feast registry and online store (a SQLite file,
or a Feast project of its own in Redis), named after the training set's content key. The features
step applies and materializes into the new world; serving opens the world of the production model.
So a run whose model is not promoted never changes the features production reads, and the
production model always reads the features it was trained with.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import math
import sqlite3
import struct
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import hiredis
import numpy as np
import pandas as pd

from flywheel.config import Settings
from flywheel.errors import FeatureStoreError
from flywheel.features.definitions import build_definitions
from flywheel.features.views import View, feature_refs, views_of

log = logging.getLogger(__name__)
# Training joins each transaction to the feature rows strictly before it: the state the online
# store holds when the transaction is scored (feature rows include their own transaction).
JOIN_OFFSET = pd.Timedelta(microseconds=1)
JOIN_CHUNK_ROWS = 25_000


def feast_home(settings: Settings) -> Path:
    """The use case's folder of Feast files (its feature worlds, and the latest world's env file)."""
    return Path(settings.features.dir) / settings.namespace


def world_dir(settings: Settings, world: str) -> Path:
    """The folder of one feature world (its registry, and its SQLite online store)."""
    if not world or not world.isalnum():
        raise FeatureStoreError(f"invalid feature world {world!r}: expected the hex key of a training set")
    return feast_home(settings) / "worlds" / world


def offline_store_versions(settings: Settings) -> dict[str, str]:
    """The offline store that joins training sets and the versions of the engine under it (part of
    a training set's content key)."""
    import importlib.metadata

    engine = {"file": ["dask"], "ray": ["ray"]}.get(settings.features.offline_store, ["duckdb", "ibis-framework"])
    versions = {"type": settings.features.offline_store}
    for package in engine:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            raise FeatureStoreError(
                f"features.offline_store={settings.features.offline_store} needs the {package} package: "
                "install the project's requirements.lock"
            ) from None
    return versions


def repo_config(settings: Settings, world: str) -> Any:
    """A Feast RepoConfig for one feature world (SQLite or Redis online store, DuckDB or file offline store)."""
    from feast.repo_config import RepoConfig

    feast_cfg = settings.features
    folder = world_dir(settings, world)
    folder.mkdir(parents=True, exist_ok=True)
    if feast_cfg.online_store == "sqlite":
        online: dict[str, Any] = {"type": "sqlite", "path": str(folder / "online.db")}
    else:
        online = {"type": "redis", "connection_string": feast_cfg.redis_connection}
    engines: dict[str, Any] = {"offline_store": {"type": _offline_store_type(feast_cfg.offline_store)}}
    if feast_cfg.offline_store == "ray":
        engines = ray_engines(feast_cfg.ray_address)
    return RepoConfig(
        project=feast_project(settings, world),
        provider="local",
        registry=str(folder / "registry.db"),
        online_store=online,
        entity_key_serialization_version=3,
        repo_path=str(settings.home),
        **engines,
    )


def ray_engines(address: str) -> dict[str, Any]:
    """Feast's offline store and batch engine settings for Ray (flywheel/features/ray_store.py): on
    the Ray cluster at ``address``, or an empty address: a local Ray on 127.0.0.1."""
    ray = {"ray_address": address or None}
    return {
        "offline_store": {"type": "flywheel.features.ray_store.FlywheelRayOfflineStore", **ray},
        "batch_engine": {"type": "flywheel.features.ray_store.FlywheelRayComputeEngine", **ray},
    }


def _offline_store_type(name: str) -> str:
    """Feast's offline store ``type`` for the settings' name of it. (The as-of store's class path is
    a string here: serving opens stores too, and never needs DuckDB imported.)"""
    return "flywheel.features.asof_store.AsofDuckDBOfflineStore" if name == "duckdb-asof" else name


def point_feast_cli_at(settings: Settings, world: str) -> Path:
    """Point the `feast` CLI of feature_repo/ at a feature world: write ``<features dir>/latest.env``,
    the variables feature_repo/feature_store.yaml expands (Feast expands ``${VAR}`` in it): the
    world's Feast project, its folder (registry and SQLite online store) and the offline store.
    The features step calls it for the world it built; the file is replaced atomically."""
    import os
    import shlex

    offline = settings.features.offline_store
    values = {
        "FLYWHEEL_FEAST_PROJECT": feast_project(settings, world),
        "FLYWHEEL_FEAST_WORLD": str(world_dir(settings, world).resolve()),
        # The ray store needs its engine's settings too: the CLI joins and materializes on DuckDB.
        "FLYWHEEL_FEAST_OFFLINE_STORE": _offline_store_type("duckdb-asof" if offline == "ray" else offline),
    }
    path = feast_home(settings) / "latest.env"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".latest.env.{os.getpid()}")
    partial.write_text("".join(f"{name}={shlex.quote(value)}\n" for name, value in values.items()))
    os.replace(partial, path)
    return path


def open_store(settings: Settings, world: str) -> Any:
    """The Feast FeatureStore of one feature world."""
    from feast import FeatureStore

    return FeatureStore(config=repo_config(settings, world))


def _check_world_files(settings: Settings, world: str) -> None:
    folder = world_dir(settings, world)
    needed = [folder / "registry.db"] + ([folder / "online.db"] if settings.features.online_store == "sqlite" else [])
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        raise FeatureStoreError(
            f"feature world {world} is missing ({', '.join(missing)}): the features it was trained with are "
            "not in this online store; re-run `flywheel run` on its data, or promote a model whose world exists"
        )


def open_served_store(settings: Settings, world: str) -> Any:
    """The Feast store of a world that must already hold the applied and materialized feature views
    (the world a model is served from): a missing or empty world is an error, never an empty store
    whose every read says "no features" and silently scores everyone as a new customer. (Serving
    itself reads through :func:`open_online_reader`, without the Feast SDK.)"""
    from flywheel.usecase import load_usecase

    _check_world_files(settings, world)
    store = open_store(settings, world)
    views = {view.name for view in store.list_feature_views()}
    expected = {view.name for view in views_of(load_usecase(settings.usecase))}
    if not expected <= views:
        raise FeatureStoreError(f"feature world {world} has views {sorted(views)}, not the use case's {sorted(expected)}")
    if settings.features.online_store == "redis":
        client = store._get_provider().online_store._get_client(store.config.online_store)
        _check_redis_holds_world(client, settings, world, store.config.project)
    return store


def _check_redis_holds_world(client: Any, settings: Settings, world: str, project: str) -> None:
    """A Redis world lives in the server, not in the world's folder: a Redis restarted without
    persistence, flushed, or another instance holds no row of it. Feast keys each entity
    ``<entity key bytes><project>``, so one key ending with the project proves it was materialized."""
    where = settings.features.redis_connection
    try:
        found = next(iter(client.scan_iter(match=b"*" + project.encode(), count=1000)), None)
    except Exception as exc:  # redis-py raises ConnectionError, TimeoutError, AuthenticationError...
        raise FeatureStoreError(f"cannot read the Redis online store at {where}: {type(exc).__name__}: {exc}") from exc
    if found is None:
        raise FeatureStoreError(
            f"feature world {world} has no rows in the Redis online store at {where} (Feast project {project}): "
            "the server lost them (restarted without persistence, flushed) or is another instance; "
            "re-run `flywheel run` on the model's data to materialize them again"
        )


def apply_definitions(store: Any, views: list[View], tables: dict[str, str]) -> None:
    """Register the use case's entities and feature views, each reading its offline table."""
    try:
        store.apply(build_definitions(views, tables))
    except Exception as exc:  # Feast raises many types; name the step and the cause
        raise FeatureStoreError(f"feast apply failed: {type(exc).__name__}: {exc}") from exc


def materialize(store: Any, start: dt.datetime, end: dt.datetime) -> None:
    """Load the latest feature values in [start, end] into the online store."""
    try:
        store.materialize(start_date=start, end_date=end)
    except Exception as exc:
        raise FeatureStoreError(f"feast materialize {start}..{end} failed: {type(exc).__name__}: {exc}") from exc


ROW = "__row"  # each entity row's position: how Feast's answer is put back in the rows' order


def entity_frame(rows: pd.DataFrame, views: list[View], timestamp: str) -> pd.DataFrame:
    """The entity rows for a point-in-time join: one per row, with every view's join key, just before
    its event time."""
    from flywheel.features.engine import join_key_text

    frame = pd.DataFrame({ROW: np.arange(len(rows), dtype=np.int64)})
    for view in views:
        if view.join_key not in frame:
            keys = rows[view.join_key]
            frame[view.join_key] = (keys if view.key_type == "string" else join_key_text(keys)).to_numpy()
    frame["event_timestamp"] = (pd.to_datetime(rows[timestamp], utc=True) - JOIN_OFFSET).to_numpy()
    return frame


def historical_features(store: Any, rows: pd.DataFrame, views: list[View], contract: Any,
                        chunk_rows: int = JOIN_CHUNK_ROWS) -> pd.DataFrame:
    """Each row joined with every view's features as they were just before it, through Feast's
    ``get_historical_features``; the rows and their order are kept, numbers come as float64 columns
    with NaN where a view has no row (yet, or within its TTL), text as objects.

    On the DuckDB offline stores every view is joined in one call (a columnar as-of join). Feast's
    file (dask) store loses every view's values for an entity row that one view has no row for and
    slows down more than linearly with the entity frame, so there each view is retrieved on its own,
    in chunks of ``chunk_rows``. Both are checked against a merge_asof oracle (tests/unit/test_features.py,
    tests/unit/test_point_in_time.py, and :func:`flywheel.features.oracle.check_sample` on every build).
    """
    from flywheel.features import asof_store  # noqa: F401  (the join's code: part of the training set's key)

    rows = rows.reset_index(drop=True)
    entities = entity_frame(rows, views, contract.timestamp)
    kinds = {name: kind for view in views for name, kind in view.features.items()}
    if store.config.offline_store.type != "file":
        parts = {"all views": [_retrieve(store, entities, feature_refs(views), "all views")]}
    else:
        parts = {
            view.name: [
                _retrieve(store, entities.iloc[start: start + chunk_rows][[ROW, view.join_key, "event_timestamp"]],
                          view.refs(), view.name)
                for start in range(0, len(entities), chunk_rows)
            ]
            for view in views
        }
    out = rows.copy()

    def typed(values: pd.Series, name: str) -> Any:
        return values.to_numpy(dtype=object) if kinds[name] == "String" else values.to_numpy(dtype="float64", na_value=np.nan)

    for what, frames in parts.items():
        if len(frames) == 1 and np.array_equal(frames[0][ROW].to_numpy(), np.arange(len(out))):
            # The rows came back as they went in (the as-of store keeps them): no join needed.
            for name in (name for name in kinds if name in frames[0].columns):
                out[name] = typed(frames[0][name], name)
            continue
        # Feast neither keeps the entity rows' order nor (the file store, with one view) the rows that
        # found no feature row: align on the row; a missing row means "no earlier features".
        joined = pd.concat(frames, ignore_index=True).set_index(ROW)
        if not joined.index.is_unique or len(joined) > len(rows):
            raise FeatureStoreError(f"point-in-time join of {what} returned {len(joined)} rows for {len(rows)} rows")
        joined = joined.reindex(np.arange(len(out)))
        for name in (name for name in kinds if name in joined.columns):
            out[name] = typed(joined[name], name)
    return out


def _retrieve(store: Any, entities: pd.DataFrame, refs: list[str], what: str) -> pd.DataFrame:
    try:
        return store.get_historical_features(entity_df=entities, features=refs).to_df()
    except Exception as exc:  # Feast raises many types; name the step and the cause
        raise FeatureStoreError(f"feast point-in-time join of {what} failed: {type(exc).__name__}: {exc}") from exc


def online_features(store: Any, rows: Sequence[dict[str, Any]], views: list[View]) -> dict[str, list[Any]]:
    """The current features of each row (its join keys) from the online store, through Feast's SDK."""
    return store.get_online_features(features=feature_refs(views), entity_rows=list(rows)).to_dict()


# ---------------------------------------------------------------- the served read path, without the Feast SDK
# Serving reads the online store Feast wrote, in Feast's own layout, without importing Feast: the
# SDK costs seconds of start-up (it imports every offline store) and its per-call protobuf work
# is most of a one-transaction request. tests/unit/test_online_layout.py checks every piece of the
# layout below against Feast's own functions, and the serving tests read Feast-materialized data.
VALUE_TYPE_STRING = 2  # feast.types.ValueType.STRING
SERVING_REDIS_TIMEOUT_S = 1.0  # a served Redis read or connect that takes longer fails (unless the connection string sets its own)
MAX_SQL_PARAMETERS = 30_000  # per SQLite statement: below its default limit of 32,766
_U32 = struct.Struct("<I")
_DOUBLE, _FLOAT = struct.Struct("<d"), struct.Struct("<f")


def feast_project(settings: Settings, world: str) -> str:
    """The Feast project of a feature world: its tables' (SQLite) or keys' (Redis) namespace."""
    return f"{settings.features.project}_{world}"


def entity_key_bytes(join_key: str, entity_id: str) -> bytes:
    """Feast's serialized entity key (``serialize_entity_key``, version 3) of one string join key."""
    value = entity_id.encode()
    return b"".join((_entity_key_head(join_key), _U32.pack(len(value)), value))


@functools.lru_cache(maxsize=16)
def _entity_key_head(join_key: str) -> bytes:
    """The part of an entity key before its value's length (the same for every entity of a join key)."""
    key = join_key.encode()
    return b"".join((_U32.pack(1), _U32.pack(VALUE_TYPE_STRING), _U32.pack(len(key)), key, _U32.pack(VALUE_TYPE_STRING)))


def _varint(raw: bytes, at: int) -> int:
    return _varint_at(raw, at)[0]


def _varint_at(raw: bytes, at: int) -> tuple[int, int]:
    """A varint at ``at``: (its value, the position after it)."""
    number, shift = 0, 0
    while True:
        byte = raw[at]
        number |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return number, at


def decode_value(raw: bytes | None) -> float | str:
    """A feature value as Feast stores it (a serialized ``feast.types.Value``) as a float; NaN for
    a missing value (no bytes, an empty message, or ``null_val``).

    The features are Int64 and Float64 (definitions.py): a double is field 5 (tag 0x29 and 8 bytes,
    little-endian), an int64 field 4 (tag 0x20 and a varint, two's complement). Int32, float and bool
    are read likewise, and a String (the last value of a text column) as text; any other kind of
    value is refused rather than guessed."""
    if not raw:
        return math.nan
    tag, size = raw[0], len(raw)
    if tag == 0x29 and size == 9:  # double_val
        return _DOUBLE.unpack_from(raw, 1)[0]
    if tag in (0x20, 0x18, 0x38):  # int64_val, int32_val, bool_val
        number = _varint(raw, 1)
        return float(number - (1 << 64) if number >= 1 << 63 else number)
    if tag == 0x35 and size == 5:  # float_val
        return _FLOAT.unpack_from(raw, 1)[0]
    if raw[:2] == b"\x98\x01":  # null_val
        return math.nan
    if tag == 0x1a:  # string_val: a length (varint), then UTF-8 bytes
        length, start = _varint_at(raw, 1)
        return raw[start:start + length].decode("utf-8")
    raise FeatureStoreError(f"the online store holds a feature value flywheel cannot read: {raw[:24]!r} "
                            "(expected a Feast Int64 or Float64 value)")


def timestamp_micros(raw: bytes) -> int:
    """Microseconds since the epoch of a serialized ``google.protobuf.Timestamp`` (Feast's Redis
    ``_ts:<view>`` field): field 1, seconds; field 2, nanoseconds; both varints, either omitted when 0."""
    seconds = nanos = 0
    at = 0
    while at < len(raw):
        tag = raw[at]
        value, at = _varint_at(raw, at + 1)
        if tag == 0x08:
            seconds = value - (1 << 64) if value >= 1 << 63 else value
        elif tag == 0x10:
            nanos = value
    return seconds * 1_000_000 + nanos // 1000


def feature_hash_key(view: str, name: str) -> bytes:
    """The Redis hash field Feast stores a feature under: murmur3 of ``view:name``, 4 bytes little-endian."""
    import mmh3

    return mmh3.hash(f"{view}:{name}", signed=False).to_bytes(4, "little")


def redis_client(connection: str, **defaults: Any) -> Any:
    """A redis-py client from Feast's connection string (``host:port[,db=0,password=...,ssl=true]``);
    ``defaults``: client options that the string's own options override."""
    import redis

    nodes = [part for part in connection.split(",") if "=" not in part]
    if len(nodes) != 1 or ":" not in nodes[0]:
        raise FeatureStoreError(f"features.redis_connection {connection!r} must be host:port with optional ,key=value options")
    host, port = nodes[0].rsplit(":", 1)
    options: dict[str, Any] = dict(defaults)
    for part in connection.split(","):
        if "=" in part:
            name, value = part.split("=", 1)
            try:
                options[name] = json.loads(value)
            except json.JSONDecodeError:
                options[name] = value
    return redis.Redis(host=host, port=int(port), **options)


class OnlineReader:
    """The current features of many rows' entities, read straight from the online store of a served
    feature world (Feast's tables in SQLite, Feast's hashes in Redis): one statement for all the
    use case's feature views in SQLite, one pipelined round trip for all of them in Redis.

    What :func:`online_features` returns, as numpy arrays, without the Feast SDK; the hot path of
    serving. Open one with :func:`open_online_reader`.
    """

    def __init__(self, project: str, views: Sequence[View], sqlite_path: str | None = None, redis: Any = None) -> None:
        self.project = project
        self._redis = redis
        self._sqlite = None
        self._queries: dict[str, str] = {}
        if sqlite_path is not None:
            # Read-only; KServe calls predict in its event loop thread, a reload builds readers in another.
            self._sqlite = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True, check_same_thread=False)
            self._lock = threading.Lock()
        self._views = [(view.name, view.join_key, list(view.features)) for view in views]
        # A row older than its view's TTL at the request's time is not read (as the point-in-time
        # join does not read it: flywheel.aggregations, "Reading"); 0: no TTL.
        self._ttl = {view.name: int(view.ttl / dt.timedelta(microseconds=1)) for view in views}
        # Views whose features are all numbers take the fast path (one float matrix per view).
        self._text = {view.name: [kind == "String" for kind in view.features.values()] for view in views}
        self._fields = {name: [feature_hash_key(name, feature) for feature in features] for name, _, features in self._views}
        self._ts_fields = {name: f"_ts:{name}".encode() for name, _, _ in self._views}
        self.join_keys = list(dict.fromkeys(key for _, key, _ in self._views))

    def read(self, keys: Mapping[str, Sequence[str | None]], at: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(feature name -> array with NaN (or "" for text) where the store has no value, join key ->
        bool array saying whether the store knows that entity at all). ``keys``: each join key's
        entity ids as text, one per row (None: the row names none). ``at``: each row's time
        (datetime64; NaT or no ``at``: not checked); a view's row older than its TTL at that time counts as absent, as
        the point-in-time join has it (a row is read when its time is at least ``at`` minus the TTL,
        minus the join's microsecond; the SQLite layout keeps whole seconds, so there a row expires up
        to a second early)."""
        wanted = [(view, key, names, keys[key]) for view, key, names in self._views]
        try:
            found, stamps = self._read_redis(wanted) if self._redis is not None else self._read_sqlite(wanted)
        except FeatureStoreError:
            raise
        except Exception as exc:  # the store is down or broken: the caller turns it into a 503
            raise FeatureStoreError(f"online read from {self._where()} failed: {type(exc).__name__}: {exc}") from exc
        expired = self._expired(wanted, found, stamps, at) if at is not None and any(self._ttl.values()) else None
        return self._arrays(wanted, found, expired)

    def _expired(self, wanted: list, found: list[dict[str, list[Any]]], stamps: list[dict[str, int]],
                 at: np.ndarray) -> list[set[int]] | None:
        """Per view, the rows whose entity's row is older than the view's TTL at the row's time
        (None when none is; a row without a time is not checked)."""
        times = np.asarray(at)
        moments = np.where(np.isnat(times), np.iinfo(np.int64).min, times.astype("datetime64[us]").astype(np.int64)).tolist()
        out, any_expired = [], False
        for (view, _, _, ids), values, written in zip(wanted, found, stamps):
            ttl = self._ttl[view]
            gone: set[int] = set()
            if ttl and values:
                for row, entity in enumerate(ids):
                    stamp = written.get(entity) if entity is not None else None
                    if stamp is not None and moments[row] - stamp > ttl + 1:
                        gone.add(row)
            any_expired |= bool(gone)
            out.append(gone)
        return out if any_expired else None

    def _arrays(self, wanted: list, found: list[dict[str, list[Any]]],
                expired: list[set[int]] | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        features: dict[str, np.ndarray] = {}
        known: dict[str, np.ndarray] = {}
        for index, ((view, key, names, ids), values) in enumerate(zip(wanted, found)):
            empty = [math.nan] * len(names)
            gone = expired[index] if expired is not None else ()
            if gone:
                rows = [empty if row in gone else values.get(entity, empty) for row, entity in enumerate(ids)]
            else:
                rows = [values.get(entity, empty) for entity in ids]
            text = self._text[view]
            if not any(text):
                matrix = np.array(rows, dtype=np.float64).reshape(len(ids), len(names))
                seen = ~np.isnan(matrix).all(axis=1)
                known[key] = known[key] | seen if key in known else seen
                features.update({name: matrix[:, column] for column, name in enumerate(names)})
                continue
            seen = np.array([entity in values and row not in gone for row, entity in enumerate(ids)], dtype=bool)
            known[key] = known[key] | seen if key in known else seen
            for column, name in enumerate(names):
                if text[column]:
                    features[name] = np.array(["" if isinstance(row[column], float) else row[column] for row in rows], dtype=object)
                else:
                    features[name] = np.array([row[column] for row in rows], dtype=np.float64)
        return features, known

    def _where(self) -> str:
        return f"Redis (Feast project {self.project})" if self._redis is not None else "SQLite"

    def _read_sqlite(self, wanted: list) -> tuple[list[dict[str, list[float]]], list[dict[str, int]]]:
        """Per view, entity id -> its features' values in the view's order (entities with none left
        out), and entity id -> its row's time (microseconds; whole seconds in this layout): both views in one statement (one shared lock of the database file, not two), or in
        as few as SQLite's limit on a statement's parameters allows for a large batch."""
        by_key = [{entity_key_bytes(key, entity): entity for entity in set(ids) if entity is not None} for _, key, _, ids in wanted]
        pieces = [(index, list(keys)[start:start + MAX_SQL_PARAMETERS])
                  for index, keys in enumerate(by_key) for start in range(0, len(keys), MAX_SQL_PARAMETERS)]
        statements: list[list[tuple[int, list[bytes]]]] = [[]]
        for index, piece in pieces:
            if sum(len(keys) for _, keys in statements[-1]) + len(piece) > MAX_SQL_PARAMETERS:
                statements.append([])
            statements[-1].append((index, piece))
        rows: list[tuple] = []
        for statement in statements:
            query = " UNION ALL ".join(
                f'SELECT {index}, entity_key, feature_name, value, event_ts FROM "{self.project}_{wanted[index][0]}" '
                f"WHERE entity_key IN ({','.join('?' * len(keys))})"
                for index, keys in statement
            )
            with self._lock:
                rows += self._sqlite.execute(query, [key for _, keys in statement for key in keys]).fetchall()
        positions = [{name: column for column, name in enumerate(names)} for _, _, names, _ in wanted]
        found: list[dict[str, list[float]]] = [{} for _ in wanted]
        stamps: list[dict[str, int]] = [{} for _ in wanted]
        for index, entity_key, name, raw, event_ts in rows:
            column = positions[index].get(name)
            if column is not None:
                entity = by_key[index][entity_key]
                found[index].setdefault(entity, [math.nan] * len(positions[index]))[column] = decode_value(raw)
                if event_ts is not None:
                    stamps[index][entity] = int(event_ts) * 1_000_000
        return found, stamps

    def _read_redis(self, wanted: list) -> tuple[list[dict[str, list[float]]], list[dict[str, int]]]:
        """Per view, entity id -> its features' values (and, for a view with a TTL, entity id -> its
        row's time in microseconds): one HMGET per distinct entity of both views,
        all written at once on one pooled connection and read back in order (one round trip).

        Blocking, in the event loop, on purpose: a local Redis answers a pass in tens of
        microseconds, less than the asyncio machinery costs. CPU of a pass of 8 one-transaction
        requests: about 160 us this way (SQLite: 205; benchmarks/online_read.py); measured in
        process while choosing: 220 us awaiting the replies with the loop watching the socket,
        350 us awaiting a redis.asyncio pipeline, 300 us with redis-py's blocking pipeline (they
        pack and parse each command in Python). One transaction: 68, SQLite 52, awaited 133. Under
        wrk at concurrency 8 on one worker, side by side (2026-11-24): 1,830 requests/s this way,
        1,647 awaiting the socket. The commands are packed by hiredis; replies are parsed by hiredis through the
        connection; the client's retry policy (open_online_reader: one immediate retry, for a
        connection Redis closed) and socket timeouts bound the wait."""
        suffix = self.project.encode()
        unique = [[entity for entity in set(ids) if entity is not None] for _, _, _, ids in wanted]
        packed = b"".join(
            hiredis.pack_command((b"HMGET", entity_key_bytes(key, entity) + suffix, *self._fields[view],
                                  *((self._ts_fields[view],) if self._ttl[view] else ())))
            for (view, key, _, _), entities in zip(wanted, unique) for entity in entities
        )
        count = sum(len(entities) for entities in unique)
        pool = self._redis.connection_pool
        connection = pool.get_connection()
        try:
            replies = connection.retry.call_with_retry(lambda: _exchange(connection, packed, count),
                                                       lambda error: connection.disconnect())
        finally:
            pool.release(connection)
        answers = iter(replies)
        found: list[dict[str, list[float]]] = []
        stamps: list[dict[str, int]] = []
        for (view, _, _, _), entities in zip(wanted, unique):
            values: dict[str, list[float]] = {}
            times: dict[str, int] = {}
            if self._ttl[view]:
                for entity in entities:
                    *raws, stamp = next(answers)
                    values[entity] = [decode_value(raw) for raw in raws]
                    if stamp:
                        times[entity] = timestamp_micros(stamp)
            else:
                values = {entity: [decode_value(raw) for raw in next(answers)] for entity in entities}
            found.append(values)
            stamps.append(times)
        return found, stamps


def _exchange(connection: Any, packed: bytes, count: int) -> list:
    """Write packed commands on a redis-py connection and read their ``count`` replies."""
    try:
        connection.send_packed_command([packed])
        return [connection.read_response() for _ in range(count)]
    except BaseException:
        connection.disconnect()  # replies left unread would answer the next caller's commands
        raise


def open_online_reader(settings: Settings, world: str, views: Sequence[View] | None = None) -> OnlineReader:
    """The online reader of ``views`` (default: the use case's) in a world that must already hold
    materialized features (the world a model is served from): a missing or empty world is an error,
    never a store whose every read says "no features" and silently scores every entity as new."""
    if views is None:
        from flywheel.usecase import load_usecase

        views = views_of(load_usecase(settings.usecase))
    folder = world_dir(settings, world)
    _check_world_files(settings, world)
    project = feast_project(settings, world)
    if settings.features.online_store == "redis":
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # Reads block the event loop (OnlineReader._read_redis): a Redis that stops answering must
        # fail the request in a bounded time (a 503), and a failed read is retried once at once
        # (a connection Redis closed) rather than after backoff sleeps that would stall the server.
        client = redis_client(settings.features.redis_connection, socket_timeout=SERVING_REDIS_TIMEOUT_S,
                              socket_connect_timeout=SERVING_REDIS_TIMEOUT_S, retry=Retry(NoBackoff(), 1))
        _check_redis_holds_world(client, settings, world, project)
        return OnlineReader(project, views, redis=client)
    path = folder / "online.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    missing = [view.name for view in views if f"{project}_{view.name}" not in tables]
    if missing:
        raise FeatureStoreError(f"feature world {world} has no online table for {', '.join(missing)} in {path}: "
                                "it was never materialized; re-run `flywheel run` on its data")
    return OnlineReader(project, views, sqlite_path=str(path))
