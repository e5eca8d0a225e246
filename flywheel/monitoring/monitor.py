"""The monitor: a window of captured traffic against the served model's baseline.

For the window ``[since, until)`` of captured rows (:mod:`flywheel.monitoring.capture`), scored by
the version that scored most of them:

- **drift** of every profiled input, feature and output against the version's baseline
  (:mod:`flywheel.monitoring.drift`: PSI or Jensen-Shannon for numbers, L-infinity for categories,
  and null rates), on per-day profiles merged into the window's (each day's profile is stored, so
  a longer window is a merge, not a re-read);
- **skew**: a sample replayed through the offline path (:mod:`flywheel.monitoring.skew`);
- **estimated performance** without labels (:mod:`flywheel.monitoring.performance`: a binary
  model's expected PR-AUC from its calibrated scores, as NannyML's CBPE; a regression's expected MAE
  from its loss model, as NannyML's DLE), for the window and per day;
- **realised performance** per day, once the labels are known: captured rows joined by the
  contract's id with the lake's labelled rows whose labels were known by the lake's newest time
  (the contract's ``label_known``); a day with fewer than ``monitoring.min_labelled_rows`` labelled
  rows is shown, not judged.

Each figure has its threshold from ``settings.monitoring``; the estimated and realised key metric
(PR-AUC, MAE, ...) is held to the holdout's (the model's evaluation) with ``max_metric_drop``. The
result, an HTML report, and Prometheus gauges (text exposition, and a Pushgateway when set) are
written under ``<use case>/monitoring/runs/<run id>/``; ``crossed`` lists what crossed a threshold.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from flywheel import lake as lakes
from flywheel import lineage
from flywheel.config import Settings
from flywheel.errors import DataError, RegistryError
from flywheel.monitoring import performance
from flywheel.monitoring.baseline import baseline_uri, contract_of, holdout_features, load_baseline
from flywheel.monitoring.capture import INPUT, OUTPUT, capture_parts, capture_root
from flywheel.monitoring.drift import compare
from flywheel.monitoring.profile import Profile, profile_table
from flywheel.monitoring.skew import measure_skew
from flywheel.registry import Registry
from flywheel.storage import Storage

log = logging.getLogger(__name__)

US = dt.timedelta(microseconds=1)
# The key metric of each task, whether higher is better, and the names the estimators and the
# realised metrics give it.
KEY_METRICS = {
    "binary": ("pr_auc", True, "expected_pr_auc"),
    "regression": ("mae", False, "expected_mae"),
}


@dataclass
class Finding:
    """One figure that crossed its threshold."""

    kind: str  # drift | nulls | skew | estimated | realised
    subject: str  # the column, feature or metric (and day)
    figure: str  # what was measured (psi, js, linf, null rate change, inconsistent rate, pr_auc, ...)
    value: float
    threshold: float

    def describe(self) -> str:
        return f"{self.kind}: {self.subject}: {self.figure} {self.value:.4g} (threshold {self.threshold:.4g})"


@dataclass
class MonitorResult:
    run_id: str
    since: str
    until: str
    rows: int
    versions: dict[str, int]
    model_version: str | None
    task: str | None
    judged: bool
    drift: list[dict[str, Any]] = field(default_factory=list)
    skew: dict[str, Any] | None = None
    estimate: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)  # the holdout's realised metrics
    days: list[dict[str, Any]] = field(default_factory=list)  # per day: rows, labelled, estimated and realised key metric
    realised: dict[str, Any] = field(default_factory=dict)  # the window's labelled rows together
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    result_uri: str = ""
    report_uri: str = ""
    metrics_uri: str = ""
    seconds: float = 0.0

    @property
    def crossed(self) -> bool:
        return bool(self.findings)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["crossed"] = self.crossed
        data["figures"] = self.kfp_metrics()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MonitorResult":
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["findings"] = [Finding(**f) for f in data.get("findings", [])]
        return cls(**fields)

    def kfp_metrics(self) -> dict[str, float]:
        """The figures worth a glance in the Kubeflow UI (KFP ``Metrics``)."""
        out: dict[str, float] = {"rows": float(self.rows), "crossed": float(len(self.findings))}
        for item in self.drift:
            out[f"drift.{item['column']}"] = round(float(item["value"]), 6)
        for name, value in self.estimate.items():
            if isinstance(value, (int, float)) and value == value:
                out[f"estimated.{name}"] = round(float(value), 6)
        if self.skew:
            for item in self.skew["features"]:
                out[f"skew.{item['feature']}"] = round(float(item["inconsistent_rate"]), 6)
        return out


def _utc(value: dt.datetime | str | None) -> dt.datetime | None:
    if value is None or value == "":
        return None
    try:
        stamp = pd.Timestamp(value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{value!r} is not a time: give an ISO 8601 date or time, e.g. 2026-10-18 or "
                        f"2026-10-18T06:00:00Z ({exc})") from None
    if stamp is pd.NaT:
        raise DataError(f"{value!r} is not a time: give an ISO 8601 date or time, e.g. 2026-10-18")
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.to_pydatetime()


def window_of(storage: Storage, settings: Settings, since: Any = None, until: Any = None) -> tuple[dt.datetime, dt.datetime]:
    """The window to read: ``until`` defaults to just after the newest captured hour (the capture's
    present: live traffic or a replay of history alike), ``since`` to ``monitoring.window_days`` before it."""
    given_start, end = _utc(since), _utc(until)  # bad input is named before anything is read
    if end is None:
        parts = capture_parts(storage)
        if not parts:
            raise DataError(f"nothing was captured yet under {capture_root(storage)}: switch capture on "
                            "(monitoring.capture_rate, FLYWHEEL_MONITORING__CAPTURE_RATE) and serve some traffic")
        last_hour = parts[-1].rsplit("/", 1)[0]
        newest_time = max(pd.to_datetime(storage.read_parquet(uri, columns=["row_time"]).to_pandas()["row_time"], utc=True).max()
                          for uri in parts if uri.rsplit("/", 1)[0] == last_hour)
        end = newest_time.to_pydatetime() + US
    start = given_start or end - dt.timedelta(days=settings.monitoring.window_days)
    if start >= end:
        raise DataError(f"--since {start.isoformat()} is not before the window's end {end.isoformat()}")
    return start, end


def _count_versions(storage: Storage, parts: list[str], start: dt.datetime, end: dt.datetime) -> dict[str, int]:
    """Rows per model version in the window (reads two columns of each part)."""
    counts: dict[str, int] = {}
    for uri in parts:
        table = _window_rows(storage.read_parquet(uri, columns=["row_time", "model_version"]), start, end, None)
        for version, count in zip(*np.unique(table["model_version"].to_numpy(zero_copy_only=False).astype(str), return_counts=True)):
            counts[str(version)] = counts.get(str(version), 0) + int(count)
    return counts


def _window_rows(table: pa.Table, start: dt.datetime, end: dt.datetime, version: str | None) -> pa.Table:
    """A part's rows in [start, end) (and of ``version``, when given)."""
    times = table["row_time"]
    keep = pc.and_(pc.greater_equal(times, pa.scalar(start, pa.timestamp("us", "UTC"))),
                   pc.less(times, pa.scalar(end, pa.timestamp("us", "UTC"))))
    if version is not None:
        keep = pc.and_(keep, pc.equal(table["model_version"], version))
    return table.filter(pc.fill_null(keep, False))


