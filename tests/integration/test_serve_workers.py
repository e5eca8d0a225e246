"""Several workers on the configured address: both serve, and one /metrics scrape counts every
request whichever worker answered it (Prometheus multiprocess mode)."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import flywheel_server

V1 = "/v1/models/fraud:predict"
V2 = "/v2/models/fraud/infer"
GOOD = {"card_id": "c0000001", "merchant_id": "m000001", "amount": 12.5, "ts": "2026-11-01T12:00:00Z"}
HOST = "127.0.0.2"  # a loopback address that is not the default: binding it proves the setting is used


@pytest.fixture(scope="module")
def server(trained_loop, tmp_path_factory):
    env = dict(trained_loop["env"], FLYWHEEL_SERVING__WORKERS="2", FLYWHEEL_SERVING__HOST=HOST,
               FLYWHEEL_MONITORING__CAPTURE_RATE="1", FLYWHEEL_MONITORING__CAPTURE_FLUSH_S="0.2")
    with flywheel_server(env, tmp_path_factory.mktemp("workers") / "server.log", host=HOST, seconds=300) as running:
        yield running, trained_loop


def samples(text: str, name: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def total(text: str, name: str, **labels: str) -> float:
    return sum(s.value for s in samples(text, name) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_the_server_binds_only_the_configured_host(server):
    running, _ = server
    port = int(running.base.rsplit(":", 1)[1])
    assert httpx.get(f"{running.base}/v1/models/fraud", timeout=5).status_code == 200
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "KServe's default binds every address; the setting must win"


def test_metrics_count_every_request_across_workers(server):
    running, loop = server
    version = loop["model"]["version"]
    before = httpx.get(f"{running.base}/metrics", timeout=10).text
    sent = {"200": 0, "400": 0}
    unknown_cards = 0
    for n in range(60):  # a new connection each time, so both workers get some
        if n % 6 == 5:
            response = httpx.post(f"{running.base}{V1}", json={"instances": [dict(GOOD, amount=-1)]}, timeout=10)
        elif n % 2:
            response = httpx.post(f"{running.base}{V2}", json={"inputs": [
                {"name": k, "shape": [1], "datatype": "BYTES" if isinstance(v, str) else "FP64", "data": [v]} for k, v in GOOD.items()
            ]}, timeout=10)
        else:
            card = "card-never-seen" if n % 4 == 0 else GOOD["card_id"]
            unknown_cards += card == "card-never-seen"
            response = httpx.post(f"{running.base}{V1}", json={"instances": [dict(GOOD, card_id=card)]}, timeout=10)
        sent[str(response.status_code)] += 1
    after = httpx.get(f"{running.base}/metrics", timeout=10).text

    pids = {json.loads(line)["pid"] for line in running.output().splitlines() if line.startswith('{"time"')}
    assert len(pids) == 2, f"both workers should have served requests, saw {pids}"

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("flywheel_requests_total") == 60
    assert grew("flywheel_requests_total", status="200", model_version=version) == sent["200"] == 50
    assert grew("flywheel_requests_total", status="400", model_version="none") == sent["400"] == 10
    assert grew("flywheel_requests_total", protocol="v2") == 20
    assert grew("flywheel_request_seconds_count") == 60
    assert grew("flywheel_feature_lookup_seconds_count") == 50  # only requests that got as far as scoring
    assert grew("flywheel_forward_seconds_count") == 50
    assert grew("flywheel_unknown_entities_total", entity="card") == unknown_cards == 15
    assert grew("flywheel_unknown_entities_total", entity="merchant") == 0
    buckets = samples(after, "flywheel_request_seconds_bucket")
    assert buckets and max(s.value for s in buckets if s.labels["le"] == "+Inf") >= 30


def test_each_worker_captures_its_own_requests_in_parts_of_its_own(server):
    """Bug caught: workers sharing (or losing) the capture writer, or writing parts under one name,
    so one worker's rows overwrite or hide another's."""
    import time

    from flywheel.monitoring.capture import capture_parts, read_capture

    running, loop = server
    sent = {f"workers-capture-{n}" for n in range(30)}
    for request_id in sorted(sent):  # a new connection each time, so both workers get some
        response = httpx.post(f"{running.base}{V1}", json={"instances": [GOOD]}, headers={"x-request-id": request_id}, timeout=10)
        assert response.status_code == 200
    storage = loop["storage"]
    deadline, seen = time.monotonic() + 20, set()
    while time.monotonic() < deadline:
        table = read_capture(storage, columns=["request_id"])
        seen = {rid for rid in (table["request_id"].to_pylist() if table.num_rows else []) if rid in sent}
        if seen == sent:
            break
        time.sleep(0.2)
    assert seen == sent, f"{len(sent - seen)} requests' rows were not captured"
    pids = {uri.rsplit("/", 1)[1].split("-")[2] for uri in capture_parts(storage)}
    served_by = {str(json.loads(line)["pid"]) for line in running.output().splitlines()
                 if line.startswith('{"time"') and json.loads(line)["request_id"] in sent}
    assert len(served_by) == 2 and served_by <= pids, (served_by, pids)
