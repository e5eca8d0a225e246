"""The monitor's Prometheus gauges (flywheel/monitoring/gauges.py): the text exposition parses with
prometheus_client's own parser, and a Pushgateway receives the same families. A Pushgateway cannot
run here: a loopback stand-in records what prometheus_client's push_to_gateway sends."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client.parser import text_string_to_metric_families

from flywheel.config import load_settings
from flywheel.monitoring.gauges import write_gauges
from flywheel.monitoring.monitor import Finding, MonitorResult
from flywheel.storage import Storage


def a_result(tmp_path) -> MonitorResult:
    result = MonitorResult(run_id="mon-g", since="2026-10-18T00:00:00+00:00", until="2026-10-25T00:00:00+00:00", rows=5250,
                           versions={"v1": 5250}, model_version="v1", task="binary", judged=True)
    result.drift = [{"column": "input.amount", "metric": "psi", "value": 1.13, "threshold": 0.2},
                    {"column": "input.channel", "metric": "linf", "value": 0.02, "threshold": 0.1}]
    result.estimate = {"expected_pr_auc": 0.41, "rows": 5250}
    result.days = [{"day": "2026-10-18", "realised": 0.12, "realised_metrics": {"pr_auc": 0.12, "roc_auc": 0.7}}]
    result.skew = {"features": [{"feature": "card_txn_count_1h", "inconsistent_rate": 0.25}]}
    result.findings = [Finding("drift", "input.amount", "psi", 1.13, 0.2)]
    result.metrics_uri = str(tmp_path / "store" / "metrics.prom")
    return result


def families(text: str) -> dict[str, list]:
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_the_gauges_parse_and_carry_every_figure(tmp_path):
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path)})
    storage = Storage.from_settings(settings)
    result = a_result(tmp_path)
    write_gauges(storage, settings, result)
    parsed = families(storage.read_bytes(result.metrics_uri).decode())
    drift = {s.labels["column"]: s.value for s in parsed["flywheel_monitor_drift"]}
    assert drift == {"input.amount": 1.13, "input.channel": 0.02}
    assert {s.labels["metric"]: s.value for s in parsed["flywheel_monitor_estimated_metric"]} == {"expected_pr_auc": 0.41}  # a count is not a metric
    assert {s.labels["metric"]: s.value for s in parsed["flywheel_monitor_realised_metric"]} == {"pr_auc": 0.12, "roc_auc": 0.7}
    assert [s.value for s in parsed["flywheel_monitor_crossed"]] == [1]
    assert [s.value for s in parsed["flywheel_monitor_skew_rate"]] == [0.25]
    assert all(s.labels["usecase"] == "fraud" and s.labels["model_version"] == "v1" for s in parsed["flywheel_monitor_drift"])
    # The latest exposition is also where a textfile collector reads it.
    assert storage.read_bytes(storage.uri("monitoring", "metrics.prom")) == storage.read_bytes(result.metrics_uri)


def test_the_gauges_are_pushed_to_a_pushgateway_and_a_dead_one_fails_nothing(tmp_path):
    received: list[tuple[str, str, bytes]] = []

    class Gateway(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.command, self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_MONITORING__PUSHGATEWAY": f"127.0.0.1:{server.server_address[1]}"})
        write_gauges(Storage.from_settings(settings), settings, a_result(tmp_path))
    finally:
        server.shutdown()
        server.server_close()
    [(method, path, body)] = received
    assert path == "/metrics/job/flywheel-monitor/usecase/fraud"
    assert "flywheel_monitor_drift" in families(body.decode())

    # Nothing listens there any more: the push fails, the figures are still written.
    dead = load_settings(env={"FLYWHEEL_HOME": str(tmp_path / "2"), "FLYWHEEL_MONITORING__PUSHGATEWAY": f"127.0.0.1:{server.server_address[1]}"})
    result = a_result(tmp_path / "2")
    write_gauges(Storage.from_settings(dead), dead, result)
    assert Storage.from_settings(dead).exists(result.metrics_uri)
