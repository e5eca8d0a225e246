"""The local canary: real KServe ModelServers on loopback (tests/canary_models.py), the splitting
proxy in front of them, and the ramp driving it under concurrent load. The thresholds are the real
defaults (:class:`Thresholds`), never loosened for a test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from flywheel.deploy.analysis import Thresholds
from flywheel.deploy.ramp import ramp_canary, v1_bodies
from flywheel.deploy.traffic import ARM_HEADER, start_proxy
from flywheel.errors import CanaryError
from flywheel.storage import Storage
from tests.canary_models import erroring_request, expected_score, shuffled_score
from tests.factories import FRAUD_CONTRACT
from tests.servers import free_port, wait_until_ready

FRAUD_FIELDS = list(FRAUD_CONTRACT.request_fields())  # what a fraud request carries

ROOT = Path(__file__).resolve().parents[2]
V1 = "/v1/models/fraud:predict"
BEHAVIOURS = ("good", "erroring", "slow", "shuffled")
PIDS: dict[str, int] = {}  # the servers fixture's processes, by name


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, str]]:
    """stable (the good model) and one server per canary behaviour, started together."""
    logs = tmp_path_factory.mktemp("canary-servers")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    started: dict[str, tuple[subprocess.Popen, str, Path]] = {}
    try:
        for name in ("stable", *BEHAVIOURS):
            port, log = free_port(), logs / f"{name}.log"
            with open(log, "w") as sink:
                process = subprocess.Popen(
                    [sys.executable, "-m", "tests.canary_models", "--port", str(port),
                     "--behaviour", "good" if name == "stable" else name],
                    env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                )
            started[name] = (process, f"http://127.0.0.1:{port}", log)
            PIDS[name] = process.pid
        for name, (process, base, log) in started.items():
            try:
                wait_until_ready(process, f"{base}/v1/models/fraud", 120)
            except pytest.fail.Exception as exc:
                pytest.fail(f"the {name} model server did not start: {exc}\n{log.read_text(errors='replace')}")
        yield {name: base for name, (_, base, _) in started.items()}
    finally:
        for process, _, _ in started.values():
            process.terminate()
        for process, _, _ in started.values():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()


def transactions(n: int, offset: int = 0) -> list[dict]:
    """Held-out-like transactions with amounts spread across the decision threshold."""
    rng = np.random.default_rng(7 + offset)
    return [
        {"transaction_id": f"tx-{offset + i}", "card_id": f"card-{i % 37}", "merchant_id": f"m-{i % 11}",
         "merchant_category": "grocery", "amount": float(rng.uniform(1, 300)), "ts": f"2026-11-01T{i % 24:02d}:00:00Z",
         "channel": "pos", "lat": 52.5, "lon": 13.4, "is_fraud": False}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def replay() -> list[dict]:
    return v1_bodies(transactions(400), fields=FRAUD_FIELDS)


class BackgroundClients:
    """Live clients hitting the proxy for as long as the block runs; every answer that is not a 200 is a failure."""

    def __init__(self, url: str, threads: int = 2) -> None:
        self.url, self.stop = url, threading.Event()
        self.statuses: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]

    def _run(self, k: int) -> None:
        bodies = v1_bodies(transactions(50, offset=10_000 * (k + 1)), fields=FRAUD_FIELDS)
        with httpx.Client(timeout=30) as client:
            i = 0
            while not self.stop.is_set():
                try:
                    status = str(client.post(self.url, json=bodies[i % len(bodies)]).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with self.lock:
                    self.statuses[status] += 1
                i += 1

    @property
    def failures(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != "200")

    def __enter__(self) -> "BackgroundClients":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def ramp(*args, **options) -> dict:
    """The ramp's decision record, as the JSON it is written as."""
    return ramp_canary(*args, **options).to_dict()


def arms_of(url: str, bodies: list[dict]) -> list[str]:
    with httpx.Client(timeout=30) as client:
        answers = [client.post(url, json=body) for body in bodies]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    return [a.headers[ARM_HEADER] for a in answers]


