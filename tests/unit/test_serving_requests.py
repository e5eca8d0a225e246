"""Request parsing: every client mistake is an InvalidInput (HTTP 400) that names the problem."""

import pytest
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest

from serving.requests import transactions_frame, v1_instances, v2_instances

GOOD = {"card_id": "c0000001", "merchant_id": "m000001", "amount": 12.5, "ts": "2026-11-01T12:00:00Z"}


def test_a_good_v1_instance_parses_with_optional_fields_filled():
    frame = transactions_frame(v1_instances({"instances": [dict(GOOD, channel="online", lat=40.0, lon=-80.0)]}))
    assert frame.loc[0, "amount"] == 12.5 and str(frame.loc[0, "ts"].tz) == "UTC"
    assert frame.loc[0, "merchant_category"] is None


@pytest.mark.parametrize(
    "body, message",
    [
        ({"inputs": []}, "instances"),
        ([], "instances"),
        ({"instances": []}, "non-empty list"),
        ({"instances": "x"}, "non-empty list"),
        ({"instances": [42]}, "instance 0 must be an object"),
        ({"instances": [{"card_id": "c"}]}, "missing required field"),
        ({"instances": [dict(GOOD, amount="12")]}, "'amount' must be a number"),
        ({"instances": [dict(GOOD, amount=-1)]}, "'amount' must be between"),
        ({"instances": [dict(GOOD, amount=float("nan"))]}, "'amount' must be between"),
        ({"instances": [dict(GOOD, ts="yesterday-ish")]}, "'ts' must be an ISO-8601"),
        ({"instances": [dict(GOOD, card_id="")]}, "'card_id' must be a non-empty string"),
        ({"instances": [dict(GOOD, lat=123.0)]}, "'lat' must be between"),
        ({"instances": [GOOD] * 1001}, "at most 1000"),
    ],
)
def test_bad_v1_requests_name_the_problem(body, message):
    with pytest.raises(InvalidInput, match=message):
        transactions_frame(v1_instances(body))


def v2(inputs):
    return InferRequest(model_name="fraud", infer_inputs=inputs)


def test_v2_named_inputs_become_rows():
    request = v2([
        InferInput("card_id", [2], "BYTES", ["c1", "c2"]),
        InferInput("merchant_id", [2], "BYTES", ["m1", "m2"]),
        InferInput("amount", [2], "FP64", [1.0, 2.0]),
        InferInput("ts", [2], "BYTES", ["2026-11-01T12:00:00Z", "2026-11-01T13:00:00Z"]),
    ])
    frame = transactions_frame(v2_instances(request))
    assert list(frame.card_id) == ["c1", "c2"] and list(frame.amount) == [1.0, 2.0]


def test_v2_unknown_input_and_ragged_lengths_are_invalid():
    with pytest.raises(InvalidInput, match="unknown input 'color'"):
        v2_instances(v2([InferInput("color", [1], "BYTES", ["red"])]))
    with pytest.raises(InvalidInput, match="same length"):
        v2_instances(v2([InferInput("card_id", [2], "BYTES", ["a", "b"]), InferInput("amount", [1], "FP32", [1.0])]))
