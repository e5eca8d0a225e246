"""The request schema, derived from the use case's contract, and turning v1 and v2 bodies into
validated row columns.

:class:`RequestSchema` lists what a scoring request carries: the contract's columns minus the labels
and the time they become known (:meth:`flywheel.contract.Contract.request_fields`), each with its
type, whether it is required, and its bounds (the lake's own: serving never accepts a value the lake
would refuse, nor refuses one it accepts). Both protocols are checked against it. Every client
mistake is a ``kserve.errors.InvalidInput`` (HTTP 400) whose message names the field (and the
instance) at fault. What comes out is :class:`Rows`: one numpy array per field, in the layout
:meth:`flywheel.features.transform.FeatureSpec.transform_columns` reads, and each entity's join keys
as text (as the feature store holds them). No pandas on this path.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson
from kserve.errors import InvalidInput

from flywheel.contract import NUMERIC, Contract

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
# Scoring happens in this century; a time outside these years is a client bug, not an event.
EARLIEST = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
LATEST = dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc)
EARLIEST_S, LATEST_S = EARLIEST.timestamp(), LATEST.timestamp()
MAX_STRING = 256  # characters in an id or a category
INTEGER = {"int8", "int16", "int32", "int64"}


@dataclass(frozen=True)
class FieldSpec:
    """One field of a row as a client sends it."""

    name: str
    kind: Literal["string", "number", "timestamp", "bool"]
    required: bool
    low: float = -math.inf
    high: float = math.inf
    strict_low: bool = False  # the bound ``low`` itself is outside
    integer: bool = False  # a whole number (a join key's text is its digits)
    key: bool = False  # an entity's join key: read from the online store
    doc: str = ""


# v2 datatypes each field accepts.
V2_DATATYPES = {
    "string": {"BYTES"},
    "number": {"FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"},
    "timestamp": {"BYTES", "FP64", "INT64"},
    "bool": {"BOOL"},
}


def input_datatype(spec: FieldSpec) -> str:
    """The v2 datatype a field's values have in JSON (its model metadata): text and times BYTES,
    whole numbers INT64, other numbers FP64, booleans BOOL."""
    if spec.kind in ("string", "timestamp"):
        return "BYTES"
    if spec.kind == "bool":
        return "BOOL"
    return "INT64" if spec.integer else "FP64"


@dataclass(frozen=True)
class Rows:
    """Validated rows: numbers as float64 (NaN where absent), times as datetime64[ns] UTC (NaT where
    absent), text as objects ("" where absent); ``keys``: each join key's entity ids as text (None
    where absent), in the order of the rows."""

    count: int
    keys: dict[str, list[str | None]]
    columns: dict[str, np.ndarray]


def join_rows(parts: list[Rows]) -> Rows:
    """Several requests' rows as one, in order (one scoring pass for all of them)."""
    if len(parts) == 1:
        return parts[0]
    return Rows(
        sum(part.count for part in parts),
        {key: [entity for part in parts for entity in part.keys[key]] for key in parts[0].keys},
        {name: np.concatenate([part.columns[name] for part in parts]) for name in parts[0].columns},
    )


def field_specs(contract: Contract) -> tuple[FieldSpec, ...]:
    """The request's fields from the contract: its request fields, typed and bounded as the lake is."""
    keys = set(contract.entities.values())
    specs = []
    for name, required in contract.request_fields().items():
        column = contract.columns[name]
        if column.type == "timestamp":
            kind = "timestamp"
        elif column.type == "bool":
            kind = "bool"
        elif column.type in NUMERIC:
            kind = "number"
        else:
            kind = "string"
        specs.append(FieldSpec(
            name, kind, required,
            low=column.min if column.min is not None else -math.inf,
            high=column.max if column.max is not None else math.inf,
            strict_low=column.strict_min, integer=column.type in INTEGER, key=name in keys, doc=column.doc,
        ))
    return tuple(specs)


def _where(index: int | None, name: str) -> str:
    return f"field '{name}'" if index is None else f"instance {index}: field '{name}'"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_json(body: bytes | bytearray | memoryview) -> Any:
    """A raw body as JSON (orjson: integers beyond 64 bits and non-finite numbers are refused)."""
    try:
        return orjson.loads(bytes(body))
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}") from None


