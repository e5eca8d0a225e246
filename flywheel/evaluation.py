"""The evaluate step: the task's metrics on the time-based holdout, the gate, and a report.

What a model is judged by follows its task (:mod:`flywheel.task`): a binary model by ROC-AUC, PR-AUC,
recall at a fixed false-positive rate and the Brier skill over always predicting the base rate
(ranking alone can be had without labels, skill cannot); a regression by MAE, RMSE, the median
absolute error, its bias, the share within the use case's tolerance and the MAE skill over the
training labels' median; a multiclass model by log-loss, accuracy, macro-F1 and the log-loss skill
over the classes' shares. The gate blesses a candidate only if it clears the floors AND is no worse
than the production model by more than each metric's allowed regression (binary: the ``gate``
settings; other tasks: the use case's ``evaluation``), on the holdout rows that neither model
trained on: the candidate's holdout from the end of production's training window on. When too few
such rows remain (or positive cases, for a binary task), production's training window is unknown, or
production learns another task, the report says why no comparison was possible and the gate falls
back to the floors. The rows compared are recorded with the report. When the data came with true
probabilities (a generator's truth), the report also gives the best achievable PR-AUC.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, f1_score, log_loss, roc_auc_score, roc_curve

from flywheel import lineage
from flywheel.config import GateSettings, Settings
from flywheel.contract import Contract
from flywheel.errors import ArtifactNotFound, DataError, StorageError
from flywheel.features.build import TrainingSet
from flywheel.registry import ModelVersion, Registry
from flywheel.storage import Storage
from flywheel.task import LABELS, METRICS, Task
from flywheel.training.model import Model, load_version
from flywheel.usecase import load_usecase

log = logging.getLogger(__name__)
# ------------------------------------------------------------------------------------- metrics
def brier_skill(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Brier skill score against the base rate: 1 - Brier / Brier of always predicting the
    holdout's positive rate. 0: no better than knowing the rate; only a model that learned
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


def regression_metrics(labels: np.ndarray, predictions: np.ndarray, median: float, tolerance: float | None) -> dict[str, float]:
    """Errors in the label's own units, and the MAE skill: 1 - MAE / the MAE of always predicting the
    training labels' ``median`` (0: no better than that constant; it needs no input at all)."""
    labels, predictions = np.asarray(labels, dtype=float), np.asarray(predictions, dtype=float)
    if not len(labels):
        raise DataError("the holdout has no labelled rows: a regression's errors are undefined")
    error = predictions - labels
    constant = float(np.mean(np.abs(median - labels)))
    metrics = {
        "mae": float(np.mean(np.abs(error))),
        "rmse": float(np.sqrt(np.mean(error ** 2))),
        "median_ae": float(np.median(np.abs(error))),
        "bias": float(np.mean(error)),
        "mae_skill": float(1 - np.mean(np.abs(error)) / constant) if constant > 0 else float("nan"),
        "constant_mae": constant,
    }
    if tolerance is not None:
        metrics["within_tolerance"] = float(np.mean(np.abs(error) <= tolerance))
    return metrics


def multiclass_metrics(labels: np.ndarray, probabilities: np.ndarray, shares: np.ndarray) -> dict[str, float]:
    """Log-loss, accuracy and macro-F1 of class probabilities (rows x classes) against class indices,
    and the log-loss skill over always predicting the training classes' ``shares``."""
    labels = np.asarray(labels).astype(int)
    if not len(labels):
        raise DataError("the holdout has no labelled rows: a multiclass model's metrics are undefined")
    classes = list(range(probabilities.shape[1]))
    clipped = np.clip(probabilities, 1e-12, 1.0)
    loss = float(log_loss(labels, clipped / clipped.sum(axis=1, keepdims=True), labels=classes))
    prior = np.clip(np.asarray(shares, dtype=float), 1e-12, 1.0)
    constant = float(log_loss(labels, np.tile(prior / prior.sum(), (len(labels), 1)), labels=classes))
    predicted = probabilities.argmax(axis=1)
    return {
        "log_loss": loss,
        "accuracy": float(np.mean(predicted == labels)),
        "macro_f1": float(f1_score(labels, predicted, labels=classes, average="macro", zero_division=0)),
        "log_loss_skill": float(1 - loss / constant) if constant > 0 else float("nan"),
    }


@dataclass
class Baseline:
    """What a model could predict without any input, learnt from the training labels: their median
    (regression) or the classes' shares (multiclass)."""

    median: float = 0.0
    shares: list[float] = field(default_factory=list)


