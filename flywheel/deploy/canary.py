"""Canary analysis: judge windows of observations of the stable and the candidate version against
thresholds from settings, and decide promote or rollback. The judging is pure (no I/O): the same
observations always give the same verdict. Observations come from :func:`replay`, which sends the
same held-out requests to both versions over HTTP; the verdict and everything it was based on is
written as a decision record (JSON and markdown) to storage.

Per window the candidate must keep its error rate under an absolute ceiling and within an allowed
increase over the stable version's, its p99 latency under an absolute ceiling and within a ratio of
the stable version's, and agree with the stable version's scores (within ``score_tolerance``) on at
least ``min_score_agreement`` of the requests both answered. A window too small to judge counts
against the candidate. ``windows`` good windows promote; the first bad one rolls back.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from flywheel.config import CanarySettings
from flywheel.storage import Storage

PROMOTE, ROLLBACK, CONTINUE = "promote", "rollback", "continue"


@dataclass(frozen=True)
class Observation:
    """One request's outcome at one version: whether it succeeded, how long it took, the score."""

    request: int  # the request's index in the replay, to pair the two versions' answers
    ok: bool
    latency_ms: float
    score: float | None = None
    error: str = ""


@dataclass
class SideMetrics:
    requests: int
    errors: int
    error_rate: float
    p50_ms: float
    p99_ms: float


@dataclass
class WindowMetrics:
    """What one window showed, for both versions."""

    stable: SideMetrics
    canary: SideMetrics
    paired: int  # requests both versions answered
    score_agreement: float  # share of paired requests whose scores differ by at most the tolerance
    max_score_difference: float
    passed: bool = False
    reasons: list[str] = field(default_factory=list)


def _side(observations: Sequence[Observation]) -> SideMetrics:
    latencies = np.array([o.latency_ms for o in observations if o.ok], dtype=float)
    errors = sum(not o.ok for o in observations)
    n = len(observations)
    return SideMetrics(
        requests=n,
        errors=errors,
        error_rate=errors / n if n else 1.0,
        p50_ms=float(np.percentile(latencies, 50)) if len(latencies) else math.inf,
        p99_ms=float(np.percentile(latencies, 99)) if len(latencies) else math.inf,
    )


def window_metrics(stable: Sequence[Observation], canary: Sequence[Observation], cfg: CanarySettings) -> WindowMetrics:
    """Summarize one window and judge it against the thresholds."""
    stable_scores = {o.request: o.score for o in stable if o.ok and o.score is not None}
    pairs = [(stable_scores[o.request], o.score) for o in canary if o.ok and o.score is not None and o.request in stable_scores]
    differences = np.abs(np.array([a - b for a, b in pairs], dtype=float))
    metrics = WindowMetrics(
        stable=_side(stable),
        canary=_side(canary),
        paired=len(pairs),
        score_agreement=float((differences <= cfg.score_tolerance).mean()) if len(pairs) else 0.0,
        max_score_difference=float(differences.max()) if len(pairs) else math.inf,
    )
    metrics.reasons = judge(metrics, cfg)
    metrics.passed = not metrics.reasons
    return metrics


def judge(metrics: WindowMetrics, cfg: CanarySettings) -> list[str]:
    """Every threshold the window breaks (empty: the window passed)."""
    reasons = []
    c, s = metrics.canary, metrics.stable
    if c.requests < cfg.min_requests:
        reasons.append(f"only {c.requests} requests reached the canary (at least {cfg.min_requests} are needed to judge)")
    if c.error_rate > cfg.max_error_rate:
        reasons.append(f"canary error rate {c.error_rate:.4f} > {cfg.max_error_rate:.4f}")
    if c.error_rate > s.error_rate + cfg.max_error_rate_increase:
        reasons.append(f"canary error rate {c.error_rate:.4f} exceeds stable's {s.error_rate:.4f} by more than {cfg.max_error_rate_increase:.4f}")
    if c.p99_ms > cfg.max_p99_latency_ms:
        reasons.append(f"canary p99 latency {c.p99_ms:.1f} ms > {cfg.max_p99_latency_ms:.1f} ms")
    if math.isfinite(s.p99_ms) and c.p99_ms > s.p99_ms * cfg.max_p99_latency_ratio:
        reasons.append(f"canary p99 latency {c.p99_ms:.1f} ms > {cfg.max_p99_latency_ratio:g}x stable's {s.p99_ms:.1f} ms")
    if metrics.score_agreement < cfg.min_score_agreement:
        reasons.append(
            f"scores agree (within {cfg.score_tolerance:g}) on {metrics.score_agreement:.1%} of {metrics.paired} paired requests "
            f"(< {cfg.min_score_agreement:.1%})"
        )
    return reasons


