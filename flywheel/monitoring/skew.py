"""Online/offline consistency: what serving read, against what the offline path gives for the same
entities at the same times.

Captured rows (:mod:`flywheel.monitoring.capture`) hold each feature the predictor read from the
online store. The offline path is the training set's own: the engine's feature rows computed from
the lake with the declarations the model version recorded, read as of just before each row's time
(:func:`flywheel.features.history.replay_tables`, :class:`~flywheel.features.history.PointInTimeReader`:
what a training-set row holds). The two are compared feature by feature, as Chronon's consistency
job compares logged fetches with their backfill:

- ``mismatch``: both have a value and they differ (numbers beyond a relative 1e-6, text at all);
- ``missing``: the offline path has a value and serving read none (a lagging or failed
  materialization, an expired row);
- ``extra``: serving read a value the offline path does not have at that time (a row from the
  future of the request, or from outside the view's TTL);

each as a share of the rows compared. A row is compared only when the lake holds its time already
(its features can be recomputed); the rest are counted as ``not_yet_in_lake``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from flywheel.config import Settings
from flywheel.deploy.live import lake_of
from flywheel.errors import ArtifactNotFound, DataError
from flywheel.features.engine import EVENT_TIMESTAMP
from flywheel.features.history import PointInTimeReader, replay_tables
from flywheel.features.incremental import source_rows
from flywheel.features.views import views_of_model
from flywheel.monitoring.capture import FEATURE, INPUT
from flywheel.registry import Registry
from flywheel.storage import Storage
from flywheel.usecase import load_usecase

log = logging.getLogger(__name__)

RELATIVE_TOLERANCE = 1e-6  # float32 round trips and summation order, not a different value


@dataclass
class FeatureSkew:
    feature: str
    compared: int
    mismatch_rate: float
    missing_rate: float
    extra_rate: float
    threshold: float
    crossed: bool
    examples: list[dict[str, Any]] = field(default_factory=list)  # a few rows that differ: entity, time, online, offline

    @property
    def inconsistent_rate(self) -> float:
        return self.mismatch_rate + self.missing_rate + self.extra_rate

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "inconsistent_rate": self.inconsistent_rate}


@dataclass
class SkewReport:
    rows: int  # captured rows sampled
    compared: int  # of them, rows whose time the lake covers
    not_yet_in_lake: int
    features: list[FeatureSkew]
    skipped: list[str]  # why some rows or versions could not be compared

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "compared": self.compared, "not_yet_in_lake": self.not_yet_in_lake,
                "features": [f.to_dict() for f in self.features], "skipped": self.skipped}


def _present(values: np.ndarray) -> np.ndarray:
    if values.dtype == object:
        return np.array([v is not None and v == v and v != "" for v in values], dtype=bool)
    return ~np.isnan(values.astype(np.float64))


def compare_feature(online: np.ndarray, offline: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: (mismatch, missing, extra) flags of one feature's online against offline values."""
    on, off = _present(online), _present(offline)
    both = on & off
    differ = np.zeros(len(online), dtype=bool)
    if both.any():
        if online.dtype == object or offline.dtype == object:
            a, b = online[both].astype(str), offline[both].astype(str)
            differ[both] = a != b
        else:
            a, b = online[both].astype(np.float64), offline[both].astype(np.float64)
            differ[both] = np.abs(a - b) > RELATIVE_TOLERANCE * np.maximum(np.abs(b), 1.0)
    return differ, off & ~on, on & ~off


def measure_skew(storage: Storage, settings: Settings, captured: pd.DataFrame, registry: Registry,
                 sample_rows: int | None = None, seed: int = 0) -> SkewReport:
    """Replay a sample of captured rows (a DataFrame in the capture's layout) through the offline
    path of the model version that scored each, and compare feature by feature."""
    threshold = settings.monitoring.max_skew_mismatch
    sample_rows = sample_rows or settings.monitoring.skew_sample_rows
    if len(captured) > sample_rows:
        captured = captured.sample(n=sample_rows, random_state=seed).sort_values("row_time", kind="stable")
    flags: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    examples: dict[str, list[dict[str, Any]]] = {}
    skipped: list[str] = []
    compared = late = 0
    usecase = load_usecase(settings.usecase)
    for version, rows in captured.groupby("model_version", sort=True):
        try:
            meta = registry.get(str(version)).meta
            views = views_of_model(meta)
            if not views:
                raise DataError("it recorded no feature views")
            lake_uri = lake_of(storage, meta)
            times = pd.to_datetime(rows["row_time"], utc=True)
            tables = replay_tables(storage, meta, lake_uri, times.min(), times.max(),
                                   lambda snapshot, first_day: source_rows(storage, snapshot, usecase, first=first_day))
        except (DataError, ArtifactNotFound) as exc:
            skipped.append(f"version {version}: {len(rows)} rows not compared: {exc}")
            continue
        # The lake's newest event: later rows' features cannot be recomputed yet.
        newest = max((pd.Timestamp(t[EVENT_TIMESTAMP].max()) for t in tables.values() if len(t)), default=None)
        covered = (times <= newest).to_numpy() if newest is not None else np.zeros(len(rows), dtype=bool)
        late += int((~covered).sum())
        rows, times = rows[covered], times[covered]
        keys = {}
        for view in views:
            column = INPUT + view.join_key
            if column not in rows.columns:
                skipped.append(f"version {version}: view {view.name}'s join key {view.join_key} is not a request field")
                continue
            keys[view.join_key] = [None if v is None or v != v else str(v) for v in rows[column].tolist()]
        readable = [view for view in views if view.join_key in keys]
        if not len(rows) or not readable:
            continue
        offline, _ = PointInTimeReader(readable, tables).read(keys, at=times.to_numpy(dtype="datetime64[us]"))
        compared += len(rows)
        for name, values in offline.items():
            column = FEATURE + name
            if column not in rows.columns:
                skipped.append(f"version {version}: feature {name} was not captured")
                continue
            online = rows[column].to_numpy()
            online = online.astype(object) if values.dtype == object else online.astype(np.float64)
            result = compare_feature(online, values)
            flags.setdefault(name, []).append(result)
            bad = np.flatnonzero(result[0] | result[1] | result[2])[:3]
            join = next(view.join_key for view in readable if name in view.features)
            examples.setdefault(name, []).extend(
                {"entity": keys[join][i], "time": times.iloc[i].isoformat(), "online": _plain(online[i]),
                 "offline": _plain(values[i])} for i in bad)
    features = []
    for name, parts in sorted(flags.items()):
        count = sum(len(p[0]) for p in parts)
        rates = [sum(int(p[k].sum()) for p in parts) / count if count else 0.0 for k in range(3)]
        crossed = count > 0 and sum(rates) > threshold
        features.append(FeatureSkew(name, count, *rates, threshold=threshold, crossed=crossed,
                                    examples=examples.get(name, [])[:3]))
    return SkewReport(rows=len(captured), compared=compared, not_yet_in_lake=late, features=features, skipped=skipped)


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, float)):
        return None if value != value else float(value)
    return None if value is None else str(value)