def training_baseline(storage: Storage, training_set: TrainingSet, model: Model) -> Baseline:
    """The constant predictions a model's skill is measured against, from its training labels."""
    task = model.task
    if task.kind == "binary":
        return Baseline()
    train = storage.read_parquet(training_set.train_uri, columns=[task.label]).to_pandas()
    values = model.spec.label_values(train)
    if task.kind == "regression":
        return Baseline(median=float(np.median(values)))
    counts = np.bincount(values, minlength=task.outputs).astype(float)
    return Baseline(shares=(counts / max(counts.sum(), 1.0)).tolist())


def task_metrics(task: Task, labels: np.ndarray, predictions: np.ndarray, baseline: Baseline, fpr: float) -> dict[str, float]:
    """The task's metrics of predictions against labels (see the module's docstring), with the row count."""
    if task.kind == "binary":
        metrics = ranking_metrics(labels, predictions, fpr)
        metrics.update(rows=float(len(labels)), positives=float(labels.sum()), base_rate=float(labels.mean()),
                       brier_skill=brier_skill(labels, predictions))
        return metrics
    if task.kind == "regression":
        metrics = regression_metrics(labels, predictions, baseline.median, task.evaluation.tolerance)
    else:
        metrics = multiclass_metrics(labels, predictions, np.asarray(baseline.shares))
    metrics["rows"] = float(len(labels))
    return metrics


# ---------------------------------------------------------------------------------------- the gate
@dataclass
class GateRules:
    """What the gate holds a candidate to: floors (for a lower-is-better metric, a ceiling), the
    allowed regressions against production (in each metric's units), and the false-positive rate of
    a binary model's recall."""

    floors: dict[str, float]
    regressions: dict[str, float]
    higher: dict[str, bool | None]
    fpr: float = 0.01


def gate_rules(task: Task, cfg: GateSettings) -> GateRules:
    """A binary task's rules are the gate settings, with what its use case declares on top; the
    other tasks' are their use case's ``evaluation`` (defaults in :mod:`flywheel.task`)."""
    rules = task.evaluation
    if task.kind == "binary":
        floors = {"roc_auc": cfg.min_roc_auc, "pr_auc": cfg.min_pr_auc, "brier_skill": cfg.min_brier_skill, **rules.floors}
        regressions = {"pr_auc": cfg.max_pr_auc_regression, "roc_auc": cfg.max_roc_auc_regression,
                       "recall_at_fpr": cfg.max_recall_regression, **rules.regressions}
    else:
        floors, regressions = dict(rules.floors), dict(rules.regressions)
    return GateRules(floors, regressions, METRICS[task.kind], cfg.recall_at_fpr)


def label(name: str, fpr: float) -> str:
    return LABELS.get(name, name).format(fpr=fpr)


def gate(metrics: dict[str, float], comparison: Comparison | None, rules: GateRules) -> tuple[bool, list[str]]:
    """Bless only above the floors AND, where a comparison was possible, no worse than production on
    every compared metric (within its allowed regression). Returns (blessed, reasons for a refusal)."""
    reasons = []
    for name, floor in rules.floors.items():
        value = metrics.get(name)
        if value is None or value != value:
            reasons.append(f"{label(name, rules.fpr)} could not be measured on the holdout, and it has a floor of {floor:.4f}")
        elif rules.higher[name] and value < floor:
            reasons.append(f"{label(name, rules.fpr)} {value:.4f} is below the floor {floor:.4f}"
                           + (SKILL_NOTE if name == "brier_skill" else ""))
        elif not rules.higher[name] and value > floor:
            reasons.append(f"{label(name, rules.fpr)} {value:.4f} is above the limit {floor:.4f}")
    if comparison is not None and comparison.possible:
        for name, allowed in rules.regressions.items():
            ours, theirs = comparison.candidate.get(name), comparison.production.get(name)
            if ours is None or theirs is None:
                continue
            worse = ours < theirs - allowed if rules.higher[name] else ours > theirs + allowed
            if worse:
                reasons.append(
                    f"{label(name, rules.fpr)} {ours:.4f} is worse than production {comparison.production_version}'s "
                    f"{theirs:.4f} by more than {allowed:.4f} (on {comparison.rows:,} rows neither model trained on)"
                )
    return not reasons, reasons


# The ranking floors alone can be cleared without learning anything from labels: fraud here is
# anomalous, and an anomaly ranking (even a net fit to shuffled labels that happens to rank the
# tails high) reaches ROC-AUC 0.87 / PR-AUC 0.34 on small data. Skill over the base rate cannot.
SKILL_NOTE = (" (its probabilities are hardly better than always predicting the base rate: it learned "
              "little from the labels)")


