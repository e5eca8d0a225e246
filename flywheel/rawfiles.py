"""Reading raw files: csv, parquet and jsonl bytes into tables of the use case's schema.

Every value is held to the schema the use case's contract gives (:meth:`flywheel.contract.Contract.
arrow_schema`): missing columns, values that do not cast and nulls in a column that may not be null
are refused with a :class:`~flywheel.errors.DataError` that names the file, the column and the first
bad value. Timestamps (Arrow timestamps or ISO-8601 text with ``Z``, an offset, or none for UTC)
become ``timestamp[us, UTC]``.
"""

from __future__ import annotations

import io
import json
from typing import IO, Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flywheel.errors import DataError, first_line

SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")
UTC_MICROS = pa.timestamp("us", tz="UTC")

# Arrow errors a cast or a parse can raise on bad data; anything else is a bug and should surface.
BAD_DATA = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError, TypeError, OverflowError)
# The expectations the schema stands for, named in messages like the suite's own.
COLUMNS_MATCH = "expect_table_columns_to_match_set"
OF_TYPE = "expect_column_values_to_be_of_type"
NOT_NULL = "expect_column_values_to_not_be_null"
ROW_COUNT = "expect_table_row_count_to_be_between"
READABLE = "expect_file_to_be_readable"  # not a GE expectation: the file itself could not be parsed
# A CSV/JSON block: about this many bytes are parsed at a time.
BLOCK_BYTES = 16 << 20


def read_table(uri: str, data: bytes, schema: pa.Schema) -> pa.Table:
    """A raw file's bytes as a ``schema`` table (extra columns dropped); DataError if it cannot be."""
    return conform(uri, parse(uri, data, schema), schema)


def parse(uri: str, data: bytes, schema: pa.Schema) -> pa.Table:
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
                column_types={f.name: pa.string() for f in schema},
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


