"""Feast, configured from the settings: apply, materialize, point-in-time joins and online reads.

Every training set gets a *feature world*: its own Feast registry and online store (a SQLite file,
or a Feast project of its own in Redis), named after the training set's content key. The features
step applies and materializes into the new world; serving opens the world of the production model.
So a run whose model is not promoted never changes the features production reads, and the
production model always reads the features it was trained with.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from flywheel.config import Settings
from flywheel.errors import FeatureStoreError
from flywheel.features.definitions import (
    CARD_FEATURES,
    CARD_VIEW,
    MERCHANT_FEATURES,
    MERCHANT_VIEW,
    build_definitions,
    feature_refs,
)

log = logging.getLogger(__name__)
# Training joins each transaction to the feature rows strictly before it: the state the online
# store holds when the transaction is scored (feature rows include their own transaction).
JOIN_OFFSET = pd.Timedelta(microseconds=1)
JOIN_CHUNK_ROWS = 25_000
VIEWS = [(CARD_VIEW, "card_id", CARD_FEATURES), (MERCHANT_VIEW, "merchant_id", MERCHANT_FEATURES)]


def world_dir(settings: Settings, world: str) -> Path:
    """The folder of one feature world (its registry, and its SQLite online store)."""
    if not world or not world.isalnum():
        raise FeatureStoreError(f"invalid feature world {world!r}: expected the hex key of a training set")
    return Path(settings.features.dir) / "worlds" / world


def offline_store_versions(settings: Settings) -> dict[str, str]:
    """The offline store that joins training sets and the versions of the engine under it (part of
    a training set's content key)."""
    import importlib.metadata

    engine = ["dask"] if settings.features.offline_store == "file" else ["duckdb", "ibis-framework"]
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
    return RepoConfig(
        project=f"{feast_cfg.project}_{world}",
        provider="local",
        registry=str(folder / "registry.db"),
        online_store=online,
        offline_store={"type": _offline_store_type(feast_cfg.offline_store)},
        entity_key_serialization_version=3,
        repo_path=str(settings.home),
    )


def _offline_store_type(name: str) -> str:
    """Feast's offline store ``type`` for the settings' name of it. (The as-of store's class path is
    a string here: serving opens stores too, and never needs DuckDB imported.)"""
    return "flywheel.features.asof_store.AsofDuckDBOfflineStore" if name == "duckdb-asof" else name


def open_store(settings: Settings, world: str) -> Any:
    """The Feast FeatureStore of one feature world."""
    from feast import FeatureStore

    return FeatureStore(config=repo_config(settings, world))


def open_served_store(settings: Settings, world: str) -> Any:
    """The store of a world that must already hold the applied and materialized feature views (the
    world a model is served from): a missing or empty world is an error, never an empty store
    whose every read says "no features" and silently scores everyone as a new customer."""
    folder = world_dir(settings, world)
    needed = [folder / "registry.db"] + ([folder / "online.db"] if settings.features.online_store == "sqlite" else [])
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        raise FeatureStoreError(
            f"feature world {world} is missing ({', '.join(missing)}): the features it was trained with are "
            "not in this online store; re-run `flywheel run` on its data, or promote a model whose world exists"
        )
    store = open_store(settings, world)
    views = {view.name for view in store.list_feature_views()}
    if not {CARD_VIEW, MERCHANT_VIEW} <= views:
        raise FeatureStoreError(f"feature world {world} has views {sorted(views)}, not {CARD_VIEW} and {MERCHANT_VIEW}")
    if settings.features.online_store == "redis":
        _check_redis_holds_world(store, settings, world)
    return store


def _check_redis_holds_world(store: Any, settings: Settings, world: str) -> None:
    """A Redis world lives in the server, not in the world's folder: a Redis restarted without
    persistence, flushed, or another instance holds no row of it. Feast keys each entity
    ``<entity key bytes><project>``, so one key ending with the project proves it was materialized."""
    project = store.config.project
    where = settings.features.redis_connection
    try:
        client = store._get_provider().online_store._get_client(store.config.online_store)
        found = next(iter(client.scan_iter(match=b"*" + project.encode(), count=1000)), None)
    except Exception as exc:  # redis-py raises ConnectionError, TimeoutError, AuthenticationError...
        raise FeatureStoreError(f"cannot read the Redis online store at {where}: {type(exc).__name__}: {exc}") from exc
    if found is None:
        raise FeatureStoreError(
            f"feature world {world} has no rows in the Redis online store at {where} (Feast project {project}): "
            "the server lost them (restarted without persistence, flushed) or is another instance; "
            "re-run `flywheel run` on the model's data to materialize them again"
        )


def apply_definitions(store: Any, card_table_path: str, merchant_table_path: str) -> None:
    """Register the entities and feature views, reading the given offline tables."""
    try:
        store.apply(build_definitions(card_table_path, merchant_table_path))
    except Exception as exc:  # Feast raises many types; name the step and the cause
        raise FeatureStoreError(f"feast apply failed: {type(exc).__name__}: {exc}") from exc


def materialize(store: Any, start: dt.datetime, end: dt.datetime) -> None:
    """Load the latest feature values in [start, end] into the online store."""
    try:
        store.materialize(start_date=start, end_date=end)
    except Exception as exc:
        raise FeatureStoreError(f"feast materialize {start}..{end} failed: {type(exc).__name__}: {exc}") from exc


def entity_frame(transactions: pd.DataFrame) -> pd.DataFrame:
    """The entity rows for a point-in-time join: one per transaction, just before its time."""
    return pd.DataFrame(
        {
            "transaction_id": transactions["transaction_id"].to_numpy(),
            "card_id": transactions["card_id"].to_numpy(),
            "merchant_id": transactions["merchant_id"].to_numpy(),
            "event_timestamp": pd.to_datetime(transactions["ts"], utc=True) - JOIN_OFFSET,
        }
    )


def historical_features(store: Any, transactions: pd.DataFrame, chunk_rows: int = JOIN_CHUNK_ROWS) -> pd.DataFrame:
    """Each transaction joined with the card and merchant features as they were just before it,
    through Feast's ``get_historical_features``; the transactions' rows and order are kept, the
    features come as float64 columns with NaN where a view has no row (yet, or within its TTL).

    On the DuckDB offline stores every view is joined in one call (a columnar as-of join). Feast's
    file (dask) store loses every view's values for an entity row that one view has no row for and
    slows down more than linearly with the entity frame, so there each view is retrieved on its own,
    in chunks of ``chunk_rows``. Both are checked against a merge_asof oracle (tests/unit/test_features.py,
    tests/unit/test_point_in_time.py, and :func:`flywheel.features.oracle.check_sample` on every build).
    """
    from flywheel.features import asof_store  # noqa: F401  (the join's code: part of the training set's key)

    if not transactions["transaction_id"].is_unique:
        raise FeatureStoreError("the transactions to join repeat transaction ids: each entity row must be one transaction")
    entities = entity_frame(transactions)
    if store.config.offline_store.type != "file":
        parts = {"all views": [_retrieve(store, entities, feature_refs(), "all views")]}
    else:
        parts = {
            view: [
                _retrieve(store, entities.iloc[start : start + chunk_rows][["transaction_id", key, "event_timestamp"]],
                          [f"{view}:{name}" for name in names], view)
                for start in range(0, len(entities), chunk_rows)
            ]
            for view, key, names in VIEWS
        }
    out = transactions.copy()
    for what, frames in parts.items():
        if len(frames) == 1 and np.array_equal(frames[0]["transaction_id"].to_numpy(), out["transaction_id"].to_numpy()):
            # The rows came back as they went in (the as-of store keeps them): no join needed.
            for name in (name for name in (*CARD_FEATURES, *MERCHANT_FEATURES) if name in frames[0].columns):
                out[name] = frames[0][name].to_numpy(dtype="float64", na_value=np.nan)
            continue
        # Feast neither keeps the entity rows' order nor (the file store, with one view) the rows that
        # found no feature row: align on the transaction id; a missing row means "no earlier features".
        joined = pd.concat(frames, ignore_index=True).set_index("transaction_id")
        names = [name for name in (*CARD_FEATURES, *MERCHANT_FEATURES) if name in joined.columns]
        if not joined.index.is_unique or len(joined) > len(transactions):
            raise FeatureStoreError(f"point-in-time join of {what} returned {len(joined)} rows for {len(transactions)} transactions")
        out = out.join(joined[names].astype("float64"), on="transaction_id")
    return out


def _retrieve(store: Any, entities: pd.DataFrame, refs: list[str], what: str) -> pd.DataFrame:
    try:
        return store.get_historical_features(entity_df=entities, features=refs).to_df()
    except Exception as exc:  # Feast raises many types; name the step and the cause
        raise FeatureStoreError(f"feast point-in-time join of {what} failed: {type(exc).__name__}: {exc}") from exc


def online_features(store: Any, rows: Sequence[dict[str, str]]) -> dict[str, list[Any]]:
    """The current features of each (card_id, merchant_id) row from the online store."""
    return store.get_online_features(features=feature_refs(), entity_rows=list(rows)).to_dict()


class OnlineReader:
    """The current card and merchant features of many transactions, read straight from the online
    store of a served feature world: one ``online_read`` per feature view, values as numpy arrays.

    This is what :func:`online_features` returns, without the Feast SDK's per-call work (request
    protobufs, response dicts); the hot path of serving, where a request is a handful of numbers.
    """

    def __init__(self, store: Any) -> None:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        self._entity_key, self._value = EntityKey, Value
        self._config = store.config
        self._online_store = store._get_provider().online_store
        self._views = [(store.get_feature_view(view), key, list(names)) for view, key, names in VIEWS]

    def read(self, card_ids: Sequence[str], merchant_ids: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(feature name -> float64 array with NaN where the store has no value, key name -> bool
        array saying whether the store knows that entity at all)."""
        features: dict[str, np.ndarray] = {}
        known: dict[str, np.ndarray] = {}
        for (view, key, names), ids in zip(self._views, (card_ids, merchant_ids)):
            keys = [self._entity_key(join_keys=[key], entity_values=[self._value(string_val=i)]) for i in ids]
            try:
                # A copy: the Redis store appends its own timestamp key to the list it is given.
                rows = self._online_store.online_read(self._config, view, keys, list(names))
            except Exception as exc:  # the store is down or broken: the caller turns it into a 503
                raise FeatureStoreError(f"online read of {view.name} failed: {type(exc).__name__}: {exc}") from exc
            columns = {name: np.full(len(ids), np.nan) for name in names}
            found = np.zeros(len(ids), dtype=bool)
            for index, (_, values) in enumerate(rows):
                # SQLite answers an unknown key with no values; Redis with empty (null) ones.
                for name in names:
                    value = (values or {}).get(name)
                    kind = value.WhichOneof("val") if value is not None else None
                    if kind is not None:
                        columns[name][index] = getattr(value, kind)
                        found[index] = True
            features.update(columns)
            known[key] = found
        return features, known
