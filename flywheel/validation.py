"""Validate: a Great Expectations suite over a lake snapshot; a failure stops the pipeline.

The suite is the use case's data contract (:mod:`flywheel.contract`) as expectations: ingest holds
rows to its columns and types; this suite checks what types cannot (ranges, vocabularies, nulls,
uniqueness, a label's base rate, event times neither in the future nor absurdly old), and the drift
gate compares each batch with the last accepted ones in the ways the contract says. Results are
written as JSON and as HTML data docs below ``<reports>/<run_id>/`` before any failure is raised, so
a failed run always leaves its evidence behind. This module only checks and reports: the validate
step (:func:`flywheel.steps.validate_step`) publishes a staged batch that passes and discards one
that fails (:mod:`flywheel.lake`).

``great_expectations`` takes seconds to import, so it is imported inside the functions that use it.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from flywheel import lineage
from flywheel.contract import Contract
from flywheel.errors import ArtifactNotFound, ValidationFailed
from flywheel.storage import ObjectRef, Storage, join

if TYPE_CHECKING:
    from flywheel.config import IngestSettings

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from great_expectations.core import ExpectationSuite, ExpectationSuiteValidationResult

    from flywheel.lake import LakeSnapshot

log = logging.getLogger(__name__)

SUITE_NAME = "contract"
# How many unexpected values a result keeps (and the failure message shows at most 3 of them).
PARTIAL_UNEXPECTED = 5


@dataclass
class ValidationReport:
    """The outcome of one validation run and where its reports are."""

    success: bool
    run_id: str
    rows: int
    evaluated: int
    failed: list[dict[str, Any]]
    report_uri: str
    html_uri: str | None = None
    snapshot_uri: str | None = None
    statistics: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)  # the batch's statistics (the next batches' baseline)
    drift: list[dict[str, Any]] = field(default_factory=list)  # each drift check: observed vs expected

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_suite(
    contract: Contract,
    name: str = SUITE_NAME,
    *,
    ts_window: "tuple[dt.datetime, dt.datetime] | None" = None,
) -> "ExpectationSuite":
    """The use case's suite, derived from its contract: its exact columns and at least one row; no
    nulls where a column may not be null; a unique id; each declared range, vocabulary (with its
    ``categories_mostly``) and mean band. ``ts_window`` (earliest, latest) adds the check that event
    times are neither in the future (a clock or time-zone bug) nor absurdly old (a unit bug)."""
    gx = _import_gx()
    import great_expectations.expectations as gxe

    expectations = [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(contract.columns), exact_match=True),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        *[gxe.ExpectColumnValuesToNotBeNull(column=name) for name, c in contract.columns.items() if not c.nullable],
    ]
    if contract.id is not None:
        expectations.append(gxe.ExpectColumnValuesToBeUnique(column=contract.id))
    for column, c in contract.columns.items():
        if c.min is not None or c.max is not None:
            expectations.append(gxe.ExpectColumnValuesToBeBetween(
                column=column, min_value=c.min, max_value=c.max, strict_min=c.strict_min))
        if c.categories is not None:
            expectations.append(gxe.ExpectColumnValuesToBeInSet(
                column=column, value_set=list(c.categories), mostly=c.categories_mostly))
        if c.mean is not None:
            expectations.append(gxe.ExpectColumnMeanToBeBetween(column=column, min_value=c.mean[0], max_value=c.mean[1]))
    if ts_window is not None:
        expectations.append(gxe.ExpectColumnValuesToBeBetween(
            column=contract.timestamp, min_value=ts_window[0], max_value=ts_window[1]))
    # Passed to the constructor: suite.add_expectation() looks for an active data context (GE's
    # global project) to save into, and raises DataContextRequiredError when there is none.
    return gx.ExpectationSuite(name=name, expectations=expectations)


def validate_frame(
    df: "pd.DataFrame", suite: "ExpectationSuite"
) -> tuple[bool, list[dict[str, Any]], dict[str, Any]]:
    """Run the suite over a DataFrame: (success, failed expectations, GE's result as a JSON dict)."""
    result = _run_suite(df, suite)
    return bool(result.success), summarize_failures(result), _plain(result.to_json_dict())


def validate_snapshot(
    storage: Storage,
    snapshot: "LakeSnapshot",
    reports_uri: str,
    run_id: str,
    contract: Contract,
    raise_on_failure: bool = True,
) -> ValidationReport:
    """Validate every row of a lake snapshot; write ``validation.json`` and ``validation.html`` under
    ``<reports_uri>/<run_id>/`` (with lineage back to the snapshot manifest), then raise
    :class:`ValidationFailed` naming each failed expectation when ``raise_on_failure`` is set."""
    from flywheel.lake import read_snapshot

    started = time.perf_counter()
    df = read_snapshot(storage, snapshot, contract.arrow_schema()).to_pandas()
    read_s = time.perf_counter() - started
    result = _run_suite(df, build_suite(contract))
    result.meta["run_id"] = _run_identifier(run_id)  # names the run in the data docs
    validate_s = time.perf_counter() - started - read_s
    failed = summarize_failures(result)
    statistics = _plain(dict(result.statistics))

    folder = join(reports_uri, run_id)
    html_uri = join(folder, "validation.html")
    report = ValidationReport(
        success=bool(result.success),
        run_id=run_id,
        rows=len(df),
        evaluated=int(statistics.get("evaluated_expectations", len(result.results))),
        failed=failed,
        report_uri=join(folder, "validation.json"),
        html_uri=html_uri,
        snapshot_uri=snapshot.uri,
        statistics=statistics,
    )
    document = {
        **report.to_dict(),
        "snapshot": {"uri": snapshot.uri, "sha256": snapshot.sha256, "rows": snapshot.rows},
        "result": _plain(result.to_json_dict()),
    }
    json_ref = storage.write_json(report.report_uri, document)
    page = render_html(result, title=f"Validation of {snapshot.uri}")
    html_ref = storage.write_bytes(html_uri, page.encode())
    inputs = [_manifest_ref(storage, snapshot)]
    params = {"suite": SUITE_NAME, "success": report.success, "rows": report.rows}
    for ref in (json_ref, html_ref):
        lineage.record(storage, ref, step="validate", run_id=run_id, inputs=inputs, params=params)
    log.info(
        "validate: %s, %d/%d expectations passed on %d rows (read %.2fs, validate %.2fs, total %.2fs); report %s",
        "passed" if report.success else "FAILED",
        report.evaluated - len(failed),
        report.evaluated,
        report.rows,
        read_s,
        validate_s,
        time.perf_counter() - started,
        report.report_uri,
    )
    if not report.success and raise_on_failure:
        raise ValidationFailed(failure_message(report))
    return report


# --- the batch gate: the new rows, and drift against the last accepted batches ---------------------

# Enforced by ingest before any row is staged: every column is there, each id is unique in the lake.
ENFORCED_AT_INGEST = {"expect_table_columns_to_match_set", "expect_column_values_to_be_unique"}
# Expectations about single values: a row that breaks one can be set aside on its own.
ROW_LEVEL = {"expect_column_values_to_not_be_null", "expect_column_values_to_be_between", "expect_column_values_to_be_in_set"}
SHARE_CHECK = "share_of_each_value_close_to_baseline"  # no GE expectation does this: computed here


def ts_window(settings: "IngestSettings", now: dt.datetime | None = None) -> tuple[dt.datetime, dt.datetime]:
    """The timestamps a batch may hold: not older than ``max_age_days``, not later than now plus
    ``max_future_minutes``."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return now - dt.timedelta(days=settings.max_age_days), now + dt.timedelta(minutes=settings.max_future_minutes)


def batch_columns(contract: Contract) -> list[str]:
    """The columns the batch gate reads: the event time and those with a range, a vocabulary, a mean
    band or a drift check. The others (an id, a join key) have nothing left to check once ingest has
    held them to the schema (types, nulls) and the id unique through its index."""
    drift = contract.drift_checks()
    known = contract.label_known.column if contract.label_known.within is not None else None
    return [name for name, c in contract.columns.items()
            if name in (contract.timestamp, known) or name in drift or c.min is not None or c.max is not None
            or c.categories is not None or c.mean is not None]


KNOWN_WITHIN = "label_known_within_its_bound"  # no GE expectation compares two times: computed here


def known_within_check(table: "pa.Table", contract: Contract) -> dict[str, Any] | None:
    """The contract's ``label_known.within``: a row's label time lies between its event time and
    that bound after it (features read that far back for labels; a later one would be missed by a day
    computed alone). None when the contract has no such bound."""
    import pyarrow as pa
    import pyarrow.compute as pc

    bound = contract.label_known.within
    column = contract.label_known.column
    if bound is None or column is None or table.num_rows == 0:
        return None
    lag = pc.subtract(table.column(column), table.column(contract.timestamp))
    outside = pc.or_(pc.less(lag, pa.scalar(dt.timedelta(0), pa.duration("us"))),
                     pc.greater(lag, pa.scalar(bound, pa.duration("us"))))
    bad = int(pc.sum(pc.fill_null(outside, False)).as_py() or 0)
    return {"expectation": KNOWN_WITHIN, "column": column, "success": bad == 0, "observed": bad,
            "expected": f"{column} between {contract.timestamp} and {bound} after it"}


def batch_expectations(contract: Contract, settings: "IngestSettings", now: dt.datetime | None = None) -> list[Any]:
    """The suite as the batch gate runs it: the expectations on the columns it reads, with the
    timestamp window, less those ingest already enforces."""
    suite = build_suite(contract, ts_window=ts_window(settings, now))
    columns = batch_columns(contract)
    return [
        e for e in suite.expectations
        if e.expectation_type not in ENFORCED_AT_INGEST and getattr(e, "column", None) in (None, *columns)
    ]


def row_check(contract: Contract, settings: "IngestSettings", now: dt.datetime | None = None) -> Any:
    """The suite's row-level expectations (not null, between, in set) as a vectorized check over a
    table of the contract's rows: returns (a mask of the rows breaking any, each such row's reason, as
    ``expectation(column): value``). Ingest's policy quarantine sets those rows aside."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    checks = [e for e in batch_expectations(contract, settings, now) if e.expectation_type in ROW_LEVEL]

    def failing(e: Any, column: "pa.ChunkedArray") -> "pa.ChunkedArray":
        if e.expectation_type == "expect_column_values_to_not_be_null":
            return column.is_null()
        if e.expectation_type == "expect_column_values_to_be_in_set":
            return pc.invert(pc.is_in(column, value_set=pa.array(list(e.value_set)).cast(column.type)))
        out = pa.chunked_array([pa.array(np.zeros(len(column), dtype=bool))])
        if e.min_value is not None:
            low = pa.scalar(e.min_value, type=column.type)
            out = pc.or_(out, (pc.less_equal if e.strict_min else pc.less)(column, low))
        if e.max_value is not None:
            high = pa.scalar(e.max_value, type=column.type)
            out = pc.or_(out, (pc.greater_equal if e.strict_max else pc.greater)(column, high))
        return out

    def check(table: "pa.Table") -> tuple["np.ndarray", list[str]]:
        bad = np.zeros(table.num_rows, dtype=bool)
        reasons: dict[int, str] = {}
        for e in checks:
            column = table.column(e.column)
            fails = pc.fill_null(failing(e, column), False).to_numpy(zero_copy_only=False) & ~bad
            for row in np.flatnonzero(fails):
                reasons[int(row)] = f"{e.expectation_type}({e.column}): {_plain(column[int(row)].as_py())!r}"
            bad |= fails
        return bad, [reasons[int(row)] for row in np.flatnonzero(bad)]

    return check