def _lake_labels(storage: Storage, settings: Settings, meta: dict[str, Any], days: list[str]) -> tuple[pd.DataFrame, str]:
    """The lake's rows of ``days`` with a known label: (id, label, time), and a note when none can be."""
    from flywheel.deploy.live import lake_of

    contract = contract_of(settings, meta)
    if not contract.id or not contract.labels:
        return pd.DataFrame(), "the contract names no id (or no label): captured rows cannot be joined with their labels"
    lake_uri = lake_of(storage, meta)
    snapshot = lakes.latest_snapshot(storage, lake_uri)
    if snapshot is None:
        return pd.DataFrame(), f"the lake {lake_uri} has no snapshot"
    parts = [p for p in snapshot.parts if p.get("date", "") in set(days)]
    label = contract.labels[0]
    known = contract.label_known
    columns = [contract.id, contract.timestamp, label] + ([known.column] if known.column else [])
    newest_day = max((p.get("date", "") for p in snapshot.parts), default="")
    table = lakes.read_snapshot(storage, dataclasses.replace(snapshot, parts=parts), contract.arrow_schema(), columns=columns)
    rows = table.to_pandas()
    # The lake's present: its newest event (a label is known when the lake's clock says so).
    newest_parts = [p for p in snapshot.parts if p.get("date", "") == newest_day]
    present = lakes.read_snapshot(storage, dataclasses.replace(snapshot, parts=newest_parts), contract.arrow_schema(),
                                  columns=[contract.timestamp]).to_pandas()[contract.timestamp].max()
    times = pd.to_datetime(rows[contract.timestamp], utc=True)
    ok = rows[label].notna()
    if known.column:
        arrived = pd.to_datetime(rows[known.column], utc=True)
        ok &= arrived.notna() & (arrived <= present)
    elif known.delay is not None:
        ok &= times + pd.Timedelta(known.delay) <= present
    rows = rows[ok]
    return pd.DataFrame({"id": rows[contract.id].astype(str).to_numpy(), "label": rows[label].to_numpy(dtype=np.float64)}), ""


