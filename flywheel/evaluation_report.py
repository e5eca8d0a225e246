"""What a reviewer reads about a candidate: detailed metrics (Brier score, calibration, recall at
several false-positive rates, metrics per merchant category and channel), plots (ROC, PR,
calibration, score histograms against production) and an HTML report with a model card.

Pure functions over labels and scores, plus :func:`write_report`, which renders the plots as PNG
(matplotlib, headless) and embeds them in one self-contained HTML file.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, brier_score_loss, precision_recall_curve, roc_auc_score, roc_curve

FPRS = (0.001, 0.005, 0.01, 0.05)
CALIBRATION_BINS = 10
SEGMENTS = ("merchant_category", "channel")
ROC_POINTS = 200  # the ROC curve handed to KFP is thinned to about this many points


def recall_at_fprs(labels: np.ndarray, scores: np.ndarray, fprs: tuple[float, ...] = FPRS) -> dict[str, float]:
    """The best recall at each false-positive rate, keyed ``recall_at_fpr_<rate>``."""
    false_positive_rate, true_positive_rate, _ = roc_curve(labels, scores)
    return {f"recall_at_fpr_{fpr:g}": float(true_positive_rate[false_positive_rate <= fpr].max()) for fpr in fprs}


def calibration(labels: np.ndarray, scores: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Reliability by score quantile bins (equal counts: fraud scores crowd near 0): each bin's mean
    score, observed fraud rate and size, and the expected calibration error (count-weighted |gap|)."""
    order = np.argsort(scores, kind="stable")
    table = []
    for chunk in np.array_split(order, bins):
        if not len(chunk):
            continue
        table.append({"mean_score": float(scores[chunk].mean()), "fraud_rate": float(labels[chunk].mean()), "rows": int(len(chunk))})
    total = sum(b["rows"] for b in table)
    ece = sum(b["rows"] * abs(b["mean_score"] - b["fraud_rate"]) for b in table) / total if total else math.nan
    return {"bins": table, "expected_calibration_error": float(ece)}


def segment_metrics(frame: pd.DataFrame, labels: np.ndarray, scores: np.ndarray, columns: tuple[str, ...] = SEGMENTS) -> dict[str, list[dict[str, Any]]]:
    """ROC-AUC and PR-AUC per value of each segment column (None where a segment has one class)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for column in columns:
        if column not in frame:
            continue
        rows = []
        values = frame[column].astype(str).to_numpy()
        for value in sorted(set(values)):
            mask = values == value
            y, s = labels[mask], scores[mask]
            two_classes = 0 < y.sum() < len(y)
            rows.append({
                "value": value, "rows": int(mask.sum()), "positives": int(y.sum()),
                "roc_auc": float(roc_auc_score(y, s)) if two_classes else None,
                "pr_auc": float(average_precision_score(y, s)) if two_classes else None,
            })
        out[column] = rows
    return out


def details(frame: pd.DataFrame, labels: np.ndarray, scores: np.ndarray, fpr: float) -> dict[str, Any]:
    """Every detailed metric of one model on one set of rows, plus what the KFP UI plots: a thinned
    ROC curve and the confusion matrix at the threshold that gives false-positive rate ``fpr``."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=float)
    false_positive_rate, true_positive_rate, thresholds = roc_curve(labels, scores)
    keep = np.unique(np.linspace(0, len(thresholds) - 1, min(ROC_POINTS, len(thresholds))).astype(int))
    threshold = float(thresholds[false_positive_rate <= fpr][-1])
    threshold = min(threshold, 1.0)  # roc_curve's first threshold is +inf
    flagged = scores >= threshold
    matrix = [[int(((labels == 0) & ~flagged).sum()), int(((labels == 0) & flagged).sum())],
              [int(((labels == 1) & ~flagged).sum()), int(((labels == 1) & flagged).sum())]]
    return {
        "brier": float(brier_score_loss(labels, scores)),
        **recall_at_fprs(labels, scores),
        "calibration": calibration(labels, scores),
        "segments": segment_metrics(frame, labels, scores),
        "roc_curve": {"fpr": false_positive_rate[keep].tolist(), "tpr": true_positive_rate[keep].tolist(),
                      "threshold": [min(float(t), 1.0) for t in thresholds[keep]]},
        "confusion_matrix": {"categories": ["legit", "fraud"], "matrix": matrix, "threshold": threshold, "at_fpr": fpr},
    }