def batch_profile(df: "pd.DataFrame", contract: Contract, quantiles: list[float]) -> dict[str, Any]:
    """What the drift gate compares (:meth:`~flywheel.contract.Contract.drift_checks`): the row
    count, and per column its quantiles, its values' shares or its rate of 1s (nulls left out)."""
    if not len(df):
        return {"rows": 0}
    profile: dict[str, Any] = {"rows": int(len(df)), "quantiles": {}, "shares": {}, "rates": {}}
    for column, how in contract.drift_checks().items():
        values = df[column].dropna()
        if not len(values):
            continue
        if how == "quantiles":
            profile["quantiles"][column] = {str(q): float(v) for q, v in zip(quantiles, values.quantile(quantiles).tolist())}
        elif how == "shares":
            profile["shares"][column] = {str(k): float(v) for k, v in values.value_counts(normalize=True).items() if v > 0}
        else:
            profile["rates"][column] = float(values.astype("float64").mean())
    return profile


def baseline_profile(profiles: list[dict[str, Any]], contract: Contract, quantiles: list[float]) -> dict[str, Any]:
    """The mean of the last accepted batches' profiles, column by column (a batch whose profile lacks
    a column, such as one accepted under an older contract, does not count for that column)."""
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    baseline: dict[str, Any] = {"batches": len(profiles), "rows": mean([p["rows"] for p in profiles]),
                                "quantiles": {}, "shares": {}, "rates": {}}
    for column, how in contract.drift_checks().items():
        if how == "quantiles":
            seen = [p["quantiles"][column] for p in profiles if column in p.get("quantiles", {})]
            if seen and all(str(q) in s for s in seen for q in quantiles):
                baseline["quantiles"][column] = {str(q): mean([s[str(q)] for s in seen]) for q in quantiles}
        elif how == "shares":
            seen = [p["shares"][column] for p in profiles if column in p.get("shares", {})]
            keys = sorted({k for s in seen for k in s})
            if seen:
                baseline["shares"][column] = {k: mean([s.get(k, 0.0) for s in seen]) for k in keys}
        else:
            seen = [p["rates"][column] for p in profiles if column in p.get("rates", {})]
            if seen:
                baseline["rates"][column] = mean(seen)
    return baseline