# ------------------------------------------------------------------------------ against production
@dataclass
class Comparison:
    """Candidate against production on the rows neither trained on (or why there was none)."""

    production_version: str
    possible: bool
    reason: str
    rows: int = 0
    positives: int = 0  # a binary task's positive rows among them
    since: str | None = None  # the rows compared are the holdout's from this time on
    rows_uri: str | None = None  # the keys of the rows compared
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
    details: dict[str, Any] = field(default_factory=dict)  # calibration, recall at FPRs, slices, curves, errors
    html_uri: str = ""  # the HTML report with plots and the model card
    task: dict[str, Any] = field(default_factory=dict)  # the task the model learnt (kind, label, output)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def same_task(candidate: Task, production: dict[str, Any] | None) -> str:
    """Why production's predictions cannot be compared with the candidate's ("" when they can)."""
    if production is None:
        return ""  # a model from before tasks were recorded: the first use case's, binary
    if (production.get("kind"), production.get("label"), tuple(production.get("classes", ()))) != (
            candidate.kind, candidate.label, candidate.classes):
        return (f"production predicts {production.get('label')} as a {production.get('kind')} task, the candidate "
                f"{candidate.label} as a {candidate.kind} task")
    return ""


def compare_with_production(
    storage: Storage,
    registry: Registry,
    production: ModelVersion,
    holdout: pd.DataFrame,
    candidate: Model,
    candidate_predictions: np.ndarray,
    baseline: Baseline,
    settings: Settings,
    contract: Contract,
    report_folder: str,
    scored: dict[str, Any] | None = None,
) -> Comparison:
    """Score production and the candidate on the holdout rows production did not train on (their
    labels, both models' predictions and the rows go into ``scored`` when given, for the report)."""
    task, cfg = candidate.task, settings.gate
    other_task = same_task(task, production.meta.get("task"))
    if other_task:
        return Comparison(production.version, False, other_task)
    end = production_training_end(storage, production)
    if end is None:
        return Comparison(production.version, False, f"production {production.version}'s training window is unknown (its training set is gone)")
    ts = pd.to_datetime(holdout[contract.timestamp], utc=True)
    unseen = (ts >= end).to_numpy()
    rows = holdout[unseen]
    labels = candidate.spec.label_values(rows)
    comparison = Comparison(production.version, False, "", rows=len(rows), since=end.isoformat())
    if task.kind == "binary":
        comparison.positives = int(labels.sum())
        if comparison.positives < cfg.min_comparison_positives or comparison.positives == len(rows):
            comparison.reason = (
                f"only {len(rows):,} holdout rows ({comparison.positives} positive) are after production "
                f"{production.version}'s training window (which ends {end.isoformat()}); at least "
                f"{cfg.min_comparison_positives} positive cases are needed to compare"
            )
            return comparison
    elif len(rows) < task.evaluation.min_comparison_rows:
        comparison.reason = (
            f"only {len(rows):,} holdout rows are after production {production.version}'s training window (which "
            f"ends {end.isoformat()}); at least {task.evaluation.min_comparison_rows:,} are needed to compare"
        )
        return comparison
    production_model: Model = load_version(registry, production)
    comparison.candidate = task_metrics(task, labels, candidate_predictions[unseen], baseline, cfg.recall_at_fpr)
    production_predictions = production_model.score(rows)
    comparison.production = task_metrics(task, labels, production_predictions, baseline, cfg.recall_at_fpr)
    if scored is not None:
        scored.update(rows=rows, labels=labels, production=production_predictions, candidate=candidate_predictions[unseen])
    keys = [c for c in (contract.id, contract.timestamp, *contract.entities.values()) if c and c in rows]
    ref = storage.write_parquet(f"{report_folder}/comparison_rows.parquet", rows[list(dict.fromkeys(keys))].reset_index(drop=True))
    comparison.rows_uri = ref.uri
    comparison.possible = True
    positives = f" ({comparison.positives} positive)" if task.kind == "binary" else ""
    comparison.reason = f"compared on {len(rows):,} holdout rows{positives} from {end.isoformat()} on, which neither model trained on"
    return comparison


