"""The evaluate step: metrics on the time-based holdout, the gate, and a report.

The gate blesses a candidate only if it clears an absolute floor (ROC-AUC and PR-AUC) AND is no
worse than the production model, both scored on the same holdout. When the data came with true
fraud probabilities, the report also gives the best achievable PR-AUC on that holdout.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from flywheel import lineage
from flywheel.errors import DataError
from flywheel.registry import ModelVersion, Registry
from flywheel.schema import LABEL
from flywheel.storage import Storage

log = logging.getLogger(__name__)


def ranking_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """ROC-AUC and PR-AUC (average precision) of scores against 0/1 labels."""
    labels = np.asarray(labels).astype(int)
    if labels.min() == labels.max():
        raise DataError("the holdout has only one class: ROC-AUC and PR-AUC are undefined")
    return {
        "roc_auc": float(roc_auc_score(labels, scores)),
        "pr_auc": float(average_precision_score(labels, scores)),
    }


@dataclass
class Evaluation:
    """What the evaluate step found and decided."""

    model_version: str
    metrics: dict[str, float]
    production_version: str | None
    production_metrics: dict[str, float] | None
    truth: dict[str, float] | None
    blessed: bool
    reasons: list[str] = field(default_factory=list)
    report_uri: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate(metrics: dict[str, float], production: dict[str, float] | None, settings: Any) -> tuple[bool, list[str]]:
    """Bless only above the floors AND no worse than production (within the allowed regression)."""
    cfg = settings.gate
    reasons = []
    if metrics["roc_auc"] < cfg.min_roc_auc:
        reasons.append(f"ROC-AUC {metrics['roc_auc']:.4f} is below the floor {cfg.min_roc_auc:.4f}")
    if metrics["pr_auc"] < cfg.min_pr_auc:
        reasons.append(f"PR-AUC {metrics['pr_auc']:.4f} is below the floor {cfg.min_pr_auc:.4f}")
    if production is not None and metrics["pr_auc"] < production["pr_auc"] - cfg.max_regression:
        reasons.append(
            f"PR-AUC {metrics['pr_auc']:.4f} is worse than production's {production['pr_auc']:.4f} "
            f"by more than {cfg.max_regression:.4f}"
        )
    return not reasons, reasons


def load_truth(storage: Storage, truth_uri: str) -> pd.DataFrame:
    """The true fraud probabilities written by `flywheel generate` (transaction_id, fraud_probability)."""
    import pyarrow as pa

    parts = list(storage.iter_objects(truth_uri, (".parquet",))) if truth_uri else []
    if not parts:
        return pd.DataFrame(columns=["transaction_id", "fraud_probability"])
    return pa.concat_tables([storage.read_parquet(uri) for uri in parts]).to_pandas()


def evaluate(
    storage: Storage,
    settings: Any,
    training_set: Any,
    model_version: str,
    run_id: str,
    truth_uri: str = "",
) -> Evaluation:
    """Score the candidate (and production) on the holdout, apply the gate, write the report."""
    registry = Registry(storage, settings.model_name)
    holdout = storage.read_parquet(training_set.holdout_uri).to_pandas()
    labels = holdout[LABEL].to_numpy()
    candidate_version = registry.get(model_version)
    candidate = registry.load(candidate_version)
    scores = candidate.score(holdout)
    metrics = ranking_metrics(labels, scores)
    metrics.update(rows=float(len(holdout)), positives=float(labels.sum()), base_rate=float(labels.mean()))

    production: ModelVersion | None = registry.production()
    production_metrics = None
    if production is not None:
        production_metrics = ranking_metrics(labels, registry.load(production).score(holdout))

    truth_metrics = None
    truth = load_truth(storage, truth_uri)
    if len(truth):
        joined = holdout[["transaction_id", LABEL]].assign(score=scores).merge(truth, on="transaction_id", how="inner")
        if len(joined) and joined[LABEL].nunique() == 2:
            best = ranking_metrics(joined[LABEL].to_numpy(), joined["fraud_probability"].to_numpy())
            model_on_same = ranking_metrics(joined[LABEL].to_numpy(), joined["score"].to_numpy())
            truth_metrics = {
                "coverage": len(joined) / len(holdout),
                "truth_roc_auc": best["roc_auc"],
                "truth_pr_auc": best["pr_auc"],
                "pr_auc_vs_truth": model_on_same["pr_auc"] / best["pr_auc"] if best["pr_auc"] > 0 else float("nan"),
            }

    blessed, reasons = gate(metrics, production_metrics, settings)
    result = Evaluation(
        model_version=model_version,
        metrics=metrics,
        production_version=production.version if production else None,
        production_metrics=production_metrics,
        truth=truth_metrics,
        blessed=blessed,
        reasons=reasons or ["cleared the floors and is no worse than production"],
    )
    report_uri = storage.uri("reports", "evaluation", run_id, "evaluation.json")
    result.report_uri = report_uri
    ref = storage.write_json(report_uri, result.to_dict())
    lineage.record(
        storage,
        ref,
        step="evaluate",
        run_id=run_id,
        inputs=[
            storage.stat(training_set.holdout_uri).to_dict(),
            {"uri": candidate_version.manifest_uri, "sha256": candidate_version.sha256},
        ],
        params={"gate": settings.gate.model_dump()},
    )
    log.info("evaluate: %s blessed=%s (%s)", model_version, blessed, "; ".join(result.reasons))
    return result
