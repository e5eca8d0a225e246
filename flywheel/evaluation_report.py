"""What a reviewer reads about a candidate, per task: detailed metrics, metrics per value of the
use case's slice columns, plots, and an HTML report with a model card.

- binary: Brier score, calibration, recall at several false-positive rates, ROC-AUC and PR-AUC per
  slice (with each slice's rows, positives and negatives: a slice with one class has none); plots:
  ROC (the chance diagonal drawn as y = x on its symlog axis), PR, calibration and score histograms
  against production;
- regression: error quantiles, MAE and bias per slice; plots: predicted against actual (a 2-D
  histogram, both axes in the label's units, the diagonal drawn) and the errors' histogram against
  production;
- multiclass: the confusion matrix, per-class F1, accuracy and log-loss per slice (with its rows per
  class); plot: the confusion matrix (rows: the true class, shares of the row).

A slice's metrics from fewer than :data:`MIN_MEANINGFUL` cases (binary: of its rarer class; otherwise
rows) are marked ``meaningful: false`` with a ``warning``, and the HTML shows them greyed as not
meaningful: one positive gives a ROC-AUC of 0 or 1 that says nothing. Slices inform the reviewer; the
gate never reads them.

Pure functions over labels and predictions, plus :func:`render_html`, which embeds the plots (PNG,
matplotlib headless) in one self-contained HTML file.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (average_precision_score, brier_score_loss, confusion_matrix, f1_score, log_loss,
                             precision_recall_curve, roc_auc_score, roc_curve)

from flywheel.contract import parse_contract
from flywheel.errors import UseCaseError
from flywheel.task import Task

FPRS = (0.001, 0.005, 0.01, 0.05)
CALIBRATION_BINS = 10
ROC_POINTS = 200  # the ROC curve handed to KFP is thinned to about this many points
# The fewest cases a slice's metric is worth reading from: a binary slice's positives (and negatives),
# a regression slice's rows, a multiclass slice's rows (and a class's rows for its F1).
MIN_MEANINGFUL = 30


def recall_at_fprs(labels: np.ndarray, scores: np.ndarray, fprs: tuple[float, ...] = FPRS) -> dict[str, float]:
    """The best recall at each false-positive rate, keyed ``recall_at_fpr_<rate>``."""
    false_positive_rate, true_positive_rate, _ = roc_curve(labels, scores)
    return {f"recall_at_fpr_{fpr:g}": float(true_positive_rate[false_positive_rate <= fpr].max()) for fpr in fprs}


def calibration(labels: np.ndarray, scores: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Reliability by score quantile bins (equal counts: rare-event scores crowd near 0): each bin's mean
    score, observed positive rate and size, and the expected calibration error (count-weighted |gap|)."""
    order = np.argsort(scores, kind="stable")
    table = []
    for chunk in np.array_split(order, bins):
        if not len(chunk):
            continue
        table.append({"mean_score": float(scores[chunk].mean()), "positive_rate": float(labels[chunk].mean()), "rows": int(len(chunk))})
    total = sum(b["rows"] for b in table)
    ece = sum(b["rows"] * abs(b["mean_score"] - b["positive_rate"]) for b in table) / total if total else math.nan
    return {"bins": table, "expected_calibration_error": float(ece)}


def _plural(count: int, noun: str) -> str:
    """``1 positive``, ``3 positives``, ``2 rows of late``."""
    head, of, tail = noun.partition(" of ")
    return f"{count:,} {head}" + ("" if count == 1 else "s") + (f" of {tail}" if of else "")


def meaningful(counts: dict[str, int], minimum: int = MIN_MEANINGFUL) -> dict[str, Any]:
    """``meaningful`` (every count at least ``minimum``) and, when not, a ``warning`` naming the
    smallest count: ``{"positive": 1, "negative": 400}`` -> "not meaningful: only 1 positive (...)"."""
    noun, count = min(counts.items(), key=lambda item: item[1])
    if count >= minimum:
        return {"meaningful": True, "warning": None}
    return {"meaningful": False, "warning": f"not meaningful: only {_plural(count, noun)} (at least {minimum} needed)"}


