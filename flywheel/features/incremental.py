"""Incremental feature computation: the offline tables are kept day by day, and a build computes
only the days whose inputs changed.

A day's feature rows (each view's rows stamped that UTC day, :mod:`flywheel.features.engine`) depend
on the lake's rows of that day and of the :func:`lookback_days` days before it (the longest window,
plus how long a label may take to become known), on the code that computes them, and on the use
case's files (its contract and feature declaration). Its content key is the hash of exactly that:
the code fingerprint of this module (which imports the engine), the use case's digest, and the
sha256s of the lake parts of every date in ``[day - lookback, day]``. A new day therefore computes
that day only; a part added to (or changed in) an earlier day invalidates that day and every day
whose lookback reaches it, and nothing else. A reused day is re-hashed against the sha256 recorded
when it was written.

The days run from the lake's first date to its last, gaps included (a label that becomes known on a
day without events is a row of that day), and no row is stamped after the last date: labels known
after the lake's present are not known yet.

The lake contract makes this exact: a ``date=YYYY-MM-DD`` partition holds the rows of that UTC day
(:mod:`flywheel.ingest` splits by the event time), and the windows only look back, so the rows of a
day computed from its lookback equal the same rows of a computation over the whole lake
(tests/unit/test_incremental_features.py compares the two frames exactly).

Layout::

    <root>/<use case>/features/offline/days/<day key[:16]>/<view>.parquet + manifest.json
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from flywheel import lineage
from flywheel.errors import ArtifactNotFound, DataError
from flywheel.features import engine
from flywheel.features.views import View, views_of
from flywheel.fingerprint import code_fingerprint
from flywheel.lake import LakeSnapshot, read_snapshot, source_snapshots
from flywheel.storage import Storage, sha256_bytes
from flywheel.usecase import UseCase

log = logging.getLogger(__name__)

@dataclass
class DayTables:
    """The offline tables of a snapshot (view name -> table), and which days this build computed."""

    tables: dict[str, pd.DataFrame]
    computed: list[str] = field(default_factory=list)  # days computed by this build
    reused: list[str] = field(default_factory=list)  # days read back from an earlier build


def lookback_days(usecase: UseCase) -> int:
    """Whole days of lake rows before a day that its feature rows read: the longest window, plus how
    long a label may take to become known for label aggregations (:func:`engine.lookback`), rounded up."""
    aggregations = [a for named in usecase.features.named().values() for _, a in named]
    reach = engine.lookback(aggregations, usecase.contract, usecase.contract.label_known.within)
    return math.ceil(reach / dt.timedelta(days=1))


def lake_days(snapshot: LakeSnapshot) -> tuple[list[str], dict[str, list[str]]]:
    """Every date from the snapshot's first to its last, gaps included, and each date's part sha256s."""
    by_date: dict[str, list[str]] = {}
    for part in snapshot.parts:
        date = part.get("date") or ""
        if not date:
            raise DataError(f"lake part {part.get('uri')} names no date=YYYY-MM-DD partition; re-run ingest into a fresh lake")
        by_date.setdefault(date, []).append(part["sha256"])
    if not by_date:
        return [], by_date
    first, last = dt.date.fromisoformat(min(by_date)), dt.date.fromisoformat(max(by_date))
    return [(first + dt.timedelta(days=i)).isoformat() for i in range((last - first).days + 1)], by_date


def source_rows(storage: Storage, snapshot: LakeSnapshot, usecase: UseCase, first: str = "", last: str = "") -> dict[str, pd.DataFrame]:
    """The rows of each further source the use case's features read, from the source snapshots that
    go with ``snapshot`` (only the partitions dated ``first`` to ``last``, 'YYYY-MM-DD', when given)."""
    needed = sorted({a.source for named in usecase.features.named().values() for _, a in named if a.source})
    snapshots = source_snapshots(snapshot)
    out = {}
    for name in needed:
        if name not in snapshots:
            raise DataError(f"lake snapshot {snapshot.uri} holds no rows of the contract's source {name!r} (it predates "
                            "the source): run ingest again with its files beside the main source's")
        schema = usecase.contract.sources[name].contract().arrow_schema()
        source = snapshots[name]
        if first or last:
            parts = [p for p in source.parts if (first or "") <= p.get("date", "") <= (last or "9999-12-31")]
            source = dataclasses.replace(source, parts=parts)
        out[name] = read_snapshot(storage, source, schema).to_pandas()
    return out


def _source_parts(snapshot: LakeSnapshot, usecase: UseCase) -> list[tuple[str, dict[str, Any]]]:
    """(source name, part) for every part of the further sources the features read."""
    needed = {a.source for named in usecase.features.named().values() for _, a in named if a.source}
    return [(name, part) for name, source in sorted(source_snapshots(snapshot).items()) if name in needed
            for part in source.parts]


def day_keys(snapshot: LakeSnapshot, usecase: UseCase) -> dict[str, str]:
    """Each day's content key: the feature code, the use case's files, and the parts of every date
    from ``lookback_days`` before it up to it, of the lake and of each further source read."""
    dates, by_date = lake_days(snapshot)
    sources = _source_parts(snapshot, usecase)
    code = code_fingerprint(__name__)  # this module, the engine and everything they import
    lookback = lookback_days(usecase)
    keys = {}
    for date in dates:
        first = (dt.date.fromisoformat(date) - dt.timedelta(days=lookback)).isoformat()
        inputs = [(other, sorted(shas)) for other, shas in sorted(by_date.items()) if first <= other <= date]
        further = sorted(f"{name}:{part['sha256']}" for name, part in sources if first <= part.get("date", "") <= date)
        material = [code, usecase.digest, inputs] + ([further] if further else [])
        keys[date] = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return keys


def day_uri(storage: Storage, key: str) -> str:
    return storage.uri("features", "offline", "days", key[:16])


def feature_tables(storage: Storage, rows: pd.DataFrame, snapshot: LakeSnapshot, usecase: UseCase, run_id: str,
                   sources: dict[str, pd.DataFrame] | None = None) -> DayTables:
    """The snapshot's offline tables, one per view of the use case (``rows`` are the snapshot's rows,
    ``sources`` its further sources' rows, :func:`source_rows`; read here when not given):
    days computed before with the same key are read back (verified), the others computed from their
    lookback and stored; the result equals :func:`engine.entity_table` over all of ``rows`` up to the
    end of the lake's last day."""
    views = views_of(usecase)
    keys = day_keys(snapshot, usecase)
    day_of_row = _dates(rows[usecase.contract.timestamp])
    unknown = sorted(set(np.unique(day_of_row)) - set(keys))
    if unknown:
        raise DataError(f"snapshot {snapshot.uri} holds rows of {unknown[:3]} but no partition of those dates")
    frames: dict[str, list[pd.DataFrame]] = {view.name: [] for view in views}
    missing: list[str] = []
    reused: list[str] = []
    for date, key in keys.items():
        tables = _read_day(storage, key, views)
        if tables is None:
            missing.append(date)
            continue
        reused.append(date)
        for name, table in tables.items():
            frames[name].append(table)
    if missing:
        if sources is None:  # only the partitions the missing days' windows reach: a source may be large
            first = (dt.date.fromisoformat(missing[0]) - dt.timedelta(days=lookback_days(usecase))).isoformat()
            sources = source_rows(storage, snapshot, usecase, first=first, last=missing[-1])
        for name, tables in _compute_days(storage, rows, day_of_row, snapshot, usecase, views, keys, missing, run_id,
                                          sources).items():
            frames[name].extend(tables)
    log.info("features: %d days computed, %d reused", len(missing), len(reused))
    assembled = {view.name: _assemble(frames[view.name], view) for view in views}
    return DayTables(tables=assembled, computed=missing, reused=reused)


