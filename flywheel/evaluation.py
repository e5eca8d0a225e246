"""The evaluate step: metrics on the time-based holdout, the gate, and a report.

The gate blesses a candidate only if it clears absolute floors (ROC-AUC and PR-AUC on its holdout,
and the Brier skill score over always predicting the fraud rate: ranking alone can be had without
labels, skill cannot) AND is no worse than the production model on PR-AUC, ROC-AUC and recall at a fixed false-positive
rate. The comparison uses only holdout rows that neither model trained on: the candidate's holdout
from the end of production's training window on. When too few such rows (or fraud cases) remain, or
production's training window is unknown, the report says why no comparison was possible and the
gate falls back to the floors. The rows compared are recorded with the report.
When the data came with true fraud probabilities, the report also gives the best achievable PR-AUC.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from flywheel import lineage
from flywheel.config import GateSettings, Settings
from flywheel.errors import ArtifactNotFound, DataError, StorageError
from flywheel.features.build import TrainingSet
from flywheel.registry import ModelVersion, Registry
from flywheel.schema import ID, LABEL, TIMESTAMP
from flywheel.storage import Storage
from flywheel.training.model import Model, load_version

log = logging.getLogger(__name__)
COMPARED = ("pr_auc", "roc_auc", "recall_at_fpr")


def brier_skill(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Brier skill score against the base rate: 1 - Brier / Brier of always predicting the
    holdout's fraud rate. 0: no better than knowing the rate; only a model that learned fraud
    probabilities from labels scores above it."""
    labels = np.asarray(labels, dtype=float)
    rate = labels.mean()
    reference = rate * (1 - rate)
    if reference == 0:
        raise DataError("the holdout has only one class: the Brier skill score is undefined")
    return float(1 - np.mean((np.asarray(probabilities, dtype=float) - labels) ** 2) / reference)


def ranking_metrics(labels: np.ndarray, scores: np.ndarray, fpr: float = 0.01) -> dict[str, float]:
    """ROC-AUC, PR-AUC (average precision) and recall at false-positive rate ``fpr`` of scores
    against 0/1 labels."""
    labels = np.asarray(labels).astype(int)
    if labels.min() == labels.max():
        raise DataError("the holdout has only one class: ROC-AUC and PR-AUC are undefined")
    false_positive_rate, true_positive_rate, _ = roc_curve(labels, scores)
    return {
        "roc_auc": float(roc_auc_score(labels, scores)),
        "pr_auc": float(average_precision_score(labels, scores)),
        "recall_at_fpr": float(true_positive_rate[false_positive_rate <= fpr].max()),
    }


@dataclass
class Comparison:
    """Candidate against production on the rows neither trained on (or why there was none)."""

    production_version: str
    possible: bool
    reason: str
    rows: int = 0
    positives: int = 0
    since: str | None = None  # the rows compared are the holdout's from this time on
    rows_uri: str | None = None  # the transaction ids compared
    candidate: dict[str, float] = field(default_factory=dict)
    production: dict[str, float] = field(default_factory=dict)


@dataclass
class Evaluation:
    """What the evaluate step found and decided."""

    model_version: str
    metrics: dict[str, float]
    production_version: str | None
    production_metrics: dict[str, float] | None  # production on the compared rows
    comparison: dict[str, Any] | None
    truth: dict[str, float] | None
    blessed: bool
    reasons: list[str] = field(default_factory=list)
    report_uri: str = ""
    details: dict[str, Any] = field(default_factory=dict)  # Brier, calibration, recall at FPRs, segments, curves
    html_uri: str = ""  # the HTML report with plots and the model card

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate(metrics: dict[str, float], comparison: Comparison | None, cfg: GateSettings) -> tuple[bool, list[str]]:
    """Bless only above the floors AND, where a comparison was possible, no worse than production on
    every compared metric (within its allowed regression). Returns (blessed, reasons for a refusal)."""
    reasons = []
    if metrics["roc_auc"] < cfg.min_roc_auc:
        reasons.append(f"ROC-AUC {metrics['roc_auc']:.4f} is below the floor {cfg.min_roc_auc:.4f}")
    if metrics["pr_auc"] < cfg.min_pr_auc:
        reasons.append(f"PR-AUC {metrics['pr_auc']:.4f} is below the floor {cfg.min_pr_auc:.4f}")
    # The ranking floors alone can be cleared without learning anything from labels: fraud here is
    # anomalous, and an anomaly ranking (even a net fit to shuffled labels that happens to rank the
    # tails high) reaches ROC-AUC 0.87 / PR-AUC 0.34 on small data. Skill over the base rate cannot.
    if "brier_skill" in metrics and metrics["brier_skill"] < cfg.min_brier_skill:
        reasons.append(f"Brier skill score {metrics['brier_skill']:.4f} is below the floor {cfg.min_brier_skill:.4f} "
                       "(its probabilities are hardly better than always predicting the fraud rate: it learned "
                       "little from the labels)")
    if comparison is not None and comparison.possible:
        allowed = {
            "pr_auc": cfg.max_pr_auc_regression,
            "roc_auc": cfg.max_roc_auc_regression,
            "recall_at_fpr": cfg.max_recall_regression,
        }
        for name in COMPARED:
            ours, theirs = comparison.candidate[name], comparison.production[name]
            if ours < theirs - allowed[name]:
                reasons.append(
                    f"{_LABELS[name].format(fpr=cfg.recall_at_fpr)} {ours:.4f} is worse than production "
                    f"{comparison.production_version}'s {theirs:.4f} by more than {allowed[name]:.4f} "
                    f"(on {comparison.rows:,} rows neither model trained on)"
                )
    return not reasons, reasons