def segment_metrics(frame: pd.DataFrame, labels: np.ndarray, scores: np.ndarray, columns: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
    """ROC-AUC and PR-AUC per value of each slice column (None where a slice has one class), with the
    slice's rows, positives and negatives, and whether its metrics are meaningful (see the module)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for column in columns:
        if column not in frame:
            continue
        rows = []
        values = frame[column].astype(str).to_numpy()
        for value in sorted(set(values)):
            mask = values == value
            y, s = labels[mask], scores[mask]
            positives = int(y.sum())
            two_classes = 0 < positives < len(y)
            rows.append({
                "value": value, "rows": int(mask.sum()), "positives": positives, "negatives": int(len(y) - positives),
                "roc_auc": float(roc_auc_score(y, s)) if two_classes else None,
                "pr_auc": float(average_precision_score(y, s)) if two_classes else None,
                **meaningful({"positive": positives, "negative": int(len(y) - positives)}),
            })
        out[column] = rows
    return out


def regression_slices(frame: pd.DataFrame, labels: np.ndarray, predictions: np.ndarray, columns: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
    """MAE, bias and rows per value of each slice column, and whether they are meaningful."""
    out: dict[str, list[dict[str, Any]]] = {}
    error = np.asarray(predictions, dtype=float) - np.asarray(labels, dtype=float)
    for column in columns:
        if column not in frame:
            continue
        values = frame[column].astype(str).to_numpy()
        rows = []
        for value in sorted(set(values)):
            mask = values == value
            rows.append({"value": value, "rows": int(mask.sum()), "mae": float(np.mean(np.abs(error[mask]))),
                         "bias": float(np.mean(error[mask])), **meaningful({"row": int(mask.sum())})})
        out[column] = rows
    return out


def multiclass_slices(frame: pd.DataFrame, labels: np.ndarray, probabilities: np.ndarray, columns: tuple[str, ...],
                      names: tuple[str, ...] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Accuracy, log-loss, rows and rows per true class per value of each slice column, and whether
    they are meaningful (a slice's rows; its classes are shown for the reader to weigh)."""
    out: dict[str, list[dict[str, Any]]] = {}
    classes = list(range(probabilities.shape[1]))
    names = names or tuple(str(c) for c in classes)
    clipped = np.clip(probabilities, 1e-12, 1.0)
    clipped = clipped / clipped.sum(axis=1, keepdims=True)
    for column in columns:
        if column not in frame:
            continue
        values = frame[column].astype(str).to_numpy()
        rows = []
        for value in sorted(set(values)):
            mask = values == value
            per_class = np.bincount(labels[mask], minlength=len(classes))
            rows.append({"value": value, "rows": int(mask.sum()),
                         "rows per class": ", ".join(f"{name} {int(n):,}" for name, n in zip(names, per_class)),
                         "accuracy": float(np.mean(probabilities[mask].argmax(axis=1) == labels[mask])),
                         "log_loss": float(log_loss(labels[mask], clipped[mask], labels=classes)),
                         **meaningful({"row": int(mask.sum())})})
        out[column] = rows
    return out


def details(task: Task, frame: pd.DataFrame, labels: np.ndarray, predictions: np.ndarray, fpr: float) -> dict[str, Any]:
    """Every detailed metric of one model on one set of rows, per its task (see the module)."""
    slices = task.evaluation.slices
    if task.kind == "regression":
        error = np.asarray(predictions, dtype=float) - np.asarray(labels, dtype=float)
        quantiles = (0.05, 0.25, 0.5, 0.75, 0.95)
        return {"error_quantiles": {f"p{round(q * 100)}": float(np.quantile(error, q)) for q in quantiles},
                "segments": regression_slices(frame, labels, predictions, slices)}
    if task.kind == "multiclass":
        labels = np.asarray(labels).astype(int)
        classes = list(range(len(task.classes)))
        predicted = predictions.argmax(axis=1)
        matrix = confusion_matrix(labels, predicted, labels=classes)
        f1 = f1_score(labels, predicted, labels=classes, average=None, zero_division=0)
        return {"per_class": [{"class": c, "rows": int((labels == i).sum()), "f1": float(f1[i]),
                               **meaningful({f"row of class {c}": int((labels == i).sum())})} for i, c in enumerate(task.classes)],
                "segments": multiclass_slices(frame, labels, predictions, slices, tuple(task.classes)),
                "confusion_matrix": {"categories": list(task.classes), "matrix": matrix.tolist()}}
    return binary_details(frame, labels, predictions, fpr, slices)


def binary_details(frame: pd.DataFrame, labels: np.ndarray, scores: np.ndarray, fpr: float, slices: tuple[str, ...]) -> dict[str, Any]:
    """Every detailed metric of a binary model on one set of rows, plus what the KFP UI plots: a thinned
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
        "segments": segment_metrics(frame, labels, scores, slices),
        "roc_curve": {"fpr": false_positive_rate[keep].tolist(), "tpr": true_positive_rate[keep].tolist(),
                      "threshold": [min(float(t), 1.0) for t in thresholds[keep]]},
        "confusion_matrix": {"categories": ["negative", "positive"], "matrix": matrix, "threshold": threshold, "at_fpr": fpr},
    }


# ------------------------------------------------------------------ plots and HTML
def _png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def plots(task: Task, labels: np.ndarray, predictions: np.ndarray, production: tuple[np.ndarray, np.ndarray] | None) -> dict[str, bytes]:
    """The task's plots (see the module) as PNG; production drawn on its own rows (the rows neither
    model trained on) when it was compared."""
    if task.kind == "regression":
        return regression_plots(task, labels, predictions, production)
    if task.kind == "multiclass":
        return multiclass_plots(task, labels, predictions)
    return binary_plots(labels, predictions, production)


def regression_plots(task: Task, labels: np.ndarray, predictions: np.ndarray,
                     production: tuple[np.ndarray, np.ndarray] | None) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, predictions = np.asarray(labels, dtype=float), np.asarray(predictions, dtype=float)
    out: dict[str, bytes] = {}
    # Both axes over the same range (the 1st to 99th percentile of both): the diagonal is "exact".
    low = float(min(np.quantile(labels, 0.01), np.quantile(predictions, 0.01)))
    high = float(max(np.quantile(labels, 0.99), np.quantile(predictions, 0.99)))
    high = high if high > low else low + 1.0
    figure, axis = plt.subplots(figsize=(5, 4))
    counts = axis.hist2d(labels, predictions, bins=60, range=[[low, high], [low, high]], cmin=1, norm=matplotlib.colors.LogNorm())
    figure.colorbar(counts[3], ax=axis, label="rows (log)")
    axis.plot([low, high], [low, high], linestyle=":", color="black", label="predicted = actual")
    axis.set(xlabel=f"actual {task.label}", ylabel=f"predicted {task.label}", title="predicted against actual (1st-99th percentile)")
    axis.legend(loc="upper left")
    out["predicted_vs_actual"] = _png(figure)
    figure, axis = plt.subplots(figsize=(5, 4))
    curves = [("candidate", labels, predictions)] + ([("production", *production)] if production is not None else [])
    errors = [np.asarray(p, dtype=float) - np.asarray(y, dtype=float) for _, y, p in curves]
    span = max(float(np.quantile(np.abs(e), 0.99)) for e in errors) or 1.0
    edges = np.linspace(-span, span, 61)
    for (name, _, _), error in zip(curves, errors):
        axis.hist(error, bins=edges, alpha=0.5, label=f"{name} (MAE {np.mean(np.abs(error)):.2f})")
    axis.axvline(0, linestyle=":", color="grey")
    axis.set(xlabel=f"error: predicted - actual {task.label}", ylabel="rows", title="errors (99% of them)")
    axis.legend()
    out["errors"] = _png(figure)
    return out


def multiclass_plots(task: Task, labels: np.ndarray, probabilities: np.ndarray) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(range(len(task.classes)))
    matrix = confusion_matrix(np.asarray(labels).astype(int), probabilities.argmax(axis=1), labels=classes).astype(float)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1.0)
    figure, axis = plt.subplots(figsize=(5, 4))
    image = axis.imshow(shares, vmin=0, vmax=1, cmap="Blues")
    figure.colorbar(image, ax=axis, label="share of the true class's rows")
    axis.set_xticks(classes, task.classes, rotation=45)
    axis.set_yticks(classes, task.classes)
    for i in classes:
        for j in classes:
            axis.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black")
    axis.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    return {"confusion": _png(figure)}


ROC_LINEAR_BELOW = 0.01  # the ROC plot's false-positive axis is linear below this rate, logarithmic above


def chance_line(points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """The chance diagonal (recall = false-positive rate), sampled densely over both parts of the ROC
    plot's symlog axis: two points joined by a straight segment would bend below y = x on it."""
    x = np.unique(np.concatenate([np.linspace(0.0, ROC_LINEAR_BELOW, points // 4), np.geomspace(ROC_LINEAR_BELOW, 1.0, points)]))
    return x, x.copy()


def roc_figure(curves: list[tuple[str, np.ndarray, np.ndarray]]) -> Any:
    """The ROC plot of each (name, labels, scores), the chance diagonal (label "chance") beside them,
    on a false-positive axis that is linear below :data:`ROC_LINEAR_BELOW` and logarithmic above."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display in a pipeline step
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 4))
    for name, y, s in curves:
        fpr, tpr, _ = roc_curve(y, s)
        axis.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, s):.3f})")
    axis.plot(*chance_line(), linestyle=":", color="grey", label="chance")
    axis.set(xlabel=f"false-positive rate (linear below {ROC_LINEAR_BELOW:g}, log above)", ylabel="recall", title="ROC")
    axis.set_xscale("symlog", linthresh=ROC_LINEAR_BELOW)
    axis.set_xlim(0, 1)
    axis.legend()
    return figure


def binary_plots(labels: np.ndarray, scores: np.ndarray, production: tuple[np.ndarray, np.ndarray] | None) -> dict[str, bytes]:
    """ROC, PR, calibration and score histogram PNGs."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display in a pipeline step
    import matplotlib.pyplot as plt

    curves = [("candidate", labels, scores)] + ([("production", *production)] if production is not None else [])
    out: dict[str, bytes] = {}
    out["roc"] = _png(roc_figure(curves))
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
        xs, ys = [b["mean_score"] for b in bins], [b["positive_rate"] for b in bins]
        top = max(top, *xs, *ys)
        axis.plot(xs, ys, marker="o", label=name)
    axis.plot([0, top], [0, top], linestyle=":", color="grey", label="perfectly calibrated")
    axis.set(xlabel="mean score (quantile bin)", ylabel="observed positive rate", title="calibration")
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


SLICE_FLAGS = ("meaningful", "warning")  # a row's verdict on its own counts: shown in its metric cells


def _table(rows: list[dict[str, Any]]) -> str:
    """Rows as an HTML table. A row marked ``meaningful: false`` shows each metric (a float, or none)
    greyed as not meaningful, with its warning, instead of as a figure to trust."""
    if not rows:
        return "<p>none</p>"
    keys = [k for k in rows[0] if k not in SLICE_FLAGS]
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
    body = "".join("<tr>" + "".join(_cell(row, k) for k in keys) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if row.get("meaningful") is False and (isinstance(value, float) or value is None):
        shown = f" <small>({_fmt(value)})</small>" if value is not None else ""
        return f'<td class="not-meaningful">{html.escape(row["warning"])}{shown}</td>'
    return f"<td>{_fmt(value)}</td>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if value is None:
        return "&ndash;"
    return html.escape(str(value))


def _card_table(card: dict[str, Any]) -> str:
    """The model card as a table of field and value; a list is shown as a list, one item a line."""
    def shown(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return "<ul>" + "".join(f"<li>{html.escape(str(item))}</li>" for item in value) + "</ul>" if value else "none"
        return _fmt(value)

    rows = "".join(f'<tr><th scope="row">{html.escape(field)}</th><td>{shown(value)}</td></tr>' for field, value in card.items())
    return f'<table class="card"><tr><th>field</th><th>value</th></tr>{rows}</table>'


def render_html(evaluation: dict[str, Any], model_card: dict[str, Any], images: dict[str, bytes]) -> str:
    """One self-contained HTML page: verdict, metrics, plots (embedded PNG), segments, model card."""
    m, d = evaluation["metrics"], evaluation["details"]
    verdict = "BLESSED" if evaluation["blessed"] else "NOT blessed"
    task = evaluation.get("task") or {"kind": "binary", "label": "label"}
    kind = task["kind"]
    compared = evaluation.get("production_metrics") or {}
    headline = [{"metric": k, "candidate": m.get(k), "production (compared rows)": compared.get(k)}
                for k in REPORTED[kind] if k in m]
    extra = ""
    if kind == "binary":
        headline += [{"metric": k, "candidate": d[k], "production (compared rows)": (d.get("production") or {}).get(k)}
                     for k in ("brier", *(f"recall_at_fpr_{f:g}" for f in FPRS))]
        truth = evaluation.get("truth") or {}
        if truth:
            headline.append({"metric": "PR-AUC share of the best achievable", "candidate": truth.get("pr_auc_vs_truth"), "production (compared rows)": None})
        matrix = d["confusion_matrix"]
        extra = (f"<p>Expected calibration error: {d['calibration']['expected_calibration_error']:.4f}.\n"
                 f"Confusion matrix at threshold {matrix['threshold']:.4f} (false-positive rate {matrix['at_fpr']:g}):\n"
                 + _table([{"": c, **dict(zip(["predicted negative", "predicted positive"], row))}
                           for c, row in zip(["negative", "positive"], matrix["matrix"])])
                 + f"</p>\n<h2>Calibration bins</h2>{_table(d['calibration']['bins'])}")
        rows = f"{int(m['rows']):,} rows, {int(m['positives']):,} positive ({html.escape(task['label'])} = 1)"
    elif kind == "regression":
        extra = f"<h2>Errors (predicted - actual {html.escape(task['label'])})</h2>" + _table([d["error_quantiles"]])
        if m.get("constant_mae") is not None:
            extra += (f"<p>Always predicting the training labels' median would give an MAE of {m['constant_mae']:.4f}; "
                      f"the MAE skill is the share of that error the model removes.</p>")
        rows = f"{int(m['rows']):,} rows"
    else:
        matrix = d["confusion_matrix"]
        extra = ("<h2>Confusion matrix (rows: the true class)</h2>"
                 + _table([{"": c, **{f"predicted {p}": n for p, n in zip(matrix["categories"], row)}}
                           for c, row in zip(matrix["categories"], matrix["matrix"])])
                 + "<h2>Per class</h2>" + _table(d["per_class"]))
        rows = f"{int(m['rows']):,} rows"
    pictures = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}"/><figcaption>{name}</figcaption></figure>'
        for name, data in images.items()
    )
    segments = "".join(f"<h3>by {html.escape(col)}</h3>{_table(rows_)}" for col, rows_ in d["segments"].items()) or "<p>none declared</p>"
    card = _card_table(model_card)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>evaluation {html.escape(evaluation['model_version'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}
figure{{display:inline-block;margin:0 1em 1em 0}}td.not-meaningful{{color:#888;font-style:italic;text-align:left}}
table.card td,table.card th{{text-align:left;vertical-align:top}}table.card ul{{margin:0;padding-left:1.2em}}</style></head><body>
<h1>Model {html.escape(evaluation['model_version'])}: {verdict}</h1>
<p>{html.escape(kind)} task: {html.escape(task['label'])}{f" ({html.escape(task['output'])})" if task.get("output") else ""}</p>
<ul>{''.join(f'<li>{html.escape(r)}</li>' for r in evaluation['reasons'])}</ul>
<h2>Metrics (holdout: {rows})</h2>{_table(headline)}
{extra}
<h2>Plots</h2>{pictures}
<h2>Segments</h2><p>Metrics of a segment with fewer than {MIN_MEANINGFUL} {"rows" if kind != "binary" else "positive (or negative) rows"} are not meaningful: they are greyed.</p>{segments}
<h2>Model card</h2>{card}
</body></html>
"""


# The metrics the report's table shows first, per task (the evaluation's own, in this order).
REPORTED = {
    "binary": ("roc_auc", "pr_auc", "recall_at_fpr", "brier_skill"),
    "regression": ("mae", "rmse", "median_ae", "bias", "within_tolerance", "mae_skill"),
    "multiclass": ("log_loss", "accuracy", "macro_f1", "log_loss_skill"),
}


def model_card(model: Any, evaluation: dict[str, Any], made_by: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a reviewer needs to know about a version, in words: what it learnt from which features
    and request fields in which feature world, on which rows (the training window), with which
    parameters, and where it came from (run, training set, code version, the production it was
    compared with). ``model`` is its registry version (its manifest's ``meta`` is what training
    recorded); ``made_by`` the lineage record of its manifest (for the code version), when known.
    Values are text, or lists of text; none is a raw mapping."""
    meta = model.meta or {}
    task = meta.get("task") or evaluation.get("task") or {}
    usecase = meta.get("usecase") or {}
    training_set = meta.get("training_set") or {}
    comparison = evaluation.get("comparison") or {}
    kind = (evaluation.get("task") or {}).get("kind", "binary")
    return {
        "model": f"{model.name} {model.version}",
        "use case": f"{usecase['name']} (files' digest {str(usecase.get('digest', ''))[:12]})" if usecase.get("name") else None,
        "task": f"{task.get('kind', 'binary')}: predicts {task.get('label', '?')}" + (f" as {task['output']}" if task.get("output") else ""),
        "features": describe_features(meta),
        "request fields (model inputs)": describe_request(meta),
        "feature world": (f"{meta['feature_world']} (the Feast registry and online store built with its training set; "
                          "serving reads this one)") if meta.get("feature_world") else None,
        "training window": describe_window(meta.get("training_window") or {}, training_set.get("rows")),
        "parameters": describe_parameters(meta.get("params") or {}),
        "trained by run": model.run_id,
        "asked for by": (f"the monitor's decision {meta['triggered_by']} (its evidence: what crossed which threshold)"
                         if meta.get("triggered_by") else "a run started by hand or on a schedule (no monitor's decision)"),
        "created": model.created_at,
        "training": describe_training(meta),
        "training set": training_set.get("uri"),
        "training set sha256": training_set.get("sha256"),
        "training key": model.training_key,
        "code version": (made_by or {}).get("code_version"),
        "manifest sha256": model.sha256,
        **{f"holdout {name}": evaluation["metrics"].get(name) for name in REPORTED[kind][:2]},
        "compared with production": describe_comparison(model.version, evaluation),
        "evaluation": evaluation.get("report_uri"),
    }


def describe_comparison(version: str, evaluation: dict[str, Any]) -> str:
    """Which production version the candidate was compared with, and on what (or why not)."""
    production = evaluation.get("production_version")
    if not production:
        return "none: there was no production model yet"
    if production == version:
        return "none: this version is production"
    comparison = evaluation.get("comparison") or {}
    return f"{production}: {comparison.get('reason') or 'not compared'}"


def describe_features(meta: dict[str, Any]) -> list[str]:
    """One line per feature view the model was trained with: its name, entity and key, and features."""
    lines = []
    for view in meta.get("views") or []:
        features = view.get("features") or {}
        names = ", ".join(features) if features else "no features"
        lines.append(f"{view.get('name')} (per {view.get('entity')}, key {view.get('join_key')}): {names}")
    if not lines and meta.get("features"):  # a model from before views were recorded
        lines = [str(name) for name in meta["features"]]
    return lines


def describe_request(meta: dict[str, Any]) -> list[str]:
    """The fields a scoring request carries (from the contract the model was trained with), each
    marked required or optional."""
    if not meta.get("contract"):
        return []
    try:
        fields = parse_contract(meta["contract"], "the model's recorded contract").request_fields()
    except UseCaseError as exc:
        return [f"unreadable contract: {exc}"]
    return [f"{name} ({'required' if required else 'optional'})" for name, required in fields.items()]


def describe_window(window: dict[str, Any], rows: Any = None) -> str | None:
    """"2026-10-01 to 2026-10-28 (27.5 days, 12,345 rows)": the training rows' event times."""
    rows = window.get("rows", rows)
    counted = f"{int(rows):,} rows" if rows is not None else None
    if not window.get("end"):
        return counted
    end = pd.Timestamp(window["end"])
    if not window.get("start"):
        return f"rows before {end:%Y-%m-%d %H:%M} UTC" + (f" ({counted})" if counted else "")
    start = pd.Timestamp(window["start"])
    days = (end - start).total_seconds() / 86400
    span = f"{days:.0f} days" if abs(days - round(days)) < 0.05 else f"{days:.1f} days"
    return f"{start:%Y-%m-%d} to {end:%Y-%m-%d} ({span}" + (f", {counted})" if counted else ")")


def describe_parameters(params: dict[str, Any], prefix: str = "") -> list[str]:
    """The settings that shaped the model, one "name: value" a line (nested settings as ``a.b``,
    lists as comma-separated values)."""
    lines = []
    for name, value in sorted(params.items()):
        if isinstance(value, dict):
            lines += describe_parameters(value, f"{prefix}{name}.")
        elif isinstance(value, (list, tuple)):
            lines.append(f"{prefix}{name}: {', '.join(str(v) for v in value) or 'none'}")
        else:
            lines.append(f"{prefix}{name}: {value}")
    return lines


def describe_training(meta: dict[str, Any]) -> str | None:
    """How the training ran: launcher, attempts, time and the epoch kept."""
    if not meta.get("launcher"):
        return None
    parts = [f"{meta['launcher']} launcher", f"{meta.get('attempts', 1)} attempt(s)"]
    if meta.get("train_seconds") is not None:
        parts.append(f"{meta['train_seconds']} s")
    if meta.get("best_epoch") is not None:
        parts.append(f"best epoch {meta['best_epoch']} of {len(meta.get('epochs') or [])}")
    return ", ".join(parts)