def _dates(ts: pd.Series) -> np.ndarray:
    """Each timestamp's UTC date as 'YYYY-MM-DD' (formatted once per distinct day)."""
    days = pd.to_datetime(ts, utc=True).dt.floor("D")
    codes, uniques = pd.factorize(days)
    return np.array([day.strftime("%Y-%m-%d") for day in uniques], dtype=object)[codes] if len(uniques) else np.array([], dtype=object)


def _read_day(storage: Storage, key: str, views: list[View]) -> dict[str, pd.DataFrame] | None:
    """A stored day's tables, each re-hashed against its manifest; None if the day was never stored."""
    try:
        manifest = storage.read_json(f"{day_uri(storage, key)}/manifest.json")
    except ArtifactNotFound:
        return None
    if manifest.get("key") != key:
        raise DataError(f"{day_uri(storage, key)}/manifest.json describes day key {str(manifest.get('key'))[:16]}; delete it to rebuild")
    tables = {}
    for view in views:
        uri, sha = manifest["files"][view.name]
        data = storage.read_bytes(uri)
        if sha256_bytes(data) != sha:
            raise DataError(f"{uri} changed since it was written (sha256 mismatch); delete {day_uri(storage, key)} to rebuild")
        tables[view.name] = pq.read_table(io.BytesIO(data)).to_pandas()
    return tables


