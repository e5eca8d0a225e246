"""The features step: the use case's declared aggregations from the lake (one offline table per
entity, :mod:`flywheel.features.engine`), Feast apply + materialize, a point-in-time training set.

Everything here is content-addressed by one key: the lake snapshot, the code that computes features
and joins them (derived from this module's imports, see :mod:`flywheel.fingerprint`) and the
settings that shape the split. A rerun with the same key reuses the offline tables and the training
set after re-hashing them against the sha256 recorded when they were written; a change of any of
the three builds new ones. The key also names the feature world (see :mod:`flywheel.features.store`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from flywheel import lineage
from flywheel.config import Settings
from flywheel.errors import ArtifactNotFound, DataError, FeatureStoreError
from flywheel.contract import Contract
from flywheel.features import incremental, online_write, oracle, store as feast_store
from flywheel.features.views import View, feature_refs, views_of
from flywheel.fingerprint import code_fingerprint
from flywheel.lake import LakeSnapshot, read_snapshot
from flywheel.storage import ObjectRef, Storage
from flywheel.usecase import UseCase, load_usecase

log = logging.getLogger(__name__)
# Rows per row group of the training set: each training worker reads the row groups of its own shard.
ROW_GROUP_ROWS = 16_384


@dataclass
class TrainingSet:
    """A point-in-time-correct training set, split by time, identified by the hash of what made it."""

    uri: str
    key: str  # sha256 of the inputs: lake snapshot, feature code, split
    sha256: str  # sha256 of the content: the train and holdout files' sha256s, in that order
    train_uri: str
    holdout_uri: str
    rows: int
    train_rows: int
    holdout_rows: int
    positives: int
    holdout_positives: int
    cutoff: str
    snapshot_sha256: str
    feature_refs: list[str] = field(default_factory=list)  # view:feature, every feature the set holds
    files: dict[str, str] = field(default_factory=dict)  # train/holdout URI -> sha256
    reused: bool = False

    @property
    def manifest_uri(self) -> str:
        return f"{self.uri}/manifest.json"

    @property
    def world(self) -> str:
        """The feature world (Feast registry and online store) built with this training set."""
        return feature_world(self.key)

    def verify(self, storage: Storage) -> None:
        """Re-hash the train and holdout files against the sha256s recorded at publication."""
        if not self.files:
            raise DataError(f"training set {self.manifest_uri} records no file checksums; delete {self.uri} to rebuild it")
        for uri, sha in self.files.items():
            storage.verify(uri, sha)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingSet":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class FeaturesResult:
    training_set: TrainingSet
    tables: dict[str, str]  # view name -> its offline table's URI
    materialized: dict[str, int]  # entity -> how many of them the online store now holds
    seconds: dict[str, float]


def feature_world(key: str) -> str:
    """The name of the feature world of a training set key."""
    return key[:16]


def features_key(snapshot_sha256: str, settings: Settings) -> str:
    """The content key of the offline tables and the training set: the lake snapshot, the code that
    makes them (this module and everything it imports) and the settings that shape them."""
    shaping = {
        "holdout_fraction": settings.data.holdout_fraction,
        # The engine that joins (and its version): equal results are its contract, checked, not assumed.
        "offline_store": feast_store.offline_store_versions(settings),
        "usecase": load_usecase(settings.usecase).digest,  # every file of the use case's folder
    }
    code = code_fingerprint(__name__)
    return hashlib.sha256(json.dumps([snapshot_sha256, code, shaping], sort_keys=True).encode()).hexdigest()


def world_of_model(storage: Storage, model_meta: dict[str, Any]) -> str:
    """The feature world a model version was trained with (from its meta, else its training set's
    manifest): the online features it must be served with."""
    if model_meta.get("feature_world"):
        return str(model_meta["feature_world"])
    training_set_uri = (model_meta.get("training_set") or {}).get("uri")
    try:
        key = storage.read_json(f"{training_set_uri}/manifest.json")["key"] if training_set_uri else ""
    except (ArtifactNotFound, KeyError):
        key = ""
    if not key:
        raise FeatureStoreError(
            "the model's feature world is unknown (its meta names no training set with a key): retrain it with `flywheel run`"
        )
    return feature_world(key)


def latest_tables(storage: Storage) -> dict[str, str]:
    """The offline tables (view name -> the local file Feast reads) that the latest features step applied."""
    try:
        latest = storage.read_json(storage.uri("features", "offline", "latest.json"))
    except ArtifactNotFound:
        raise FeatureStoreError("no feature tables yet: run `flywheel run` first") from None
    if "feast" not in latest:
        raise FeatureStoreError("the latest features step predates declared features: run `flywheel run` again")
    return dict(latest["feast"])


def latest_training_set(storage: Storage) -> TrainingSet:
    """The training set of the latest features step (the key in ``features/offline/latest.json``),
    verified against its checksums."""
    try:
        key = storage.read_json(storage.uri("features", "offline", "latest.json"))["key"]
    except (ArtifactNotFound, KeyError):
        raise FeatureStoreError("no training set yet: run `flywheel run` first") from None
    training_set = _reusable_training_set(storage, storage.uri("datasets", "training", key[:16], "manifest.json"), key)
    if training_set is None:
        raise FeatureStoreError(
            f"the latest features step (key {key[:16]}) published no training set: run `flywheel run` again"
        )
    return training_set


def _log_progress(view: str, written: int, total: int) -> None:
    """Materialization's progress in the step's log (the CLI shows a bar instead)."""
    log.info("materialize %s: %d of %d entities written", view, written, total)


def materialize_window(table_paths: list[str]) -> tuple[dt.datetime, dt.datetime]:
    """The span of the offline tables' own feature rows, a second wider at each end: the window that
    loads every entity's latest row into the online store, whatever time a view stamps its rows with."""
    stamps = [pd.read_parquet(path, columns=["event_timestamp"])["event_timestamp"] for path in table_paths]
    start = min(pd.Timestamp(s.min()) for s in stamps).to_pydatetime()
    end = max(pd.Timestamp(s.max()) for s in stamps).to_pydatetime()
    return start - dt.timedelta(seconds=1), end + dt.timedelta(seconds=1)


