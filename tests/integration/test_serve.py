"""`flywheel serve`: the real KServe ModelServer on loopback, scoring over HTTP (v1 and v2)."""

from __future__ import annotations

import json
import re
import time

import httpx
import pandas as pd
import pytest

from tests.servers import flywheel_server

V1 = "/v1/models/fraud:predict"
V2 = "/v2/models/fraud/infer"


@pytest.fixture(scope="module")
def server(trained_loop, tmp_path_factory):
    with flywheel_server(trained_loop["env"], tmp_path_factory.mktemp("serve") / "server.log") as running:
        yield running.base, trained_loop, running


def known_transaction(loop) -> dict:
    holdout = loop["storage"].read_parquet(loop["training_set"]["holdout_uri"]).to_pandas()
    row = holdout.iloc[-1]
    return {
        "transaction_id": "req-1", "card_id": row.card_id, "merchant_id": row.merchant_id,
        "merchant_category": row.merchant_category, "amount": float(row.amount),
        "ts": (row.ts + pd.Timedelta(hours=1)).isoformat(), "channel": row.channel,
        "lat": float(row.lat), "lon": float(row.lon),
    }


def v2_body(tx: dict, **replace) -> dict:
    inputs = {
        "card_id": {"name": "card_id", "shape": [1], "datatype": "BYTES", "data": [tx["card_id"]]},
        "merchant_id": {"name": "merchant_id", "shape": [1], "datatype": "BYTES", "data": [tx["merchant_id"]]},
        "merchant_category": {"name": "merchant_category", "shape": [1], "datatype": "BYTES", "data": [tx["merchant_category"]]},
        "amount": {"name": "amount", "shape": [1], "datatype": "FP64", "data": [tx["amount"]]},
        "ts": {"name": "ts", "shape": [1], "datatype": "BYTES", "data": [tx["ts"]]},
    }
    inputs.update(replace)
    return {"inputs": [tensor for tensor in inputs.values() if tensor is not None]}


def test_v1_scores_a_transaction_with_online_features(server):
    base, loop, _ = server
    response = httpx.post(f"{base}{V1}", json={"instances": [known_transaction(loop)]}, timeout=10)
    assert response.status_code == 200, response.text
    prediction = response.json()["predictions"][0]
    assert 0.0 <= prediction["fraud_probability"] <= 1.0
    assert prediction["model_version"] == loop["model"]["version"]
    assert prediction["unknown_entities"] == []


def test_an_obvious_fraud_scores_higher_than_the_same_card_normal_use(server):
    base, loop, _ = server
    normal = known_transaction(loop)
    fraud = dict(normal, amount=normal["amount"] * 40, merchant_category="crypto", channel="online",
                 lat=normal["lat"] - 15, lon=normal["lon"] + 40, ts=normal["ts"][:11] + "03:30:00+00:00")
    response = httpx.post(f"{base}{V1}", json={"instances": [normal, fraud]}, timeout=10)
    assert response.status_code == 200, response.text
    low, high = (p["fraud_probability"] for p in response.json()["predictions"])
    assert high > low