def iter_tables(uri: str, stream: IO[bytes], chunk_rows: int, schema: pa.Schema) -> Iterator[pa.Table]:
    """A raw file's parsed (not yet conformed) rows, a chunk at a time, from a seekable binary stream:
    parquet by row batches, csv and jsonl by blocks, so a file of any size is never whole in memory.
    (A .json file holding one JSON array is the exception: it is parsed whole.) An unreadable file
    (truncated parquet, a broken csv quote, bad JSON), even if the fault is far into it, is a
    DataError naming the file."""
    kind = uri.rsplit(".", 1)[-1].lower()
    try:
        if kind == "parquet":
            reader = pq.ParquetFile(stream)
            for batch in reader.iter_batches(batch_size=chunk_rows):
                yield pa.Table.from_batches([batch])
            return
        if kind == "csv":
            import pyarrow.csv as pcsv

            convert = pcsv.ConvertOptions(
                column_types={f.name: pa.string() for f in schema}, strings_can_be_null=True
            )
            reader = pcsv.open_csv(stream, read_options=pcsv.ReadOptions(block_size=BLOCK_BYTES), convert_options=convert)
        else:
            head = stream.read(64)
            stream.seek(0)
            if head.lstrip()[:1] == b"[":
                yield parse(uri, stream.read(), schema)
                return
            import pyarrow.json as pjson

            reader = pjson.open_json(stream, read_options=pjson.ReadOptions(block_size=BLOCK_BYTES))
        for batch in reader:
            yield pa.Table.from_batches([batch])
    except (*BAD_DATA, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{uri} could not be read as {kind} ({READABLE}): {first_line(exc)}") from None


def check_columns(uri: str, column_names: list[str], schema: pa.Schema) -> None:
    """Refuse a table that lacks a column of ``schema`` (missing, or renamed)."""
    missing = [f.name for f in schema if f.name not in column_names]
    if missing:
        unexpected = [name for name in column_names if name not in schema.names]
        raise DataError(
            f"{uri} is missing required columns {missing} ({COLUMNS_MATCH}); it has {column_names}"
            f"{f' (unexpected: {unexpected}: renamed?)' if unexpected else ''}; "
            f"expected the columns of the use case's contract: {schema.names}"
        )


def _converter(target: pa.Field) -> Callable[[pa.ChunkedArray], pa.ChunkedArray]:
    return utc_timestamps if pa.types.is_timestamp(target.type) else _caster(target.type)


def conform_rows(table: pa.Table, limit: int, schema: pa.Schema) -> tuple[pa.Table, pa.Array, list[str]]:
    """Hold a parsed table to ``schema`` row by row: (the rows that conform, a boolean mask
    of the rows that do not, and each such row's reason). A value that does not cast or a null in a
    required column makes its row bad; the columns must be there (see :func:`check_columns`).
    Finding bad rows stops after ``limit`` of them (the batch is rejected past that anyway)."""
    n = table.num_rows
    bad = np.zeros(n, dtype=bool)
    reasons: dict[int, str] = {}
    columns = []
    for target in schema:
        values = table.column(target.name)
        convert = _converter(target)
        try:
            column = convert(values)
        except BAD_DATA:
            rows = _bad_rows(values, convert, limit)
            for row in rows:
                reasons.setdefault(row, f"{OF_TYPE}({target.name}): {values[row].as_py()!r} is not {target.type}")
            bad[rows] = True
            keep = np.ones(n, dtype=bool)
            keep[rows] = False
            column = _scatter(convert(values.filter(pa.array(keep))), keep, target.type)
        if not target.nullable:
            missing = column.is_null()
            if pa.types.is_floating(column.type):
                missing = pc.or_(missing, pc.fill_null(pc.is_nan(column), False))
            missing = np.asarray(missing.to_numpy(zero_copy_only=False), dtype=bool) & ~bad
            for row in np.flatnonzero(missing)[:limit]:
                reasons.setdefault(int(row), f"{NOT_NULL}({target.name}): null")
            bad |= missing
        columns.append(column)
    conformed = pa.Table.from_arrays(columns, schema=pa.schema([f.with_nullable(True) for f in schema]))
    good = conformed.filter(pa.array(~bad)).cast(schema)
    return good, pa.array(bad), [reasons.get(int(row), "") for row in np.flatnonzero(bad)]


def _scatter(values: pa.ChunkedArray, keep: np.ndarray, kind: pa.DataType) -> pa.ChunkedArray:
    """``values`` (one per kept row) back at their rows; null at the others."""
    positions = np.full(len(keep), -1, dtype=np.int64)
    positions[keep] = np.arange(int(keep.sum()))
    index = pa.array(positions, mask=~keep)
    return pa.chunked_array([values.combine_chunks().take(index)], type=kind)


def _bad_rows(values: pa.ChunkedArray, convert: Callable[[pa.ChunkedArray], Any], limit: int) -> list[int]:
    """Every row (up to ``limit``) whose value ``convert`` refuses: bisection over halves that fail."""
    found: list[int] = []
    pending = [(0, len(values))]
    while pending and len(found) < limit:
        lo, hi = pending.pop()
        try:
            convert(values.slice(lo, hi - lo))
            continue
        except BAD_DATA:
            pass
        if hi - lo == 1:
            found.append(lo)
            continue
        mid = (lo + hi) // 2
        pending += [(mid, hi), (lo, mid)]  # left half first
    return sorted(found)


def conform(uri: str, table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Hold a parsed table to ``schema``: extra columns dropped, values cast, nulls refused where the
    schema says a column may not be null."""
    check_columns(uri, table.column_names, schema)
    columns = []
    for target in schema:
        values = table.column(target.name)
        convert = _converter(target)
        try:
            column = convert(values)
        except BAD_DATA as exc:
            example = _first_bad_value(values, convert)
            raise DataError(
                f"{uri}: column {target.name!r} cannot be read as {target.type} ({OF_TYPE}): "
                f"bad value {example!r} ({first_line(exc)})"
            ) from None
        if not target.nullable:
            missing_count = column.null_count
            if pa.types.is_floating(column.type):
                missing_count += pc.sum(pc.is_nan(column)).as_py() or 0
            if missing_count:
                raise DataError(
                    f"{uri}: column {target.name!r} has {missing_count} null values of {len(column)} "
                    f"but may not be null ({NOT_NULL})"
                )
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


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


def utc_timestamps(values: pa.ChunkedArray) -> pa.ChunkedArray:
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