# ------------------------------------------------------------------ the proxy
def test_the_split_is_exact_and_the_canary_answers_its_share(servers, replay):
    """10% means exactly 10 of 100 requests, answered with the canary's own scores; each canary
    request is shadowed to stable and the score pairs match the two models' oracles."""
    with start_proxy(servers["stable"], servers["shuffled"], canary_percent=10) as proxy:
        bodies = replay[:100]
        with httpx.Client(timeout=30) as client:
            answers = [client.post(proxy.url + V1, json=body) for body in bodies]
        assert [a.status_code for a in answers] == [200] * 100
        arms = [a.headers[ARM_HEADER] for a in answers]
        assert arms == (["stable"] * 9 + ["canary"]) * 10
        for body, answer, arm in zip(bodies, answers, arms):
            tx = body["instances"][0]
            want = shuffled_score(tx["transaction_id"]) if arm == "canary" else expected_score(tx["amount"])
            assert answer.json()["predictions"][0]["fraud_probability"] == pytest.approx(want)
        window = proxy.take_window()

    assert window.client == {"requests": 100, "to_canary": 10, "answered_by_canary": 10, "fallbacks": 0, "failures": 0}
    assert (window.stable.requests, window.stable.errors) == (100, 0)  # 90 routed + 10 shadows
    assert (window.canary.requests, window.canary.errors) == (10, 0)
    canary_txs = [b["instances"][0] for b, arm in zip(bodies, arms) if arm == "canary"]
    diffs = np.array([abs(expected_score(t["amount"]) - shuffled_score(t["transaction_id"])) for t in canary_txs])
    same_decision = [(expected_score(t["amount"]) >= 0.5) == (shuffled_score(t["transaction_id"]) >= 0.5) for t in canary_txs]
    assert window.agreement.pairs == 10
    assert window.agreement.mean_abs_diff == pytest.approx(diffs.mean())
    assert window.agreement.max_abs_diff == pytest.approx(diffs.max())
    assert window.agreement.decision_agreement == pytest.approx(np.mean(same_decision))
    assert window.agreement.score_agreement == pytest.approx(np.mean(diffs <= 0.1))


def test_v2_requests_are_split_and_compared_too(servers):
    body = {"inputs": [{"name": "amount", "shape": [2], "datatype": "FP64", "data": [20.0, 280.0]},
                       {"name": "transaction_id", "shape": [2], "datatype": "BYTES", "data": ["v2-a", "v2-b"]}]}
    with start_proxy(servers["stable"], servers["good"], canary_percent=50) as proxy:
        with httpx.Client(timeout=30) as client:
            answers = [client.post(proxy.url + "/v2/models/fraud/infer", json=body) for _ in range(4)]
        window = proxy.take_window()
    assert [a.headers[ARM_HEADER] for a in answers] == ["stable", "canary"] * 2
    for answer in answers:
        assert answer.json()["outputs"][0]["data"] == pytest.approx([expected_score(20.0), expected_score(280.0)])
    assert window.agreement.pairs == 4 and window.agreement.mean_abs_diff == 0.0


def test_health_readiness_and_metadata_are_stables(servers):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with start_proxy(servers["stable"], dead, canary_percent=100) as proxy:
        for path in ("/v2/health/ready", "/v2/health/live", "/v1/models/fraud", "/v2/models/fraud/ready"):
            answer = httpx.get(proxy.url + path, timeout=10)
            assert answer.status_code == 200, (path, answer.text)
            assert answer.headers[ARM_HEADER] == "stable"


def test_a_dead_canary_is_answered_from_stable(servers, replay):
    dead = f"http://127.0.0.1:{free_port()}"
    with start_proxy(servers["stable"], dead, canary_percent=100) as proxy:
        assert arms_of(proxy.url + V1, replay[:20]) == ["stable"] * 20
        window = proxy.take_window()
    assert window.canary.errors == 20 and window.client["fallbacks"] == 20 and window.client["failures"] == 0
    assert all(e.startswith("connection") for e in window.canary.error_examples)


def test_a_canary_refusing_what_stable_answers_is_a_canary_failure(servers, replay):
    """A 4xx from the canary for a request stable answers (here: the canary has no such model) is
    the canary's failure, answered from stable."""
    with start_proxy(servers["stable"], servers["good"] + "/no-such-prefix", canary_percent=100) as proxy:
        assert arms_of(proxy.url + V1, replay[:5]) == ["stable"] * 5
        window = proxy.take_window()
    assert window.canary.errors == 5 and window.client["fallbacks"] == 5 and window.client["failures"] == 0
    assert window.canary.error_examples == ["HTTP 404 for a request stable answered with 200"]