def _compute_days(
    storage: Storage,
    rows: pd.DataFrame,
    day_of_row: np.ndarray,
    snapshot: LakeSnapshot,
    usecase: UseCase,
    views: list[View],
    keys: dict[str, str],
    missing: list[str],
    run_id: str,
    sources: dict[str, pd.DataFrame],
) -> dict[str, list[pd.DataFrame]]:
    """Compute the missing days from the rows of their span and its lookback, and store each day."""
    lookback = lookback_days(usecase)
    first = (dt.date.fromisoformat(missing[0]) - dt.timedelta(days=lookback)).isoformat()
    span = rows[(day_of_row >= first) & (day_of_row <= missing[-1])]
    # A source row is known at its time plus the source's delay, within the lookback (engine.lookback).
    source_spans = {}
    for name, frame in sources.items():
        day = _dates(frame[usecase.contract.sources[name].timestamp])
        source_spans[name] = frame[(day >= first) & (day <= missing[-1])]
    since = pd.Timestamp(missing[0], tz="UTC")
    until = pd.Timestamp(missing[-1], tz="UTC") + pd.Timedelta(days=1)
    computed = {view.name: engine.entity_table(span, usecase.contract, view.entity, list(view.aggregations),
                                               since=since, until=until, sources=source_spans)
                for view in views}
    stamped = {name: _dates(table[engine.EVENT_TIMESTAMP]) for name, table in computed.items()}
    out: dict[str, list[pd.DataFrame]] = {view.name: [] for view in views}
    for date in missing:
        key = keys[date]
        window = (dt.date.fromisoformat(date) - dt.timedelta(days=lookback)).isoformat()
        inputs = [{"uri": p["uri"], "sha256": p["sha256"]} for p in snapshot.parts if window <= p["date"] <= date]
        inputs += [{"uri": p["uri"], "sha256": p["sha256"]} for _, p in _source_parts(snapshot, usecase)
                   if window <= p.get("date", "") <= date]
        files: dict[str, Any] = {}
        for view in views:
            table = computed[view.name][stamped[view.name] == date].reset_index(drop=True)
            ref = storage.write_parquet(f"{day_uri(storage, key)}/{view.name}.parquet", table)
            files[view.name] = [ref.uri, ref.sha256]
            out[view.name].append(table)
        # The manifest is the publication point (a day without one is computed again) and carries the
        # day's lineage: its tables' sha256s, and the lake parts they came from.
        manifest = storage.write_json(f"{day_uri(storage, key)}/manifest.json", {"key": key, "date": date, "files": files})
        lineage.record(storage, manifest, step="features", run_id=run_id, inputs=inputs, params={"day": date, "day_key": key})
    return out


def _assemble(days: list[pd.DataFrame], view: View) -> pd.DataFrame:
    """Days' rows as one table in the order a whole computation gives: by entity, then time."""
    table = pd.concat(days, ignore_index=True)
    return table.sort_values([view.join_key, engine.EVENT_TIMESTAMP], kind="stable").reset_index(drop=True)


__all__ = ["DayTables", "day_keys", "feature_tables", "lookback_days", "source_rows"]
