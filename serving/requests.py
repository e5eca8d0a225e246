"""Turning v1 and v2 request bodies into a frame of transactions, or a clear InvalidInput (HTTP 400)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd
from kserve.errors import InvalidInput

from flywheel.schema import REQUEST_FIELDS, REQUIRED_REQUEST_FIELDS

MAX_INSTANCES = 1000
STRING_FIELDS = ["transaction_id", "card_id", "merchant_id", "merchant_category", "channel"]
NUMBER_FIELDS = {"amount": (0.0, 1e9), "lat": (-90.0, 90.0), "lon": (-180.0, 180.0)}


def _check_string(index: int, name: str, value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str) or (name in REQUIRED_REQUEST_FIELDS and not value.strip()):
        raise InvalidInput(f"instance {index}: field '{name}' must be a non-empty string, got {value!r}")
    return value


def _check_number(index: int, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidInput(f"instance {index}: field '{name}' must be a number, got {value!r}")
    number = float(value)
    low, high = NUMBER_FIELDS[name]
    if not math.isfinite(number) or not low <= number <= high:
        raise InvalidInput(f"instance {index}: field '{name}' must be between {low:g} and {high:g}, got {value!r}")
    return number


def _check_ts(index: int, value: Any) -> pd.Timestamp:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            ts = pd.Timestamp(float(value), unit="s", tz="UTC")  # seconds since the epoch
        elif isinstance(value, str) and value.strip():
            ts = pd.Timestamp(value)
        else:
            raise ValueError
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(
            f"instance {index}: field 'ts' must be an ISO-8601 time such as '2026-11-01T12:00:00Z' "
            f"or seconds since the epoch, got {value!r}"
        ) from None
    if ts is pd.NaT:
        raise InvalidInput(f"instance {index}: field 'ts' is not a time: {value!r}")
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def transactions_frame(instances: Any) -> pd.DataFrame:
    """Validate a list of transaction dicts and return them as a frame with the schema's field names."""
    if not isinstance(instances, list) or not instances:
        raise InvalidInput("'instances' must be a non-empty list of transactions")
    if len(instances) > MAX_INSTANCES:
        raise InvalidInput(f"at most {MAX_INSTANCES} transactions per request, got {len(instances)}")
    rows = []
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise InvalidInput(f"instance {index} must be an object with the transaction's fields, got {type(instance).__name__}")
        missing = [name for name in REQUIRED_REQUEST_FIELDS if instance.get(name) is None]
        if missing:
            raise InvalidInput(f"instance {index} is missing required field(s): {', '.join(missing)}")
        row: dict[str, Any] = {}
        for name in STRING_FIELDS:
            if instance.get(name) is not None:
                row[name] = _check_string(index, name, instance[name])
        for name in NUMBER_FIELDS:
            if instance.get(name) is not None:
                row[name] = _check_number(index, name, instance[name])
        row["ts"] = _check_ts(index, instance["ts"])
        rows.append(row)
    frame = pd.DataFrame(rows)
    for name in REQUEST_FIELDS:
        if name not in frame:
            frame[name] = None
    return frame


def json_body(body: Any) -> Any:
    """A request body as JSON, whatever its Content-Type claimed.

    KServe parses a body as JSON only when it is sent as application/json; `curl -d` sends a form
    type, and such a body reaches the model as bytes. Inference servers accept JSON either way.
    """
    if isinstance(body, (bytes, bytearray, memoryview)):
        try:
            return json.loads(bytes(body))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput(f"the request body is not valid JSON: {exc}") from None
    return body


def v1_instances(body: Any) -> list[Any]:
    """The transactions of a v1 body: {"instances": [...]}."""
    if not isinstance(body, dict) or "instances" not in body:
        raise InvalidInput('a v1 request must be a JSON object {"instances": [{...transaction...}]}')
    return body["instances"]


def v2_instances(request: Any) -> list[dict[str, Any]]:
    """The transactions of a v2 InferRequest: one named input per field, all of the same length."""
    columns: dict[str, list[Any]] = {}
    for tensor in request.inputs or []:
        data = tensor.data
        if data is None:
            try:
                data = tensor.as_numpy()
            except Exception as exc:  # binary tensors that do not decode
                raise InvalidInput(f"input '{tensor.name}' could not be decoded: {exc}") from None
        data = list(np.asarray(data, dtype=object).reshape(-1)) if not isinstance(data, list) else data
        if tensor.name not in REQUEST_FIELDS:
            raise InvalidInput(f"unknown input '{tensor.name}': expected inputs named {', '.join(REQUEST_FIELDS)}")
        if tensor.datatype == "BYTES":
            data = [d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d for d in data]
        columns[tensor.name] = data
    if not columns:
        raise InvalidInput("a v2 request needs inputs, one per transaction field (card_id, merchant_id, amount, ts, ...)")
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) != 1:
        raise InvalidInput(f"all inputs must have the same length, got {lengths}")
    count = next(iter(lengths.values()))
    return [{name: values[i] for name, values in columns.items()} for i in range(count)]