def test_v2_named_inputs_and_the_scoring_version(server):
    base, loop, _ = server
    response = httpx.post(f"{base}{V2}", json=v2_body(known_transaction(loop)), timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == loop["model"]["version"]
    probability, unknown = body["outputs"]
    assert probability["name"] == "fraud_probability" and probability["datatype"] == "FP32"
    assert 0.0 <= probability["data"][0] <= 1.0
    assert unknown["name"] == "unknown_entities" and unknown["data"] == [""]


def test_v1_and_v2_score_the_same_transaction_alike(server):
    base, loop, _ = server
    tx = known_transaction(loop)
    one = httpx.post(f"{base}{V1}", json={"instances": [{k: tx[k] for k in ("card_id", "merchant_id", "merchant_category", "amount", "ts")}]}, timeout=10)
    two = httpx.post(f"{base}{V2}", json=v2_body(tx), timeout=10)
    assert one.json()["predictions"][0]["fraud_probability"] == pytest.approx(two.json()["outputs"][0]["data"][0], rel=1e-6)


def test_an_unknown_card_is_scored_with_cold_start_defaults_and_flagged(server):
    base, loop, _ = server
    tx = dict(known_transaction(loop), card_id="card-never-seen")
    response = httpx.post(f"{base}{V1}", json={"instances": [tx, known_transaction(loop)]}, timeout=10)
    assert response.status_code == 200, response.text
    first, second = response.json()["predictions"]
    assert first["unknown_entities"] == ["card"] and second["unknown_entities"] == []
    assert 0.0 <= first["fraud_probability"] <= 1.0
    response = httpx.post(f"{base}{V2}", json=v2_body(dict(tx, merchant_id="merchant-never-seen")), timeout=10)
    assert response.json()["outputs"][1]["data"] == ["card,merchant"]


def test_a_batch_is_scored_in_order(server):
    base, loop, _ = server
    tx = known_transaction(loop)
    amounts = [1.0, 10.0, 100.0, 1000.0, 10000.0]
    batch = httpx.post(f"{base}{V1}", json={"instances": [dict(tx, amount=a) for a in amounts]}, timeout=10).json()["predictions"]
    singles = [httpx.post(f"{base}{V1}", json={"instances": [dict(tx, amount=a)]}, timeout=10).json()["predictions"][0] for a in amounts]
    assert [p["fraud_probability"] for p in batch] == pytest.approx([p["fraud_probability"] for p in singles], rel=1e-5)


GOOD = {"card_id": "c1", "merchant_id": "m1", "amount": 12.5, "ts": "2026-11-01T12:00:00Z"}
GOOD_V2 = {"card_id": "c1", "merchant_id": "m1", "merchant_category": "grocery", "amount": 12.5, "ts": "2026-11-01T12:00:00Z"}


@pytest.mark.parametrize(
    "path, body, message",
    [
        (V1, {"rows": []}, "field 'instances'"),
        (V1, {"instances": [{"card_id": "c"}]}, "missing required field"),
        (V1, {"instances": [dict(GOOD, amount="lots")]}, "field 'amount' must be a number"),
        (V1, {"instances": [dict(GOOD, ts="9999-12-31T23:59:59Z")]}, "field 'ts' must be a time in years"),
        (V1, {"instances": [dict(GOOD, ts="1000-01-01T00:00:00Z")]}, "field 'ts' must be a time in years"),
        (V1, {"instances": [dict(GOOD, ts="now")]}, "field 'ts' must be an ISO-8601"),
        (V1, {"instances": [dict(GOOD, ts=1e300)]}, "field 'ts' must be a time"),
        (V1, {"instances": []}, "at least one row"),
        (V1, {"instances": [GOOD] * 1001}, "at most 1000"),
        (V1, {"instances": [dict(GOOD, colour="red")]}, "unknown field"),
        (V1, [GOOD], "field 'instances'"),
        (V1, "just a string", "field 'instances'"),
        (V1, 5, "field 'instances'"),
        (V2, {"inputs": [{"name": "colour", "shape": [1], "datatype": "BYTES", "data": ["red"]}]}, "unknown input"),
        (V2, {"inputs": "nope"}, "malformed request"),
        (V2, v2_body(GOOD_V2, ts={"name": "ts", "shape": [1], "datatype": "BYTES", "data": ["9999-01-01T00:00:00Z"]}), "field 'ts' must be a time in years"),
        (V2, v2_body(GOOD_V2, ts={"name": "ts", "shape": [1], "datatype": "BYTES", "data": ["1000-01-01T00:00:00Z"]}), "field 'ts' must be a time in years"),
        (V2, v2_body(GOOD_V2, amount={"name": "amount", "shape": [1], "datatype": "INT64", "data": [int("9" * 400)]}), "not valid JSON: number"),
        (V2, v2_body(GOOD_V2, amount={"name": "amount", "shape": [1], "datatype": "INT64", "data": [2 ** 63 - 1]}), "field 'amount' must be above 0 and at most"),
        (V2, v2_body(GOOD_V2, amount={"name": "amount", "shape": [3], "datatype": "FP64", "data": [1.0]}), "input 'amount': shape \\[3\\] disagrees"),
        (V2, v2_body(GOOD_V2, amount={"name": "amount", "shape": [1], "datatype": "BYTES", "data": ["1.0"]}), "input 'amount' must have datatype"),
        (V2, v2_body(GOOD_V2, card_id={"name": "card_id", "shape": [1], "datatype": "FP32", "data": [1.0]}), "input 'card_id' must have datatype BYTES"),
        (V2, v2_body(GOOD_V2, card_id={"name": "card_id", "shape": [0], "datatype": "BYTES", "data": []}), "at least one row"),
        (V2, v2_body(GOOD_V2, card_id=None), "missing required input"),
    ],
)
def test_malformed_requests_get_400_naming_the_problem(server, path, body, message):
    base, _, _ = server
    response = httpx.post(f"{base}{path}", content=json.dumps(body), headers={"content-type": "application/json"}, timeout=10)
    assert response.status_code == 400, response.text
    assert re.search(message, response.json()["error"]), response.json()["error"]


def test_invalid_json_is_a_client_error_not_a_500(server):
    base, _, _ = server
    for path in (V1, V2):
        for content_type in ("application/json", "application/x-www-form-urlencoded"):
            for body in (b"{not json", b'{"instances": [{"amount": ' + b"9" * 400 + b"}]}", b"\xff\xfe\x00"):
                response = httpx.post(f"{base}{path}", content=body, headers={"content-type": content_type}, timeout=10)
                assert response.status_code == 400, (path, content_type, body[:20], response.status_code, response.text)
                assert response.json().get("error")


def test_an_oversized_body_is_refused_with_413_before_it_is_parsed(server):
    base, _, _ = server
    huge = json.dumps({"instances": [GOOD] * 20_000}).encode()  # about 1.4 MB: over the 1 MiB default
    assert len(huge) > 1_048_576
    response = httpx.post(f"{base}{V1}", content=huge, headers={"content-type": "application/json"}, timeout=10)
    assert response.status_code == 413 and "max_body_bytes" in response.json()["error"]

    def chunks():  # no Content-Length: the limit holds while reading
        for start in range(0, len(huge), 65536):
            yield huge[start : start + 65536]

    response = httpx.post(f"{base}{V2}", content=chunks(), headers={"content-type": "application/json"}, timeout=10)
    assert response.status_code == 413
    response = httpx.post(f"{base}{V1}", json={"instances": [GOOD]}, timeout=10)
    assert response.status_code == 200, "the server must still answer after refusing a body"


def binary_body(tx: dict, amount: bytes | None = None, card: bytes | None = None, **header) -> tuple[bytes, int]:
    """A v2 body in the binary tensor extension (as tritonclient builds it): the JSON header, then
    amount (FP64) and card_id (BYTES, each element length-prefixed) as raw bytes."""
    import struct

    amount = struct.pack("<d", tx["amount"]) if amount is None else amount
    card = struct.pack("<I", len(tx["card_id"])) + tx["card_id"].encode() if card is None else card
    document = {"inputs": [
        {"name": "amount", "shape": [1], "datatype": "FP64", "parameters": {"binary_data_size": len(amount)}},
        {"name": "card_id", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(card)}},
        {"name": "merchant_id", "shape": [1], "datatype": "BYTES", "data": [tx["merchant_id"]]},
        {"name": "ts", "shape": [1], "datatype": "BYTES", "data": [tx["ts"]]},
    ], **header}
    head = json.dumps(document).encode()
    return head + amount + card, len(head)


