"""Features as of each request's own time: the serving path for a replay of history.

A world's online store holds each entity's *latest* row: right for live traffic, wrong for a replay
of past requests (the local release's canary replays the candidate's held-out rows). Read against
the present, a flight from six weeks ago gets its aircraft's and airport's features of today: both
models of a canary are judged on inputs that neither was evaluated on, and for features about the
last hour they disagree for reasons that are not the models'.

So a replay reads features the way the training set was joined (:mod:`flywheel.aggregations`,
"Reading"): each request at time ``T`` gets, per view, its entity's latest row strictly before ``T``
(ties: the latest created), nothing when that row is older than the view's TTL at ``T``. The rows
are the offline engine's own (:func:`flywheel.features.engine.entity_table`), computed for the
replay's span from the lake with the declarations the model version recorded, so a replayed request
reads exactly the features its training-set row holds. :class:`PointInTimeReader` answers
:meth:`OnlineReader.read <flywheel.features.store.OnlineReader.read>`'s call from those rows held in
memory; everything else in serving (the request, the transform, the model, the metrics) is the
served path itself. ``serving.replay_features`` names the folder of tables a server reads this way
(written by :func:`write_replay_tables`); empty: the online store, as always.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from flywheel import lake as lakes
from flywheel.contract import parse_contract
from flywheel.errors import DataError
from flywheel.features.engine import CREATED_TIMESTAMP, EVENT_TIMESTAMP, entity_table, lookback
from flywheel.features.views import View, views_of_model
from flywheel.fingerprint import code_fingerprint
from flywheel.storage import Storage

log = logging.getLogger(__name__)

_US = pd.Timedelta(microseconds=1)
_JOIN_OFFSET_US = 1  # strictly before T: as of T minus a microsecond, as the training join reads
MANIFEST = "manifest.json"


class PointInTimeReader:
    """Each row's features as of just before its own time, from a view's offline rows held in memory
    (``tables``: view name -> the engine's table: join key, ``event_timestamp``, ``created_timestamp``,
    the features). Same call and answer as :meth:`OnlineReader.read`: (feature name -> array, NaN or
    "" where there is no row; join key -> whether the entity had a row within the TTL)."""

    def __init__(self, views: Sequence[View], tables: Mapping[str, pd.DataFrame]) -> None:
        self.project = "point-in-time replay"
        self._views = []
        for view in views:
            if view.name not in tables:
                raise DataError(f"the replay's feature tables have no table for view {view.name}")
            table = tables[view.name].sort_values([view.join_key, EVENT_TIMESTAMP, CREATED_TIMESTAMP], kind="stable")
            keys = table[view.join_key].to_numpy(dtype=object)
            starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
            stops = np.r_[starts[1:], len(keys)] if len(keys) else starts
            spans = {keys[start]: (int(start), int(stop)) for start, stop in zip(starts, stops)}
            times = table[EVENT_TIMESTAMP].astype("datetime64[us, UTC]").array.asi8 if len(table) else np.zeros(0, np.int64)
            columns = {name: (table[name].to_numpy(dtype=object) if kind == "String"
                              else table[name].to_numpy(dtype=np.float64, na_value=np.nan))
                       for name, kind in view.features.items()}
            ttl = int(view.ttl / dt.timedelta(microseconds=1))
            self._views.append((view, spans, times, columns, ttl))
        self.join_keys = list(dict.fromkeys(view.join_key for view in views))

    def read(self, keys: Mapping[str, Sequence[str | None]], at: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        features: dict[str, np.ndarray] = {}
        known: dict[str, np.ndarray] = {}
        for view, spans, times, columns, ttl in self._views:
            ids = keys[view.join_key]
            count = len(ids)
            moments = _moments(at, count)
            picked = np.full(count, -1, dtype=np.int64)
            for row, entity in enumerate(ids):
                span = spans.get(entity) if entity is not None else None
                if span is None:
                    continue
                start, stop = span
                if moments[row] is None:  # no time: the entity's latest row, as the online store holds it
                    picked[row] = stop - 1
                    continue
                as_of = moments[row] - _JOIN_OFFSET_US
                position = start + int(np.searchsorted(times[start:stop], as_of, side="right")) - 1
                if position >= start and not (ttl and as_of - times[position] > ttl):
                    picked[row] = position
            found = picked >= 0
            known[view.join_key] = known[view.join_key] | found if view.join_key in known else found
            for name, kind in view.features.items():
                values = columns[name]
                if kind == "String":
                    out = np.full(count, "", dtype=object)
                    out[found] = [("" if value is None or value != value else value) for value in values[picked[found]]]
                else:
                    out = np.full(count, np.nan)
                    out[found] = values[picked[found]]
                features[name] = out
        return features, known


def _moments(at: np.ndarray | None, count: int) -> list[int | None]:
    """Each row's time in microseconds since the epoch (None: no time given)."""
    if at is None:
        return [None] * count
    times = np.asarray(at)
    if times.dtype.kind != "M":
        times = pd.to_datetime(pd.Series(times), utc=True).to_numpy(dtype="datetime64[us]")
    micros = times.astype("datetime64[us]").astype(np.int64)
    return [None if np.isnat(value) else int(micro) for value, micro in zip(times, micros)]


