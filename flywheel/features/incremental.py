"""Incremental feature computation: the offline tables are kept day by day, and a build computes
only the days whose inputs changed.

A day's feature rows (card and merchant rows stamped that UTC day) depend on the lake's rows of that
day and of the :func:`flywheel.features.compute.lookback_days` days before it (the 30-day windows,
and the label delay before the fraud rate's window), on the code that computes them, and on the
settings that shape them (the label delay). Its content key is the hash of exactly that: the code
fingerprint of this module (which imports :mod:`flywheel.features.compute`), the label delay, and
the sha256s of the lake parts of every date in ``[day - lookback, day]``. A new day therefore
computes that day only; a part added to (or changed in) an earlier day invalidates that day and
every day whose lookback reaches it, and nothing else. A reused day is re-hashed against the sha256 recorded when it was written.

The lake contract makes this exact: a ``date=YYYY-MM-DD`` partition holds the transactions of that
UTC day (:mod:`flywheel.ingest` splits by ``ts``), and the windows only look back, so the rows of a
day computed from its lookback equal the same rows of a computation over the whole lake
(tests/unit/test_incremental_features.py compares the two frames exactly).

Layout::

    <root>/features/offline/days/<day key[:16]>/{card,merchant}_features.parquet + manifest.json
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from flywheel import lineage
from flywheel.errors import ArtifactNotFound, DataError
from flywheel.features import compute
from flywheel.fingerprint import code_fingerprint
from flywheel.lake import LakeSnapshot
from flywheel.storage import Storage, sha256_bytes

log = logging.getLogger(__name__)

TABLES = ("card", "merchant")
KEYS = {"card": "card_id", "merchant": "merchant_id"}


@dataclass
class DayTables:
    """The card and merchant offline tables of a whole snapshot, assembled from its days."""

    card: pd.DataFrame
    merchant: pd.DataFrame
    computed: list[str] = field(default_factory=list)  # days computed by this build
    reused: list[str] = field(default_factory=list)  # days read back from an earlier build


def day_keys(snapshot: LakeSnapshot, label_delay: dt.timedelta, *, usecase_digest: str) -> dict[str, str]:
    """Each lake date's content key: the feature code, the use case's files (``usecase_digest``,
    :attr:`flywheel.usecase.UseCase.digest`), the label delay, and the parts of every date from
    ``lookback_days`` before it up to it (dates in the snapshot only)."""
    by_date: dict[str, list[str]] = {}
    for part in snapshot.parts:
        date = part.get("date") or ""
        if not date:
            raise DataError(f"lake part {part.get('uri')} names no date=YYYY-MM-DD partition; re-run ingest into a fresh lake")
        by_date.setdefault(date, []).append(part["sha256"])
    code = code_fingerprint(__name__)  # this module, compute and everything they import
    lookback = compute.lookback_days(label_delay)
    dates = sorted(by_date)
    keys = {}
    for date in dates:
        first = (dt.date.fromisoformat(date) - dt.timedelta(days=lookback)).isoformat()
        inputs = [(other, sorted(by_date[other])) for other in dates if first <= other <= date]
        material = [code, usecase_digest, label_delay.total_seconds(), inputs]
        keys[date] = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return keys


def day_uri(storage: Storage, key: str) -> str:
    return storage.uri("features", "offline", "days", key[:16])


def feature_tables(
    storage: Storage, transactions: pd.DataFrame, snapshot: LakeSnapshot, label_delay: dt.timedelta, run_id: str,
    *, usecase_digest: str,
) -> DayTables:
    """The snapshot's card and merchant tables (``transactions`` are its rows): days computed
    before with the same key are read back (verified), the others computed from their lookback and
    stored; the result equals :func:`compute.card_feature_table` / :func:`compute.merchant_feature_table`
    over all of ``transactions``."""
    keys = day_keys(snapshot, label_delay, usecase_digest=usecase_digest)
    day_of_row = _dates(transactions["ts"])
    unknown = sorted(set(np.unique(day_of_row)) - set(keys))
    if unknown:
        raise DataError(f"snapshot {snapshot.uri} holds transactions of {unknown[:3]} but no partition of those dates")
    frames: dict[str, list[pd.DataFrame]] = {name: [] for name in TABLES}
    missing: list[str] = []
    reused: list[str] = []
    for date, key in keys.items():
        tables = _read_day(storage, key)
        if tables is None:
            missing.append(date)
            continue
        reused.append(date)
        for name in TABLES:
            frames[name].append(tables[name])
    if missing:
        for name, table in _compute_days(storage, transactions, day_of_row, snapshot, keys, missing, label_delay, run_id).items():
            frames[name].extend(table)
    log.info("features: %d days computed, %d reused", len(missing), len(reused))
    card, merchant = (_assemble(frames[name], KEYS[name]) for name in TABLES)
    return DayTables(card=card, merchant=merchant, computed=missing, reused=reused)


def _dates(ts: pd.Series) -> np.ndarray:
    """Each timestamp's UTC date as 'YYYY-MM-DD' (formatted once per distinct day)."""
    days = pd.to_datetime(ts, utc=True).dt.floor("D")
    codes, uniques = pd.factorize(days)
    return np.array([day.strftime("%Y-%m-%d") for day in uniques], dtype=object)[codes] if len(uniques) else np.array([], dtype=object)


