"""v2 binary tensors (serving/tensors.py): the extension's bodies decoded strictly, and binary rows
checked exactly as their JSON twins are (the JSON path is the oracle: it checks value by value)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest

from serving.requests import RequestSchema
from serving.tensors import decode_rest, decode_tensor, split_bytes
from tests.factories import FRAUD_CONTRACT

SCHEMA = RequestSchema(FRAUD_CONTRACT)


def bodies(columns: dict[str, tuple[list, str]]) -> tuple[bytes, tuple[bytes, int]]:
    """The same rows as a JSON v2 body and as a binary one (KServe's client encoding)."""
    def request(binary: bool) -> InferRequest:
        inputs = []
        for name, (values, datatype) in columns.items():
            array = np.array([v.encode() for v in values], dtype=object) if datatype == "BYTES" else np.array(
                values, dtype={"FP64": np.float64, "FP32": np.float32, "INT64": np.int64, "BOOL": bool}[datatype])
            tensor = InferInput(name, [len(values)], datatype)
            tensor.set_data_from_numpy(array, binary_data=binary)
            inputs.append(tensor)
        return InferRequest(model_name="fraud", infer_inputs=inputs)

    document, _ = request(False).to_rest()
    return json.dumps(document).encode(), request(True).to_rest()


def both(columns):
    """Rows (or the error message) from the JSON body and from the binary body."""
    as_json, (binary, length) = bodies(columns)
    out = []
    for body, header in ((as_json, None), (binary, str(length))):
        try:
            out.append(SCHEMA.v2(decode_rest(body, header, "fraud"), 1000))
        except InvalidInput as exc:
            out.append(str(exc))
    return out


texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
amounts = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.sampled_from([0.0, -1.0, 1e6, 1e6 + 1, 12.5]))
times = st.one_of(st.sampled_from(["2026-11-01T12:00:00Z", "2026-11-01T12:00:00.123456+02:00", "1999-12-31T23:59:59Z",
                                   "2100-01-01T00:00:00Z", "now", "", "2026-02-30T00:00:00"]), texts)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(texts, texts, amounts, times, st.floats(-100, 100)), min_size=1, max_size=5))
def test_binary_rows_are_checked_exactly_as_their_json_twins(rows):
    """Bug caught: the column-wise check of binary data accepting a value the JSON path refuses
    (or the other way round), or reading a value differently."""
    columns = {
        "card_id": ([r[0] for r in rows], "BYTES"), "merchant_id": ([r[1] for r in rows], "BYTES"),
        "amount": ([r[2] for r in rows], "FP64"), "ts": ([r[3] for r in rows], "BYTES"), "lat": ([r[4] for r in rows], "FP64"),
    }
    if any(not np.isfinite(r[2]) for r in rows):
        columns["amount"] = ([r[2] if np.isfinite(r[2]) else -1.0 for r in rows], "FP64")  # JSON has no NaN: a bad number instead
    from_json, from_binary = both(columns)
    if isinstance(from_json, str):
        assert from_binary == from_json
        return
    assert not isinstance(from_binary, str), from_binary
    assert from_binary.count == from_json.count and from_binary.keys == from_json.keys
    for name, column in from_json.columns.items():
        np.testing.assert_array_equal(from_binary.columns[name], column, err_msg=name)


def test_seconds_since_the_epoch_in_binary_are_checked_and_read_as_in_json():
    base = {"card_id": (["c1", "c2"], "BYTES"), "merchant_id": (["m1", "m2"], "BYTES"), "amount": ([1.0, 2.0], "FP64")}
    from_json, from_binary = both(dict(base, ts=([1793534400, 1793534401], "INT64")))
    np.testing.assert_array_equal(from_binary.columns["ts"], from_json.columns["ts"])
    assert from_binary.columns["ts"][0] == np.datetime64("2026-11-01T12:00:00", "ns")
    from_json, from_binary = both(dict(base, ts=([1793534400.5, 4102444800.0], "FP64")))
    assert from_json == from_binary == "instance 1: field 'ts' must be a time in years 2000-2099, got 4102444800.0"


def test_bool_bytes_other_than_0_and_1_are_refused():
    with pytest.raises(InvalidInput, match="BOOL element must be the byte 0 or 1"):
        decode_tensor("flag", "BOOL", [2], b"\x01\x02")
    assert decode_tensor("flag", "BOOL", [2], b"\x01\x00").tolist() == [True, False]


@pytest.mark.parametrize("raw, message", [
    (b"\x05\x00\x00\x00abc", "element 0 says 5 bytes, 3 remain"),
    (b"\x01\x00\x00\x00a\x01\x00", "2 byte\\(s\\) left where a 4-byte length should be"),
])
def test_a_truncated_bytes_tensor_is_named(raw, message):
    with pytest.raises(InvalidInput, match=message):
        split_bytes("card_id", raw)


def test_bytes_elements_may_be_empty_or_hold_any_bytes():
    raw = struct.pack("<I", 0) + struct.pack("<I", 3) + b"\x00\xff\x01"
    assert split_bytes("x", raw) == [b"", b"\x00\xff\x01"]


@pytest.mark.parametrize("datatype, shape, raw, message", [
    ("FP64", [2], b"\x00" * 15, "15 bytes of binary data, but shape \\[2\\] of FP64 needs 16"),
    ("FP64", [-1], b"", "shape must be a non-empty list of whole numbers at least 0"),
    ("INT128", [1], b"\x00" * 16, "unknown datatype 'INT128'"),
    ("BYTES", [3], struct.pack("<I", 1) + b"a", "holds 1 BYTES element\\(s\\), but shape \\[3\\] needs 3"),
])
def test_a_tensor_that_disagrees_with_its_shape_or_datatype_is_named(datatype, shape, raw, message):
    with pytest.raises(InvalidInput, match=message):
        decode_tensor("amount", datatype, shape, raw)


def test_a_json_body_is_read_whatever_its_content_type_and_a_binary_one_only_with_its_header():
    body = json.dumps({"inputs": [{"name": "amount", "shape": [1], "datatype": "FP64", "data": [1.5]}]}).encode()
    assert decode_rest(body, None, "fraud").inputs[0].data == [1.5]
    with pytest.raises(InvalidInput, match="not valid JSON"):
        decode_rest(body + struct.pack("<d", 1.5), None, "fraud")  # binary bytes without the header