def split_by_time(frame: pd.DataFrame, holdout_fraction: float, timestamp: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.Timestamp]:
    """The last ``holdout_fraction`` of the time span is the holdout; everything before is training."""
    ts = pd.to_datetime(frame[timestamp], utc=True)
    start, end = ts.min(), ts.max()
    cutoff = start + (end - start) * (1 - holdout_fraction)
    return frame[ts < cutoff], frame[ts >= cutoff], cutoff


def build_features(storage: Storage, settings: Settings, snapshot: LakeSnapshot, run_id: str) -> FeaturesResult:
    """Compute the use case's feature tables from a lake snapshot, apply and materialize them into the
    snapshot's feature world, and build the point-in-time training set."""
    seconds: dict[str, float] = {}
    usecase = load_usecase(settings.usecase)
    views = views_of(usecase)
    if not views:
        raise DataError(f"use case {usecase.folder} declares no features: its features.yaml names no aggregations")
    key = features_key(snapshot.sha256, settings)
    world = feature_world(key)

    started = time.perf_counter()
    rows = read_snapshot(storage, snapshot, usecase.contract.arrow_schema()).to_pandas()
    if rows.empty:
        raise DataError(f"lake snapshot {snapshot.uri} holds no rows")
    seconds["read_lake"] = time.perf_counter() - started

    started = time.perf_counter()
    tables = _offline_tables(storage, rows, key, snapshot, usecase, views, run_id)
    # Feast's file offline store reads local files: tables kept in S3 are read through a local copy.
    feast_dir = feast_store.world_dir(settings, world) / "offline"
    feast_paths = {name: str(storage.local_copy(uri, feast_dir)) for name, uri in tables.items()}
    storage.write_json(storage.uri("features", "offline", "latest.json"), {"tables": tables, "feast": feast_paths, "key": key})
    seconds["compute"] = time.perf_counter() - started

    started = time.perf_counter()
    fs = feast_store.open_store(settings, world)
    feast_store.apply_definitions(fs, views, feast_paths)
    online_write.materialize_world(fs, settings, *materialize_window(list(feast_paths.values())), progress=_log_progress)
    feast_store.point_feast_cli_at(settings, world)  # `feast` in feature_repo/ now reads this world
    seconds["apply_materialize"] = time.perf_counter() - started

    started = time.perf_counter()
    dataset_uri = storage.uri("datasets", "training", key[:16])
    training_set = _reusable_training_set(storage, f"{dataset_uri}/manifest.json", key)
    if training_set is None:
        contract = usecase.contract
        labelled = rows[rows[contract.labels[0]].notna()] if contract.unlabelled == "keep" else rows
        joined = feast_store.historical_features(fs, labelled, views, contract).sort_values(contract.timestamp, kind="stable")
        offline = {name: pd.read_parquet(path) for name, path in feast_paths.items()}
        oracle.check_sample(joined, views, offline, contract, settings.features.oracle_sample_rows, seed=int(key[:8], 16))
        training_set = _write_training_set(
            storage, joined, dataset_uri, key, snapshot, settings.data.holdout_fraction, run_id, list(tables.values()),
            contract, feature_refs(views),
        )
    seconds["training_set"] = time.perf_counter() - started
    log.info("features: %s", ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return FeaturesResult(
        training_set=training_set,
        tables=tables,
        materialized={view.entity: int(rows[view.join_key].nunique()) for view in views},
        seconds=seconds,
    )


def _offline_tables(
    storage: Storage, rows: pd.DataFrame, key: str, snapshot: LakeSnapshot, usecase: UseCase, views: list[View], run_id: str,
) -> dict[str, str]:
    """The offline tables of this key (view name -> URI): reused (after re-hashing them against their
    manifest) or assembled day by day (only days whose inputs changed are computed, see
    :mod:`flywheel.features.incremental`) and published with a manifest written last."""
    tables_uri = storage.uri("features", "offline", key[:16])
    uris = {view.name: f"{tables_uri}/{view.name}.parquet" for view in views}
    manifest_uri = f"{tables_uri}/manifest.json"
    try:
        manifest = storage.read_json(manifest_uri)
    except ArtifactNotFound:
        manifest = None
    if manifest is not None and manifest.get("key") == key:
        for uri, sha in manifest["files"].items():
            storage.verify(uri, sha)
        log.info("features: reusing offline tables %s (verified)", tables_uri)
        return uris
    days = incremental.feature_tables(storage, rows, snapshot, usecase, run_id)
    snapshot_ref = {"uri": snapshot.uri, "sha256": snapshot.sha256}
    files = {}
    for name, uri in uris.items():
        ref = storage.write_parquet(uri, days.tables[name])
        lineage.record(storage, ref, step="features", run_id=run_id, inputs=[snapshot_ref], params={"key": key})
        files[uri] = ref.sha256
    storage.write_json(manifest_uri, {"key": key, "files": files, "days_computed": days.computed, "days_reused": days.reused})
    return uris


def _reusable_training_set(storage: Storage, manifest_uri: str, key: str) -> TrainingSet | None:
    """The published training set of this key, verified against its checksums; None if there is none."""
    try:
        data = storage.read_json(manifest_uri)
    except ArtifactNotFound:
        return None
    training_set = TrainingSet.from_dict(data)
    if training_set.key != key:
        raise DataError(f"{manifest_uri} describes training set {training_set.key[:16]}, not {key[:16]}; delete it to rebuild")
    training_set.verify(storage)
    training_set.reused = True
    log.info("features: reusing training set %s (verified)", training_set.uri)
    return training_set


def _write_training_set(
    storage: Storage,
    joined: pd.DataFrame,
    dataset_uri: str,
    key: str,
    snapshot: LakeSnapshot,
    holdout_fraction: float,
    run_id: str,
    table_uris: list[str],
    contract: Contract,
    refs_of_features: list[str],
) -> TrainingSet:
    train, holdout, cutoff = split_by_time(joined, holdout_fraction, contract.timestamp)
    label = contract.labels[0]
    binary = contract.columns[label].is_binary()
    for name, part in (("training", train), ("holdout", holdout)):
        positives = int(part[label].sum()) if len(part) and binary else None
        if len(part) == 0 or positives == 0:
            found = f" and {positives} positive labels ({label} = 1)" if binary else ""
            raise DataError(
                f"the {name} split has {len(part)} labelled rows{found}: too little data to train and evaluate "
                "a model; ingest more days or rows"
            )
    inputs = [storage.stat(uri).to_dict() for uri in table_uris] + [{"uri": snapshot.uri, "sha256": snapshot.sha256}]
    refs: list[ObjectRef] = []
    for name, part in (("train", train), ("holdout", holdout)):
        ref = storage.write_parquet(f"{dataset_uri}/{name}.parquet", part.reset_index(drop=True), row_group_size=ROW_GROUP_ROWS)
        lineage.record(storage, ref, step="features", run_id=run_id, inputs=inputs, params={"key": key})
        refs.append(ref)
    training_set = TrainingSet(
        uri=dataset_uri,
        key=key,
        sha256=hashlib.sha256("".join(r.sha256 for r in refs).encode()).hexdigest(),
        files={r.uri: r.sha256 for r in refs},
        train_uri=refs[0].uri,
        holdout_uri=refs[1].uri,
        rows=len(joined),
        train_rows=len(train),
        holdout_rows=len(holdout),
        positives=int(train[label].sum()) if binary else 0,
        holdout_positives=int(holdout[label].sum()) if binary else 0,
        cutoff=cutoff.isoformat(),
        snapshot_sha256=snapshot.sha256,
        feature_refs=refs_of_features,
    )
    # The manifest is the publication point: a training set without one does not exist.
    manifest = storage.write_json(training_set.manifest_uri, training_set.to_dict())
    lineage.record(storage, manifest, step="features", run_id=run_id, inputs=[r.to_dict() for r in refs], params={"key": key})
    return training_set


__all__ = ["TrainingSet", "FeaturesResult", "build_features", "features_key", "feature_world", "materialize_window", "split_by_time"]
