"""The canary decision: a pure function of observation windows and thresholds from settings."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flywheel.config import CanarySettings, load_settings
from flywheel.deploy import canary
from flywheel.deploy.canary import Observation, decide, window_metrics
from flywheel.storage import Storage

CFG = CanarySettings()  # the real defaults, never lowered for a test


def side(n, *, errors=0, latency=5.0, score=lambda i: 0.02 + (i % 7) / 100, start=0):
    return [Observation(start + i, i >= errors, latency + (i % 10) * 0.1, score(i) if i >= errors else None) for i in range(n)]


def test_a_good_canary_passes_every_window_and_is_promoted():
    windows = [window_metrics(side(200), side(200, latency=6.0), CFG) for _ in range(CFG.windows)]
    assert all(w.passed for w in windows)
    verdict, reasons = decide(windows, CFG)
    assert verdict == "promote" and "3 of 3 windows passed" in reasons[0]
    assert decide(windows[:2], CFG)[0] == "continue"


def test_an_erroring_canary_is_rolled_back_on_the_first_window():
    window = window_metrics(side(200), side(200, errors=10), CFG)  # 5% of requests fail
    assert window.canary.error_rate == pytest.approx(10 / 200) and window.stable.error_rate == 0
    verdict, reasons = decide([window], CFG)
    assert verdict == "rollback" and any("canary error rate 0.0500 > 0.0100" in r for r in reasons)


def test_a_ten_times_slower_canary_is_rolled_back():
    window = window_metrics(side(200, latency=5.0), side(200, latency=50.0), CFG)
    verdict, reasons = decide([window], CFG)
    assert verdict == "rollback"
    assert any("p99 latency" in r and "2x stable's" in r for r in reasons)
    # p99 by the definition (numpy's linear interpolation) computed independently here:
    latencies = sorted(50.0 + (i % 10) * 0.1 for i in range(200))
    rank = 0.99 * (len(latencies) - 1)
    expected = latencies[int(rank)] + (latencies[int(rank) + 1] - latencies[int(rank)]) * (rank - int(rank))
    assert window.canary.p99_ms == pytest.approx(expected)


def test_a_canary_that_disagrees_with_stable_is_rolled_back():
    window = window_metrics(side(200), side(200, score=lambda i: 0.9 if i % 4 == 0 else 0.02 + (i % 7) / 100), CFG)
    assert window.score_agreement == pytest.approx(150 / 200)
    verdict, reasons = decide([window], CFG)
    assert verdict == "rollback" and any("scores agree" in r for r in reasons)


def test_a_window_too_small_to_judge_counts_against_the_canary():
    verdict, reasons = decide([window_metrics(side(20), side(20), CFG)], CFG)
    assert verdict == "rollback" and any("only 20 requests reached the canary" in r for r in reasons)


def test_thresholds_come_from_settings(tmp_path):
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_DEPLOY__CANARY__MAX_P99_LATENCY_RATIO": "20",
                                  "FLYWHEEL_DEPLOY__CANARY__MAX_P99_LATENCY_MS": "1000"})
    window = window_metrics(side(200, latency=5.0), side(200, latency=50.0), settings.deploy.canary)
    assert window.passed


def test_the_decision_record_is_written_as_json_and_markdown(tmp_path):
    storage = Storage(str(tmp_path))
    windows = [window_metrics(side(200), side(200, errors=10), CFG)]
    verdict, reasons = decide(windows, CFG)
    record = canary.DecisionRecord("fraud", "v2", "v1", "kserve", "run-1", verdict, reasons, CFG.model_dump(),
                                   [canary.window_dict(w) for w in windows], 10, canary.now(), canary.now(), ["patched"])
    canary.write_record(storage, record)
    stored = storage.read_json(record.uri)
    assert stored["verdict"] == "rollback" and stored["thresholds"]["max_error_rate"] == 0.01
    assert stored["windows"][0]["canary"]["errors"] == 10
    markdown = storage.read_bytes(record.uri.replace(".json", ".md")).decode()
    assert "# Canary decision: ROLLBACK" in markdown and "| 1 | 200 | 0.0500 |" in markdown


# ------------------------------------------------------------------ observing over real HTTP
class Predictor(BaseHTTPRequestHandler):
    """A loopback stand-in for one predictor revision: scores, or fails, as its server says."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(self.server.delay_s)
        if self.server.fail:
            self.send_response(500)
            self.end_headers()
            return
        amount = body["instances"][0]["amount"]
        data = json.dumps({"predictions": [{"fraud_probability": amount / 1000}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def start_predictors(*behaviours):
    """Loopback predictor servers, one per (fail, delay_s)."""
    servers = []
    for fail, delay_s in behaviours:
        server = ThreadingHTTPServer(("127.0.0.1", 0), Predictor)
        server.fail, server.delay_s = fail, delay_s
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    return servers, [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]


def stop_predictors(servers):
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def predictors():
    servers, urls = start_predictors((False, 0.0), (True, 0.0))
    yield urls
    stop_predictors(servers)


def test_replay_sends_each_request_to_both_versions_and_observes_them(predictors):
    good, failing = predictors
    instances = [{"amount": float(a)} for a in (10, 20, 30)]
    stable, canary_obs = canary.replay(good, failing, instances, "fraud", start=5)
    assert [o.request for o in stable] == [5, 6, 7] and [o.score for o in stable] == pytest.approx([0.01, 0.02, 0.03])
    assert all(o.ok and o.latency_ms > 0 for o in stable)
    assert all(not o.ok and o.error == "HTTP 500" for o in canary_obs)
    window = window_metrics(stable, canary_obs, CFG)
    assert window.canary.error_rate == 1.0 and window.paired == 0
