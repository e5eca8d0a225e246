"""The request schema: every client mistake is an InvalidInput (HTTP 400) naming the field at fault."""

import datetime as dt

import numpy as np
import pytest
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest

from serving.requests import RequestSchema, parse_json
from tests.factories import FRAUD_CONTRACT, FRAUD_REQUEST_FIELDS

SCHEMA = RequestSchema(FRAUD_CONTRACT)  # the fraud use case's request, from its contract
REQUEST_SCHEMA = SCHEMA.fields
v1_transactions, v2_transactions = SCHEMA.v1, SCHEMA.v2

GOOD = {"card_id": "c0000001", "merchant_id": "m000001", "amount": 12.5, "ts": "2026-11-01T12:00:00Z"}


def v1(*instances, max_batch=1000):
    return v1_transactions({"instances": list(instances)}, max_batch)


def test_the_schema_lists_exactly_the_transaction_fields():
    assert sorted(spec.name for spec in REQUEST_SCHEMA) == sorted(FRAUD_REQUEST_FIELDS)


def test_a_good_v1_instance_becomes_columns_with_absent_optional_fields_missing():
    parsed = v1(dict(GOOD, channel="online", lat=40.0, lon=-80.0))
    assert parsed.count == 1 and parsed.keys == {"card_id": ["c0000001"], "merchant_id": ["m000001"]}
    assert parsed.columns["amount"].tolist() == [12.5] and parsed.columns["lat"].tolist() == [40.0]
    assert parsed.columns["ts"].dtype == np.dtype("datetime64[ns]")
    assert parsed.columns["ts"][0] == np.datetime64("2026-11-01T12:00:00", "ns")
    assert parsed.columns["merchant_category"].tolist() == [""] and parsed.columns["channel"].tolist() == ["online"]


@pytest.mark.parametrize(
    "ts, expected",
    [
        ("2026-11-01T12:00:00Z", "2026-11-01T12:00:00"),
        ("2026-11-01T12:00:00", "2026-11-01T12:00:00"),  # naive means UTC
        ("2026-11-01T14:00:00+02:00", "2026-11-01T12:00:00"),
        ("2026-11-01T12:00:00.123456Z", "2026-11-01T12:00:00.123456"),
        (1793534400, "2026-11-01T12:00:00"),  # seconds since the epoch
    ],
)
def test_timestamps_are_read_as_utc(ts, expected):
    assert v1(dict(GOOD, ts=ts)).columns["ts"][0] == np.datetime64(expected, "ns")


@pytest.mark.parametrize(
    "body, message",
    [
        ({"inputs": []}, "field 'instances' is missing"),
        ([], "field 'instances' is missing"),
        ({"instances": [], "extra": 1}, "unknown field"),
        ({"instances": []}, "at least one row"),
        ({"instances": "x"}, "field 'instances' must be a non-empty list"),
        ({"instances": [42]}, "instance 0 must be an object"),
        ({"instances": [{"card_id": "c"}]}, "missing required field"),
        ({"instances": [dict(GOOD, colour="red")]}, "unknown field.*'colour'"),
        ({"instances": [dict(GOOD, amount="12")]}, "field 'amount' must be a number"),
        ({"instances": [dict(GOOD, amount=True)]}, "field 'amount' must be a number"),
        ({"instances": [dict(GOOD, amount=-1)]}, "field 'amount' must be"),
        ({"instances": [dict(GOOD, amount=float("nan"))]}, "field 'amount' must be a finite number"),
        ({"instances": [dict(GOOD, amount=float("inf"))]}, "field 'amount' must be a finite number"),
        ({"instances": [dict(GOOD, amount=10**400)]}, "field 'amount' must be above 0 and at most"),
        ({"instances": [dict(GOOD, ts="yesterday-ish")]}, "field 'ts' must be an ISO-8601"),
        ({"instances": [dict(GOOD, ts="now")]}, "field 'ts' must be an ISO-8601"),
        ({"instances": [dict(GOOD, ts="9999-12-31T23:59:59Z")]}, "field 'ts' must be a time in years 2000-2099"),
        ({"instances": [dict(GOOD, ts="1000-01-01T00:00:00Z")]}, "field 'ts' must be a time in years 2000-2099"),
        ({"instances": [dict(GOOD, ts="0001-01-01T00:00:00+01:00")]}, "field 'ts' must be a time in years 2000-2099"),
        ({"instances": [dict(GOOD, ts=10**400)]}, "field 'ts' must be a time"),
        ({"instances": [dict(GOOD, ts=-1e18)]}, "field 'ts' must be a time"),
        ({"instances": [dict(GOOD, ts=True)]}, "field 'ts' must be an ISO-8601 time string"),
        ({"instances": [dict(GOOD, ts=[1])]}, "field 'ts' must be an ISO-8601 time string"),
        ({"instances": [dict(GOOD, card_id="")]}, "field 'card_id' must be a non-empty string"),
        ({"instances": [dict(GOOD, card_id=7)]}, "field 'card_id' must be a string"),
        ({"instances": [dict(GOOD, card_id="c" * 300)]}, "field 'card_id' must be at most"),
        ({"instances": [dict(GOOD, lat=123.0)]}, "field 'lat' must be"),
        ({"instances": [GOOD, dict(GOOD, lon=-181)]}, "instance 1: field 'lon'"),
        ({"instances": [GOOD] * 1001}, "at most 1000"),
    ],
)
def test_bad_v1_requests_name_the_field(body, message):
    with pytest.raises(InvalidInput, match=message):
        v1_transactions(body, 1000)


