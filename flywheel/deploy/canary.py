"""The canary decision, one for both targets: the loop that judges windows in order
(:func:`analyse`), the decision record (:class:`DecisionRecord`) and, for KServe's tag-routed
revisions, observing a window by replaying held-out requests to both (:func:`replay`).

Every window, local (the splitting proxy's, :mod:`flywheel.deploy.traffic`) or on KServe, becomes a
:class:`flywheel.deploy.analysis.WindowObservations` and is judged by the one pure function
:func:`flywheel.deploy.analysis.judge` against thresholds from ``settings.deploy.canary``. The
first failed window rolls back; a candidate that passes every planned window is promoted.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import pandas as pd

from flywheel.deploy.analysis import Sample, ScorePair, Thresholds, WindowObservations, finite, judge, summarise
from flywheel.contract import Contract, parse_contract
from flywheel.errors import DeployError, GateRefused
from flywheel.registry import ModelVersion
from flywheel.storage import Storage

PROMOTE, ROLLBACK = "promote", "rollback"
RECORD_KIND = "flywheel.canary-decision/v2"

# observe(percent, index) runs one window with the canary at ``percent``% and returns what was seen,
# plus fields of the caller's own for the window's entry in the record (e.g. the client's statuses).
ObserveWindow = Callable[[int, int], tuple[WindowObservations, dict[str, Any]]]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


@dataclass
class DecisionRecord:
    """Why a candidate was promoted or rolled back: every window seen, the thresholds, the verdict
    and what was done about it, in order. One type for the local and the KServe target."""

    model_name: str
    candidate: str
    stable: str | None
    target: str  # local | kserve
    run_id: str
    thresholds: dict[str, Any]
    steps: list[int]  # the canary's traffic percent in each planned window (KServe: one percent)
    source: str = "replay"  # replay: held-out requests sent by the analysis; live: clients' own traffic
    verdict: str = ""
    reasons: list[str] = field(default_factory=list)
    windows: list[dict[str, Any]] = field(default_factory=list)
    client: dict[str, Any] = field(default_factory=dict)  # what the replay's clients got (local)
    final_canary_percent: int | None = None
    started_at: str = field(default_factory=now)
    decided_at: str = ""
    duration_s: float = 0.0
    events: list[str] = field(default_factory=list)  # what was done, in order (servers, API calls, registry)
    meta: dict[str, Any] = field(default_factory=dict)
    uri: str = ""
    kind: str = RECORD_KIND

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (an infinite or missing latency becomes None)."""
        return finite(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DecisionRecord":
        return cls(**data)

    def to_markdown(self) -> str:
        def num(value: Any, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        lines = [
            f"# Canary decision: {self.verdict.upper()}",
            "",
            f"model **{self.model_name}** candidate `{self.candidate}` against stable `{self.stable}` "
            f"({self.target}, canary at {', '.join(f'{s}%' for s in self.steps)}), run `{self.run_id}`, decided {self.decided_at}",
            "",
            "## Why",
            *[f"- {reason}" for reason in self.reasons],
            "",
            "## Windows",
            "| window | canary % | canary req | canary err | stable err | canary p99 ms | stable p99 ms | score agreement | decision agreement | verdict |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for index, w in enumerate(self.windows, start=1):
            o = w["observations"]
            c, s, a = o["canary"], o.get("stable_shadow") or o["stable"], o["agreement"]
            lines.append(
                f"| {index} | {w['step']} | {c['requests']} | {c['error_rate']:.4f} | {s['error_rate']:.4f} | "
                f"{num(c['p99_ms'], '.1f')} | {num(s['p99_ms'], '.1f')} | {num(a['score_agreement'], '.1%')} | "
                f"{num(a['decision_agreement'], '.1%')} | {w['verdict']} |"
            )
        if self.client:
            lines += ["", f"Clients: {self.client.get('requests', 0)} requests, {self.client.get('failures', 0)} failed."]
        lines += ["", "## Thresholds", *[f"- `{k}`: {v}" for k, v in sorted(self.thresholds.items())],
                  "", "## What was done", *[f"1. {e}" for e in self.events]]
        return "\n".join(lines) + "\n"


def analyse(record: DecisionRecord, plan: Sequence[int], observe: ObserveWindow, thresholds: Thresholds) -> str:
    """Run and judge the planned windows in order (``plan``: the canary's percent in each), appending
    each to ``record.windows``. The first failed window stops it: ``rollback``; every window passed:
    ``promote``. Sets the record's verdict and reasons and returns the verdict; acting on it (the
    traffic, the registry) is the caller's."""
    seen: dict[int, int] = {}
    for index, percent in enumerate(plan):
        seen[percent] = seen.get(percent, 0) + 1
        started = now()
        observations, extra = observe(percent, index)
        judgement = judge(observations, thresholds)
        record.windows.append({
            "step": percent, "window": seen[percent], "started_at": started, "ended_at": now(), **extra,
            "observations": observations.to_dict(), "verdict": judgement.verdict, "reasons": judgement.reasons,
        })
        if not judgement.passed:
            record.verdict = ROLLBACK
            record.reasons = [f"at {percent}% (window {seen[percent]}): {reason}" for reason in judgement.reasons]
            return ROLLBACK
    record.verdict = PROMOTE
    record.reasons = [f"{len(plan)} window(s) at {', '.join(f'{s}%' for s in dict.fromkeys(plan))} passed every threshold"]
    return PROMOTE


def write_record(storage: Storage, record: DecisionRecord, uri: str | None = None) -> DecisionRecord:
    """Write the record as JSON (default ``reports/canary/<run>/decision.json``) and markdown beside it."""
    record.uri = uri or storage.uri("reports", "canary", record.run_id, "decision.json")
    storage.write_json(record.uri, record.to_dict())
    markdown_uri = record.uri[: -len(".json")] + ".md" if record.uri.endswith(".json") else record.uri + ".md"
    storage.write_bytes(markdown_uri, record.to_markdown().encode())
    return record


def held_out_rows(storage: Storage, model: ModelVersion, contract: Contract) -> list[dict[str, Any]]:
    """The model's holdout rows (rows it never trained on) as scoring requests' fields (the
    contract's request fields; a missing value left out), in time order."""
    rows = request_rows(held_out_frame(storage, model, contract, columns=list(contract.request_fields())), contract)
    if not rows:
        raise DeployError(f"the holdout of model {model.version} is empty: no requests to replay")
    return rows


def held_out_frame(storage: Storage, model: ModelVersion, contract: Contract, columns: list[str] | None = None) -> pd.DataFrame:
    """The model's holdout rows (with their point-in-time features and labels, or only ``columns``),
    in time order."""
    training_set_uri = (model.meta.get("training_set") or {}).get("uri")
    if not training_set_uri:
        raise DeployError(f"model {model.version} records no training set: no held-out requests to replay")
    holdout_uri = storage.read_json(f"{training_set_uri}/manifest.json")["holdout_uri"]
    frame = storage.read_parquet(holdout_uri, columns=columns).to_pandas()
    return frame.sort_values(contract.timestamp, kind="stable").reset_index(drop=True)


def request_rows(frame: pd.DataFrame, contract: Contract) -> list[dict[str, Any]]:
    """Rows as scoring requests' fields: the contract's request fields, times in ISO 8601, a missing
    value left out."""
    frame = frame[[name for name in contract.request_fields() if name in frame]].copy()
    for name in contract.timestamp_columns():
        if name in frame:
            frame[name] = frame[name].map(lambda t: t.isoformat() if t is not None and t == t else None)
    return [{name: value for name, value in row.items() if value is not None and value == value}
            for row in frame.to_dict(orient="records")]


def model_contract(model: ModelVersion, fallback: Contract) -> Contract:
    """The contract a model version was trained with (recorded by the train step), else ``fallback``."""
    recorded = model.meta.get("contract")
    return parse_contract(recorded, f"model {model.version}'s recorded contract") if recorded else fallback


def model_output(model: ModelVersion) -> str | None:
    """The name a model version answers with (its task's output); None for a version from before
    tasks were recorded (a prediction's first field is its answer)."""
    return (model.meta.get("task") or {}).get("output")



# ------------------------------------------------------------------ observing KServe's revisions over HTTP
def replay(stable_url: str, canary_url: str, instances: Iterable[dict[str, Any]], model_name: str,
           thresholds: Thresholds, canary_percent: int = 0, timeout_s: float = 5.0, output: str | None = None) -> WindowObservations:
    """Send each request (a v1 instance) to both revisions, one after the other, and summarise what
    each answered as one window (every stable call is the canary's twin: a shadow)."""
    import httpx

    samples: list[Sample] = []
    pairs: list[ScorePair] = []
    requests = 0
    with httpx.Client(timeout=timeout_s) as client:
        for instance in instances:
            requests += 1
            stable = _observe(client, f"{stable_url.rstrip('/')}/v1/models/{model_name}:predict", "stable", instance, output)
            canary = _observe(client, f"{canary_url.rstrip('/')}/v1/models/{model_name}:predict", "canary", instance, output)
            samples += [stable[0], canary[0]]
            if stable[1] is not None and canary[1] is not None:
                pairs.append(ScorePair(stable[1], canary[1]))
    client_counts = {"requests": requests, "to_canary": requests, "answered_by_canary": 0, "fallbacks": 0, "failures": 0}
    return summarise(samples, pairs, client_counts, thresholds, canary_percent)


def _observe(client: Any, url: str, arm: str, instance: dict[str, Any], output: str | None = None) -> tuple[Sample, tuple[float, ...] | None]:
    import httpx

    from flywheel.deploy.traffic import scores_of

    started = time.perf_counter()
    try:
        response = client.post(url, json={"instances": [instance]})
        latency = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            return Sample(arm, False, latency, f"HTTP {response.status_code}", shadow=arm == "stable"), None
        scores = scores_of("v1", response.content, output)
        if scores is None:
            return Sample(arm, False, latency, "the answer holds no finite score", shadow=arm == "stable"), None
        return Sample(arm, True, latency, shadow=arm == "stable"), scores
    except httpx.TimeoutException:
        return Sample(arm, False, (time.perf_counter() - started) * 1000, f"timeout after {client.timeout.read}s", True,
                      shadow=arm == "stable"), None
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        return Sample(arm, False, (time.perf_counter() - started) * 1000, f"{type(exc).__name__}: {exc}",
                      shadow=arm == "stable"), None


def latest_evaluation(storage: Storage, model_version: str) -> dict[str, Any]:
    """The newest evaluation report of ``model_version`` (what `flywheel deploy` releases on)."""
    reports = [uri for uri in storage.list(storage.uri("reports", "evaluation")) if uri.endswith("/evaluation.json")]
    found = [report for report in (storage.read_json(uri) for uri in reports) if report.get("model_version") == model_version]
    if not found:
        raise GateRefused(f"model version {model_version} has no evaluation report: run the pipeline (or `flywheel run`) to evaluate it first")
    return max(found, key=lambda report: report.get("report_uri", ""))