def _slack(share: float, rows: int) -> float:
    """Three standard errors of a share estimated from ``rows`` rows."""
    return 3 * math.sqrt(max(share * (1 - share), 0.0) / max(rows, 1))


def drift_expectations(baseline: dict[str, Any], drift: Any, rows: int) -> list[Any]:
    """The drift gate as GE expectations (each marked ``meta.drift``) for a batch of ``rows`` rows,
    against ``baseline``: its row count always, its distributions when it has ``drift.min_rows``."""
    _import_gx()
    import great_expectations.expectations as gxe

    tolerance = drift.quantile_tolerance
    meta = {"drift": True, "baseline_batches": baseline["batches"]}
    expectations = [
        # A delivery far smaller or larger than usual: a partial export, or one sent twice over.
        gxe.ExpectTableRowCountToBeBetween(
            min_value=int(baseline["rows"] * drift.min_rows_ratio), max_value=int(baseline["rows"] * drift.max_rows_ratio) + 1,
            meta=meta,
        ),
    ]
    if rows < drift.min_rows:
        return expectations
    for column, values in baseline.get("quantiles", {}).items():
        # Numbers in another unit (cents for dollars, minutes for hours) or from another population.
        expectations.append(gxe.ExpectColumnQuantileValuesToBeBetween(
            column=column,
            quantile_ranges={
                "quantiles": [float(q) for q in values],
                "value_ranges": [[v - tolerance * abs(v), v + tolerance * abs(v)] for v in values.values()],
            },
            meta=meta,
        ))
    for column, rate in baseline.get("rates", {}).items():
        # A 0/1 column (a label's base rate) that moved: a labelling bug, or another population.
        expectations.append(gxe.ExpectColumnMeanToBeBetween(
            column=column, min_value=max(0.0, rate - drift.max_rate_change - _slack(rate, rows)),
            max_value=rate + drift.max_rate_change + _slack(rate, rows), meta=meta,
        ))
    for column in baseline.get("shares", {}):
        shares = baseline["shares"].get(column) or {}
        if shares:
            # A sample of n rows over k values has an expected KL of about (k - 1) / 2n by chance alone.
            expectations.append(gxe.ExpectColumnKLDivergenceToBeLessThan(
                column=column, threshold=round(drift.max_kl_divergence + len(shares) / rows, 6), meta=meta,
                partition_object={"values": list(shares), "weights": [v / sum(shares.values()) for v in shares.values()]},
            ))
    return expectations


