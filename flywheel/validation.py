"""Validate: a Great Expectations suite over a lake snapshot; a failure stops the pipeline.

The suite is the data contract's second half: :mod:`flywheel.schema` fixes the columns and types at
ingest, this suite checks what types cannot (ranges, sets, uniqueness, the fraud rate). Results are
written as JSON and as HTML data docs below ``<reports>/<run_id>/`` before any failure is raised, so
a failed run always leaves its evidence behind. This module only checks and reports: the validate
step (:func:`flywheel.steps.validate_step`) publishes a staged batch that passes and discards one
that fails (:mod:`flywheel.lake`).

``great_expectations`` takes seconds to import, so it is imported inside the functions that use it.
"""

from __future__ import annotations

import html
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from flywheel import lineage
from flywheel.errors import ArtifactNotFound, ValidationFailed
from flywheel.schema import CHANNELS, ID, LABEL, MERCHANT_CATEGORIES, TIMESTAMP, TRANSACTION_SCHEMA
from flywheel.storage import ObjectRef, Storage, join

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.core import ExpectationSuite, ExpectationSuiteValidationResult

    from flywheel.lake import LakeSnapshot

log = logging.getLogger(__name__)

SUITE_NAME = "transactions"
NOT_NULL = [ID, "card_id", "merchant_id", "amount", TIMESTAMP, LABEL]
MAX_AMOUNT = 1_000_000.0
FRAUD_RATE = (0.0005, 0.2)
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_suite(
    name: str = SUITE_NAME,
    *,
    max_amount: float = MAX_AMOUNT,
    fraud_rate: tuple[float, float] = FRAUD_RATE,
    category_mostly: float = 0.99,
) -> "ExpectationSuite":
    """The production suite for card transactions (one expectation per line, each with its reason)."""
    gx = _import_gx()
    import great_expectations.expectations as gxe

    expectations = [
        # The shape: exactly the contract's columns, and something to train on.
        gxe.ExpectTableColumnsToMatchSet(column_set=list(TRANSACTION_SCHEMA.names), exact_match=True),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        # Identity and the fields every feature and the label depend on.
        *[gxe.ExpectColumnValuesToNotBeNull(column=column) for column in NOT_NULL],
        gxe.ExpectColumnValuesToBeUnique(column=ID),
        # A card payment is positive and bounded; anything else is a unit or sign bug upstream.
        gxe.ExpectColumnValuesToBeBetween(column="amount", min_value=0, max_value=max_amount, strict_min=True),
        # The label is binary, and a fraud rate outside this band means a labelling or sampling bug.
        gxe.ExpectColumnValuesToBeInSet(column=LABEL, value_set=[0, 1]),
        gxe.ExpectColumnMeanToBeBetween(column=LABEL, min_value=fraud_rate[0], max_value=fraud_rate[1]),
        # Coordinates on the globe.
        gxe.ExpectColumnValuesToBeBetween(column="lat", min_value=-90, max_value=90),
        gxe.ExpectColumnValuesToBeBetween(column="lon", min_value=-180, max_value=180),
        # Closed vocabularies; new merchant categories appear in the wild, so a few are tolerated.
        gxe.ExpectColumnValuesToBeInSet(column="channel", value_set=list(CHANNELS)),
        gxe.ExpectColumnValuesToBeInSet(
            column="merchant_category", value_set=list(MERCHANT_CATEGORIES), mostly=category_mostly
        ),
    ]
    # Passed to the constructor: suite.add_expectation() looks for an active data context (GE's
    # global project) to save into, and raises DataContextRequiredError when there is none.
    return gx.ExpectationSuite(name=name, expectations=expectations)


def validate_frame(
    df: "pd.DataFrame", suite: "ExpectationSuite | None" = None
) -> tuple[bool, list[dict[str, Any]], dict[str, Any]]:
    """Run the suite over a DataFrame: (success, failed expectations, GE's result as a JSON dict)."""
    result = _run_suite(df, suite)
    return bool(result.success), summarize_failures(result), _plain(result.to_json_dict())


def validate_snapshot(
    storage: Storage,
    snapshot: "LakeSnapshot",
    reports_uri: str,
    run_id: str,
    raise_on_failure: bool = True,
) -> ValidationReport:
    """Validate every row of a lake snapshot; write ``validation.json`` and ``validation.html`` under
    ``<reports_uri>/<run_id>/`` (with lineage back to the snapshot manifest), then raise
    :class:`ValidationFailed` naming each failed expectation when ``raise_on_failure`` is set."""
    from flywheel.lake import read_snapshot

    started = time.perf_counter()
    df = read_snapshot(storage, snapshot).to_pandas()
    read_s = time.perf_counter() - started
    result = _run_suite(df)
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
    """HTML data docs: GE's own validation page, or (if GE's renderer fails) a plain table."""
    try:
        from great_expectations.render.renderer import ValidationResultsPageRenderer
        from great_expectations.render.view import DefaultJinjaPageView

        # GE's number formatting parses repr(value): numpy 2 scalars ("np.float64(0.02)") break it,
        # so hand the renderer plain Python values.
        for item in result.results:
            item.result = _plain(item.result)
        return DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(result))
    except Exception as exc:  # the report must exist even when GE's renderer does not cope
        log.warning("GE data docs renderer failed (%s); writing a plain HTML table instead", exc)
        return _plain_html(result, title)


def _plain_html(result: "ExpectationSuiteValidationResult", title: str) -> str:
    rows = []
    for item in result.results:
        config = item.expectation_config
        kwargs = {k: v for k, v in dict(config.kwargs).items() if k != "batch_id"} if config else {}
        details = _describe(item.result or {}, item.exception_info or {}, kwargs)
        rows.append(
            f"<tr class={'ok' if item.success else 'fail'}><td>{'✔' if item.success else '✘'}</td>"
            f"<td>{html.escape(config.type if config else '?')}</td><td>{html.escape(str(kwargs))}</td>"
            f"<td>{html.escape(details if not item.success else 'passed')}</td></tr>"
        )
    status = "passed" if result.success else "FAILED"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px}.fail{background:#fdd}"
        f"</style></head><body><h1>{html.escape(title)}: {status}</h1><table>"
        "<tr><th></th><th>expectation</th><th>arguments</th><th>observed</th></tr>"
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


def _run_suite(df: "pd.DataFrame", suite: "ExpectationSuite | None" = None) -> "ExpectationSuiteValidationResult":
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    started = time.perf_counter()
    # A fresh ephemeral context per run: nothing is shared between calls, so names cannot clash
    # and no global GE state leaks from one validation into the next (it costs a few ms).
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # no tqdm noise in logs
    batch = (
        context.data_sources.add_pandas("flywheel")
        .add_dataframe_asset(SUITE_NAME)
        .add_batch_definition_whole_dataframe("whole")
        .get_batch(batch_parameters={"dataframe": df})
    )
    result = batch.validate(
        suite or build_suite(),
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": PARTIAL_UNEXPECTED},
    )
    log.debug("validate: GE ran %d expectations in %.2fs", len(result.results), time.perf_counter() - started)
    return result


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