def test_a_binary_body_is_scored_as_its_json_twin(server):
    """Bug caught: the binary tensor extension refused (tritonclient's default)."""
    base, loop, _ = server
    tx = known_transaction(loop)
    body, length = binary_body(tx)
    binary = httpx.post(f"{base}{V2}", content=body, headers={"inference-header-content-length": str(length)}, timeout=10)
    assert binary.status_code == 200, binary.text
    twin = httpx.post(f"{base}{V2}", content=json.dumps(v2_body(tx, merchant_category=None, channel=None)), timeout=10)  # no content type
    assert twin.status_code == 200, twin.text
    assert binary.json()["outputs"][0]["data"] == pytest.approx(twin.json()["outputs"][0]["data"], rel=1e-6)
    assert binary.json()["model_version"] == loop["model"]["version"]


@pytest.mark.parametrize("change, message", [
    (lambda body, length: (body, "abc"), "must be a whole number of bytes"),
    (lambda body, length: (body, str(len(body) + 10)), "but the body has"),
    (lambda body, length: (body, "0"), "but the body has"),
    (lambda body, length: (body[:-3], str(length)), "only .* byte\\(s\\) of the body remain"),
    (lambda body, length: (body + b"extra", str(length)), "byte\\(s\\) after the JSON header"),
    (lambda body, length: (body, str(length - 1)), "are not the request's JSON"),
    (lambda body, length: (body, str(length + 2)), "are not the request's JSON"),
])
def test_a_malformed_binary_body_is_a_400_naming_the_problem(server, change, message):
    """Bugs caught: a header length past the body, sizes that disagree with the body, or a cut body
    read anyway (garbage scores) or as a 500."""
    base, loop, _ = server
    body, length = binary_body(known_transaction(loop))
    body, header = change(body, length)
    response = httpx.post(f"{base}{V2}", content=body, headers={"inference-header-content-length": header}, timeout=10)
    assert response.status_code == 400, response.text
    assert re.search(message, response.json()["error"]), response.json()["error"]


