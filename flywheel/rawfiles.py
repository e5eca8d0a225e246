"""Reading raw transaction files: csv, parquet and jsonl bytes into TRANSACTION_SCHEMA tables.

Every value is held to :data:`flywheel.schema.TRANSACTION_SCHEMA`: missing columns, values that do
not cast and nulls are refused with a :class:`~flywheel.errors.DataError` that names the file, the
column and the first bad value. Timestamps (Arrow timestamps or ISO-8601 text with ``Z``, an offset,
or none for UTC) become ``timestamp[us, UTC]``.
"""

from __future__ import annotations

import io
import json
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flywheel.errors import DataError, first_line
from flywheel.schema import TIMESTAMP, TRANSACTION_SCHEMA

SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")
UTC_MICROS = pa.timestamp("us", tz="UTC")

# Arrow errors a cast or a parse can raise on bad data; anything else is a bug and should surface.
BAD_DATA = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError, TypeError, OverflowError)


def read_table(uri: str, data: bytes) -> pa.Table:
    """A raw file's bytes as a TRANSACTION_SCHEMA table (extra columns dropped); DataError if it cannot be."""
    return conform(uri, parse(uri, data))


def parse(uri: str, data: bytes) -> pa.Table:
    """Bytes to an Arrow table, by file suffix; an unreadable file is a DataError naming it."""
    kind = uri.rsplit(".", 1)[-1].lower()
    try:
        if kind == "parquet":
            return pq.read_table(io.BytesIO(data))
        if kind == "csv":
            import pyarrow.csv as pcsv

            # Read the schema's columns as text and cast them ourselves: type inference would turn
            # ids like "0042" into integers and gives worse messages on bad values.
            convert = pcsv.ConvertOptions(
                column_types={f.name: pa.string() for f in TRANSACTION_SCHEMA},
                strings_can_be_null=True,
            )
            return pcsv.read_csv(io.BytesIO(data), convert_options=convert)
        # .jsonl / .json: newline-delimited records, or one JSON array of records.
        if data.lstrip()[:1] == b"[":
            records = json.loads(data)
            if not all(isinstance(r, dict) for r in records):
                raise ValueError("a JSON array of objects was expected")
            return pa.Table.from_pylist(records)
        import pyarrow.json as pjson

        return pjson.read_json(io.BytesIO(data))
    except (*BAD_DATA, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{uri} could not be read as {kind}: {first_line(exc)}") from None


def conform(uri: str, table: pa.Table) -> pa.Table:
    """Hold a parsed table to TRANSACTION_SCHEMA: extra columns dropped, values cast, nulls refused."""
    missing = [f.name for f in TRANSACTION_SCHEMA if f.name not in table.column_names]
    if missing:
        raise DataError(
            f"{uri} is missing required columns {missing} (it has {table.column_names}); "
            f"expected the columns of TRANSACTION_SCHEMA: {TRANSACTION_SCHEMA.names}"
        )
    columns = []
    for target in TRANSACTION_SCHEMA:
        values = table.column(target.name)
        convert = _timestamp if target.name == TIMESTAMP else _caster(target.type)
        try:
            column = convert(values)
        except BAD_DATA as exc:
            example = _first_bad_value(values, convert)
            raise DataError(
                f"{uri}: column {target.name!r} cannot be read as {target.type}: "
                f"bad value {example!r} ({first_line(exc)})"
            ) from None
        if not target.nullable:
            missing_count = column.null_count
            if pa.types.is_floating(column.type):
                missing_count += pc.sum(pc.is_nan(column)).as_py() or 0
            if missing_count:
                raise DataError(
                    f"{uri}: column {target.name!r} has {missing_count} null values of {len(column)} "
                    "but may not be null"
                )
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=TRANSACTION_SCHEMA)


def _caster(target: pa.DataType) -> Callable[[pa.ChunkedArray], pa.ChunkedArray]:
    def cast(values: pa.ChunkedArray) -> pa.ChunkedArray:
        if pa.types.is_dictionary(values.type):
            values = values.cast(values.type.value_type)
        try:
            return values.cast(target)
        except BAD_DATA:
            # "1.0" in a csv integer column (pandas writes ints with nulls that way): via float,
            # which still refuses 1.5 (truncation) and 300 (int8 overflow).
            if pa.types.is_integer(target) and pa.types.is_string(values.type):
                return values.cast(pa.float64()).cast(target)
            raise

    return cast


def _timestamp(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """Timestamps or ISO-8601 strings (Z, offsets, or naive = UTC) to timestamp[us, UTC]."""
    kind = values.type
    if pa.types.is_dictionary(kind):
        values, kind = values.cast(kind.value_type), kind.value_type
    if pa.types.is_timestamp(kind):
        # Naive timestamps are UTC: Arrow stores UTC instants, so setting the zone only relabels them.
        # Sub-microsecond digits are dropped (the lake keeps microseconds).
        return values.cast(pa.timestamp("us", tz=kind.tz), safe=kind.unit != "ns").cast(UTC_MICROS)
    if pa.types.is_date(kind) or pa.types.is_null(kind):  # a null column fails the null check next
        return values.cast(pa.timestamp("us")).cast(UTC_MICROS)
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise TypeError(f"expected timestamps or ISO-8601 strings, got {kind}")
    # Normalise the text so one Arrow cast reads it all: naive values get "Z" (UTC), digits past
    # microseconds are dropped. (pandas.to_datetime(format="ISO8601", utc=True) is no help here: on
    # a mix of offset and naive strings it applies an earlier row's offset to the naive ones.)
    text = pc.utf8_trim_whitespace(values)
    text = pc.replace_substring_regex(text, pattern=r"(\.\d{6})\d+", replacement=r"\1")
    text = pc.replace_substring_regex(text, pattern=r"(\d)z$", replacement=r"\1Z")
    has_zone = pc.match_substring_regex(text, pattern=r"[T ]\d\d(:\d\d(:\d\d(\.\d*)?)?)?\s*(Z|[+-]\d\d(:?\d\d)?)$")
    date_only = pc.match_substring_regex(text, pattern=r"^\d{4}-\d\d-\d\d$")
    suffix = pc.if_else(has_zone, "", pc.if_else(date_only, "T00:00:00Z", "Z"))
    text = pc.binary_join_element_wise(text, suffix, "")
    try:
        return text.cast(UTC_MICROS)
    except pa.ArrowInvalid:
        raise ValueError("expected ISO-8601 timestamps, with Z, an offset, or none for UTC") from None


def _first_bad_value(values: pa.ChunkedArray, convert: Callable[[pa.ChunkedArray], Any]) -> Any:
    """The first value ``convert`` refuses, found by bisection (a handful of vectorized calls)."""
    lo, hi = 0, len(values)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            convert(values.slice(lo, mid - lo))
            lo = mid  # the left half converts: the culprit is on the right
        except BAD_DATA:
            hi = mid
    return values[lo].as_py() if len(values) else None