def monitor(storage: Storage, settings: Settings, run_id: str, since: Any = None, until: Any = None) -> MonitorResult:
    """Monitor the window (see the module docstring) and write the result, report and gauges."""
    started = time.perf_counter()
    cfg = settings.monitoring
    start, end = window_of(storage, settings, since, until)
    result = MonitorResult(run_id=run_id, since=start.isoformat(timespec="microseconds"),
                           until=end.isoformat(timespec="microseconds"), rows=0, versions={}, model_version=None,
                           task=None, judged=False)
    parts = capture_parts(storage, start, end)
    versions = _count_versions(storage, parts, start, end)
    result.versions = {k: int(v) for k, v in sorted(versions.items(), key=lambda kv: -kv[1])}
    result.rows = int(sum(versions.values()))
    if not result.rows:
        result.notes.append(f"no captured rows from {result.since} to {result.until}")
        return _finish(storage, settings, result, None, None, started)
    version_name = next(iter(result.versions))
    registry = Registry(storage, settings.model_name)
    try:
        version = registry.get(version_name)
    except RegistryError as exc:
        raise DataError(f"the captured rows were scored by version {version_name}, which the registry does not hold: {exc}") from exc
    result.model_version = version_name
    scored = result.versions[version_name]
    if len(versions) > 1:
        result.notes.append(f"{result.rows - scored} rows scored by other versions ({', '.join(result.versions)}) are "
                            "left out of drift and performance: each has its own baseline")
    baseline = load_baseline(storage, settings, version)
    result.task = baseline["task"]
    result.judged = scored >= cfg.min_rows
    if not result.judged:
        result.notes.append(f"{scored} captured rows: fewer than monitoring.min_rows ({cfg.min_rows}); reported, not judged")

    # One pass over the window's parts, one part in memory at a time: every row into its day's
    # profile (on the baseline's bins, merged exactly), and a uniform sample of rows kept for what
    # needs rows (the estimates, the labels' join, the skew replay).
    base = Profile.from_dict(baseline["profile"])
    rate = min(1.0, cfg.sample_rows / scored)
    if rate < 1:
        result.notes.append(f"performance and skew read a uniform sample of {rate:.2%} of the window's rows "
                            f"(monitoring.sample_rows={cfg.sample_rows:,}); drift reads every row")
    rng = np.random.default_rng(0)
    days: dict[str, Profile] = {}
    counts: dict[str, int] = {}
    samples: list[pd.DataFrame] = []
    kinds: dict[str, Any] | None = None
    for uri in parts:
        table = _window_rows(storage.read_parquet(uri), start, end, version_name)
        if not table.num_rows:
            continue
        if kinds is None:
            kinds = {c: k for c, k in baseline["kinds"].items() if c in table.column_names}
        day_of_part = pc.strftime(table["row_time"], format="%Y-%m-%d").to_numpy(zero_copy_only=False)
        for day in np.unique(day_of_part):
            chosen = table.filter(pa.array(day_of_part == day))
            profile = profile_table(chosen.select(list(kinds)), kinds, baseline=base, bins=cfg.bins)
            days[day] = profile if day not in days else days[day].merge(profile)
            counts[day] = counts.get(day, 0) + chosen.num_rows
        keep = rng.random(table.num_rows) < rate if rate < 1 else np.ones(table.num_rows, dtype=bool)
        samples.append(table.filter(pa.array(keep)).to_pandas())
    assert kinds is not None
    missing = sorted(set(baseline["kinds"]) - set(kinds))
    if missing:
        result.notes.append(f"not captured, so not compared: {', '.join(missing)}")
    window: Profile | None = None
    for day in sorted(days):
        storage.write_json(storage.uri("monitoring", "profiles", version_name, f"date={day}", f"{run_id}.json"), days[day].to_dict())
        window = days[day] if window is None else window.merge(days[day])
    assert window is not None
    for item in compare(base, window, cfg):
        data = item.to_dict()
        result.drift.append(data)
        if result.judged and data.get("crossed"):
            result.findings.extend(_drift_findings(data, cfg))
    rows = pd.concat(samples, ignore_index=True).sort_values("row_time", kind="stable").reset_index(drop=True)
    day_of = pd.to_datetime(rows["row_time"], utc=True).dt.strftime("%Y-%m-%d")

    # Performance: estimated (label-free) for the window and per day, realised per day.
    key = KEY_METRICS.get(baseline["task"])
    reference = baseline.get("reference") or {}
    result.reference = {k: v for k, v in reference.items() if isinstance(v, (int, float))}
    if key and reference:
        metric, higher, expected = key
        scores = rows[[OUTPUT + name for name in baseline["outputs"]]].to_numpy(dtype=np.float64).reshape(len(rows), -1)[:, 0]
        result.estimate = _estimate(baseline, scores, rows)
        limit = _limit(reference[metric], higher, cfg.max_metric_drop)
        if result.judged and _worse(result.estimate[expected], limit, higher):
            result.findings.append(Finding("estimated", "window", expected, float(result.estimate[expected]), limit))
        labels, note = _labels_for(storage, settings, version.meta, rows, sorted(set(day_of)))
        if note:
            result.notes.append(note)
        realise = performance.realised_binary if baseline["task"] == "binary" else performance.realised_regression
        label_values = labels.to_numpy(dtype=np.float64) if labels is not None else np.full(len(rows), np.nan)
        for day, index in rows.groupby(day_of, sort=True).groups.items():
            index = np.asarray(index)
            part_scores = scores[index]
            entry: dict[str, Any] = {"day": day, "rows": counts.get(day, int(len(index))), "sampled": int(len(index)),
                                     "estimated": float(_estimate(baseline, part_scores, rows.loc[index])[expected])}
            known = ~np.isnan(label_values[index])
            entry["labelled"] = int(known.sum())
            entry.update(_realised(realise, metric, higher, limit, part_scores[known], label_values[index][known], cfg))
            if entry.get("crossed"):
                result.findings.append(Finding("realised", f"day {day}", metric, entry["realised"], limit))
            result.days.append(entry)
        known = ~np.isnan(label_values)
        result.realised = {"labelled": int(known.sum()),
                           **_realised(realise, metric, higher, limit, scores[known], label_values[known], cfg)}
        if result.realised.get("crossed"):
            result.findings.append(Finding("realised", "window (labelled rows)", metric, result.realised["realised"], limit))
    elif baseline["task"] not in KEY_METRICS:
        result.notes.append(f"no performance estimate for a {baseline['task']} task yet")

    # Skew: a sample replayed through the offline path.
    try:
        skew = measure_skew(storage, settings, rows, registry)
        result.skew = skew.to_dict()
        for item in skew.features:
            if item.crossed and result.judged:
                result.findings.append(Finding("skew", item.feature, "inconsistent rate", item.inconsistent_rate, item.threshold))
        result.notes.extend(skew.skipped)
    except DataError as exc:
        result.notes.append(f"skew not measured: {exc}")
    return _finish(storage, settings, result, baseline, window, started)