def decide(windows: Sequence[WindowMetrics], cfg: CanarySettings) -> tuple[str, list[str]]:
    """``rollback`` at the first failed window, ``promote`` after ``cfg.windows`` passed ones, else
    ``continue``. Returns the verdict and its reasons."""
    for index, window in enumerate(windows, start=1):
        if not window.passed:
            return ROLLBACK, [f"window {index}: {reason}" for reason in window.reasons]
    if len(windows) >= cfg.windows:
        return PROMOTE, [f"{len(windows)} of {cfg.windows} windows passed every threshold"]
    return CONTINUE, [f"{len(windows)} of {cfg.windows} windows passed so far"]


@dataclass
class DecisionRecord:
    """Why a candidate was promoted or rolled back: what was seen, against which thresholds."""

    model_name: str
    candidate: str
    stable: str | None
    target: str  # kserve | local
    run_id: str
    verdict: str
    reasons: list[str]
    thresholds: dict[str, Any]
    windows: list[dict[str, Any]]
    traffic_percent: int
    started_at: str
    decided_at: str
    events: list[str] = field(default_factory=list)  # what was done, in order (API calls, registry changes)
    uri: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = [
            f"# Canary decision: {self.verdict.upper()}",
            "",
            f"model **{self.model_name}** candidate `{self.candidate}` against stable `{self.stable}` "
            f"({self.target}, {self.traffic_percent}% canary traffic), run `{self.run_id}`, decided {self.decided_at}",
            "",
            "## Why",
            *[f"- {reason}" for reason in self.reasons],
            "",
            "## Windows",
            "| window | canary req | canary err | stable err | canary p99 ms | stable p99 ms | agreement | passed |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        def ms(value: float | None) -> str:
            return "none answered" if value is None else f"{value:.1f}"

        for index, w in enumerate(self.windows, start=1):
            lines.append(
                f"| {index} | {w['canary']['requests']} | {w['canary']['error_rate']:.4f} | {w['stable']['error_rate']:.4f} | "
                f"{ms(w['canary']['p99_ms'])} | {ms(w['stable']['p99_ms'])} | {w['score_agreement']:.1%} | {w['passed']} |"
            )
        lines += ["", "## Thresholds", *[f"- `{k}`: {v}" for k, v in sorted(self.thresholds.items())],
                  "", "## What was done", *[f"1. {e}" for e in self.events]]
        return "\n".join(lines) + "\n"


def window_dict(window: WindowMetrics) -> dict[str, Any]:
    """A window as JSON-safe data (an infinite latency, from a side with no answer, becomes None)."""

    def finite(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return finite(asdict(window))


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def write_record(storage: Storage, record: DecisionRecord) -> DecisionRecord:
    """Write the record as ``reports/canary/<run>/decision.json`` and ``decision.md``."""
    folder = storage.uri("reports", "canary", record.run_id)
    record.uri = f"{folder}/decision.json"
    storage.write_json(record.uri, record.to_dict())
    storage.write_bytes(f"{folder}/decision.md", record.to_markdown().encode())
    return record


# ------------------------------------------------------------------ observing over HTTP
def replay(stable_url: str, canary_url: str, instances: Iterable[dict[str, Any]], model_name: str,
           timeout_s: float = 5.0, start: int = 0) -> tuple[list[Observation], list[Observation]]:
    """Send each request (a v1 instance) to both versions, one after the other, and observe each answer."""
    import httpx

    stable: list[Observation] = []
    canary: list[Observation] = []
    with httpx.Client(timeout=timeout_s) as client:
        for index, instance in enumerate(instances, start=start):
            for url, out in ((stable_url, stable), (canary_url, canary)):
                out.append(_observe(client, f"{url.rstrip('/')}/v1/models/{model_name}:predict", index, instance))
    return stable, canary


def _observe(client: Any, url: str, index: int, instance: dict[str, Any]) -> Observation:
    import httpx

    started = time.perf_counter()
    try:
        response = client.post(url, json={"instances": [instance]})
        latency = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            return Observation(index, False, latency, error=f"HTTP {response.status_code}")
        score = float(response.json()["predictions"][0]["fraud_probability"])
        return Observation(index, True, latency, score)
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        return Observation(index, False, (time.perf_counter() - started) * 1000, error=f"{type(exc).__name__}: {exc}")
