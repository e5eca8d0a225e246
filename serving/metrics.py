"""The predictor's Prometheus metrics, correct across worker processes.

With more than one worker, `flywheel serve` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder
before prometheus_client is first imported (see :func:`serving.server.prepare_environment`); every
worker then writes its samples there and :func:`exposition` sums them, so one scrape answers for the
whole server. With one worker (and in the in-process tests) the metrics are ordinary in-memory ones:
that process is the whole server.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess
from prometheus_client import REGISTRY, exposition as prom_exposition
from prometheus_client import values

# Whether this process's metrics live in the multiprocess folder: decided when prometheus_client was
# imported. (Feast sets PROMETHEUS_MULTIPROC_DIR when it is unset, later: that must not count.)
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") if values.ValueClass is not values.MutexValue else None

# Sub-millisecond buckets: a one-transaction request is about a millisecond end to end.
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

REQUESTS = Counter(
    "flywheel_requests", "Scoring requests answered, by protocol, HTTP status and the model version that scored",
    ["protocol", "status", "model_version"],
)
REQUEST_SECONDS = Histogram("flywheel_request_seconds", "Whole scoring request, body read to response", ["protocol"], buckets=FAST_BUCKETS)
LOOKUP_SECONDS = Histogram("flywheel_feature_lookup_seconds", "Online feature lookup of one scoring pass (the requests that arrived together)", buckets=FAST_BUCKETS)
FORWARD_SECONDS = Histogram("flywheel_forward_seconds", "Model forward pass of one scoring pass (all its transactions)", buckets=FAST_BUCKETS)
UNKNOWN_ENTITIES = Counter("flywheel_unknown_entities", "Rows scored with cold-start defaults, by the entity the store did not know", ["entity"])
LIVE_WRITES = Counter("flywheel_live_write_through", "Scored rows written to the live-feature event log, by outcome", ["outcome"])
CAPTURE_ROWS = Counter("flywheel_capture_rows", "Scored rows sampled for capture (monitoring.capture_rate), by outcome: queued, "
                       "dropped (the queue was full), written (to a Parquet part), failed (the part could not be written)", ["outcome"])
RELOADS = Counter("flywheel_model_reloads", "Production model changes picked up without a restart, by outcome", ["outcome"])


def exposition(accept: str | None) -> tuple[bytes, str]:
    """The metrics page (and its content type): every worker's samples in multiprocess mode."""
    encoder, content_type = prom_exposition.choose_encoder(accept or "")
    if MULTIPROCESS_DIR:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=MULTIPROCESS_DIR)
        return encoder(registry), content_type
    return encoder(REGISTRY), content_type
