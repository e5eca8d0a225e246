"""The request schema, and turning v1 and v2 bodies into validated transaction columns.

:data:`REQUEST_SCHEMA` is the one place that lists a transaction's fields, their types and their
ranges; both protocols are checked against it. Every client mistake is a
``kserve.errors.InvalidInput`` (HTTP 400) whose message names the field (and the instance) at
fault. What comes out is a :class:`Transactions`: one numpy array per field, in the layout
:meth:`flywheel.features.transform.FeatureSpec.transform_columns` reads. No pandas on this path.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson
from kserve.errors import InvalidInput

from flywheel.schema import REQUEST_FIELDS

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
# Card authorizations happen now-ish; anything outside these years is a client bug, not a transaction.
EARLIEST = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
LATEST = dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc)
MAX_STRING = 256  # characters in an id or a category


@dataclass(frozen=True)
class FieldSpec:
    """One field of a transaction as a client sends it."""

    name: str
    kind: Literal["string", "number", "timestamp"]
    required: bool
    low: float = -math.inf
    high: float = math.inf
    doc: str = ""


REQUEST_SCHEMA: tuple[FieldSpec, ...] = (
    FieldSpec("transaction_id", "string", False, doc="the client's id, echoed nowhere: for its own logs"),
    FieldSpec("card_id", "string", True, doc="the card; an unknown card is scored with cold-start defaults"),
    FieldSpec("merchant_id", "string", True, doc="the merchant; an unknown merchant likewise"),
    FieldSpec("merchant_category", "string", False, doc="one of flywheel.schema.MERCHANT_CATEGORIES; others count as <other>"),
    FieldSpec("amount", "number", True, 0.0, 1e9, doc="in the card's currency"),
    FieldSpec("ts", "timestamp", True, doc="ISO-8601 (naive means UTC), or seconds since the epoch; years 2000-2099"),
    FieldSpec("channel", "string", False, doc="one of flywheel.schema.CHANNELS"),
    FieldSpec("lat", "number", False, -90.0, 90.0, doc="where the card was used"),
    FieldSpec("lon", "number", False, -180.0, 180.0),
)
FIELDS = {spec.name: spec for spec in REQUEST_SCHEMA}
REQUIRED = [spec.name for spec in REQUEST_SCHEMA if spec.required]
assert sorted(FIELDS) == sorted(REQUEST_FIELDS), "the request schema must list exactly the transaction's fields"

# v2 datatypes each field accepts.
V2_DATATYPES = {
    "string": {"BYTES"},
    "number": {"FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"},
    "timestamp": {"BYTES", "FP64", "INT64"},
}


@dataclass(frozen=True)
class Transactions:
    """Validated transactions: ids as lists, everything else as arrays (``ts`` as datetime64[ns] UTC)."""

    count: int
    card_ids: list[str]
    merchant_ids: list[str]
    columns: dict[str, np.ndarray]


def join_transactions(parts: list[Transactions]) -> Transactions:
    """Several requests' transactions as one, in order (one scoring pass for all of them)."""
    if len(parts) == 1:
        return parts[0]
    return Transactions(
        sum(part.count for part in parts),
        [card for part in parts for card in part.card_ids],
        [merchant for part in parts for merchant in part.merchant_ids],
        {name: np.concatenate([part.columns[name] for part in parts]) for name in parts[0].columns},
    )


def _where(index: int | None, name: str) -> str:
    return f"field '{name}'" if index is None else f"instance {index}: field '{name}'"