def share_checks(profile: dict[str, Any], baseline: dict[str, Any], drift: Any) -> list[dict[str, Any]]:
    """Each value's share of each vocabulary column against the baseline's (GE has no such
    expectation); none for a batch under ``drift.min_rows``."""
    checks: list[dict[str, Any]] = []
    rows = profile.get("rows", 0)
    if rows < drift.min_rows:
        return checks
    for column in baseline.get("shares", {}):
        observed, expected = profile.get("shares", {}).get(column, {}), baseline["shares"].get(column, {})
        for value in sorted(set(observed) | set(expected)):
            got, want = observed.get(value, 0.0), expected.get(value, 0.0)
            allowed = drift.max_share_change + _slack(want, rows)
            checks.append({
                "expectation": SHARE_CHECK, "column": column, "value": value, "success": abs(got - want) <= allowed,
                "observed": round(got, 4), "expected": f"{want:.4f} ± {allowed:.4f}",
            })
    return checks


def validate_batch(
    storage: Storage,
    staged: "LakeSnapshot",
    reports_uri: str,
    run_id: str,
    contract: Contract,
    settings: "IngestSettings",
    now: dt.datetime | None = None,
) -> ValidationReport:
    """The gate on a staged batch: the suite on its new rows only (its cost grows with the batch, not
    the lake), then the drift gate against the profiles of the last accepted batches. Writes
    ``validation.json`` and ``.html`` under ``<reports_uri>/<run_id>/`` and returns the report (its
    ``profile`` is what the publish records for the next batches); never raises on a failure."""
    from flywheel.lake import load_snapshot, manifest_uri, read_new_rows, recent_profiles

    started = time.perf_counter()
    vocabularies = [name for name, how in contract.drift_checks().items() if how == "shares"]
    table = read_new_rows(storage, staged, contract.arrow_schema(), batch_columns(contract), dictionary=vocabularies)
    rows = table.num_rows
    read_s = time.perf_counter() - started
    quantiles = list(settings.drift.quantiles)
    profile = batch_profile(table.select(list(contract.drift_checks())).to_pandas(), contract, quantiles)
    baseline: dict[str, Any] = {}
    if settings.drift.enabled and staged.parent and rows:
        parent = load_snapshot(storage, manifest_uri(staged.lake_uri, staged.parent))
        history = recent_profiles(storage, parent, settings.drift.window)
        if history:
            baseline = baseline_profile(history, contract, quantiles)
    expectations = batch_expectations(contract, settings, now)
    if baseline:
        expectations += drift_expectations(baseline, settings.drift, rows)
    result = _run_batch_suite(table, expectations) if rows else None
    within = known_within_check(table, contract)
    del table
    validate_s = time.perf_counter() - started - read_s

    shares = share_checks(profile, baseline, settings.drift) if baseline else []
    failed = summarize_failures(result) if result is not None else []
    if within is not None and not within["success"]:
        failed.append({"expectation": KNOWN_WITHIN, "column": within["column"],
                       "details": f"{within['observed']} rows outside: expected {within['expected']}"})
    failed += [
        {"expectation": c["expectation"], "column": c["column"],
         "details": f"share of {c['value']!r} observed {c['observed']}, expected {c['expected']}"}
        for c in shares if not c["success"]
    ]
    drift = _drift_results(result) + shares if result is not None else []
    statistics = _plain(dict(result.statistics)) if result is not None else {"evaluated_expectations": 0}
    folder = join(reports_uri, run_id)
    report = ValidationReport(
        success=not failed,
        run_id=run_id,
        rows=rows,
        evaluated=int(statistics.get("evaluated_expectations", 0)) + len(shares) + (within is not None),
        failed=failed,
        report_uri=join(folder, "validation.json"),
        html_uri=join(folder, "validation.html"),
        snapshot_uri=staged.uri,
        statistics=statistics,
        profile=profile,
        drift=drift,
    )
    document = {
        **report.to_dict(),
        "snapshot": {"uri": staged.uri, "sha256": staged.sha256, "rows": staged.rows, "new_parts": staged.new_parts},
        "baseline": baseline,
        "result": _plain(result.to_json_dict()) if result is not None else None,
    }
    json_ref = storage.write_json(report.report_uri, document)
    if result is not None:
        result.meta["run_id"] = _run_identifier(run_id)
        page = render_html(result, title=f"Validation of the batch {staged.uri}")
    else:
        page = f"<!doctype html><html><body><h1>Validation of {html.escape(staged.uri)}: no new rows</h1></body></html>"
    html_ref = storage.write_bytes(report.html_uri, page.encode())
    inputs = [_manifest_ref(storage, staged)]
    params = {"suite": SUITE_NAME, "success": report.success, "rows": report.rows, "drift_baseline_batches": baseline.get("batches", 0)}
    for ref in (json_ref, html_ref):
        lineage.record(storage, ref, step="validate", run_id=run_id, inputs=inputs, params=params)
    log.info(
        "validate: batch %s, %d/%d checks passed on %d new rows (read %.2fs, validate %.2fs); report %s",
        "passed" if report.success else "FAILED", report.evaluated - len(failed), report.evaluated, report.rows,
        read_s, validate_s, report.report_uri,
    )
    return report


