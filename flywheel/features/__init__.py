"""The features step: aggregates from the lake, Feast apply + materialize, a point-in-time training set."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from flywheel import lineage
from flywheel.errors import DataError
from flywheel.features import compute, definitions, store as feast_store, transform
from flywheel.schema import LABEL
from flywheel.storage import ObjectRef, Storage

log = logging.getLogger(__name__)


@dataclass
class TrainingSet:
    """A point-in-time-correct training set, split by time, identified by the hash of what made it."""

    uri: str
    key: str  # sha256 of the inputs: lake snapshot, feature code, split
    sha256: str  # sha256 of the content: the train and holdout files
    train_uri: str
    holdout_uri: str
    rows: int
    train_rows: int
    holdout_rows: int
    positives: int
    holdout_positives: int
    cutoff: str
    snapshot_sha256: str
    feature_refs: list[str] = field(default_factory=definitions.feature_refs)
    reused: bool = False

    @property
    def manifest_uri(self) -> str:
        return f"{self.uri}/manifest.json"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingSet":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class FeaturesResult:
    training_set: TrainingSet
    card_table_uri: str
    merchant_table_uri: str
    materialized_cards: int
    materialized_merchants: int
    seconds: dict[str, float]


def feature_code_hash() -> str:
    """Changes whenever the feature logic changes, so old training sets are not reused."""
    digest = hashlib.sha256()
    for module in (compute, definitions, feast_store):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def latest_tables(storage: Storage) -> tuple[str, str]:
    """The card and merchant offline tables (as Feast reads them) that the latest features step applied."""
    from flywheel.errors import ArtifactNotFound, FeatureStoreError

    try:
        latest = storage.read_json(storage.uri("features", "offline", "latest.json"))
    except ArtifactNotFound:
        raise FeatureStoreError("no feature tables yet: run `flywheel run` first") from None
    return latest["feast_card"], latest["feast_merchant"]


def split_by_time(frame: pd.DataFrame, holdout_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame, pd.Timestamp]:
    """The last ``holdout_fraction`` of the time span is the holdout; everything before is training."""
    ts = pd.to_datetime(frame["ts"], utc=True)
    start, end = ts.min(), ts.max()
    cutoff = start + (end - start) * (1 - holdout_fraction)
    return frame[ts < cutoff], frame[ts >= cutoff], cutoff


def build_features(storage: Storage, settings: Any, snapshot: Any, run_id: str) -> FeaturesResult:
    """Compute feature tables from a lake snapshot, apply and materialize them, and build the training set."""
    from flywheel.lake import read_snapshot

    seconds: dict[str, float] = {}
    holdout_fraction = settings.data.holdout_fraction
    key = hashlib.sha256(
        json.dumps([snapshot.sha256, feature_code_hash(), holdout_fraction]).encode()
    ).hexdigest()
    tables_uri = storage.uri("features", "offline", key[:16])
    card_uri = f"{tables_uri}/card_features.parquet"
    merchant_uri = f"{tables_uri}/merchant_features.parquet"
    dataset_uri = storage.uri("datasets", "training", key[:16])

    started = time.perf_counter()
    transactions = read_snapshot(storage, snapshot).to_pandas()
    if transactions.empty:
        raise DataError(f"lake snapshot {snapshot.uri} holds no transactions")
    seconds["read_lake"] = time.perf_counter() - started

    started = time.perf_counter()
    tables_ready = storage.exists(card_uri) and storage.exists(merchant_uri)
    if not tables_ready:
        card_table = compute.card_feature_table(transactions)
        merchant_table = compute.merchant_feature_table(transactions)
        snapshot_ref = {"uri": snapshot.uri, "sha256": snapshot.sha256}
        for uri, table in ((card_uri, card_table), (merchant_uri, merchant_table)):
            ref = storage.write_parquet(uri, table)
            lineage.record(storage, ref, step="features", run_id=run_id, inputs=[snapshot_ref], params={"key": key})
    # Feast's file offline store reads local files: tables kept in S3 are read through a local copy.
    feast_dir = settings.home / "feast" / "offline" / key[:16]
    feast_card, feast_merchant = (str(storage.local_copy(uri, feast_dir)) for uri in (card_uri, merchant_uri))
    storage.write_json(
        storage.uri("features", "offline", "latest.json"),
        {"card": card_uri, "merchant": merchant_uri, "feast_card": feast_card, "feast_merchant": feast_merchant, "key": key},
    )
    seconds["compute"] = time.perf_counter() - started

    started = time.perf_counter()
    fs = feast_store.open_store(settings)
    feast_store.apply_definitions(fs, feast_card, feast_merchant)
    ts = pd.to_datetime(transactions["ts"], utc=True)
    feast_store.materialize(fs, ts.min().to_pydatetime() - dt.timedelta(seconds=1), ts.max().to_pydatetime() + dt.timedelta(seconds=1))
    seconds["apply_materialize"] = time.perf_counter() - started

    started = time.perf_counter()
    manifest_uri = f"{dataset_uri}/manifest.json"
    if storage.exists(manifest_uri):
        training_set = TrainingSet.from_dict(storage.read_json(manifest_uri))
        training_set.reused = True
    else:
        training_set = _write_training_set(storage, fs, transactions, dataset_uri, key, snapshot, holdout_fraction, run_id, [card_uri, merchant_uri])
    seconds["training_set"] = time.perf_counter() - started
    log.info("features: %s", ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return FeaturesResult(
        training_set=training_set,
        card_table_uri=card_uri,
        merchant_table_uri=merchant_uri,
        materialized_cards=int(transactions["card_id"].nunique()),
        materialized_merchants=int(transactions["merchant_id"].nunique()),
        seconds=seconds,
    )


def _write_training_set(
    storage: Storage,
    fs: Any,
    transactions: pd.DataFrame,
    dataset_uri: str,
    key: str,
    snapshot: Any,
    holdout_fraction: float,
    run_id: str,
    table_uris: list[str],
) -> TrainingSet:
    joined = feast_store.historical_features(fs, transactions).sort_values("ts", kind="stable")
    train, holdout, cutoff = split_by_time(joined, holdout_fraction)
    for name, part in (("training", train), ("holdout", holdout)):
        if len(part) == 0 or part[LABEL].sum() == 0:
            raise DataError(
                f"the {name} split has {len(part)} rows and {int(part[LABEL].sum()) if len(part) else 0} fraud cases: "
                "too little data to train and evaluate a fraud model; ingest more days or rows"
            )
    inputs = [storage.stat(uri).to_dict() for uri in table_uris] + [{"uri": snapshot.uri, "sha256": snapshot.sha256}]
    refs: list[ObjectRef] = []
    for name, part in (("train", train), ("holdout", holdout)):
        ref = storage.write_parquet(f"{dataset_uri}/{name}.parquet", part.reset_index(drop=True))
        lineage.record(storage, ref, step="features", run_id=run_id, inputs=inputs, params={"key": key})
        refs.append(ref)
    training_set = TrainingSet(
        uri=dataset_uri,
        key=key,
        sha256=hashlib.sha256("".join(r.sha256 for r in refs).encode()).hexdigest(),
        train_uri=refs[0].uri,
        holdout_uri=refs[1].uri,
        rows=len(joined),
        train_rows=len(train),
        holdout_rows=len(holdout),
        positives=int(train[LABEL].sum()),
        holdout_positives=int(holdout[LABEL].sum()),
        cutoff=cutoff.isoformat(),
        snapshot_sha256=snapshot.sha256,
    )
    # The manifest is the publication point: a training set without one does not exist.
    manifest = storage.write_json(training_set.manifest_uri, training_set.to_dict())
    lineage.record(storage, manifest, step="features", run_id=run_id, inputs=[r.to_dict() for r in refs], params={"key": key})
    return training_set


__all__ = ["TrainingSet", "FeaturesResult", "build_features", "split_by_time", "transform"]