def check_string(index: int | None, name: str, value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{_where(index, name)} is not UTF-8 text") from None
    if not isinstance(value, str):
        raise InvalidInput(f"{_where(index, name)} must be a string, got {_show(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800"), which JSON can spell but UTF-8 cannot
            raise InvalidInput(f"{_where(index, name)} is not UTF-8 text, got {_show(value)}") from None
    if FIELDS[name].required and not value.strip():
        raise InvalidInput(f"{_where(index, name)} must be a non-empty string, got {_show(value)}")
    if len(value) > MAX_STRING:
        raise InvalidInput(f"{_where(index, name)} must be at most {MAX_STRING} characters, got {len(value)}")
    return value


def check_number(index: int | None, name: str, value: Any) -> float:
    spec = FIELDS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidInput(f"{_where(index, name)} must be a number, got {_show(value)}")
    # A huge integer has no float; compare it as an integer first.
    if isinstance(value, (int, np.integer)) and not spec.low <= value <= spec.high:
        raise InvalidInput(f"{_where(index, name)} must be between {spec.low:g} and {spec.high:g}, got {_show(value)}")
    number = float(value)
    if not math.isfinite(number) or not spec.low <= number <= spec.high:
        raise InvalidInput(f"{_where(index, name)} must be a finite number between {spec.low:g} and {spec.high:g}, got {_show(value)}")
    return number


def check_timestamp(index: int | None, value: Any) -> int:
    """A transaction time as integer nanoseconds since the epoch (UTC)."""
    if isinstance(value, (bytes, bytearray)):
        value = check_string(index, "ts", value)
    if isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidInput(f"{_where(index, 'ts')} must be an ISO-8601 time such as '2026-11-01T12:00:00Z', got {_show(value)}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.timezone.utc)
        try:
            moment = moment.astimezone(dt.timezone.utc)
        except OverflowError:
            moment = EARLIEST - dt.timedelta(days=1)  # 0001-01-01T00:00+01:00 and kin: out of range below
    elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        seconds = float(value) if abs(value) < 1e12 else math.inf  # seconds since the epoch; huge ints have no float
        if not math.isfinite(seconds):
            raise InvalidInput(f"{_where(index, 'ts')} must be a time in years 2000-2099, got {_show(value)}")
        moment = EPOCH + dt.timedelta(microseconds=round(seconds * 1e6))
    else:
        raise InvalidInput(f"{_where(index, 'ts')} must be an ISO-8601 time string or seconds since the epoch, got {_show(value)}")
    if not EARLIEST <= moment < LATEST:
        raise InvalidInput(f"{_where(index, 'ts')} must be a time in years 2000-2099, got {_show(value)}")
    return (moment - EPOCH) // dt.timedelta(microseconds=1) * 1000


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _transactions(count: int, values: dict[str, list[Any]]) -> Transactions:
    """Columns of checked values (None where an optional field is absent) as a Transactions."""
    columns: dict[str, np.ndarray] = {"ts": np.array(values["ts"], dtype=np.int64).view("datetime64[ns]")}
    for spec in REQUEST_SCHEMA:
        if spec.kind == "number":
            column = values.get(spec.name)
            columns[spec.name] = (
                np.full(count, np.nan) if column is None else np.array([np.nan if v is None else v for v in column], dtype=np.float64)
            )
        elif spec.name in ("merchant_category", "channel"):
            column = values.get(spec.name)
            columns[spec.name] = np.array(["" if column is None or v is None else v for v in (column or [None] * count)], dtype=object)
    return Transactions(count, values["card_id"], values["merchant_id"], columns)


def _check_timestamp_field(index: int | None, name: str, value: Any) -> int:
    return check_timestamp(index, value)


# Each field's check, looked up once per field rather than dispatched on its kind for every value.
CHECKS = {spec.name: {"string": check_string, "number": check_number, "timestamp": _check_timestamp_field}[spec.kind]
          for spec in REQUEST_SCHEMA}
FIELD_NAMES = frozenset(FIELDS)


def _check(index: int | None, name: str, value: Any) -> Any:
    return CHECKS[name](index, name, value)


def _check_count(count: int, max_batch: int) -> None:
    if count < 1:
        raise InvalidInput("a request must carry at least one transaction")
    if count > max_batch:
        raise InvalidInput(f"at most {max_batch} transactions per request, got {count}")


def parse_json(body: bytes | bytearray | memoryview) -> Any:
    """A raw body as JSON (orjson: integers beyond 64 bits and non-finite numbers are refused)."""
    try:
        return orjson.loads(bytes(body))
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}") from None


def v1_transactions(body: Any, max_batch: int) -> Transactions:
    """The transactions of a v1 body: ``{"instances": [{...transaction...}, ...]}``."""
    if not isinstance(body, dict) or "instances" not in body:
        raise InvalidInput('a v1 request must be a JSON object {"instances": [{...transaction...}]}: field \'instances\' is missing')
    unknown_top = sorted(set(body) - {"instances", "id", "parameters"})
    if unknown_top:
        raise InvalidInput(f"unknown field(s) {', '.join(map(repr, unknown_top))} in the request: expected 'instances'")
    instances = body["instances"]
    if not isinstance(instances, list):
        raise InvalidInput(f"field 'instances' must be a non-empty list of transactions, got {type(instances).__name__}")
    _check_count(len(instances), max_batch)
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise InvalidInput(f"instance {index} must be an object with the transaction's fields, got {type(instance).__name__}")
        missing = [name for name in REQUIRED if instance.get(name) is None]
        if missing:
            raise InvalidInput(f"instance {index} is missing required field(s): {', '.join(missing)}")
        if not FIELD_NAMES.issuperset(instance):
            unknown = sorted(str(name) for name in instance if name not in FIELDS)
            raise InvalidInput(f"instance {index}: unknown field(s) {', '.join(map(repr, unknown))}; the fields are {', '.join(FIELDS)}")
    # Field by field (a column at a time: a batch of 1,000 is mostly ordinary values, taken at once).
    values = {spec.name: _checked_column(spec, [instance.get(spec.name) for instance in instances]) for spec in REQUEST_SCHEMA}
    return _transactions(len(instances), values)


def _checked_column(spec: FieldSpec, raw: list[Any]) -> list[Any]:
    """One field's values across the instances, checked (None where absent): plain in-range values
    are taken as they are; anything else goes through the field's full check, which raises."""
    check, name = CHECKS[spec.name], spec.name
    if spec.kind == "string":
        return [value if value is None or (type(value) is str and value.isascii() and len(value) <= MAX_STRING
                                           and (not spec.required or value.strip()))
                else check(index, name, value) for index, value in enumerate(raw)]
    if spec.kind == "number" and math.isfinite(spec.low) and math.isfinite(spec.high):
        low, high = spec.low, spec.high
        return [None if value is None else float(value) if type(value) in (float, int) and low <= value <= high
                else check(index, name, value) for index, value in enumerate(raw)]
    return [None if value is None else check(index, name, value) for index, value in enumerate(raw)]


def _flatten(name: str, data: Any, depth: int = 0) -> list[Any]:
    """A v2 tensor's data, row-major nested lists or flat, as a flat list of scalars."""
    if not isinstance(data, list):
        raise InvalidInput(f"input '{name}': 'data' must be a list, got {type(data).__name__}")
    if depth > 4:
        raise InvalidInput(f"input '{name}': 'data' is nested too deeply")
    if any(isinstance(item, list) for item in data):
        flat: list[Any] = []
        for item in data:
            flat.extend(_flatten(name, item, depth + 1) if isinstance(item, list) else [item])
        return flat
    return data


def v2_transactions(request: Any, max_batch: int) -> Transactions:
    """The transactions of a v2 InferRequest: one named input per field, each with one value per
    transaction; the shape must agree with the data and the datatype with the field."""
    inputs = list(request.inputs or [])
    if not inputs:
        raise InvalidInput("a v2 request needs inputs, one per transaction field (card_id, merchant_id, amount, ts, ...)")
    values: dict[str, list[Any]] = {}
    count: int | None = None
    for tensor in inputs:
        name = tensor.name
        if name not in FIELDS:
            raise InvalidInput(f"unknown input '{name}': expected inputs named {', '.join(FIELDS)}")
        if name in values:
            raise InvalidInput(f"input '{name}' is given twice")
        spec = FIELDS[name]
        datatype = str(tensor.datatype).upper()
        if datatype not in V2_DATATYPES[spec.kind]:
            raise InvalidInput(f"input '{name}' must have datatype {' or '.join(sorted(V2_DATATYPES[spec.kind]))}, got {tensor.datatype!r}")
        data = _flatten(name, tensor.data)
        shape = list(tensor.shape or [])
        if not shape or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape) or math.prod(shape) != len(data):
            raise InvalidInput(f"input '{name}': shape {shape} disagrees with its {len(data)} value(s)")
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            raise InvalidInput(f"input '{name}': shape must be [n] or [n, 1] (one value per transaction), got {shape}")
        if count is None:
            count = len(data)
            _check_count(count, max_batch)
        elif len(data) != count:
            raise InvalidInput(f"input '{name}' has {len(data)} value(s), but other inputs have {count}: one per transaction")
        checked = []
        for index, value in enumerate(data):
            if datatype == "BYTES" and not isinstance(value, (str, bytes, bytearray)):
                raise InvalidInput(f"instance {index}: field '{name}' is BYTES but holds {_show(value)}")
            if datatype.startswith(("INT", "UINT")) and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise InvalidInput(f"instance {index}: field '{name}' is {datatype} but holds {_show(value)}")
            if datatype.startswith("FP") and (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))):
                raise InvalidInput(f"instance {index}: field '{name}' is {datatype} but holds {_show(value)}")
            checked.append(_check(index, name, value))
        values[name] = checked
    missing = [name for name in REQUIRED if name not in values]
    if missing:
        raise InvalidInput(f"the request is missing required input(s): {', '.join(missing)}")
    return _transactions(count or 0, values)