def test_the_batch_limit_comes_from_the_caller():
    with pytest.raises(InvalidInput, match="at most 2 rows"):
        v1(GOOD, GOOD, GOOD, max_batch=2)


def test_bodies_that_are_not_json_or_hold_huge_numbers_are_invalid():
    for body in (b"{not json", b"\xff\xfe", b'{"instances": [{"amount": ' + b"9" * 400 + b"}]}", b"[1e400]"):
        with pytest.raises(InvalidInput, match="not valid JSON"):
            parse_json(body)


def v2(*inputs):
    return v2_transactions(InferRequest(model_name="fraud", infer_inputs=list(inputs)), 1000)


def good_v2(**replace):
    inputs = {
        "card_id": InferInput("card_id", [2], "BYTES", ["c1", "c2"]),
        "merchant_id": InferInput("merchant_id", [2], "BYTES", ["m1", "m2"]),
        "amount": InferInput("amount", [2], "FP64", [1.0, 2.0]),
        "ts": InferInput("ts", [2], "BYTES", ["2026-11-01T12:00:00Z", "2026-11-01T13:00:00Z"]),
    }
    inputs.update(replace)
    return [tensor for tensor in inputs.values() if tensor is not None]


def test_v2_named_inputs_become_columns():
    parsed = v2(*good_v2())
    assert parsed.keys["card_id"] == ["c1", "c2"] and parsed.columns["amount"].tolist() == [1.0, 2.0]
    nested = v2(*good_v2(amount=InferInput("amount", [2, 1], "FP32", [[1.0], [2.0]])))
    assert nested.columns["amount"].tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    "replace, message",
    [
        ({"colour": InferInput("colour", [1], "BYTES", ["red"])}, "unknown input 'colour'"),
        ({"amount": InferInput("amount", [1], "FP32", [1.0])}, "input 'amount': shape \\[1\\] disagrees|input 'amount' has 1"),
        ({"amount": InferInput("amount", [3], "FP64", [1.0, 2.0])}, "input 'amount': shape \\[3\\] disagrees with its 2"),
        ({"amount": InferInput("amount", [-2], "FP64", [1.0, 2.0])}, "input 'amount': shape"),
        ({"amount": InferInput("amount", [1, 2], "FP64", [1.0, 2.0])}, "input 'amount': shape must be"),
        ({"amount": InferInput("amount", [2], "BYTES", ["1", "2"])}, "input 'amount' must have datatype"),
        ({"amount": InferInput("amount", [2], "INT64", [1, 10**400])}, "field 'amount' must be above 0 and at most"),
        ({"amount": InferInput("amount", [2], "INT64", [1, 2.5])}, "field 'amount' is INT64 but holds 2.5"),
        ({"amount": InferInput("amount", [2], "FP64", [1.0, "x"])}, "field 'amount' is FP64 but holds"),
        ({"card_id": InferInput("card_id", [2], "FP32", [1.0, 2.0])}, "input 'card_id' must have datatype BYTES"),
        ({"card_id": InferInput("card_id", [2], "BYTES", ["c1", 5])}, "field 'card_id' is BYTES but holds 5"),
        ({"ts": InferInput("ts", [2], "BYTES", ["9999-01-01T00:00:00Z", "now"])}, "field 'ts' must be a time in years"),
        ({"ts": InferInput("ts", [2], "BYTES", ["2026-11-01T12:00:00Z", "now"])}, "instance 1: field 'ts' must be an ISO-8601"),
        ({"ts": None}, "missing required input\\(s\\): ts"),
        ({"amount": InferInput("amount", [2], "FP64", "12")}, "input 'amount': 'data' must be a list"),
    ],
)
def test_bad_v2_requests_name_the_field(replace, message):
    with pytest.raises(InvalidInput, match=message):
        v2(*good_v2(**replace))


def test_v2_empty_duplicate_and_oversized_inputs_are_invalid():
    with pytest.raises(InvalidInput, match="needs inputs"):
        v2()
    with pytest.raises(InvalidInput, match="at least one row"):
        v2(InferInput("card_id", [0], "BYTES", []))
    with pytest.raises(InvalidInput, match="given twice"):
        v2(*good_v2(), InferInput("amount", [2], "FP64", [1.0, 2.0]))
    with pytest.raises(InvalidInput, match="at most 1000"):
        v2(InferInput("card_id", [1001], "BYTES", ["c"] * 1001))


def test_the_same_instant_parses_to_the_same_time_in_v1_and_v2():
    moment = dt.datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=dt.timezone.utc)
    one = v1(dict(GOOD, ts=moment.isoformat()))
    two = v2(*good_v2(ts=InferInput("ts", [2], "BYTES", [moment.isoformat()] * 2)))
    assert one.columns["ts"][0] == two.columns["ts"][0] == np.datetime64("2026-11-01T12:00:00.123456", "ns")


@pytest.mark.parametrize("field", ["card_id", "merchant_id", "merchant_category"])
def test_a_lone_surrogate_is_a_client_mistake_not_a_store_failure(field):
    """Bug caught: "\\ud800" (JSON can spell it, UTF-8 cannot) passing the schema and failing the
    online read's key encoding: a 503 for a client's bad id (found by the v2 fuzz test)."""
    with pytest.raises(InvalidInput, match=f"instance 1: field '{field}' is not UTF-8 text"):
        v1(GOOD, dict(GOOD, **{field: "card-\ud800"}))
    with pytest.raises(InvalidInput, match=f"instance 0: field '{field}' is not UTF-8 text"):
        v1(dict(GOOD, **{field: "\udfff"}))
    assert v1(dict(GOOD, **{field: "ünï-卡"})).count == 1  # other non-ASCII text is fine