# ------------------------------------------------------------------ plots and HTML
def _png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def plots(labels: np.ndarray, scores: np.ndarray, production: tuple[np.ndarray, np.ndarray] | None) -> dict[str, bytes]:
    """ROC, PR, calibration and score histogram PNGs; production's curves drawn on its own rows
    (the rows neither model trained on) when it was compared."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display in a pipeline step
    import matplotlib.pyplot as plt

    curves = [("candidate", labels, scores)] + ([("production", *production)] if production is not None else [])
    out: dict[str, bytes] = {}
    figure, axis = plt.subplots(figsize=(5, 4))
    for name, y, s in curves:
        fpr, tpr, _ = roc_curve(y, s)
        axis.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, s):.3f})")
    axis.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axis.set(xlabel="false-positive rate (linear below 0.01, log above)", ylabel="recall", title="ROC")
    axis.set_xscale("symlog", linthresh=0.01)
    axis.set_xlim(0, 1)
    axis.legend()
    out["roc"] = _png(figure)
    figure, axis = plt.subplots(figsize=(5, 4))
    for name, y, s in curves:
        precision, recall, _ = precision_recall_curve(y, s)
        axis.plot(recall, precision, label=f"{name} (AP {average_precision_score(y, s):.3f})")
    axis.set(xlabel="recall", ylabel="precision", title="precision-recall")
    axis.legend()
    out["pr"] = _png(figure)
    figure, axis = plt.subplots(figsize=(5, 4))
    top = 0.0
    for name, y, s in curves:
        bins = calibration(np.asarray(y).astype(int), np.asarray(s, dtype=float))["bins"]
        xs, ys = [b["mean_score"] for b in bins], [b["fraud_rate"] for b in bins]
        top = max(top, *xs, *ys)
        axis.plot(xs, ys, marker="o", label=name)
    axis.plot([0, top], [0, top], linestyle=":", color="grey", label="perfectly calibrated")
    axis.set(xlabel="mean score (quantile bin)", ylabel="observed fraud rate", title="calibration")
    axis.legend()
    out["calibration"] = _png(figure)
    figure, axis = plt.subplots(figsize=(5, 4))
    edges = np.linspace(0, 1, 51)
    for name, _, s in curves:
        axis.hist(s, bins=edges, alpha=0.5, label=name, log=True)
    axis.set(xlabel="score", ylabel="rows (log)", title="score distribution")
    axis.legend()
    out["histogram"] = _png(figure)
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if value is None:
        return "&ndash;"
    return html.escape(str(value))


def render_html(evaluation: dict[str, Any], model_card: dict[str, Any], images: dict[str, bytes]) -> str:
    """One self-contained HTML page: verdict, metrics, plots (embedded PNG), segments, model card."""
    m, d = evaluation["metrics"], evaluation["details"]
    verdict = "BLESSED" if evaluation["blessed"] else "NOT blessed"
    headline = [{"metric": k, "candidate": m.get(k), "production (compared rows)": (evaluation.get("production_metrics") or {}).get(k)}
                for k in ("roc_auc", "pr_auc", "recall_at_fpr")]
    headline += [{"metric": k, "candidate": d[k], "production (compared rows)": (d.get("production") or {}).get(k)}
                 for k in ("brier", *(f"recall_at_fpr_{f:g}" for f in FPRS))]
    truth = evaluation.get("truth") or {}
    if truth:
        headline.append({"metric": "PR-AUC share of the best achievable", "candidate": truth.get("pr_auc_vs_truth"), "production (compared rows)": None})
    pictures = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}"/><figcaption>{name}</figcaption></figure>'
        for name, data in images.items()
    )
    segments = "".join(f"<h3>by {html.escape(col)}</h3>{_table(rows)}" for col, rows in d["segments"].items())
    card = _table([{"field": k, "value": v if not isinstance(v, (dict, list)) else str(v)} for k, v in model_card.items()])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>evaluation {html.escape(evaluation['model_version'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}
figure{{display:inline-block;margin:0 1em 1em 0}}</style></head><body>
<h1>Model {html.escape(evaluation['model_version'])}: {verdict}</h1>
<ul>{''.join(f'<li>{html.escape(r)}</li>' for r in evaluation['reasons'])}</ul>
<h2>Metrics (holdout: {int(m['rows']):,} rows, {int(m['positives']):,} fraud)</h2>{_table(headline)}
<p>Expected calibration error: {d['calibration']['expected_calibration_error']:.4f}.
Confusion matrix at threshold {d['confusion_matrix']['threshold']:.4f} (false-positive rate {d['confusion_matrix']['at_fpr']:g}):
{_table([{'': c, **dict(zip(['predicted legit', 'predicted fraud'], row))} for c, row in zip(['legit', 'fraud'], d['confusion_matrix']['matrix'])])}</p>
<h2>Plots</h2>{pictures}
<h2>Segments</h2>{segments}
<h2>Calibration bins</h2>{_table(d['calibration']['bins'])}
<h2>Model card</h2>{card}
</body></html>
"""


def model_card(model: Any, evaluation: dict[str, Any]) -> dict[str, Any]:
    """Data, features, metrics and lineage of a version, from its manifest and its evaluation."""
    meta = model.meta or {}
    return {
        "model": f"{model.name} {model.version}",
        "sha256 (manifest)": model.sha256,
        "trained by run": model.run_id,
        "created": model.created_at,
        "training key": model.training_key,
        "training set": (meta.get("training_set") or {}).get("uri"),
        "training set sha256": (meta.get("training_set") or {}).get("sha256"),
        "training rows": (meta.get("training_set") or {}).get("rows"),
        "training window": meta.get("training_window"),
        "features": meta.get("features") or meta.get("feature_names") or meta.get("spec"),
        "parameters": meta.get("params"),
        "holdout ROC-AUC": evaluation["metrics"].get("roc_auc"),
        "holdout PR-AUC": evaluation["metrics"].get("pr_auc"),
        "production compared with": evaluation.get("production_version"),
        "evaluation": evaluation.get("report_uri"),
    }