@pytest.mark.parametrize("amount, card, message", [
    (b"\x00" * 7, None, "input 'amount': 7 bytes of binary data, but shape \\[1\\] of FP64 needs 8"),
    (b"\x00" * 16, None, "needs 8"),
    (None, b"\x09\x00\x00\x00c1", "input 'card_id': its BYTES data is truncated"),
    (None, b"\x02\x00", "input 'card_id': its BYTES data is truncated"),
    (None, b"\x02\x00\x00\x00c1\x02\x00\x00\x00c2", "holds 2 BYTES element\\(s\\), but shape \\[1\\] needs 1"),
    (None, b"\x02\x00\x00\x00\xff\xfe", "field 'card_id' is not UTF-8"),
    (b"\x00" * 8, None, "field 'amount' must be a finite number above 0"),
])
def test_a_binary_tensor_that_disagrees_with_its_shape_or_type_is_a_400_naming_the_input(server, amount, card, message):
    base, loop, _ = server
    body, length = binary_body(known_transaction(loop), amount=amount, card=card)
    response = httpx.post(f"{base}{V2}", content=body, headers={"inference-header-content-length": str(length)}, timeout=10)
    assert response.status_code == 400, response.text
    assert re.search(message, response.json()["error"]), response.json()["error"]


def test_a_json_body_sent_as_a_form_is_scored_like_json(server):
    """`curl -d` sends application/x-www-form-urlencoded: the JSON body must still be read."""
    base, loop, _ = server
    body = json.dumps({"instances": [known_transaction(loop)]}).encode()
    response = httpx.post(f"{base}{V1}", content=body, headers={"content-type": "application/x-www-form-urlencoded"}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["model_version"] == loop["model"]["version"]


def test_every_request_gets_a_request_id_and_one_json_access_log_line(server):
    base, loop, running = server
    given = httpx.post(f"{base}{V1}", json={"instances": [GOOD]}, headers={"x-request-id": "auth-42.a"}, timeout=10)
    assert given.headers["x-request-id"] == "auth-42.a"
    assert given.headers["x-model-version"] == loop["model"]["version"]
    made = httpx.post(f"{base}{V1}", json={"instances": []}, timeout=10)
    assert made.status_code == 400 and re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    hostile = httpx.post(f"{base}{V1}", json={"instances": [GOOD]}, headers={"x-request-id": "x" * 500}, timeout=10)
    assert hostile.headers["x-request-id"] != "x" * 500  # not echoed: too long to be an id
    lines = {}
    for line in running.output().splitlines():
        if line.startswith("{") and '"request_id"' in line:
            record = json.loads(line)
            lines[record["request_id"]] = record
    assert lines["auth-42.a"]["status"] == 200 and lines["auth-42.a"]["model_version"] == loop["model"]["version"]
    assert lines["auth-42.a"]["path"] == V1 and lines["auth-42.a"]["ms"] > 0
    assert abs(lines["auth-42.a"]["time"] - time.time()) < 600  # when, in Unix seconds: the platform's field, not a column
    assert lines[made.headers["x-request-id"]]["status"] == 400
