"""The monitor's figures as Prometheus gauges: written in the text exposition format beside each
run's result (and as ``monitoring/metrics.prom``, the latest: what node-exporter's textfile collector
or a sidecar serves), and pushed to a Pushgateway when ``monitoring.pushgateway`` names one (a batch
job has no /metrics of its own to scrape)."""

from __future__ import annotations

import logging
from typing import Any

from flywheel.config import Settings
from flywheel.storage import Storage

log = logging.getLogger(__name__)

JOB = "flywheel-monitor"


def gauges(settings: Settings, result: Any) -> Any:
    """A fresh registry holding the result's gauges (labelled by use case and model version)."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    common = {"usecase": settings.namespace, "model_version": result.model_version or ""}
    names = list(common)

    def gauge(name: str, doc: str, labels: list[str] = ()) -> Any:  # type: ignore[assignment]
        return Gauge(name, doc, names + list(labels), registry=registry)

    gauge("flywheel_monitor_rows", "captured rows in the monitored window").labels(**common).set(result.rows)
    gauge("flywheel_monitor_crossed", "figures that crossed their threshold in the last run").labels(**common).set(len(result.findings))
    gauge("flywheel_monitor_last_run_timestamp_seconds", "when the monitor last ran").labels(**common).set_to_current_time()
    drift = gauge("flywheel_monitor_drift", "a column's drift against the model's baseline", ["column", "metric"])
    threshold = gauge("flywheel_monitor_drift_threshold", "the drift threshold of a column", ["column", "metric"])
    for item in result.drift:
        if item.get("value") is not None:
            drift.labels(**common, column=item["column"], metric=item["metric"]).set(item["value"])
            threshold.labels(**common, column=item["column"], metric=item["metric"]).set(item["threshold"])
    estimated = gauge("flywheel_monitor_estimated_metric", "label-free estimate of the model's performance", ["metric"])
    for name, value in result.estimate.items():
        if isinstance(value, (int, float)) and name != "rows":
            estimated.labels(**common, metric=name).set(value)
    realised = gauge("flywheel_monitor_realised_metric", "the realised metric of the newest judged day", ["metric"])
    judged = [day for day in result.days if "realised" in day]
    if judged:
        for name, value in judged[-1].get("realised_metrics", {}).items():
            if name != "rows":
                realised.labels(**common, metric=name).set(value)
    if result.skew:
        skew = gauge("flywheel_monitor_skew_rate", "share of rows whose online feature differs from the offline path", ["feature"])
        for item in result.skew["features"]:
            skew.labels(**common, feature=item["feature"]).set(item["inconsistent_rate"])
    return registry


def write_gauges(storage: Storage, settings: Settings, result: Any) -> str:
    """Write the exposition beside the result and as the latest; push it when a Pushgateway is set.
    A push that fails is logged with its cause; it never fails the monitor."""
    from prometheus_client import generate_latest, push_to_gateway

    registry = gauges(settings, result)
    text = generate_latest(registry)
    storage.write_bytes(result.metrics_uri, text)
    storage.write_bytes(storage.uri("monitoring", "metrics.prom"), text)
    gateway = settings.monitoring.pushgateway
    if gateway:
        try:
            push_to_gateway(gateway, job=JOB, registry=registry, grouping_key={"usecase": settings.namespace}, timeout=10)
        except Exception as exc:  # the figures are stored anyway
            log.error("could not push the monitor's gauges to %s: %s: %s", gateway, type(exc).__name__, exc)
    return result.metrics_uri