# ---------------------------------------------------------------------------------------- report
def write_report(storage: Storage, result: Evaluation, candidate_version: ModelVersion, task: Task, holdout: pd.DataFrame,
                 labels: np.ndarray, predictions: np.ndarray, scored: dict[str, Any], fpr: float, report_folder: str) -> None:
    """Detailed metrics into ``result.details``; the plots (PNG) and the HTML report into ``report_folder``."""
    from flywheel import evaluation_report as er

    result.details = er.details(task, holdout, labels, predictions, fpr)
    production = None
    if scored:
        production_details = er.details(task, scored["rows"], scored["labels"], scored["production"], fpr)
        result.details["production"] = {k: v for k, v in production_details.items() if k not in ("roc_curve", "segments")}
        production = (scored["labels"], scored["production"])
    images = er.plots(task, labels, predictions, production)
    for name, data in images.items():
        storage.write_bytes(f"{report_folder}/{name}.png", data)
    card = er.model_card(candidate_version, result.to_dict(), lineage.lookup(storage, candidate_version.manifest_uri))
    page = er.render_html(result.to_dict(), card, images)
    result.html_uri = storage.write_bytes(f"{report_folder}/report.html", page.encode()).uri


def load_truth(storage: Storage, truth_uri: str) -> pd.DataFrame:
    """The true probabilities a generator wrote beside its data (the id column and ``probability``,
    or the generator's own name for it): empty when there are none."""
    import pyarrow as pa

    parts = list(storage.iter_objects(truth_uri, (".parquet",))) if truth_uri else []
    if not parts:
        return pd.DataFrame()
    return pa.concat_tables([storage.read_parquet(uri) for uri in parts]).to_pandas()


def truth_metrics(holdout: pd.DataFrame, scores: np.ndarray, truth: pd.DataFrame, id_column: str | None = None,
                  label_column: str | None = None) -> dict[str, float] | None:
    """The best achievable PR-AUC on the holdout (the true probabilities as scores) and the model's
    share of it: a binary task whose rows have an id and whose truth file gives each id's probability
    (its one other column)."""
    if not len(truth) or id_column is None or label_column is None or id_column not in truth or id_column not in holdout:
        return None
    probability = [c for c in truth.columns if c != id_column]
    if len(probability) != 1:
        return None
    joined = holdout[[id_column, label_column]].assign(score=scores).merge(truth, on=id_column, how="inner")
    if not len(joined) or joined[label_column].nunique() != 2:
        return None
    best = ranking_metrics(joined[label_column].to_numpy(), joined[probability[0]].to_numpy())
    model_on_same = ranking_metrics(joined[label_column].to_numpy(), joined["score"].to_numpy())
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
    contract = load_usecase(settings.usecase).contract
    registry = Registry(storage, settings.model_name)
    holdout = storage.read_parquet(training_set.holdout_uri).to_pandas()
    candidate_version = registry.get(model_version)
    candidate = load_version(registry, candidate_version)
    task = candidate.task
    labels = candidate.spec.label_values(holdout)
    predictions = candidate.score(holdout)
    baseline = training_baseline(storage, training_set, candidate)
    metrics = task_metrics(task, labels, predictions, baseline, cfg.recall_at_fpr)

    report_folder = storage.uri("reports", "evaluation", run_id)
    production: ModelVersion | None = registry.production()
    comparison = None
    scored: dict[str, Any] = {}
    if production is not None and production.version != model_version:
        comparison = compare_with_production(storage, registry, production, holdout, candidate, predictions, baseline,
                                             settings, contract, report_folder, scored)
    blessed, reasons = gate(metrics, comparison, gate_rules(task, cfg))
    if blessed:
        reasons = ["cleared the floors" + (" and is no worse than production" if comparison and comparison.possible else "")]
    if comparison is not None and not comparison.possible:
        reasons.append(f"no comparison with production: {comparison.reason}; judged on the floors only")

    truth = None
    if task.kind == "binary":
        truth = truth_metrics(holdout, predictions, load_truth(storage, truth_uri), contract.id, task.label)
    result = Evaluation(
        model_version=model_version,
        metrics=metrics,
        production_version=production.version if production else None,
        production_metrics=comparison.production if comparison and comparison.possible else None,
        comparison=asdict(comparison) if comparison else None,
        truth=truth,
        blessed=blessed,
        reasons=reasons,
        report_uri=f"{report_folder}/evaluation.json",
        task=task.model_dump(mode="json"),
    )
    write_report(storage, result, candidate_version, task, holdout, labels, predictions, scored, cfg.recall_at_fpr, report_folder)
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
        params={"gate": cfg.model_dump(), "task": task.model_dump(mode="json")},
    )
    log.info("evaluate: %s blessed=%s (%s)", model_version, blessed, "; ".join(result.reasons))
    return result
