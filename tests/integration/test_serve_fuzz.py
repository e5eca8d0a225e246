"""Fuzzing a running `flywheel serve` with hypothesis: whatever a client sends, v1, v2 or raw bytes,
the answer is never a 5xx, an error always says what was wrong, and the server keeps answering."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import FRAUD_REQUEST_FIELDS as REQUEST_FIELDS
from tests.servers import flywheel_server

V1 = "/v1/models/fraud:predict"
V2 = "/v2/models/fraud/infer"
GOOD = {"card_id": "c0000001", "merchant_id": "m000001", "merchant_category": "grocery", "amount": 12.5,
        "ts": "2026-11-01T12:00:00Z", "channel": "chip", "lat": 40.7, "lon": -74.0}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

TIMES = st.sampled_from([
    "2026-11-01T12:00:00Z", "9999-12-31T23:59:59Z", "1000-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00", "now", "",
    "2026-13-01", "2026-11-01T25:00:00", "2026-11-01T12:00:00+25:00", "2026-11-01 12:00", "20261101T120000Z", "NaT", "nan",
])
# Values known to break naive parsers, drawn often (hypothesis alone finds them rarely).
EDGES = st.sampled_from([
    10**400, -(10**400), 2**63, -(2**63) - 1, 2**64, float("nan"), float("inf"), float("-inf"), 1e308, -1.0, -0.0, 0,
    True, False, None, "", " ", "x" * 300, "\u0000", "\ud800", [], {}, [[1.0]], 1e18, 4102444800, 946684799,
])
scalars = st.one_of(
    EDGES, st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), TIMES,
)
odd = st.one_of(EDGES, scalars)  # an edge case about half the time
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
names = st.one_of(st.sampled_from([*REQUEST_FIELDS, "extra", ""]), st.text(max_size=8))


@st.composite
def v1_bodies(draw):
    def instance():
        base = dict(GOOD)
        for name in draw(st.lists(st.sampled_from(list(GOOD)), max_size=3)):
            base.pop(name, None)
        base.update(draw(st.dictionaries(names, values, max_size=3)))
        if draw(st.booleans()):
            base[draw(st.sampled_from(list(GOOD)))] = draw(odd)  # one odd value in a known field
        return base

    kind = draw(st.integers(0, 3))
    if kind == 0:
        return {"instances": [instance() for _ in range(draw(st.integers(0, 3)))]}
    if kind == 1:
        return {"instances": draw(values)}
    if kind == 2:
        return draw(st.dictionaries(names, values, max_size=3))
    return draw(values)


DATATYPES = st.sampled_from(["BYTES", "FP32", "FP64", "INT64", "INT8", "UINT64", "BOOL", "FP16", "nope", ""])


@st.composite
def v2_bodies(draw):
    good = [
        {"name": name, "shape": [1], "datatype": "BYTES" if isinstance(value, str) else "FP64", "data": [value]}
        for name, value in GOOD.items()
    ]
    kind = draw(st.integers(0, 3))
    if kind == 3:  # a good request with one odd value, in the field's own datatype or another
        inputs = [dict(tensor) for tensor in good]
        tensor = inputs[draw(st.integers(0, len(inputs) - 1))]
        tensor["data"] = [draw(odd)]
        if draw(st.booleans()):
            tensor["datatype"] = draw(DATATYPES)
        return {"inputs": inputs}
    if kind == 0:  # a good request with a few parts changed
        inputs = [dict(tensor) for tensor in good]
        for _ in range(draw(st.integers(1, 3))):
            tensor = inputs[draw(st.integers(0, len(inputs) - 1))]
            part = draw(st.sampled_from(["name", "shape", "datatype", "data", "drop"]))
            if part == "drop":
                tensor.clear()
            elif part == "shape":
                tensor["shape"] = draw(st.lists(st.integers(-3, 4) | values, max_size=3))
            elif part == "datatype":
                tensor["datatype"] = draw(DATATYPES)
            elif part == "name":
                tensor["name"] = draw(names)
            elif draw(st.booleans()):
                tensor["data"] = [draw(odd)]  # one odd value where one is expected
            else:
                tensor["data"] = draw(st.lists(values, max_size=4) | values)
        return {"inputs": inputs, **draw(st.dictionaries(st.sampled_from(["id", "parameters", "outputs"]), values, max_size=1))}
    if kind == 1:
        tensors = st.fixed_dictionaries(
            {"name": names, "shape": st.lists(st.integers(-2, 5), max_size=3), "datatype": DATATYPES, "data": st.lists(values, max_size=4)}
        )
        return {"inputs": draw(st.lists(tensors, max_size=4))}
    return draw(values)


CONTENT_TYPES = st.sampled_from(["application/json", "application/x-www-form-urlencoded", "text/plain", None])


@pytest.fixture(scope="module")
def server(trained_loop, tmp_path_factory):
    with flywheel_server(trained_loop["env"], tmp_path_factory.mktemp("fuzz") / "server.log") as running:
        with httpx.Client(base_url=running.base, timeout=10) as client:
            yield client, running


def check(client: httpx.Client, path: str, body: bytes, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post(path, content=body, headers=headers)
    assert response.status_code < 500, (path, body[:300], response.status_code, response.text[:500])
    if response.status_code != 200:
        assert response.json()["error"], response.text


def still_answers(client: httpx.Client) -> None:
    response = client.post(V1, json={"instances": [GOOD]})
    assert response.status_code == 200, response.text


@FUZZ
@given(body=v1_bodies(), content_type=CONTENT_TYPES)
def test_v1_fuzz_never_gets_a_5xx(server, body, content_type):
    client, _ = server
    check(client, V1, json.dumps(body).encode(), content_type)


@FUZZ
@given(body=v2_bodies(), content_type=CONTENT_TYPES)
def test_v2_fuzz_never_gets_a_5xx(server, body, content_type):
    client, _ = server
    check(client, V2, json.dumps(body).encode(), content_type)


@FUZZ
@given(body=st.binary(max_size=400), path=st.sampled_from([V1, V2]), content_type=CONTENT_TYPES)
def test_raw_bytes_never_get_a_5xx(server, body, path, content_type):
    client, _ = server
    check(client, path, body, content_type)


def _raw(value, datatype: str) -> bytes:
    """One value as the binary tensor extension carries it."""
    import struct

    if datatype == "BYTES":
        data = str(value).encode()
        return struct.pack("<I", len(data)) + data
    return struct.pack("<d", float(value))


@st.composite
def binary_bodies(draw):
    """A good request in the binary tensor extension (some inputs binary, the rest JSON, as a client
    may mix them), then broken the ways a buggy client or a cut connection breaks one: the header
    length off, a binary_data_size off, the body cut or padded, bytes flipped, a shape or datatype
    changed."""
    inputs, raws = [], []
    for name, value in GOOD.items():
        datatype = "BYTES" if isinstance(value, str) else "FP64"
        if draw(st.booleans()):
            raw = _raw(value, datatype) * (rows := draw(st.integers(1, 3)))
            inputs.append({"name": name, "shape": [rows], "datatype": datatype, "parameters": {"binary_data_size": len(raw)}})
            raws.append(raw)
        else:
            inputs.append({"name": name, "shape": [1], "datatype": datatype, "data": [value]})
    for _ in range(draw(st.integers(0, 2))):
        tensor = inputs[draw(st.integers(0, len(inputs) - 1))]
        part = draw(st.sampled_from(["size", "shape", "datatype", "data"]))
        if part == "size" and "parameters" in tensor:
            tensor["parameters"] = {"binary_data_size": draw(st.integers(-2, 64) | values)}
        elif part == "shape":
            tensor["shape"] = draw(st.lists(st.integers(-2, 4), max_size=3))
        elif part == "datatype":
            tensor["datatype"] = draw(DATATYPES)
        elif part == "data":
            tensor["data"] = [draw(odd)]
    head = json.dumps({"inputs": inputs, **draw(st.dictionaries(st.sampled_from(["parameters", "outputs"]), values, max_size=1))}).encode()
    body = head + b"".join(raws)
    length = len(head) + draw(st.sampled_from([0, 0, 0, -1, 1, -len(head), len(body)]))
    cut = draw(st.sampled_from(["none", "none", "truncate", "pad", "flip"]))
    if cut == "truncate":
        body = body[:draw(st.integers(0, len(body)))]
    elif cut == "pad":
        body += draw(st.binary(min_size=1, max_size=16))
    elif cut == "flip" and raws:
        at = draw(st.integers(len(head), len(body) - 1))
        body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1:]
    header = draw(st.sampled_from([str(length), str(length), str(length) + "0", "-1", "1e3", "", "x"]))
    return body, header


@FUZZ
@given(case=binary_bodies(), content_type=st.sampled_from(["application/octet-stream", "application/json", None]))
def test_binary_fuzz_never_gets_a_5xx(server, case, content_type):
    """Bug caught: a malformed binary body (lengths that disagree, a truncated tensor, a header
    length past the body) read as if it were whole, or turned into a 500."""
    client, _ = server
    body, header = case
    headers = {"inference-header-content-length": header, **({"content-type": content_type} if content_type else {})}
    response = client.post(V2, content=body, headers=headers)
    assert response.status_code < 500, (body[:300], header, response.status_code, response.text[:500])
    if response.status_code != 200:
        assert response.json()["error"], response.text
    else:
        outputs = response.json()["outputs"]
        assert outputs[0]["shape"][0] == len(outputs[0]["data"]) >= 1


def test_the_server_still_answers_after_the_fuzzing(server):
    client, running = server
    still_answers(client)
    assert running.process.poll() is None
    assert "Traceback" not in running.output(), running.output()[-3000:]