def _drift_results(result: "ExpectationSuiteValidationResult") -> list[dict[str, Any]]:
    """Each drift expectation's outcome, with the observed and the expected value."""
    out = []
    for item in result.results:
        config = item.expectation_config
        if not config or not (config.meta or {}).get("drift"):
            continue
        kwargs = dict(config.kwargs)
        observed = (item.result or {}).get("observed_value")
        if "quantile_ranges" in kwargs:
            expected: Any = dict(zip(kwargs["quantile_ranges"]["quantiles"], kwargs["quantile_ranges"]["value_ranges"]))
        elif "threshold" in kwargs:
            expected = f"below {kwargs['threshold']}"
        else:
            expected = [kwargs.get("min_value"), kwargs.get("max_value")]
        out.append({"expectation": config.type, "column": kwargs.get("column"), "success": bool(item.success),
                    "observed": _plain(observed), "expected": _plain(expected)})
    return out


def report_counts(document: dict[str, Any]) -> dict[str, float]:
    """The pass/fail counts of a validation report (``validation.json``), as plain numbers: what the
    Kubeflow UI shows as the validate step's metrics."""
    drift = document.get("drift") or []
    failed = len(document.get("failed") or [])
    evaluated = int(document.get("evaluated") or 0)
    return {
        "passed": 1.0 if document.get("success") else 0.0,
        "rows_validated": float(document.get("rows") or 0),
        "checks_evaluated": float(evaluated),
        "checks_passed": float(evaluated - failed),
        "checks_failed": float(failed),
        "drift_checks": float(len(drift)),
        "drift_checks_failed": float(sum(1 for check in drift if not check.get("success"))),
    }