MIN_CLASS_ROWS = 30  # a binary metric from fewer positives (or negatives) is shown, never judged
BOOTSTRAP_ROUNDS = 200


def _realised(realise: Any, metric: str, higher: bool, limit: float, scores: np.ndarray, labels: np.ndarray,
              cfg: Any) -> dict[str, Any]:
    """The realised key metric of labelled rows with a 90% bootstrap interval; ``crossed`` only when
    the whole interval is worse than the limit (a day of few positives swings a PR-AUC by more than
    any threshold: noise must not retrain a model)."""
    if len(labels) < cfg.min_labelled_rows:
        return {"judged": False, "why": f"{len(labels)} labelled rows (fewer than monitoring.min_labelled_rows)"} if len(labels) else {}
    if metric in ("pr_auc", "roc_auc"):
        positives = int((labels > 0.5).sum())
        if min(positives, len(labels) - positives) < MIN_CLASS_ROWS:
            figures = realise(scores, labels)
            return {"realised": figures[metric], "judged": False,
                    "why": f"only {positives} positives and {len(labels) - positives} negatives (under {MIN_CLASS_ROWS})"}
    figures = realise(scores, labels)
    value = figures[metric]
    if value is None:
        return {"judged": False, "why": f"{metric} is undefined for these labels"}
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(BOOTSTRAP_ROUNDS):
        pick = rng.integers(0, len(labels), len(labels))
        drawn = realise(scores[pick], labels[pick])[metric]
        if drawn is not None:
            draws.append(drawn)
    low, high = (float(np.quantile(draws, 0.05)), float(np.quantile(draws, 0.95))) if draws else (value, value)
    crossed = (high < limit) if higher else (low > limit)
    return {"realised": float(value), "interval": [low, high], "judged": True, "crossed": bool(crossed),
            "realised_metrics": {k: float(v) for k, v in figures.items() if isinstance(v, (int, float))}}