def check_timestamp(index: int | None, value: Any, name: str) -> int:
    """A time as integer nanoseconds since the epoch (UTC): ISO-8601 (naive means UTC) or seconds
    since the epoch, in years 2000-2099."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{_where(index, name)} is not UTF-8 text") from None
    if isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidInput(f"{_where(index, name)} must be an ISO-8601 time such as '2026-11-01T12:00:00Z', got {_show(value)}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.timezone.utc)
        try:
            moment = moment.astimezone(dt.timezone.utc)
        except OverflowError:
            moment = EARLIEST - dt.timedelta(days=1)  # 0001-01-01T00:00+01:00 and kin: out of range below
    elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        seconds = float(value) if abs(value) < 1e12 else math.inf  # seconds since the epoch; huge ints have no float
        if not math.isfinite(seconds):
            raise InvalidInput(f"{_where(index, name)} must be a time in years 2000-2099, got {_show(value)}")
        moment = EPOCH + dt.timedelta(microseconds=round(seconds * 1e6))
    else:
        raise InvalidInput(f"{_where(index, name)} must be an ISO-8601 time string or seconds since the epoch, got {_show(value)}")
    if not EARLIEST <= moment < LATEST:
        raise InvalidInput(f"{_where(index, name)} must be a time in years 2000-2099, got {_show(value)}")
    return (moment - EPOCH) // dt.timedelta(microseconds=1) * 1000


class RequestSchema:
    """The fields a scoring request carries (:func:`field_specs`) and how a v1 or v2 body becomes
    validated :class:`Rows`; built once per served model, from the contract it was trained with."""

    def __init__(self, contract: Contract) -> None:
        self.contract = contract
        self.fields = field_specs(contract)
        self.by_name = {spec.name: spec for spec in self.fields}
        self.names = frozenset(self.by_name)
        self.required = [spec.name for spec in self.fields if spec.required]
        self.keys = list(dict.fromkeys(contract.entities.values()))  # join keys, each once
        self.time = contract.timestamp
        # Each field's check, looked up once per field rather than dispatched on its kind for every value.
        self.checks = {spec.name: {"string": self.check_string, "number": self.check_number,
                                   "timestamp": self._check_time, "bool": self.check_bool}[spec.kind]
                       for spec in self.fields}

    # ------------------------------------------------------------------ one value
    def check_string(self, index: int | None, name: str, value: Any) -> str:
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
        if self.by_name[name].required and not value.strip():
            raise InvalidInput(f"{_where(index, name)} must be a non-empty string, got {_show(value)}")
        if len(value) > MAX_STRING:
            raise InvalidInput(f"{_where(index, name)} must be at most {MAX_STRING} characters, got {len(value)}")
        return value

    def check_number(self, index: int | None, name: str, value: Any) -> float:
        spec = self.by_name[name]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise InvalidInput(f"{_where(index, name)} must be a number, got {_show(value)}")
        above = "above" if spec.strict_low else "at least"
        # A huge integer has no float; compare it as an integer first.
        if isinstance(value, (int, np.integer)) and not (
                (spec.low < value if spec.strict_low else spec.low <= value) and value <= spec.high):
            raise InvalidInput(f"{_where(index, name)} must be {above} {spec.low:g} and at most {spec.high:g}, got {_show(value)}")
        number = float(value)
        inside = (spec.low < number if spec.strict_low else spec.low <= number) and number <= spec.high
        if not math.isfinite(number) or not inside:
            raise InvalidInput(f"{_where(index, name)} must be a finite number {above} {spec.low:g} and at most {spec.high:g}, got {_show(value)}")
        if spec.integer and number != int(number):
            raise InvalidInput(f"{_where(index, name)} must be a whole number, got {_show(value)}")
        return number

    def check_bool(self, index: int | None, name: str, value: Any) -> float:
        if isinstance(value, (bool, np.bool_)):
            return float(value)
        raise InvalidInput(f"{_where(index, name)} must be true or false, got {_show(value)}")

    def _check_time(self, index: int | None, name: str, value: Any) -> int:
        return check_timestamp(index, value, name)

    def check(self, index: int | None, name: str, value: Any) -> Any:
        return self.checks[name](index, name, value)

    # ------------------------------------------------------------------ whole requests
    def _check_count(self, count: int, max_batch: int) -> None:
        if count < 1:
            raise InvalidInput("a request must carry at least one row")
        if count > max_batch:
            raise InvalidInput(f"at most {max_batch} rows per request, got {count}")

    def _rows(self, count: int, values: dict[str, list[Any]]) -> Rows:
        """Columns of checked values (None where an optional field is absent) as Rows."""
        columns: dict[str, np.ndarray] = {}
        keys: dict[str, list[str | None]] = {}
        for spec in self.fields:
            column = values.get(spec.name)
            if isinstance(column, np.ndarray):  # checked binary values: none absent
                columns[spec.name] = column.view("datetime64[ns]") if spec.kind == "timestamp" else column
            elif spec.kind in ("number", "bool"):
                columns[spec.name] = (np.full(count, np.nan) if column is None
                                      else np.array([np.nan if v is None else v for v in column], dtype=np.float64))
            elif spec.kind == "timestamp":
                columns[spec.name] = (np.full(count, np.iinfo(np.int64).min, dtype=np.int64) if column is None else np.array(
                    [np.iinfo(np.int64).min if v is None else v for v in column], dtype=np.int64)).view("datetime64[ns]")
            else:
                columns[spec.name] = np.array(["" if column is None or v is None else v for v in (column or [None] * count)], dtype=object)
            if spec.key:
                if column is None:
                    keys[spec.name] = [None] * count
                elif spec.kind == "number":  # an integer key's text is its digits, as the feature store holds it
                    keys[spec.name] = [None if v is None else str(int(v)) for v in (column.tolist() if isinstance(column, np.ndarray) else column)]
                else:
                    keys[spec.name] = column
        return Rows(count, keys, columns)

    def v1(self, body: Any, max_batch: int) -> Rows:
        """The rows of a v1 body: ``{"instances": [{...row...}, ...]}``."""
        if not isinstance(body, dict) or "instances" not in body:
            raise InvalidInput('a v1 request must be a JSON object {"instances": [{...row...}]}: field \'instances\' is missing')
        unknown_top = sorted(set(body) - {"instances", "id", "parameters"})
        if unknown_top:
            raise InvalidInput(f"unknown field(s) {', '.join(map(repr, unknown_top))} in the request: expected 'instances'")
        instances = body["instances"]
        if not isinstance(instances, list):
            raise InvalidInput(f"field 'instances' must be a non-empty list of rows, got {type(instances).__name__}")
        self._check_count(len(instances), max_batch)
        names = self.names
        for index, instance in enumerate(instances):
            if not isinstance(instance, dict):
                raise InvalidInput(f"instance {index} must be an object with the row's fields, got {type(instance).__name__}")
            missing = [name for name in self.required if instance.get(name) is None]
            if missing:
                raise InvalidInput(f"instance {index} is missing required field(s): {', '.join(missing)}")
            if not names.issuperset(instance):
                unknown = sorted(str(name) for name in instance if name not in names)
                raise InvalidInput(f"instance {index}: unknown field(s) {', '.join(map(repr, unknown))}; "
                                   f"the fields are {', '.join(self.by_name)}")
        # Field by field (a column at a time: a batch of 1,000 is mostly ordinary values, taken at once).
        values = {spec.name: self._checked_column(spec, [instance.get(spec.name) for instance in instances]) for spec in self.fields}
        return self._rows(len(instances), values)

    def _checked_column(self, spec: FieldSpec, raw: list[Any]) -> list[Any]:
        """One field's values across the instances, checked (None where absent): plain in-range values
        are taken as they are; anything else goes through the field's full check, which raises."""
        check, name = self.checks[spec.name], spec.name
        if spec.kind == "string":
            return [value if value is None or (type(value) is str and value.isascii() and len(value) <= MAX_STRING
                                               and (not spec.required or value.strip()))
                    else check(index, name, value) for index, value in enumerate(raw)]
        if spec.kind == "number" and math.isfinite(spec.low) and math.isfinite(spec.high) and not spec.integer:
            low, high = spec.low, spec.high
            if spec.strict_low:
                return [None if value is None else float(value) if type(value) in (float, int) and low < value <= high
                        else check(index, name, value) for index, value in enumerate(raw)]
            return [None if value is None else float(value) if type(value) in (float, int) and low <= value <= high
                    else check(index, name, value) for index, value in enumerate(raw)]
        return [None if value is None else check(index, name, value) for index, value in enumerate(raw)]

    def v2(self, request: Any, max_batch: int) -> Rows:
        """The rows of a v2 InferRequest: one named input per field, each with one value per row; the
        shape must agree with the data and the datatype with the field."""
        inputs = list(request.inputs or [])
        if not inputs:
            raise InvalidInput(f"a v2 request needs inputs, one per field ({', '.join(self.required)}, ...)")
        values: dict[str, list[Any]] = {}
        count: int | None = None
        for tensor in inputs:
            name = tensor.name
            if name not in self.by_name:
                raise InvalidInput(f"unknown input '{name}': expected inputs named {', '.join(self.by_name)}")
            if name in values:
                raise InvalidInput(f"input '{name}' is given twice")
            spec = self.by_name[name]
            datatype = str(tensor.datatype).upper()
            if datatype not in V2_DATATYPES[spec.kind]:
                raise InvalidInput(f"input '{name}' must have datatype {' or '.join(sorted(V2_DATATYPES[spec.kind]))}, got {tensor.datatype!r}")
            data = tensor.data
            if isinstance(data, np.ndarray):  # binary data (REST's extension, gRPC's raw contents): checked column-wise
                data = data.reshape(-1)
            else:
                data = _flatten(name, data)
            shape = list(tensor.shape or [])
            if not shape or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape) or math.prod(shape) != len(data):
                raise InvalidInput(f"input '{name}': shape {shape} disagrees with its {len(data)} value(s)")
            if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
                raise InvalidInput(f"input '{name}': shape must be [n] or [n, 1] (one value per row), got {shape}")
            if count is None:
                count = len(data)
                self._check_count(count, max_batch)
            elif len(data) != count:
                raise InvalidInput(f"input '{name}' has {len(data)} value(s), but other inputs have {count}: one per row")
            if isinstance(data, np.ndarray):
                values[name] = self._checked_array(spec, datatype, data)
                continue
            checked = []
            for index, value in enumerate(data):
                if datatype == "BYTES" and not isinstance(value, (str, bytes, bytearray)):
                    raise InvalidInput(f"instance {index}: field '{name}' is BYTES but holds {_show(value)}")
                if datatype.startswith(("INT", "UINT")) and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                    raise InvalidInput(f"instance {index}: field '{name}' is {datatype} but holds {_show(value)}")
                if datatype.startswith("FP") and (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))):
                    raise InvalidInput(f"instance {index}: field '{name}' is {datatype} but holds {_show(value)}")
                checked.append(self.check(index, name, value))
            values[name] = checked
        missing = [name for name in self.required if name not in values]
        if missing:
            raise InvalidInput(f"the request is missing required input(s): {', '.join(missing)}")
        return self._rows(count or 0, values)

    def _checked_array(self, spec: FieldSpec, datatype: str, data: np.ndarray) -> Any:
        """One input's binary values, checked as :meth:`check` checks each (numbers and times at once;
        the first value out of bounds goes through the one-value check, which names it): numbers and
        booleans as float64, times as integer nanoseconds, text as a list of str."""
        name = spec.name
        if spec.kind == "string" or (spec.kind == "timestamp" and datatype == "BYTES"):
            values = data.tolist()
            try:  # UTF-8 text, as JSON's strings are; v1's column checks then take the ordinary ones at once
                values = [value.decode() if type(value) is bytes else value for value in values]
            except UnicodeDecodeError:
                pass  # the field's own check names the first that is not
            return self._checked_column(spec, values)
        if spec.kind == "bool":
            return data.astype(np.float64)
        numbers = data.astype(np.float64)
        if spec.kind == "timestamp":  # seconds since the epoch
            with np.errstate(invalid="ignore"):
                bad = ~(np.isfinite(numbers) & (numbers >= EARLIEST_S) & (numbers < LATEST_S))
            if bad.any():
                index = int(np.argmax(bad))
                check_timestamp(index, data[index].item(), name)
                raise InvalidInput(f"{_where(index, name)} must be a time in years 2000-2099, got {_show(data[index].item())}")
            return np.round(numbers * 1e6).astype(np.int64) * 1000
        with np.errstate(invalid="ignore"):
            inside = np.isfinite(numbers) & ((numbers > spec.low) if spec.strict_low else (numbers >= spec.low)) & (numbers <= spec.high)
            if spec.integer:
                inside &= numbers == np.floor(numbers)
        if not inside.all():
            index = int(np.argmin(inside))
            self.check_number(index, name, data[index].item())
            raise InvalidInput(f"{_where(index, name)} must be within its bounds, got {_show(data[index].item())}")
        return numbers

    def example(self) -> dict[str, Any]:
        """One valid v1 instance of the required fields (the warm-up request): text "warm-up", each
        number at a value its bounds allow, each time at 2026-01-01 noon UTC."""
        instance: dict[str, Any] = {}
        for spec in self.fields:
            if not spec.required:
                continue
            if spec.kind == "string":
                instance[spec.name] = "warm-up"
            elif spec.kind == "timestamp":
                instance[spec.name] = "2026-01-01T12:00:00Z"
            elif spec.kind == "bool":
                instance[spec.name] = False
            else:
                low = spec.low if math.isfinite(spec.low) else min(0.0, spec.high)
                value = low + 1.0 if spec.strict_low or low + 1.0 <= spec.high else low
                instance[spec.name] = int(value) if spec.integer else value
        return instance


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