_LABELS = {"pr_auc": "PR-AUC", "roc_auc": "ROC-AUC", "recall_at_fpr": "recall at FPR {fpr:g}"}


def production_training_end(storage: Storage, production: ModelVersion) -> pd.Timestamp | None:
    """Where production's training rows end (its training split is every row before this time), or
    None when its training set can no longer be read."""
    window = production.meta.get("training_window") or {}
    if window.get("end"):
        return pd.Timestamp(window["end"])
    training_set_uri = (production.meta.get("training_set") or {}).get("uri")
    if not training_set_uri:
        return None
    try:
        cutoff = storage.read_json(f"{training_set_uri}/manifest.json").get("cutoff")
    except (ArtifactNotFound, StorageError):
        return None
    return pd.Timestamp(cutoff) if cutoff else None


def compare_with_production(
    storage: Storage,
    registry: Registry,
    production: ModelVersion,
    holdout: pd.DataFrame,
    candidate_scores: np.ndarray,
    cfg: GateSettings,
    report_folder: str,
    scored: dict[str, Any] | None = None,
) -> Comparison:
    """Score production and the candidate on the holdout rows production did not train on (their
    labels, both models' scores and the rows go into ``scored`` when given, for the report)."""
    end = production_training_end(storage, production)
    if end is None:
        return Comparison(production.version, False, f"production {production.version}'s training window is unknown (its training set is gone)")
    ts = pd.to_datetime(holdout[TIMESTAMP], utc=True)
    unseen = (ts >= end).to_numpy()
    rows = holdout[unseen]
    labels = rows[LABEL].to_numpy()
    comparison = Comparison(production.version, False, "", rows=len(rows), positives=int(labels.sum()), since=end.isoformat())
    if comparison.positives < cfg.min_comparison_positives or comparison.positives == len(rows):
        comparison.reason = (
            f"only {len(rows):,} holdout rows ({comparison.positives} fraud) are after production "
            f"{production.version}'s training window (which ends {end.isoformat()}); at least "
            f"{cfg.min_comparison_positives} fraud cases are needed to compare"
        )
        return comparison
    production_model: Model = load_version(registry, production)
    comparison.candidate = ranking_metrics(labels, candidate_scores[unseen], cfg.recall_at_fpr)
    production_scores = production_model.score(rows)
    comparison.production = ranking_metrics(labels, production_scores, cfg.recall_at_fpr)
    if scored is not None:
        scored.update(rows=rows, labels=labels, production=production_scores, candidate=candidate_scores[unseen])
    ref = storage.write_parquet(f"{report_folder}/comparison_rows.parquet", rows[[ID, TIMESTAMP]].reset_index(drop=True))
    comparison.rows_uri = ref.uri
    comparison.possible = True
    comparison.reason = f"compared on {len(rows):,} holdout rows ({comparison.positives} fraud) from {end.isoformat()} on, which neither model trained on"
    return comparison


def write_report(storage: Storage, result: Evaluation, candidate: ModelVersion, holdout: pd.DataFrame, labels: np.ndarray,
                 scores: np.ndarray, scored: dict[str, Any], fpr: float, report_folder: str) -> None:
    """Detailed metrics into ``result.details``; the plots (PNG) and the HTML report into ``report_folder``."""
    from flywheel import evaluation_report as er

    result.details = er.details(holdout, labels, scores, fpr)
    production = None
    if scored:
        production_details = er.details(scored["rows"], scored["labels"], scored["production"], fpr)
        result.details["production"] = {k: v for k, v in production_details.items() if k not in ("roc_curve", "segments")}
        production = (scored["labels"], scored["production"])
    images = er.plots(labels, scores, production)
    for name, data in images.items():
        storage.write_bytes(f"{report_folder}/{name}.png", data)
    page = er.render_html(result.to_dict(), er.model_card(candidate, result.to_dict()), images)
    result.html_uri = storage.write_bytes(f"{report_folder}/report.html", page.encode()).uri