def report_markdown(document: dict[str, Any]) -> str:
    """A validation report (``validation.json``) as a short Markdown summary: the verdict and counts,
    each failed check with what was observed, and the drift checks (observed against expected)."""
    counts = report_counts(document)
    snapshot = document.get("snapshot") or {}
    verdict = "passed" if document.get("success") else "FAILED"
    lines = [
        f"# Validation {verdict}: {int(counts['checks_passed'])} of {int(counts['checks_evaluated'])} checks "
        f"on {int(counts['rows_validated']):,} new rows",
        "",
        f"- batch: `{snapshot.get('uri', document.get('snapshot_uri', '?'))}` "
        f"(snapshot `{str(snapshot.get('sha256', ''))[:12]}`, {int(snapshot.get('rows') or 0):,} rows with the lake)",
        f"- report: `{document.get('report_uri', '?')}`; data docs: `{document.get('html_uri', '?')}`",
        f"- drift gate: {int(counts['drift_checks']) - int(counts['drift_checks_failed'])} of "
        f"{int(counts['drift_checks'])} checks passed"
        + (f" against the last {document['baseline']['batches']} accepted batch(es)" if (document.get("baseline") or {}).get("batches")
           else " (no accepted batch yet: no baseline)"),
    ]
    if document.get("failed"):
        lines += ["", "## Failed checks", "", "| expectation | column | observed |", "| --- | --- | --- |"]
        lines += [f"| `{f['expectation']}` | {f.get('column') or 'table'} | {_cell(f.get('details'))} |" for f in document["failed"]]
    if document.get("drift"):
        lines += ["", "## Drift against the recent batches", "", "| | check | column | observed | expected |",
                  "| --- | --- | --- | --- | --- |"]
        for check in document["drift"]:
            column = check.get("column") or "table"
            if check.get("value") is not None:
                column = f"{column} = {check['value']}"
            lines.append(f"| {'✔' if check.get('success') else '✘'} | `{check['expectation']}` | {_cell(column)} | "
                         f"{_cell(check.get('observed'))} | {_cell(check.get('expected'))} |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    """A value as one Markdown table cell (pipes escaped, long values cut)."""
    text = value if isinstance(value, str) else _short(_plain(value), 160)
    return text.replace("|", "\\|").replace("\n", " ")


def failure_message(report: ValidationReport, subject: str = "") -> str:
    """The ValidationFailed text: one line per failed expectation, and where the report is."""
    lines = [
        f"validation of {subject or report.snapshot_uri or 'the snapshot'} failed: {len(report.failed)} of "
        f"{report.evaluated} expectations failed on {report.rows} rows (report: {report.report_uri}):"
    ]
    lines += [f"  - {f['expectation']}({f['column'] or 'table'}): {f['details']}" for f in report.failed]
    return "\n".join(lines)


def summarize_failures(result: "ExpectationSuiteValidationResult") -> list[dict[str, Any]]:
    """One entry per failed expectation: its type, column and a short observed value."""
    failed = []
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        kwargs = dict(config.kwargs) if config else {}
        failed.append(
            {
                "expectation": config.type if config else "unknown",
                "column": kwargs.get("column"),
                "details": _describe(item.result or {}, item.exception_info or {}, kwargs),
            }
        )
    return failed


def _describe(result: dict[str, Any], exception: dict[str, Any], kwargs: dict[str, Any]) -> str:
    error = _exception_message(exception)
    if error:
        return f"could not be evaluated: {error}"
    mismatched = (result.get("details") or {}).get("mismatched")
    if isinstance(mismatched, dict) and mismatched:
        return ", ".join(f"{kind} columns {_plain(cols)}" for kind, cols in mismatched.items() if cols)
    if result.get("unexpected_count") is not None:
        examples = _plain(list(result.get("partial_unexpected_list") or [])[:3])
        share = result.get("unexpected_percent")
        share_text = f" ({share:.2f}%)" if isinstance(share, (int, float)) else ""
        mostly = f", allowed {100 * (1 - kwargs['mostly']):.2f}%" if kwargs.get("mostly") is not None else ""
        return f"{result['unexpected_count']} unexpected values{share_text}{mostly}, e.g. {examples}"
    if "observed_value" in result:
        expected = ""
        observed = result["observed_value"]
        if "quantile_ranges" in kwargs and isinstance(observed, dict):
            ranges = kwargs["quantile_ranges"]
            return "; ".join(
                f"quantile {q}: observed {_plain(v):.4g}, expected between {lo:.4g} and {hi:.4g}"
                for q, v, (lo, hi) in zip(ranges["quantiles"], observed.get("values", []), ranges["value_ranges"])
            )
        if "partition_object" in kwargs:
            partition = ((result.get("details") or {}).get("observed_partition") or {})
            shares = dict(zip(partition.get("values", []), partition.get("weights", [])))
            expected_shares = dict(zip(kwargs["partition_object"]["values"], kwargs["partition_object"]["weights"]))
            worst = sorted(set(shares) | set(expected_shares),
                           key=lambda v: -abs(shares.get(v, 0) - expected_shares.get(v, 0)))[:3]
            changes = ", ".join(f"{v!r} {shares.get(v, 0):.3f} vs {expected_shares.get(v, 0):.3f}" for v in worst)
            return f"KL divergence observed {_short(_plain(observed))}, expected below {kwargs.get('threshold')} (shares: {changes})"
        if "min_value" in kwargs or "max_value" in kwargs:
            expected = f", expected between {kwargs.get('min_value')} and {kwargs.get('max_value')}"
        elif "column_set" in kwargs:
            expected = f", expected {kwargs['column_set']}"
        return f"observed {_short(_plain(result['observed_value']))}{expected}"
    return "failed"


def _exception_message(exception: dict[str, Any]) -> str | None:
    """GE reports an evaluation error either flat ({"raised_exception": ...}) or, when a metric
    failed (e.g. a missing column), as one such dict per metric id."""
    infos = [exception] if "raised_exception" in exception else [v for v in exception.values() if isinstance(v, dict)]
    for info in infos:
        if info.get("raised_exception") and info.get("exception_message"):
            return str(info["exception_message"]).strip().splitlines()[0]
    return None


def render_html(result: "ExpectationSuiteValidationResult", title: str = "Validation") -> str:
    """HTML data docs: GE's own validation page, or (if GE's renderer fails) a plain table. Either is
    one self-contained file that reads nothing from the network (see :func:`offline_data_docs`)."""
    try:
        from great_expectations.render.renderer import ValidationResultsPageRenderer

        # GE's number formatting parses repr(value): numpy 2 scalars ("np.float64(0.02)") break it,
        # so hand the renderer plain Python values.
        for item in result.results:
            item.result = _plain(item.result)
        return offline_data_docs(ValidationResultsPageRenderer().render(result))
    except Exception as exc:  # the report must exist even when GE's renderer does not cope
        log.warning("GE data docs renderer failed (%s); writing a plain HTML table instead", exc)
        return _plain_html(result, title)


# GE's pages load Bootstrap, Font Awesome, jQuery and Vega from CDNs, link "Home" and the suite to a
# data docs site that a report file does not have, and show each expectation's status only as a Font
# Awesome icon. Offline (an air-gapped cluster) that page is unstyled, its status column blank and
# its logo and links broken. What the page needs is rendered in the file instead: GE's own stylesheet
# and images from the installed package, a small stylesheet in place of Bootstrap's, the status as
# text, and the "Failed Only" filter without jQuery.
# GE's markdown icon of a status -> the text shown, and its colour. The marks are plain symbols, not
# emoji: a cluster's browser may have no emoji font.
STATUS_TEXT = {"✅": ("✔ passed", "text-success"), "❌": ("✘ failed", "text-danger"), "❗": ("! error", "text-warning")}
_OFFLINE_STYLES = """
body{font-family:"HK Grotesk",system-ui,sans-serif;margin:0;color:#212529;background:#fff}
.ge-navbar{display:flex;align-items:center;gap:1em;padding:8px 2em;border-bottom:1px solid #dee2e6;background:#f8f9fa}
.ge-navbar img{height:40px;width:auto}
.container-fluid{padding:1em 2em}
.row{display:flex;flex-wrap:wrap}
.col-md-2,.col-lg-2{flex:0 0 16%;max-width:16%;box-sizing:border-box}
.col-md-10,.col-lg-10{flex:0 0 84%;max-width:84%;box-sizing:border-box;padding-left:1.5em}
.col-12{flex:0 0 100%;max-width:100%}.col-6{flex:0 0 50%;max-width:50%}
.card{border:1px solid #dee2e6;border-radius:4px;margin-bottom:1em}.card-header{background:#f1f3f5;padding:6px}
.card-body{padding:8px}.nav{list-style:none;padding:0;margin:0}.nav-link{display:block;padding:2px 4px}
.alert-secondary{background:#e2e3e5;border:1px solid #d6d8db;border-radius:4px;padding:8px 12px;margin:1em 0 4px}
.table{border-collapse:collapse;width:100%;margin-bottom:1em}.table td,.table th{border-top:1px solid #dee2e6;padding:6px;
text-align:left;vertical-align:top}
.badge{display:inline-block;padding:1px 6px;border-radius:4px;background:#6c757d;color:#fff;font-size:85%}
.text-success{color:#1e7e34}.text-danger{color:#c82333}.text-warning{color:#b8860b}
.ge-status{font-style:normal;font-weight:bold;white-space:nowrap}
.btn{display:inline-block;padding:2px 8px;border:1px solid #007bff;border-radius:4px;cursor:pointer}
.btn input{margin-right:4px}
a{color:#0056b3}h5{font-size:1.15rem;margin:0}
"""
_OFFLINE_FILTER_SCRIPT = """<script>
/* GE's "Show All" / "Failed Only" filter (its sidebar's jQuery version), in plain DOM calls. */
function setSucceededVisible(show) {
  const display = show ? "" : "none";
  document.querySelectorAll(".hide-succeeded-validation-target-child").forEach(el => { el.parentElement.style.display = display; });
  document.querySelectorAll(".hide-succeeded-validation-target").forEach(el => { el.style.display = display; });
  document.querySelectorAll(".hide-succeeded-validations-column-section-target-child").forEach(el => {
    const section = el.parentElement.parentElement;
    section.style.display = display;
    document.querySelectorAll('a[href="#' + section.id + '"]').forEach(a => { a.style.display = display; });
  });
}
function showAllValidations() { setSucceededVisible(true); }
function hideSucceededValidations() { setSucceededVisible(false); }
</script>"""


def _package_data_uri(path: str, mime: str) -> str:
    """A file shipped inside the great_expectations package, as a data: URI."""
    import base64
    from importlib import resources

    data = (resources.files("great_expectations") / path).read_bytes()
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _offline_templates() -> dict[str, str]:
    """GE's templates that reach outside the file, as self-contained ones (the rest are GE's own)."""
    images = "render/view/static/images"
    return {
        # No CDN script or stylesheet; GE's own stylesheet is still included by its page template.
        "js_script_imports.j2": f"<style>{_OFFLINE_STYLES}</style>",
        "favicon.j2": f'<link rel="icon" type="image/x-icon" href="{_package_data_uri(f"{images}/favicon.ico", "image/x-icon")}"/>',
        # GE's logo from the package, and the page's title in place of links to a data docs site.
        "top_navbar.j2": (
            '<nav class="ge-navbar"><img src="' + _package_data_uri(f"{images}/logo-long.png", "image/png")
            + '" alt="Great Expectations"/>{% if page_title %}<span>{{ page_title }}</span>{% endif %}</nav>'
        ),
        # In place of GE's newsletter link: the filter buttons' functions without jQuery.
        "cloud-footer.j2": _OFFLINE_FILTER_SCRIPT,
    }


def _offline_document(node: Any) -> Any:
    """GE's rendered document with each status icon given its text, and links to data docs pages
    that a report file does not have turned into plain text (in-page anchors stay)."""
    if isinstance(node, list):
        return [_offline_document(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _offline_document(value) for key, value in node.items()}
    params = node.get("params")
    if isinstance(params, dict):
        if params.get("markdown_status_icon") in STATUS_TEXT and "icon" in params:
            text, colour = STATUS_TEXT[params["markdown_status_icon"]]
            params["icon"] = text
            styled = node.setdefault("styling", {}).setdefault("params", {}).setdefault("icon", {})
            styled["classes"] = ["ge-status", colour]
        if "html_success_icon" in params:  # trusted raw HTML beside the words "Succeeded" / "Failed"
            params["html_success_icon"] = ""
    styling = node.get("styling") if isinstance(node.get("styling"), dict) else {}
    for style in (styling.get("params") or {}).values():
        if isinstance(style, dict) and style.get("tag") == "a":
            href = str((style.get("attributes") or {}).get("href", ""))
            if not href.startswith("#"):
                style["tag"] = "span"
                style["attributes"] = {k: v for k, v in style["attributes"].items() if k != "href"}
    return node


def offline_data_docs(document: Any) -> str:
    """Render GE's validation page document as one self-contained HTML file: nothing is loaded from
    the network, no image or link is broken, and each expectation's status is shown as text."""
    from great_expectations.render.view import DefaultJinjaPageView
    from jinja2 import ChoiceLoader, DictLoader

    class OfflinePageView(DefaultJinjaPageView):
        def _validate_document(self, document: Any) -> None:
            assert isinstance(document, dict)  # GE's document as JSON, rewritten by _offline_document

    view = OfflinePageView()
    view.env.loader = ChoiceLoader([DictLoader(_offline_templates()), view.env.loader])
    page = view.render(_offline_document(document.to_json_dict()), show_how_to_buttons=False)
    # GE's page template itself links the CDN stylesheets, and its stylesheet draws a (dark mode)
    # logo from the web: drop every tag and picture that reaches outside.
    return _EXTERNAL_CSS_URL.sub("none", _EXTERNAL_TAG.sub("", page))


_EXTERNAL_TAG = re.compile(r"""<(?:link|script)\b[^>]*\b(?:href|src)\s*=\s*["']?(?:https?:)?//[^>]*>(?:\s*</script>)?""", re.I)
_EXTERNAL_CSS_URL = re.compile(r"""url\(\s*["']?(?:https?:)?//[^)]*\)""", re.I)


def _plain_html(result: "ExpectationSuiteValidationResult", title: str) -> str:
    rows = []
    for item in result.results:
        config = item.expectation_config
        kwargs = {k: v for k, v in dict(config.kwargs).items() if k != "batch_id"} if config else {}
        details = _describe(item.result or {}, item.exception_info or {}, kwargs)
        rows.append(
            f"<tr class={'ok' if item.success else 'fail'}><td>{'✔ passed' if item.success else '✘ failed'}</td>"
            f"<td>{html.escape(config.type if config else '?')}</td><td>{html.escape(str(kwargs))}</td>"
            f"<td>{html.escape(details if not item.success else 'passed')}</td></tr>"
        )
    status = "passed" if result.success else "FAILED"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px}.fail{background:#fdd}"
        f"</style></head><body><h1>{html.escape(title)}: {status}</h1><table>"
        "<tr><th>status</th><th>expectation</th><th>arguments</th><th>observed</th></tr>"
        f"{''.join(rows)}</table></body></html>"
    )


# --- running GE ---------------------------------------------------------------------------------


def _import_gx() -> Any:
    """``great_expectations``, imported late; its INFO chatter (hundreds of lines per import and per
    context) is capped at WARNING unless someone configured that logger on purpose."""
    quiet = logging.getLogger("great_expectations")
    if quiet.level == logging.NOTSET:
        quiet.setLevel(logging.WARNING)
    import great_expectations

    if quiet.level == logging.WARNING:
        # This one module pins its own logger at INFO (one line per ephemeral context).
        logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    return great_expectations


def _run_suite(df: "pd.DataFrame", suite: "ExpectationSuite") -> "ExpectationSuiteValidationResult":
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    started = time.perf_counter()
    # A fresh ephemeral context per run: nothing is shared between calls, so names cannot clash
    # and no global GE state leaks from one validation into the next (it costs a few ms).
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # no tqdm noise in logs
    from great_expectations.validator.v1_validator import Validator

    definition = context.data_sources.add_pandas("flywheel").add_dataframe_asset(SUITE_NAME).add_batch_definition_whole_dataframe("whole")
    # The validator loads the batch once (get_batch() then Batch.validate() would load it twice, and
    # each load fingerprints every value of the frame).
    validator = Validator(
        batch_definition=definition,
        batch_parameters={"dataframe": df},
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": PARTIAL_UNEXPECTED},
    )
    result = validator.validate_expectation_suite(suite)
    log.debug("validate: GE ran %d expectations in %.2fs", len(result.results), time.perf_counter() - started)
    return result


# Column means GE computes as pandas' Series.mean(), after scanning every value in Python for a
# decimal.Decimal (about 0.4 µs a row: 2 s of a 5M-row batch). The batch's columns come typed from
# lake parquet, where no Decimal can be, so the mean is taken straight from pandas.
DIRECT = {"expect_column_mean_to_be_between"}


def _run_batch_suite(table: "pa.Table", expectations: list[Any]) -> "ExpectationSuiteValidationResult":
    """The batch gate's expectations over ``table``, as one GE suite result (so the report, the data
    docs and the failure messages are GE's), computed a column at a time: GE runs each column's
    expectations on a frame of that column alone (its map expectations filter and copy the whole
    frame they get, every column of it, several times each), table-level ones ride with the first
    column, and the :data:`DIRECT` ones are decided on the same frame as GE would decide them."""
    gx = _import_gx()
    from great_expectations.core import ExpectationSuiteValidationResult

    groups: dict[str, list[Any]] = {}
    for expectation in expectations:
        groups.setdefault(getattr(expectation, "column", None) or "", []).append(expectation)
    table_level = groups.pop("", [])
    columns = list(groups) or table.column_names[:1]
    results: list[Any] = []
    meta: dict[str, Any] = {}
    for index, column in enumerate(columns):
        frame = table.select([column]).to_pandas()
        group = groups.get(column, []) + (table_level if index == 0 else [])
        by_ge = [e for e in group if e.expectation_type not in DIRECT]
        if by_ge:
            result = _run_suite(frame, gx.ExpectationSuite(name=SUITE_NAME, expectations=by_ge))
            results += result.results
            meta = meta or dict(result.meta)
        results += [_direct_result(e, frame) for e in group if e.expectation_type in DIRECT]
        del frame
    passed = sum(1 for item in results if item.success)
    statistics = {
        "evaluated_expectations": len(results), "successful_expectations": passed,
        "unsuccessful_expectations": len(results) - passed,
        "success_percent": passed / len(results) * 100 if results else None,  # as GE computes it
    }
    return ExpectationSuiteValidationResult(
        success=passed == len(results), results=results, suite_name=SUITE_NAME, statistics=statistics, meta=meta,
    )


def _direct_result(expectation: Any, df: "pd.DataFrame") -> Any:
    """``expect_column_mean_to_be_between`` as GE decides it (its ``_validate_metric_value_between``):
    no mean (no values) fails; else the bounds, each inclusive unless strict."""
    from great_expectations.core import ExpectationValidationResult

    mean = df[expectation.column].mean()
    if mean != mean:  # NaN: a column without values
        success, observed = False, None
    else:
        observed = float(mean)
        low, high = expectation.min_value, expectation.max_value
        success = (low is None or (observed > low if expectation.strict_min else observed >= low)) and (
            high is None or (observed < high if expectation.strict_max else observed <= high)
        )
    return ExpectationValidationResult(
        success=bool(success), expectation_config=expectation.configuration, result={"observed_value": observed},
        exception_info={"raised_exception": False, "exception_traceback": None, "exception_message": None},
    )


def _run_identifier(run_id: str) -> Any:
    import datetime as dt

    from great_expectations.core.run_identifier import RunIdentifier

    return RunIdentifier(run_name=run_id, run_time=dt.datetime.now(dt.timezone.utc))


def _manifest_ref(storage: Storage, snapshot: "LakeSnapshot") -> ObjectRef | dict[str, Any]:
    try:
        return storage.stat(snapshot.uri)
    except ArtifactNotFound:  # a snapshot built in memory: name it by its content hash
        return {"uri": snapshot.uri, "sha256": snapshot.sha256}


def _plain(value: Any) -> Any:
    """numpy/pandas scalars to plain Python, recursively (JSON and GE's renderer both need it)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and type(value).__module__ == "numpy":
        return value.item()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