def test_canary_5xx_are_answered_from_stable(servers, replay):
    with start_proxy(servers["stable"], servers["erroring"], canary_percent=100) as proxy:
        failing = [b for b in replay if erroring_request(b["instances"][0]["transaction_id"])][:5]
        passing = [b for b in replay if not erroring_request(b["instances"][0]["transaction_id"])][:5]
        assert arms_of(proxy.url + V1, failing) == ["stable"] * 5
        assert arms_of(proxy.url + V1, passing) == ["canary"] * 5
        window = proxy.take_window()
    assert window.canary.errors == 5 and window.canary.error_examples == ["HTTP 500"]
    assert window.client["failures"] == 0


def test_bad_proxy_arguments_are_clear_errors(servers):
    with pytest.raises(CanaryError, match="stable server's URL"):
        start_proxy("localhost:8080", servers["good"])
    with pytest.raises(CanaryError, match="whole percent"):
        start_proxy(servers["stable"], servers["good"], canary_percent=150)
    with start_proxy(servers["stable"], servers["good"]) as proxy:
        with pytest.raises(CanaryError, match="whole percent"):
            proxy.set_canary_percent(-1)
        port = int(proxy.url.rsplit(":", 1)[1])
        with pytest.raises(CanaryError, match="cannot listen"):
            start_proxy(servers["stable"], servers["good"], port=port)
        with pytest.raises(CanaryError, match="steps must rise"):
            ramp_canary(proxy, [{"instances": []}], V1, steps=[50, 10])
        with pytest.raises(CanaryError, match="no requests to send"):
            ramp_canary(proxy, [], V1)


# ------------------------------------------------------------------ the ramp
@contextmanager
def rollout(servers: dict[str, str], canary: str) -> Iterator[tuple[object, BackgroundClients]]:
    with start_proxy(servers["stable"], servers[canary]) as proxy:
        with BackgroundClients(proxy.url + V1) as live:
            yield proxy, live


@pytest.mark.parametrize("canary", ["erroring", "slow"])
def test_a_bad_canary_is_rolled_back_and_no_client_request_fails(servers, replay, tmp_path, canary):
    storage = Storage(str(tmp_path))
    uri = storage.uri("reports", "canary", f"{canary}.json")
    with rollout(servers, canary) as (proxy, live):
        record = ramp(proxy, replay, V1, steps=[20, 50], window_requests=250, concurrency=16,
                             storage=storage, record_uri=uri, meta={"candidate": canary})
        assert proxy.canary_percent == 0
        after = arms_of(proxy.url + V1, replay[:30])
    assert after == ["stable"] * 30  # rolled back: the canary gets nothing
    assert record["verdict"] == "rollback" and record["final_canary_percent"] == 0
    assert len(record["windows"]) == 1 and record["windows"][0]["step"] == 20
    # Zero failed client requests during the whole rollout: the replay's and the live clients'.
    assert record["client"] == {"requests": 250, "failures": 0, "statuses": {"200": 250}}
    assert live.failures == 0 and sum(live.statuses.values()) > 0, live.statuses
    observed = record["windows"][0]["observations"]
    assert observed["client"]["failures"] == 0
    assert observed["canary"]["requests"] >= 50
    assert observed["client"]["fallbacks"] == observed["canary"]["errors"]  # each canary failure answered by stable
    if canary == "erroring":
        # It errs (500s), not merely slow: on a loaded machine a request may also time out now and then.
        assert observed["canary"]["errors"] > observed["canary"]["timeouts"]
        assert any("canary error rate" in reason for reason in record["reasons"]), record["reasons"]
    else:  # slow: too slow to wait for (a timeout, answered from stable), or slower than the p99 thresholds allow
        c, s = observed["canary"], observed["stable"]
        assert c["timeouts"] > 0 or c["p50_ms"] > 3 * s["p50_ms"], observed  # it was seen to be slow
        assert any("latency" in reason or "timeouts" in reason for reason in record["reasons"]), record["reasons"]
    assert storage.read_json(uri) == json.loads(json.dumps(record))


def test_a_canary_that_disagrees_with_stable_is_rolled_back(servers, replay):
    with rollout(servers, "shuffled") as (proxy, live):
        record = ramp(proxy, replay, V1, steps=[20, 50], window_requests=250)
    assert record["verdict"] == "rollback"
    assert any("decisions (at" in r for r in record["reasons"]) and any("mean |stable - canary|" in r for r in record["reasons"])
    assert record["client"]["failures"] == 0 and live.failures == 0