def load_truth(storage: Storage, truth_uri: str) -> pd.DataFrame:
    """The true fraud probabilities written by `flywheel generate` (transaction_id, fraud_probability)."""
    import pyarrow as pa

    parts = list(storage.iter_objects(truth_uri, (".parquet",))) if truth_uri else []
    if not parts:
        return pd.DataFrame(columns=["transaction_id", "fraud_probability"])
    return pa.concat_tables([storage.read_parquet(uri) for uri in parts]).to_pandas()


def truth_metrics(holdout: pd.DataFrame, scores: np.ndarray, truth: pd.DataFrame) -> dict[str, float] | None:
    """The best achievable PR-AUC on the holdout (the true probabilities as scores) and the model's share of it."""
    if not len(truth):
        return None
    joined = holdout[[ID, LABEL]].assign(score=scores).merge(truth, on=ID, how="inner")
    if not len(joined) or joined[LABEL].nunique() != 2:
        return None
    best = ranking_metrics(joined[LABEL].to_numpy(), joined["fraud_probability"].to_numpy())
    model_on_same = ranking_metrics(joined[LABEL].to_numpy(), joined["score"].to_numpy())
    return {
        "coverage": len(joined) / len(holdout),
        "truth_roc_auc": best["roc_auc"],
        "truth_pr_auc": best["pr_auc"],
        "pr_auc_vs_truth": model_on_same["pr_auc"] / best["pr_auc"] if best["pr_auc"] > 0 else float("nan"),
    }


def evaluate(
    storage: Storage,
    settings: Settings,
    training_set: TrainingSet,
    model_version: str,
    run_id: str,
    truth_uri: str = "",
) -> Evaluation:
    """Score the candidate on its holdout, compare it with production on clean rows, apply the gate,
    write the report."""
    cfg = settings.gate
    registry = Registry(storage, settings.model_name)
    holdout = storage.read_parquet(training_set.holdout_uri).to_pandas()
    labels = holdout[LABEL].to_numpy()
    candidate_version = registry.get(model_version)
    scores = load_version(registry, candidate_version).score(holdout)
    metrics = ranking_metrics(labels, scores, cfg.recall_at_fpr)
    metrics.update(rows=float(len(holdout)), positives=float(labels.sum()), base_rate=float(labels.mean()),
                   brier_skill=brier_skill(labels, scores))

    report_folder = storage.uri("reports", "evaluation", run_id)
    production: ModelVersion | None = registry.production()
    comparison = None
    scored: dict[str, Any] = {}
    if production is not None and production.version != model_version:
        comparison = compare_with_production(storage, registry, production, holdout, scores, cfg, report_folder, scored)
    blessed, reasons = gate(metrics, comparison, cfg)
    if blessed:
        reasons = ["cleared the floors" + (" and is no worse than production" if comparison and comparison.possible else "")]
    if comparison is not None and not comparison.possible:
        reasons.append(f"no comparison with production: {comparison.reason}; judged on the floors only")

    result = Evaluation(
        model_version=model_version,
        metrics=metrics,
        production_version=production.version if production else None,
        production_metrics=comparison.production if comparison and comparison.possible else None,
        comparison=asdict(comparison) if comparison else None,
        truth=truth_metrics(holdout, scores, load_truth(storage, truth_uri)),
        blessed=blessed,
        reasons=reasons,
        report_uri=f"{report_folder}/evaluation.json",
    )
    write_report(storage, result, candidate_version, holdout, labels, scores, scored, cfg.recall_at_fpr, report_folder)
    ref = storage.write_json(result.report_uri, result.to_dict())
    lineage.record(
        storage,
        ref,
        step="evaluate",
        run_id=run_id,
        inputs=[
            storage.stat(training_set.holdout_uri).to_dict(),
            {"uri": candidate_version.manifest_uri, "sha256": candidate_version.sha256},
            *([{"uri": production.manifest_uri, "sha256": production.sha256}] if production else []),
        ],
        params={"gate": cfg.model_dump()},
    )
    log.info("evaluate: %s blessed=%s (%s)", model_version, blessed, "; ".join(result.reasons))
    return result
