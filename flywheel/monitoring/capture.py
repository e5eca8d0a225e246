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
from typing import Any, Iterable

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


# ---------------------------------------------------------------- writing (the predictor's side)
UTC_US = pa.timestamp("us", "UTC")
INPUT_KINDS = ("string", "number", "integer", "timestamp", "bool")


def input_array(values: Any, kind: str, empty_is_null: bool = False) -> pa.Array:
    """One ``input.<field>`` column from the predictor's validated values (numbers and booleans as
    float64 with NaN where absent, times as datetime64 with NaT, text as objects): typed as the
    layout says (float64, int64, timestamp[us, UTC], bool, string), absent values null.
    ``empty_is_null``: an empty text is an absent value (an optional field the request left out)."""
    import numpy as np

    if kind == "string":
        mask = np.equal(values, "") if empty_is_null else None
        return pa.array(values, type=pa.string(), mask=mask)
    if kind == "timestamp":
        return pa.array(np.asarray(values).astype("datetime64[us]"), from_pandas=True).cast(UTC_US)
    absent = np.isnan(values)
    if kind == "integer":
        return pa.array(np.where(absent, 0, values).astype(np.int64), mask=absent if absent.any() else None)
    if kind == "bool":
        return pa.array(np.asarray(values) != 0, mask=absent if absent.any() else None)
    if kind == "number":
        return pa.array(np.asarray(values, dtype=np.float64), mask=absent if absent.any() else None)
    raise ValueError(f"unknown input kind {kind!r}: one of {', '.join(INPUT_KINDS)}")


def capture_table(*, request_ids: Any, captured_at: Any, model_version: str, row_time: Any,
                  inputs: dict[str, pa.Array], features: dict[str, Any], known: dict[str, Any],
                  outputs: dict[str, Any]) -> pa.Table:
    """One part's rows in the capture's layout. ``captured_at`` and ``row_time``: datetime64 (UTC)
    arrays; ``inputs``: typed columns (:func:`input_array`); ``features``: float64 (NaN kept: the
    entity had no row) or text arrays; ``known``: bool arrays by join key; ``outputs``: float64
    arrays by output column name."""
    import numpy as np

    count = len(request_ids)
    columns: dict[str, Any] = {
        "request_id": pa.array(request_ids, type=pa.string()),
        "captured_at": pa.array(np.asarray(captured_at).astype("datetime64[us]")).cast(UTC_US),
        "model_version": pa.array(np.full(count, model_version, dtype=object), type=pa.string()),
        "row_time": pa.array(np.asarray(row_time).astype("datetime64[us]")).cast(UTC_US),
    }
    columns.update({INPUT + name: array for name, array in inputs.items()})
    for name, values in features.items():
        values = np.asarray(values)
        columns[FEATURE + name] = (pa.array(values, type=pa.float64()) if values.dtype.kind in "fiu"
                                   else pa.array(values, type=pa.string()))
    columns.update({KNOWN + key: pa.array(np.asarray(flags, dtype=bool)) for key, flags in known.items()})
    columns.update({OUTPUT + name: pa.array(np.asarray(values, dtype=np.float64)) for name, values in outputs.items()})
    return pa.table(columns)


def part_name(sequence: int) -> str:
    """A part's file name, unique across the processes writing at once: ``part-<ns>-<pid>-<seq>.parquet``."""
    import os
    import time

    return f"part-{time.time_ns()}-{os.getpid()}-{sequence}.parquet"


def write_parts(storage: Storage, table: pa.Table, first_sequence: int = 0) -> list[str]:
    """Write a table of captured rows as parts, one per hour of ``row_time`` (the partition a
    reader of that hour lists), each whole (the storage's atomic write). Returns their URIs."""
    import numpy as np

    if table.num_rows == 0:
        return []
    hours = table["row_time"].cast(pa.int64()).to_numpy() // 3_600_000_000
    uris = []
    for sequence, hour in enumerate(np.unique(hours), start=first_sequence):
        part = table if len(uris) == 0 and (hours == hour).all() else table.filter(pa.array(hours == hour))
        when = dt.datetime.fromtimestamp(int(hour) * 3600, dt.timezone.utc)
        uri = part_uri(storage, when, part_name(sequence))
        storage.write_parquet(uri, part)
        uris.append(uri)
    return uris
