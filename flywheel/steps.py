"""The pipeline's steps as plain functions: settings in, a JSON-able manifest out.

Each KFP component unpacks its artifacts and calls one of these; `flywheel` tests call them
directly. Every step times itself and leaves a record at ``<root>/runs/<run_id>/steps/<step>.json``
that `flywheel run` turns into its summary.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from typing import Any, Iterator

from flywheel.config import Settings, load_settings
from flywheel.errors import ConfigError, StorageError, ValidationFailed
from flywheel.storage import Storage, join
from flywheel.usecase import load_usecase

log = logging.getLogger(__name__)


def _context(settings: Settings | None) -> tuple[Settings, Storage]:
    """The step's settings (its use case fetched from storage when ``usecase_uri`` says so) and storage."""
    from flywheel.usecase_store import resolve_usecase

    settings = resolve_usecase(settings or load_settings())
    return settings, Storage.from_settings(settings)


@contextlib.contextmanager
def recorded(storage: Storage, run_id: str, step: str) -> Iterator[dict[str, Any]]:
    """Time a step and write its record (rows, artifacts, metrics: whatever the step puts in)."""
    record: dict[str, Any] = {"step": step, "run_id": run_id, "started_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    started = time.perf_counter()
    try:
        yield record
        record["status"] = "succeeded"
    except Exception as exc:
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        try:
            _write_record(storage, run_id, step, record, started)
        except StorageError as unwritten:
            # The store itself failed (the step's error says how): that error is the one to report.
            log.warning("step %s: its record could not be written either (%s)", step, unwritten)
        raise
    _write_record(storage, run_id, step, record, started)


def _write_record(storage: Storage, run_id: str, step: str, record: dict[str, Any], started: float) -> None:
    record["seconds"] = round(time.perf_counter() - started, 3)
    storage.write_json(storage.uri("runs", run_id, "steps", f"{step}.json"), record)
    log.info("step %s %s in %.2fs", step, record.get("status"), record["seconds"])


def read_step_records(storage: Storage, run_id: str) -> dict[str, dict[str, Any]]:
    """The records the steps of one run left, by step name."""
    records = {}
    for uri in storage.list(storage.uri("runs", run_id, "steps")):
        if uri.endswith(".json"):
            record = storage.read_json(uri)
            records[record["step"]] = record
    return records


def ingest_step(
    source_uri: str, run_id: str, settings: Settings | None = None, lake_uri: str = "", policy: str = ""
) -> dict[str, Any]:
    """Raw files → a staged batch of the date-partitioned lake (``<root>/lake`` unless ``lake_uri``
    names another); returns the staged snapshot, which only :func:`validate_step` publishes.
    ``policy`` (default: settings ``ingest.policy``) is ``fail`` or ``quarantine``: with quarantine,
    rows breaking the suite's row-level expectations are set aside instead of rejecting the batch."""
    from flywheel.ingest import IngestOptions, ingest, ingest_sources
    from flywheel.validation import row_check

    settings, storage = _context(settings)
    contract = load_usecase(settings.usecase).contract
    policy = policy or settings.ingest.policy
    if policy not in ("fail", "quarantine"):
        raise ConfigError(f"unknown policy {policy!r}: choose fail or quarantine")
    options = IngestOptions(
        policy=policy,
        max_quarantine_fraction=settings.ingest.max_quarantine_fraction,
        chunk_rows=settings.ingest.chunk_rows,
        row_check=row_check(contract, settings.ingest) if policy == "quarantine" else None,
    )
    with recorded(storage, run_id, "ingest") as record:
        lake_uri = lake_uri or storage.uri("lake")
        sources = ingest_sources(storage, source_uri, lake_uri, run_id, options, contract)
        staged = ingest(storage, source_uri, lake_uri, run_id, options, contract=contract, sources=sources)
        record.update(
            rows=staged.rows,
            new_parts=len(staged.new_parts),
            source_files=len(staged.source_files),
            policy=policy,
            quarantined=staged.quarantine.get("rows", 0),
            sources={name: {"rows": s.rows, "new_parts": len(s.new_parts)} for name, s in sources.items()},
            staged_snapshot=staged.uri,  # removed once published or discarded: not a lasting artifact
        )
    return staged.to_dict()


def _validated_by(report: Any) -> dict[str, Any]:
    """What a published snapshot records of the validation report that let it in."""
    return {key: getattr(report, key) for key in ("run_id", "success", "rows", "evaluated", "report_uri", "html_uri")}


def validate_step(snapshot: dict[str, Any], run_id: str, settings: Settings | None = None) -> dict[str, Any]:
    """The Great Expectations gate on a staged batch (its new rows, and the drift gate against the
    last accepted batches): when every check passes, the batch is published and the published
    snapshot returned; otherwise it is discarded (the lake stays as it was) and ValidationFailed
    stops the run. The reports are written either way."""
    from flywheel import lake
    from flywheel.validation import failure_message, validate_batch

    settings, storage = _context(settings)
    staged = lake.LakeSnapshot.from_dict(snapshot)
    with recorded(storage, run_id, "validate") as record:
        contract = load_usecase(settings.usecase).contract
        report = validate_batch(storage, staged, storage.uri("reports", "validation"), run_id, contract, settings.ingest)
        record.update(
            rows=report.rows,
            expectations=report.evaluated,
            failed=len(report.failed),
            drift=report.drift,
            artifacts={"validation_report": report.report_uri, "data_docs": report.html_uri},
        )
        # The contract's further sources: each staged one through the same gate, under its own contract.
        source_reports = {}
        for name, source in lake.source_snapshots(staged).items():
            if source.staged and source.new_parts:
                source_reports[name] = validate_batch(storage, source, storage.uri("reports", "validation", "sources", name),
                                                      run_id, contract.sources[name].contract(), settings.ingest)
        if source_reports:
            record["sources"] = {name: {"rows": r.rows, "failed": len(r.failed), "report": r.report_uri}
                                 for name, r in source_reports.items()}
        rejected = [("the batch", report)] if not report.success else []
        rejected += [(f"source {name}'s batch", r) for name, r in source_reports.items() if not r.success]
        if rejected:
            lake.discard_staged(storage, staged)
            kept = f"snapshot {staged.parent[:12]}" if staged.parent else "nothing (it is empty)"
            files = [f["uri"] for f in staged.source_files]
            where = f"from {', '.join(files[:3])}{' and more' if len(files) > 3 else ''} for lake {staged.lake_uri}"
            messages = [failure_message(r, f"{what} {where}" if what == "the batch" else what) for what, r in rejected]
            raise ValidationFailed("\n".join(messages) + f"\nthe batch was discarded; the lake still holds {kept}")
        for name, r in source_reports.items():
            staged.sources[name]["validated_by"] = _validated_by(r)
            staged.sources[name]["profile"] = r.profile
        validated_by = _validated_by(report)
        published = lake.publish_staged(storage, staged, run_id, validated_by, profile=report.profile)
        record["artifacts"]["lake_snapshot"] = published.uri
    return published.to_dict()


def validation_outputs(run_id: str, settings: Settings | None = None) -> dict[str, Any]:
    """What the validate step of run ``run_id`` shows in the Kubeflow UI: its report as GE's HTML data
    docs (``html``), a Markdown summary (``markdown``), the pass/fail counts (``metrics``) and where the
    report is (``meta``: the HTML artifact's metadata)."""
    from flywheel.validation import report_counts, report_markdown

    settings, storage = _context(settings)
    folder = join(storage.uri("reports", "validation"), run_id)
    document = storage.read_json(join(folder, "validation.json"))
    return {
        "html": storage.read_bytes(document.get("html_uri") or join(folder, "validation.html")).decode(),
        "markdown": report_markdown(document),
        "metrics": report_counts(document),
        "meta": {key: document.get(key) for key in ("success", "rows", "report_uri", "html_uri")},
    }


def ingest_and_validate(
    source_uri: str, run_id: str, settings: Settings | None = None, lake_uri: str = "", policy: str = ""
) -> dict[str, Any]:
    """`flywheel ingest`: the pipeline's ingest and validate steps, one after the other, without
    training. Returns the published snapshot; raises DataError or ValidationFailed when the batch is
    rejected (the lake is then as it was)."""
    staged = ingest_step(source_uri, run_id, settings, lake_uri, policy)
    return validate_step(staged, run_id, settings)


def features_step(snapshot: dict[str, Any], run_id: str, settings: Settings | None = None) -> dict[str, Any]:
    """Feature tables, Feast apply + materialize, and the point-in-time training set, from a
    published (validated) snapshot."""
    from flywheel.features.build import build_features
    from flywheel.lake import LakeSnapshot, require_published

    settings, storage = _context(settings)
    with recorded(storage, run_id, "features") as record:
        published = LakeSnapshot.from_dict(snapshot)
        require_published(published)
        result = build_features(storage, settings, published, run_id)
        ts = result.training_set
        record.update(
            rows=ts.rows,
            train_rows=ts.train_rows,
            holdout_rows=ts.holdout_rows,
            reused=ts.reused,
            materialized=result.materialized,
            timings={k: round(v, 2) for k, v in result.seconds.items()},
            artifacts={"training_set": ts.uri, **result.tables},
        )
    return ts.to_dict()


def train_step(training_set: dict[str, Any], run_id: str, settings: Settings | None = None,
               triggered_by: str = "") -> dict[str, Any]:
    """DDP training through torchrun; returns the published model version. ``triggered_by``: the
    monitor's decision record that asked for this run (an input of the model's lineage)."""
    from flywheel.features.build import TrainingSet
    from flywheel.training.train import train

    settings, storage = _context(settings)
    with recorded(storage, run_id, "train") as record:
        result = train(storage, settings, TrainingSet.from_dict(training_set), run_id, triggered_by)
        record.update(
            rows=training_set["train_rows"],
            reused=result.reused,
            model_version=result.model.version,
            epochs=result.epochs,
            artifacts={"model": result.model.uri},
        )
    return result.model.to_dict()


def evaluate_step(
    training_set: dict[str, Any], model: dict[str, Any], run_id: str, truth_uri: str = "", settings: Settings | None = None
) -> dict[str, Any]:
    """Metrics on the holdout and the gate's decision."""
    from flywheel.evaluation import evaluate
    from flywheel.features.build import TrainingSet

    settings, storage = _context(settings)
    with recorded(storage, run_id, "evaluate") as record:
        result = evaluate(storage, settings, TrainingSet.from_dict(training_set), model["version"], run_id, truth_uri)
        baseline = _monitoring_baseline(storage, settings, model["version"])
        record.update(
            rows=training_set["holdout_rows"],
            model_version=model["version"],
            metrics=result.metrics,
            production=result.production_version,
            production_metrics=result.production_metrics,
            comparison=result.comparison,
            truth=result.truth,
            blessed=result.blessed,
            reasons=result.reasons,
            artifacts={"evaluation": result.report_uri, "report": result.html_uri, **({"baseline": baseline} if baseline else {})},
        )
    return result.to_dict()


def _monitoring_baseline(storage: Any, settings: Settings, version: str) -> str:
    """The version's monitoring baseline (its training set's profile and its holdout's reference),
    stored with the model; a failure is logged with its cause and left to the monitor to retry: it
    never fails the evaluation."""
    from flywheel.monitoring.baseline import baseline_uri, build_baseline
    from flywheel.registry import Registry

    model = Registry(storage, settings.model_name).get(version)
    if storage.exists(baseline_uri(model)):
        return baseline_uri(model)
    try:
        build_baseline(storage, settings, model)
    except Exception as exc:
        log.error("evaluate: no monitoring baseline for %s (the monitor builds it when first needed): %s: %s",
                  version, type(exc).__name__, exc)
        return ""
    return baseline_uri(model)


def evaluation_html(evaluation: dict[str, Any], settings: Settings | None = None) -> str:
    """The evaluation's HTML report (plots embedded), for the Kubeflow UI's HTML artifact."""
    settings, storage = _context(settings)
    return storage.read_bytes(evaluation["html_uri"]).decode() if evaluation.get("html_uri") else "<p>no report</p>"


def deploy_step(model: dict[str, Any], evaluation: dict[str, Any], run_id: str, settings: Settings | None = None) -> dict[str, Any]:
    """Release the blessed version to ``deploy.target`` as a canary against production (locally: two
    `flywheel serve` processes behind the splitting proxy, for the release only; on KServe: the
    InferenceService), promoted or rolled back; the decision record is among the step's artifacts."""
    from flywheel.deploy.promote import release

    settings, storage = _context(settings)
    with recorded(storage, run_id, "deploy") as record:
        deployed, decision = release(storage, settings, model["version"], evaluation, run_id)
        artifacts = {"production": join(deployed.uri, "version.json") if deployed else ""}
        if decision:
            artifacts["decision"] = decision["uri"]
            record.update(verdict=decision["verdict"], reasons=decision["reasons"])
        record.update(model_version=deployed.version if deployed else None, artifacts=artifacts)
    return {**(deployed.to_dict() if deployed else {}), **({"decision": decision} if decision else {})}


def decision_markdown(deployed: dict[str, Any]) -> str:
    """What the deploy step decided, as markdown for the Kubeflow UI: the canary decision record."""
    from flywheel.deploy.canary import DecisionRecord

    if deployed.get("decision"):
        return DecisionRecord(**deployed["decision"]).to_markdown()
    return f"# Deployed\n\n`{deployed.get('version')}` is the production version (`flywheel serve` follows it).\n"


# ---------------------------------------------------------------- monitoring
def monitor_step(run_id: str, since: str = "", until: str = "", settings: Settings | None = None) -> dict[str, Any]:
    """Drift, skew and performance of a window of captured traffic (flywheel.monitoring.monitor)."""
    from flywheel.monitoring.monitor import monitor

    settings, storage = _context(settings)
    with recorded(storage, run_id, "monitor") as record:
        result = monitor(storage, settings, run_id, since or None, until or None)
        record.update(rows=result.rows, model_version=result.model_version, crossed=len(result.findings),
                      findings=[f.describe() for f in result.findings],
                      artifacts={"result": result.result_uri, "report": result.report_uri, "metrics": result.metrics_uri})
    return result.to_dict()


def trigger_step(result: dict[str, Any], settings: Settings | None = None, submit: bool = True, wait: bool = False) -> dict[str, Any]:
    """What the monitor's result asks for: nothing, a held request, or a submitted training run."""
    from flywheel.monitoring.trigger import decide

    settings, storage = _context(settings)
    return decide(storage, settings, result, submit=submit, wait=wait)


def monitoring_html(result: dict[str, Any], settings: Settings | None = None) -> str:
    """The monitor's HTML report, for the Kubeflow UI's HTML artifact."""
    settings, storage = _context(settings)
    return storage.read_bytes(result["report_uri"]).decode()


# ---------------------------------------------------------------- batch scoring
def plan_scoring_step(start_date: str, end_date: str, out_uri: str, run_id: str, chunk_days: int = 0,
                      settings: Settings | None = None, lake_uri: str = "") -> dict[str, Any]:
    """Pin the model version and the lake snapshot, and split the date range into chunks."""
    from flywheel.scoring import plan

    settings, storage = _context(settings)
    with recorded(storage, run_id, "plan_scoring") as record:
        out = out_uri or storage.uri("scores", run_id)
        scoring = plan(storage, settings, start_date, end_date, chunk_days or settings.scoring.chunk_days, out, lake_uri)
        scoring["run_id"] = run_id
        record.update(model_version=scoring["model_version"], chunks=len(scoring["chunks"]), artifacts={"scores": out})
    return scoring


def score_step(chunk: dict[str, str], scoring: dict[str, Any], run_id: str, settings: Settings | None = None) -> dict[str, Any]:
    """Score one chunk of days with the pinned model version."""
    from flywheel.scoring import score_chunk

    settings, storage = _context(settings)
    with recorded(storage, run_id, f"score-{chunk['start']}") as record:
        result = score_chunk(storage, settings, chunk, scoring, run_id)
        record.update(rows=result["rows"], model_version=result["model_version"], artifacts={uri.rsplit("/", 2)[-2]: uri for uri in result["files"]})
    return result


def summarize_scoring_step(scoring: dict[str, Any], results: list[dict[str, Any]], run_id: str,
                           settings: Settings | None = None) -> dict[str, Any]:
    """Gather the chunks' results into the run's summary."""
    from flywheel.scoring import summarize

    settings, storage = _context(settings)
    with recorded(storage, run_id, "summarize") as record:
        summary = summarize(storage, settings, scoring, results, run_id)
        record.update(rows=summary["rows"], model_version=summary["model_version"], artifacts={"summary": summary["uri"]})
    return summary