def _limit(reference: float, higher: bool, drop: float) -> float:
    return reference * (1 - drop) if higher else reference * (1 + drop)


def _worse(value: float, limit: float, higher: bool) -> bool:
    return value < limit if higher else value > limit


def _estimate(baseline: dict[str, Any], scores: np.ndarray, rows: pd.DataFrame) -> dict[str, Any]:
    if baseline["task"] == "binary":
        return performance.estimate_binary(scores, baseline["reference"])
    features = holdout_features(rows, baseline["kinds"])
    return performance.estimate_regression(scores, features, baseline["reference"])


def _labels_for(storage: Storage, settings: Settings, meta: dict[str, Any], rows: pd.DataFrame,
                days: list[str]) -> tuple[pd.Series | None, str]:
    """Each captured row's label where it is known (NaN where not)."""
    contract = contract_of(settings, meta)
    id_column = INPUT + (contract.id or "")
    if not contract.id or id_column not in rows.columns:
        return None, (f"the requests carry no {contract.id or 'id'}: captured rows cannot be joined with their labels, "
                      "so no realised metrics")
    lake, note = _lake_labels(storage, settings, meta, days)
    if note:
        return None, note
    lookup = lake.drop_duplicates("id", keep="last").set_index("id")["label"]
    ids = rows[id_column].astype(str)
    return pd.Series(ids.map(lookup).to_numpy(dtype=np.float64), index=rows.index), ""


def _drift_findings(data: dict[str, Any], cfg: Any) -> list[Finding]:
    findings = []
    if data["metric_crossed"]:
        findings.append(Finding("drift", data["column"], data["metric"], float(data["value"]), float(data["threshold"])))
    if data["null_rate_crossed"]:
        findings.append(Finding("nulls", data["column"], "null rate change", float(data["null_rate_change"]),
                                float(data["null_rate_threshold"])))
    return findings


def _finish(storage: Storage, settings: Settings, result: MonitorResult, baseline: dict[str, Any] | None,
            window: Profile | None, started: float) -> MonitorResult:
    from flywheel.monitoring.gauges import write_gauges
    from flywheel.monitoring.report import render_report

    folder = storage.uri("monitoring", "runs", result.run_id)
    result.result_uri = f"{folder}/result.json"
    result.report_uri = f"{folder}/report.html"
    result.metrics_uri = f"{folder}/metrics.prom"
    result.seconds = round(time.perf_counter() - started, 3)
    key = KEY_METRICS.get(result.task or "")
    reference = result.reference.get(key[0]) if key else None
    limit = _limit(reference, key[1], settings.monitoring.max_metric_drop) if key and reference is not None else None
    storage.write_bytes(result.report_uri, render_report(result, baseline, window, key, limit).encode())
    write_gauges(storage, settings, result)
    ref = storage.write_json(result.result_uri, result.to_dict())
    inputs = [storage.stat(uri).to_dict() for uri in capture_parts(storage, _utc(result.since), _utc(result.until))]
    if baseline is not None and result.model_version:
        version = Registry(storage, settings.model_name).get(result.model_version)
        inputs.append(storage.stat(baseline_uri(version)).to_dict())
    lineage.record(storage, ref, step="monitor", run_id=result.run_id, inputs=inputs,
                   params={"monitoring": settings.monitoring.model_dump(mode="json"), "since": result.since, "until": result.until})
    log.info("monitor %s: %d rows, %d crossed (%s)", result.run_id, result.rows, len(result.findings),
             "; ".join(f.describe() for f in result.findings) or "nothing crossed")
    return result
