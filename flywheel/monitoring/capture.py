"""What the predictor captured: one row per scored row, as partitioned Parquet in storage.

Layout: ``<use case>/monitoring/capture/date=YYYY-MM-DD/hour=HH/part-<ns>-<pid>-<seq>.parquet``,
partitioned by the row's own time (the request's timestamp field when the contract has one, else the
time it was scored), so a window of event time reads only its partitions, whether the traffic was
live or a replay of history. A row holds:

- ``request_id`` (the request's ``x-request-id``), ``captured_at`` (UTC), ``model_version``,
  ``row_time`` (the partitioning time, UTC);
- ``input.<field>``: each field of the request schema the model was trained with, as the request
  carried it (after validation: absent optional values are null);
- ``feature.<name>``: each online feature the predictor read for it (NaN or "" when the entity had
  no row), and ``known.<join key>``: whether the online store knew the entity;
- ``output.<name>``: the model's answer under its task's output name (a multiclass task: one column
  ``output.<output>_<class>`` per class).

Files are written whole (the storage layer's atomic write): a reader never sees half of one.
"""

from __future__ import annotations

import datetime as dt
from typing import Iterable

import pyarrow as pa

from flywheel.storage import Storage

INPUT, FEATURE, KNOWN, OUTPUT = "input.", "feature.", "known.", "output."
META_COLUMNS = ("request_id", "captured_at", "model_version", "row_time")


def capture_root(storage: Storage) -> str:
    return storage.uri("monitoring", "capture")


def part_uri(storage: Storage, when: dt.datetime, name: str) -> str:
    """Where a part whose rows start at ``when`` (UTC) is written."""
    return storage.uri("monitoring", "capture", f"date={when:%Y-%m-%d}", f"hour={when:%H}", name)


def columns_with(table: pa.Table, prefix: str) -> list[str]:
    """The names after ``prefix`` of the table's columns that carry it (``feature.`` -> feature names)."""
    return [name[len(prefix):] for name in table.column_names if name.startswith(prefix)]


def _partition_hour(uri: str) -> dt.datetime | None:
    parts = dict(piece.split("=", 1) for piece in uri.split("/") if "=" in piece)
    try:
        return dt.datetime.strptime(f"{parts['date']} {parts.get('hour', '00')}", "%Y-%m-%d %H").replace(tzinfo=dt.timezone.utc)
    except (KeyError, ValueError):
        return None


def capture_parts(storage: Storage, since: dt.datetime | None = None, until: dt.datetime | None = None) -> list[str]:
    """The capture's parts whose hour overlaps [since, until), oldest first."""
    parts = []
    for uri in storage.iter_objects(capture_root(storage), (".parquet",)):
        hour = _partition_hour(uri)
        if hour is None:
            continue
        if since is not None and hour + dt.timedelta(hours=1) <= since:
            continue
        if until is not None and hour >= until:
            continue
        parts.append(uri)
    return sorted(parts)


def read_capture(storage: Storage, since: dt.datetime | None = None, until: dt.datetime | None = None,
                 columns: Iterable[str] | None = None) -> pa.Table:
    """The captured rows whose ``row_time`` is in [since, until), as one table (parts written by
    different model versions may differ in columns: missing ones are null)."""
    import pyarrow.compute as pc

    tables = []
    for uri in capture_parts(storage, since, until):
        table = storage.read_parquet(uri)
        if columns is not None:
            table = table.select([c for c in columns if c in table.column_names])
        tables.append(table)
    if not tables:
        return pa.table({})
    table = pa.concat_tables(tables, promote_options="permissive")
    if "row_time" in table.column_names and (since is not None or until is not None):
        keep = pc.is_valid(table["row_time"])
        if since is not None:
            keep = pc.and_(keep, pc.greater_equal(table["row_time"], pa.scalar(since, pa.timestamp("us", "UTC"))))
        if until is not None:
            keep = pc.and_(keep, pc.less(table["row_time"], pa.scalar(until, pa.timestamp("us", "UTC"))))
        table = table.filter(keep)
    return table