# ----------------------------------------------------------------------------- the replay's tables
def replay_tables(storage: Storage, meta: dict[str, Any], lake_uri: str, start: pd.Timestamp, end: pd.Timestamp,
                  sources_of: Any) -> dict[str, pd.DataFrame]:
    """The feature tables a model version (``meta``: its recorded contract, views and aggregation
    code) reads for requests in ``[start, end]``: each view's rows from the newest snapshot of
    ``lake_uri``, computed by the engine with the version's own declarations, from the first instant
    a request at ``start`` may read (its TTL before) to ``end``. ``sources_of(snapshot, first_day)``:
    the further sources' rows from that day on. Raises :class:`DataError` when it cannot be done
    exactly (no recorded declarations, or aggregation code other than the one the version was trained with)."""
    views = views_of_model(meta)
    if not meta.get("contract") or not views or not all(view.aggregations for view in views):
        raise DataError("the version recorded no feature aggregations (trained before they were recorded)")
    engine = code_fingerprint("flywheel.features.engine")
    if meta.get("engine_code") and meta["engine_code"] != engine:
        raise DataError(f"the version was trained with other aggregation code ({meta['engine_code'][:12]}, here "
                        f"{engine[:12]}): its features cannot be recomputed exactly")
    contract = parse_contract(meta["contract"], "the model's recorded contract")
    snapshot = lakes.latest_snapshot(storage, lake_uri)
    if snapshot is None or not snapshot.parts:
        raise DataError(f"the lake {lake_uri} has no published snapshot")
    longest_ttl = max((pd.Timedelta(view.ttl) for view in views), default=pd.Timedelta(0))
    reach = max(pd.Timedelta(lookback([a for _, a in view.aggregations], contract, contract.label_known.within))
                for view in views)
    since = pd.Timestamp(start) - longest_ttl - 2 * _US
    first_day = (since - reach).strftime("%Y-%m-%d")
    last_day = pd.Timestamp(end).strftime("%Y-%m-%d")
    parts = [part for part in snapshot.parts if first_day <= part.get("date", "") <= last_day]
    rows = lakes.read_snapshot(storage, dataclasses.replace(snapshot, parts=parts), contract.arrow_schema()).to_pandas()
    sources = sources_of(snapshot, first_day) if contract.sources else {}
    return {view.name: entity_table(rows, contract, view.entity, list(view.aggregations), since=since,
                                    until=pd.Timestamp(end) + _US, sources=sources)
            for view in views}


def write_replay_tables(storage: Storage, folder: str, tables: Mapping[str, pd.DataFrame], version: str) -> str:
    """Write a version's replay tables under ``folder`` (what ``serving.replay_features`` names)."""
    for name, table in tables.items():
        storage.write_parquet(f"{folder}/{name}.parquet", table)
    storage.write_json(f"{folder}/{MANIFEST}", {"version": version, "views": sorted(tables),
                                                "rows": {name: len(table) for name, table in tables.items()}})
    return folder


def open_replay_reader(storage: Storage, folder: str, views: Sequence[View], version: str) -> PointInTimeReader:
    """The reader of the replay tables written for ``version`` under ``folder``."""
    manifest_uri = f"{folder}/{MANIFEST}"
    if not storage.exists(manifest_uri):
        raise DataError(f"serving.replay_features names {folder}, which holds no replay tables ({MANIFEST} is missing)")
    manifest = storage.read_json(manifest_uri)
    if manifest.get("version") != version:
        raise DataError(f"the replay tables in {folder} are model version {manifest.get('version')}'s, not {version}'s")
    tables = {view.name: storage.read_parquet(f"{folder}/{view.name}.parquet").to_pandas() for view in views}
    return PointInTimeReader(views, tables)


__all__ = ["PointInTimeReader", "open_replay_reader", "replay_tables", "write_replay_tables"]
