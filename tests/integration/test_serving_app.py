"""The serving app in process (FastAPI's TestClient, as KServe's own tests do): the schema and error
paths, the body limit, request ids and the metrics page, without starting a server process."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

V1 = "/v1/models/fraud:predict"
V2 = "/v2/models/fraud/infer"
GOOD = {"card_id": "c0000001", "merchant_id": "m000001", "amount": 12.5, "ts": "2026-11-01T12:00:00Z"}


@pytest.fixture(scope="module")
def client(trained_loop):
    from kserve.model_repository import ModelRepository
    from kserve.model_server import app
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension

    from serving.predictor import Predictor
    from serving.rest import FlywheelRESTServer

    predictor = Predictor("fraud", trained_loop["settings"])
    predictor.load()
    repository = ModelRepository()
    repository.update(predictor)
    rest = FlywheelRESTServer("kserve.model_server:app", DataPlane(model_registry=repository),
                              ModelRepositoryExtension(model_registry=repository), 0).configure("127.0.0.1", 4096)
    rest.create_application()
    with TestClient(app) as test_client:
        yield test_client, predictor


def test_a_good_request_is_scored_with_its_version(client):
    http, predictor = client
    response = http.post(V1, json={"instances": [GOOD]}, headers={"x-request-id": "in-process-1"})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["model_version"] == predictor.version
    assert response.headers["x-request-id"] == "in-process-1" and response.headers["x-model-version"] == predictor.version


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        (V1, {"instances": [dict(GOOD, ts="now")]}, 400, "field 'ts'"),
        (V1, {"instances": [dict(GOOD, amount=float("inf"))]}, 400, "the request body is not valid JSON"),
        (V1, {"instances": [GOOD] * 100}, 413, "larger than 4096 bytes"),
        (V2, {"inputs": [{"name": "amount", "shape": [2], "datatype": "FP64", "data": [1.0]}]}, 400, "shape \\[2\\] disagrees"),
        (V2, {"inputs": [{"name": "amount"}]}, 400, "malformed request"),
    ],
)
def test_client_mistakes_are_4xx_naming_the_problem(client, path, body, status, message):
    import json
    import re

    http, _ = client
    response = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert re.search(message, response.json()["error"]), response.json()["error"]
    assert response.headers["x-request-id"]


def test_unknown_routes_and_methods_answer_in_the_same_error_shape(client):
    http, _ = client
    missing = http.get("/no/such/route")
    assert missing.status_code == 404 and missing.json()["error"]
    response = http.get(V2)
    assert response.status_code == 405 and response.json()["error"]


def test_the_metrics_page_counts_requests_by_status(client):
    from prometheus_client.parser import text_string_to_metric_families

    http, predictor = client

    def count(status: str) -> float:
        text = http.get("/metrics").text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "flywheel_requests_total" and s.labels["status"] == status)

    ok, bad = count("200"), count("400")
    http.post(V1, json={"instances": [GOOD]})
    http.post(V1, json={"instances": []})
    http.post(V1, json={"instances": []})
    assert count("200") == ok + 1 and count("400") == bad + 2


def test_v2_versioned_paths_answer_for_the_served_version_and_404_for_another(client):
    """Bug caught: KServe routes /v2/models/<name>/versions/<v>/... and answers every one with a 501
    ("Model versioning not supported yet"): a server error for a client naming a version. The
    version being served answers there as on the plain paths; any other is a 404 that says which
    version is served."""
    http, predictor = client
    body = {"inputs": [{"name": "card_id", "shape": [1], "datatype": "BYTES", "data": [GOOD["card_id"]]},
                       {"name": "merchant_id", "shape": [1], "datatype": "BYTES", "data": [GOOD["merchant_id"]]},
                       {"name": "amount", "shape": [1], "datatype": "FP64", "data": [GOOD["amount"]]},
                       {"name": "ts", "shape": [1], "datatype": "BYTES", "data": [GOOD["ts"]]}]}
    served = f"/v2/models/fraud/versions/{predictor.version}"
    plain = http.post(V2, json=body)
    versioned = http.post(f"{served}/infer", json=body)
    assert versioned.status_code == 200, versioned.text
    assert versioned.json()["outputs"] == plain.json()["outputs"] and versioned.json()["model_version"] == predictor.version
    assert http.get(f"{served}/ready").status_code == 200
    assert http.get(served).json()["name"] == "fraud"
    for path in ("/v2/models/fraud/versions/no-such-version/infer", "/v2/models/fraud/versions/1/ready", "/v2/models/fraud/versions/1"):
        answer = http.post(path, json=body) if path.endswith("infer") else http.get(path)
        assert answer.status_code == 404, (path, answer.text)
        assert f"this server serves version {predictor.version!r}" in answer.json()["error"], answer.text
    other = http.post("/v2/models/other/versions/1/infer", json=body)
    assert other.status_code == 404 and "model 'other' version '1' is not served here" in other.json()["error"]


@pytest.mark.parametrize("path", ["/v2/repository/models/fraud/unload", "/v2/repository/models/fraud/load", "/v1/models/fraud:explain"])
def test_no_caller_can_unload_the_model_and_there_is_no_explain_route(client, path):
    """Bug caught: KServe's model repository extension answers POST .../fraud/unload by taking the
    model out of service (every prediction then a 404 until a restart), for any caller; and
    :explain, which the model does not have, is a 501. Both are unknown paths here (404)."""
    http, predictor = client
    answer = http.post(path, json={"instances": [GOOD]})
    assert answer.status_code == 404 and answer.json()["error"], answer.text
    scored = http.post(V1, json={"instances": [GOOD]})
    assert scored.status_code == 200 and scored.json()["predictions"][0]["model_version"] == predictor.version
    assert predictor.ready


def test_a_compressed_body_is_inflated_within_the_body_limit_and_bad_ones_named(client):
    """Bugs caught: a gzip or deflate body (tritonclient's request compression) read as JSON (a 400
    that names the wrong problem) or refused; a small compressed body that inflates past the limit
    (a zip bomb) read whole into memory; broken compressed data or an unknown encoding as a 500."""
    import gzip
    import json
    import zlib

    http, predictor = client
    plain_body = json.dumps({"instances": [GOOD]}).encode()
    for encoding, body in (("gzip", gzip.compress(plain_body)), ("deflate", zlib.compress(plain_body))):
        answer = http.post(V1, content=body, headers={"content-type": "application/json", "content-encoding": encoding})
        assert answer.status_code == 200, (encoding, answer.text)
        assert answer.json()["predictions"][0]["model_version"] == predictor.version
    bomb = gzip.compress(b" " * 100_000)  # about 130 bytes that inflate to 100 kB; the limit here is 4,096
    answer = http.post(V1, content=bomb, headers={"content-encoding": "gzip"})
    assert answer.status_code == 413 and "once decompressed" in answer.json()["error"]
    broken = http.post(V1, content=b"not gzip at all", headers={"content-encoding": "gzip"})
    assert broken.status_code == 400 and "not gzip data" in broken.json()["error"]
    truncated = http.post(V1, content=gzip.compress(plain_body)[:-12], headers={"content-encoding": "gzip"})
    assert truncated.status_code == 400 and "truncated" in truncated.json()["error"]
    unknown = http.post(V1, content=plain_body, headers={"content-encoding": "br"})
    assert unknown.status_code == 415 and "'br'" in unknown.json()["error"]
    plain = http.post(V1, json={"instances": [GOOD]}, headers={"content-encoding": "identity"})
    assert plain.status_code == 200, plain.text
