"""The canary decision both targets share: the loop over windows (first failure rolls back, all
passing promotes), the decision record, and observing two revisions over HTTP. The thresholds are
the real defaults from settings, never lowered for a test; each threshold on its own is tested in
test_analysis.py."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flywheel.config import CanarySettings, load_settings
from flywheel.deploy import canary
from flywheel.deploy.analysis import Sample, ScorePair, Thresholds, summarise
from flywheel.storage import Storage

CFG = CanarySettings()  # the real defaults, never lowered for a test
THRESHOLDS = Thresholds.from_object(CFG)
CLIENT = {"requests": 0, "to_canary": 0, "answered_by_canary": 0, "fallbacks": 0, "failures": 0}


def window(n=200, *, errors=0, latency=5.0, canary_latency=None, disagree_every=0, percent=10):
    """n requests sent to both arms: stable at ``latency`` ms, the canary at ``canary_latency``; the
    first ``errors`` canary calls fail; every ``disagree_every``-th canary score is 0.9 instead of stable's."""
    canary_latency = latency if canary_latency is None else canary_latency
    samples, pairs = [], []
    for i in range(n):
        score = 0.02 + (i % 7) / 100
        samples.append(Sample("stable", True, latency + (i % 10) * 0.1, shadow=True))
        ok = i >= errors
        samples.append(Sample("canary", ok, canary_latency + (i % 10) * 0.1, "" if ok else "HTTP 500"))
        if ok:
            pairs.append(ScorePair((score,), (0.9 if disagree_every and i % disagree_every == 0 else score,)))
    return summarise(samples, pairs, CLIENT, THRESHOLDS, percent)


def record():
    return canary.DecisionRecord("fraud", "v2", "v1", "kserve", "run-1", THRESHOLDS.to_dict(), [10])


def test_every_window_passing_promotes_after_the_whole_plan():
    seen = []

    def observe(percent, index):
        seen.append((percent, index))
        return window(percent=percent), {"note": index}

    rec = record()
    assert canary.analyse(rec, [10, 10, 50], observe, THRESHOLDS) == "promote"
    assert seen == [(10, 0), (10, 1), (50, 2)]
    assert [(w["step"], w["window"], w["note"], w["verdict"]) for w in rec.windows] == [(10, 1, 0, "pass"), (10, 2, 1, "pass"), (50, 1, 2, "pass")]
    assert rec.verdict == "promote" and rec.reasons == ["3 window(s) at 10%, 50% passed every threshold"]


@pytest.mark.parametrize("bad, reason", [
    (dict(errors=10), "canary error rate 0.0500 > 0.0100"),  # 5% of requests fail
    (dict(canary_latency=50.0), "2x stable's on the same requests"),  # ten times slower
    (dict(disagree_every=4), "scores agree within 0.1 on 75.0%"),
    (dict(n=20), "only 20 requests reached the canary"),
])
def test_the_first_bad_window_rolls_back_and_stops_the_plan(bad, reason):
    windows = iter([window(), window(**bad), window()])
    rec = record()
    assert canary.analyse(rec, [10, 10, 10], lambda p, i: (next(windows), {}), THRESHOLDS) == "rollback"
    assert len(rec.windows) == 2 and rec.windows[1]["verdict"] == "rollback"
    assert any(r.startswith("at 10% (window 2): ") and reason in r for r in rec.reasons), rec.reasons


def test_thresholds_come_from_settings(tmp_path):
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_DEPLOY__CANARY__MAX_P99_LATENCY_RATIO": "20",
                                  "FLYWHEEL_DEPLOY__CANARY__MAX_P50_LATENCY_RATIO": "20",
                                  "FLYWHEEL_DEPLOY__CANARY__MAX_P99_LATENCY_MS": "1000",
                                  "FLYWHEEL_DEPLOY__CANARY__MIN_DECISION_AGREEMENT": "0.5"})
    thresholds = Thresholds.from_object(settings.deploy.canary)
    assert (thresholds.max_p99_latency_ratio, thresholds.min_decision_agreement) == (20, 0.5)
    assert canary.analyse(record(), [10], lambda p, i: (window(canary_latency=50.0), {}), thresholds) == "promote"
    assert Thresholds.from_object(CanarySettings()) == Thresholds()  # one set of defaults