def _read_day(storage: Storage, key: str) -> dict[str, pd.DataFrame] | None:
    """A stored day's tables, each re-hashed against its manifest; None if the day was never stored."""
    try:
        manifest = storage.read_json(f"{day_uri(storage, key)}/manifest.json")
    except ArtifactNotFound:
        return None
    if manifest.get("key") != key:
        raise DataError(f"{day_uri(storage, key)}/manifest.json describes day key {str(manifest.get('key'))[:16]}; delete it to rebuild")
    tables = {}
    for name in TABLES:
        uri, sha = manifest["files"][name]
        data = storage.read_bytes(uri)
        if sha256_bytes(data) != sha:
            raise DataError(f"{uri} changed since it was written (sha256 mismatch); delete {day_uri(storage, key)} to rebuild")
        tables[name] = pq.read_table(io.BytesIO(data)).to_pandas()
    return tables


def _compute_days(
    storage: Storage,
    transactions: pd.DataFrame,
    day_of_row: np.ndarray,
    snapshot: LakeSnapshot,
    keys: dict[str, str],
    missing: list[str],
    label_delay: dt.timedelta,
    run_id: str,
) -> dict[str, list[pd.DataFrame]]:
    """Compute the missing days from the rows of their span and its lookback, and store each day."""
    lookback = compute.lookback_days(label_delay)
    first = (dt.date.fromisoformat(missing[0]) - dt.timedelta(days=lookback)).isoformat()
    span = transactions[(day_of_row >= first) & (day_of_row <= missing[-1])]
    computed = {"card": compute.card_feature_table(span), "merchant": compute.merchant_feature_table(span, label_delay)}
    stamped = {name: _dates(table["event_timestamp"]) for name, table in computed.items()}
    out: dict[str, list[pd.DataFrame]] = {name: [] for name in TABLES}
    for date in missing:
        key = keys[date]
        window = (dt.date.fromisoformat(date) - dt.timedelta(days=lookback)).isoformat()
        inputs = [{"uri": p["uri"], "sha256": p["sha256"]} for p in snapshot.parts if window <= p["date"] <= date]
        files: dict[str, Any] = {}
        for name in TABLES:
            table = computed[name][stamped[name] == date].reset_index(drop=True)
            ref = storage.write_parquet(f"{day_uri(storage, key)}/{name}_features.parquet", table)
            files[name] = [ref.uri, ref.sha256]
            out[name].append(table)
        # The manifest is the publication point (a day without one is computed again) and carries the
        # day's lineage: its tables' sha256s, and the lake parts they came from.
        manifest = storage.write_json(f"{day_uri(storage, key)}/manifest.json", {"key": key, "date": date, "files": files})
        lineage.record(storage, manifest, step="features", run_id=run_id, inputs=inputs, params={"day": date, "day_key": key})
    return out


def _assemble(days: list[pd.DataFrame], key: str) -> pd.DataFrame:
    """Days' rows as one table in the order a whole computation gives: by entity, then time."""
    table = pd.concat(days, ignore_index=True)
    return table.sort_values([key, "event_timestamp"], kind="stable").reset_index(drop=True)


__all__ = ["DayTables", "day_keys", "feature_tables"]