def test_a_good_canary_is_promoted_and_its_record_says_why(servers, replay, tmp_path):
    storage = Storage(str(tmp_path))
    uri = storage.uri("reports", "canary", "run-1", "decision.json")
    with start_proxy(servers["stable"], servers["good"]) as proxy:
        record = ramp(proxy, replay, V1, steps=[10, 50], window_requests=500, concurrency=16,
                             storage=storage, record_uri=uri, meta={"candidate": "v2", "stable": "v1"})
        assert proxy.canary_percent == 100
        assert arms_of(proxy.url + V1, replay[:10]) == ["canary"] * 10
    assert record["verdict"] == "promote" and record["final_canary_percent"] == 100, record["reasons"]
    assert record["thresholds"] == Thresholds().to_dict()
    assert record["meta"]["candidate"] == "v2" and record["meta"]["stable"] == "v1" and record["steps"] == [10, 50]
    assert [w["step"] for w in record["windows"]] == [10, 50]
    for window, share in zip(record["windows"], (50, 250)):  # the counter split is exact
        observed = window["observations"]
        assert window["verdict"] == "pass"
        # No error of its own: a timeout in a stall stable's calls suffered too is the machine's.
        assert observed["canary"]["requests"] == share and observed["canary"]["errors"] == observed["canary"]["shared_stalls"]
        assert observed["stable"]["requests"] == 500  # the rest routed, plus a shadow per canary request
        assert observed["agreement"]["pairs"] == share - observed["canary"]["errors"] and observed["agreement"]["mean_abs_diff"] == 0.0
        assert observed["agreement"]["decision_agreement"] == 1.0
    assert record["client"] == {"requests": 1000, "failures": 0, "statuses": {"200": 1000}}
    assert record["started_at"] <= record["decided_at"]
    assert storage.read_json(uri) == json.loads(json.dumps(record))


def test_live_traffic_alone_can_judge_and_roll_back_a_canary(servers):
    """No replay: the windows are the live clients' own requests, and none of them fails."""
    with start_proxy(servers["stable"], servers["erroring"]) as proxy:
        with BackgroundClients(proxy.url + V1, threads=6) as live:
            record = ramp(proxy, None, V1, steps=[20, 50], window_requests=250, live_window_timeout_s=120)
            assert proxy.canary_percent == 0
    assert record["source"] == "live" and record["verdict"] == "rollback", record["reasons"]
    observed = record["windows"][0]["observations"]
    assert observed["client"]["requests"] >= 250 and observed["canary"]["requests"] >= 50
    assert observed["canary"]["errors"] > 0 and observed["client"]["failures"] == 0
    assert live.failures == 0 and sum(live.statuses.values()) >= 250, live.statuses


@contextmanager
def stalls(names: list[str], every_s: float = 0.5, for_s: float = 0.4) -> Iterator[list[int]]:
    """Freeze the named model servers (SIGSTOP, then SIGCONT) for ``for_s`` out of every
    ``every_s + for_s`` seconds while the block runs: a stall made for real. Yields the list the
    number of stalls is counted in."""
    pids, done, count = [PIDS[name] for name in names], threading.Event(), [0]

    def run() -> None:
        while not done.is_set():  # the first stall at once: a fast machine's first window is short
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(for_s)
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            count[0] += 1
            done.wait(every_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield count
    finally:
        done.set()
        thread.join(timeout=10)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("frozen", [["stable", "good"], ["good"]], ids=["both-arms", "canary-alone"])
def test_stalls_both_arms_suffer_are_not_held_against_a_good_canary(servers, replay, frozen):
    """The canary is held to a 250 ms timeout, stable to 30 s. Freezing both servers for 400 ms at
    a time makes the canary's calls time out and stable's merely slow: those timeouts are the
    moment's, and the good canary is promoted. Freezing the canary alone is the canary's problem:
    rolled back, its timeouts counted."""
    with start_proxy(servers["stable"], servers["good"], canary_timeout_s=0.25) as proxy:
        with stalls(frozen) as count:
            record = ramp(proxy, replay, V1, steps=[20, 50], window_requests=250, concurrency=16)
    assert count[0] >= 1, count
    assert record["client"]["failures"] == 0, record["client"]
    first = record["windows"][0]["observations"]["canary"]
    assert first["timeouts"] > 0, first  # the stalls were seen by the canary
    if frozen == ["good"]:
        assert record["verdict"] == "rollback", record["reasons"]
        assert first["shared_stalls"] < first["timeouts"]
        assert any("canary error rate" in r for r in record["reasons"]), record["reasons"]
    else:
        assert record["verdict"] == "promote", record["reasons"]
        for window in record["windows"]:
            canary = window["observations"]["canary"]
            assert canary["errors"] == canary["timeouts"] == canary["shared_stalls"], canary