def test_the_decision_record_is_written_as_json_and_markdown(tmp_path):
    storage = Storage(str(tmp_path))
    rec = record()
    canary.analyse(rec, [10], lambda p, i: (window(errors=10), {}), THRESHOLDS)
    rec.events.append("patched")
    canary.write_record(storage, rec)
    stored = storage.read_json(rec.uri)
    assert rec.uri.endswith("reports/canary/run-1/decision.json")
    assert stored["verdict"] == "rollback" and stored["thresholds"]["max_error_rate"] == 0.01
    assert stored["windows"][0]["observations"]["canary"]["errors"] == 10
    assert canary.DecisionRecord.from_dict(stored).to_dict() == stored
    markdown = storage.read_bytes(rec.uri.replace(".json", ".md")).decode()
    assert "# Canary decision: ROLLBACK" in markdown and "| 1 | 10 | 200 | 0.0500 |" in markdown


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
    both_good = canary.replay(good, good, instances, "fraud", THRESHOLDS, 10)
    assert (both_good.stable.requests, both_good.canary.requests, both_good.agreement.pairs) == (3, 3, 3)
    assert both_good.agreement.max_abs_diff == 0.0 and both_good.stable.p50_ms > 0
    observed = canary.replay(good, failing, instances, "fraud", THRESHOLDS, 10)
    assert observed.stable.errors == 0 and observed.canary.error_rate == 1.0 and observed.agreement.pairs == 0
    assert observed.canary.error_examples == ["HTTP 500"] and observed.canary_percent == 10


def test_held_out_requests_are_the_contracts_request_fields_in_time_order(tmp_path):
    """The canary's replay for any use case: the model's holdout rows with only what a request
    carries (no label, no arrival), times as ISO-8601, a missing value left out, oldest first."""
    from types import SimpleNamespace

    import pandas as pd

    from flywheel.usecase import load_usecase
    from tests.factories import REPO

    contract = load_usecase(REPO / "usecases" / "flights").contract
    storage = Storage(str(tmp_path / "store"))
    holdout = pd.DataFrame({
        "flight_id": ["b", "a"], "scheduled_departure": pd.to_datetime(["2013-11-02T10:00Z", "2013-11-01T10:00Z"]),
        "scheduled_arrival": pd.to_datetime(["2013-11-02T13:00Z", "2013-11-01T13:00Z"]), "carrier": ["UA", "AA"],
        "flight": [1, 2], "tailnum": ["N1", None], "origin": ["EWR", "JFK"], "dest": ["IAH", "MIA"],
        "route": ["EWR-IAH", "JFK-MIA"], "distance": [1400.0, 1089.0],
        "arrival": pd.to_datetime(["2013-11-02T13:05Z", "2013-11-01T12:55Z"]), "arr_delay": [5.0, -5.0],
    })
    uri = storage.write_parquet(storage.uri("ds", "holdout.parquet"), holdout).uri
    storage.write_json(storage.uri("ds", "manifest.json"), {"holdout_uri": uri})
    model = SimpleNamespace(version="v1", meta={"training_set": {"uri": storage.uri("ds")}})
    rows = canary.held_out_rows(storage, model, contract)
    assert [row["flight_id"] for row in rows] == ["a", "b"]
    assert "tailnum" not in rows[0] and rows[1]["tailnum"] == "N1"
    assert rows[0]["scheduled_departure"] == "2013-11-01T10:00:00+00:00"
    assert not {"arrival", "arr_delay"} & (set(rows[0]) | set(rows[1]))
