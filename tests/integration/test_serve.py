"""`flywheel serve`: the real KServe ModelServer on loopback, scoring over HTTP (v1 and v2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from tests.servers import free_port, wait_until_ready


@pytest.fixture(scope="module")
def server(trained_loop):
    port = free_port()
    env = dict(os.environ, **trained_loop["env"])
    process = subprocess.Popen(
        [sys.executable, "-m", "flywheel.cli", "serve", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(process, f"{base}/v1/models/fraud")
    yield base, trained_loop
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


def known_transaction(loop) -> dict:
    holdout = loop["storage"].read_parquet(loop["training_set"]["holdout_uri"]).to_pandas()
    row = holdout.iloc[-1]
    return {
        "transaction_id": "req-1", "card_id": row.card_id, "merchant_id": row.merchant_id,
        "merchant_category": row.merchant_category, "amount": float(row.amount),
        "ts": (row.ts + __import__("pandas").Timedelta(hours=1)).isoformat(), "channel": row.channel,
        "lat": float(row.lat), "lon": float(row.lon),
    }


def test_v1_scores_a_transaction_with_online_features(server):
    base, loop = server
    response = httpx.post(f"{base}/v1/models/fraud:predict", json={"instances": [known_transaction(loop)]}, timeout=10)
    assert response.status_code == 200, response.text
    prediction = response.json()["predictions"][0]
    assert 0.0 <= prediction["fraud_probability"] <= 1.0
    assert prediction["model_version"] == loop["model"]["version"]


def test_an_obvious_fraud_scores_higher_than_the_same_card_normal_use(server):
    base, loop = server
    normal = known_transaction(loop)
    fraud = dict(normal, amount=normal["amount"] * 40, merchant_category="crypto", channel="online",
                 lat=normal["lat"] - 15, lon=normal["lon"] + 40, ts=normal["ts"][:11] + "03:30:00+00:00")
    response = httpx.post(f"{base}/v1/models/fraud:predict", json={"instances": [normal, fraud]}, timeout=10)
    assert response.status_code == 200, response.text
    low, high = (p["fraud_probability"] for p in response.json()["predictions"])
    assert high > low


def test_v2_named_inputs(server):
    base, loop = server
    tx = known_transaction(loop)
    body = {"inputs": [
        {"name": "card_id", "shape": [1], "datatype": "BYTES", "data": [tx["card_id"]]},
        {"name": "merchant_id", "shape": [1], "datatype": "BYTES", "data": [tx["merchant_id"]]},
        {"name": "merchant_category", "shape": [1], "datatype": "BYTES", "data": [tx["merchant_category"]]},
        {"name": "amount", "shape": [1], "datatype": "FP64", "data": [tx["amount"]]},
        {"name": "ts", "shape": [1], "datatype": "BYTES", "data": [tx["ts"]]},
    ]}
    response = httpx.post(f"{base}/v2/models/fraud/infer", json=body, timeout=10)
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert output["name"] == "fraud_probability" and output["datatype"] == "FP32"
    assert 0.0 <= output["data"][0] <= 1.0


def test_an_unknown_card_is_scored_not_refused(server):
    base, loop = server
    tx = dict(known_transaction(loop), card_id="card-never-seen", merchant_id="merchant-never-seen")
    response = httpx.post(f"{base}/v1/models/fraud:predict", json={"instances": [tx]}, timeout=10)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/v1/models/fraud:predict", {"rows": []}, "instances"),
        ("/v1/models/fraud:predict", {"instances": [{"card_id": "c"}]}, "missing required field"),
        ("/v1/models/fraud:predict", {"instances": [{"card_id": "c", "merchant_id": "m", "amount": "lots", "ts": "2026-11-01T00:00:00Z"}]}, "'amount' must be a number"),
        ("/v2/models/fraud/infer", {"inputs": [{"name": "colour", "shape": [1], "datatype": "BYTES", "data": ["red"]}]}, "unknown input"),
        ("/v2/models/fraud/infer", {"inputs": "nope"}, "malformed request"),
    ],
)
def test_malformed_requests_get_400_with_a_message(server, path, body, message):
    base, _ = server
    response = httpx.post(f"{base}{path}", json=body, timeout=10)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_invalid_json_is_a_client_error_not_a_500(server):
    base, _ = server
    for path in ("/v1/models/fraud:predict", "/v2/models/fraud/infer"):
        for content_type in ("application/json", "application/x-www-form-urlencoded"):
            response = httpx.post(f"{base}{path}", content=b"{not json", headers={"content-type": content_type}, timeout=10)
            assert response.status_code == 400, (path, content_type, response.status_code, response.text)
            assert response.json().get("error")


def test_a_json_body_sent_as_a_form_is_scored_like_json(server):
    """`curl -d` sends application/x-www-form-urlencoded: the JSON body must still be read."""
    base, loop = server
    body = json.dumps({"instances": [known_transaction(loop)]}).encode()
    response = httpx.post(f"{base}/v1/models/fraud:predict", content=body,
                          headers={"content-type": "application/x-www-form-urlencoded"}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["model_version"] == loop["model"]["version"]
