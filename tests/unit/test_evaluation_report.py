"""Detailed evaluation metrics against naive oracles, and the HTML report with its plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flywheel import evaluation_report as er
from tests.factories import FRAUD
from tests.unit.test_evaluation import naive_recall_at_fpr


@pytest.fixture
def scored():
    rng = np.random.default_rng(3)
    n = 4000
    labels = (rng.random(n) < 0.05).astype(int)
    scores = np.clip(labels * 0.3 + rng.random(n) * 0.6, 0, 1)
    frame = pd.DataFrame({"merchant_category": rng.choice(["grocery", "travel", "online"], n),
                          "channel": rng.choice(["pos", "web"], n)})
    frame.loc[frame.index[:5], "merchant_category"] = "rare"  # a segment that may hold one class only
    labels[:5] = 0
    return frame, labels, scores


def test_brier_and_recall_at_several_fprs_match_naive_oracles(scored):
    frame, labels, scores = scored
    details = er.details(FRAUD.task, frame, labels, scores, fpr=0.01)
    assert details["brier"] == pytest.approx(np.mean((scores - labels) ** 2))
    for fpr in er.FPRS:
        assert details[f"recall_at_fpr_{fpr:g}"] == pytest.approx(naive_recall_at_fpr(labels, scores, fpr))


def test_calibration_bins_hold_equal_counts_and_the_ece_is_their_weighted_gap(scored):
    _, labels, scores = scored
    result = er.calibration(labels, scores)
    order = np.argsort(scores, kind="stable")
    expected_ece = 0.0
    for b, chunk in zip(result["bins"], np.array_split(order, 10)):
        assert b["rows"] == len(chunk) == 400
        assert b["mean_score"] == pytest.approx(scores[chunk].mean()) and b["positive_rate"] == pytest.approx(labels[chunk].mean())
        expected_ece += len(chunk) / len(scores) * abs(scores[chunk].mean() - labels[chunk].mean())
    assert result["expected_calibration_error"] == pytest.approx(expected_ece)


def test_segments_have_their_own_metrics_and_a_one_class_segment_has_none(scored):
    from sklearn.metrics import roc_auc_score

    frame, labels, scores = scored
    segments = er.segment_metrics(frame, labels, scores, FRAUD.task.evaluation.slices)
    travel = next(r for r in segments["merchant_category"] if r["value"] == "travel")
    mask = (frame["merchant_category"] == "travel").to_numpy()
    assert travel["rows"] == mask.sum() and travel["roc_auc"] == pytest.approx(roc_auc_score(labels[mask], scores[mask]))
    rare = next(r for r in segments["merchant_category"] if r["value"] == "rare")
    assert rare["positives"] == 0 and rare["roc_auc"] is None
    assert {r["value"] for r in segments["channel"]} == {"pos", "web"}


def test_the_confusion_matrix_is_at_the_threshold_of_the_fpr(scored):
    frame, labels, scores = scored
    matrix = er.details(FRAUD.task, frame, labels, scores, fpr=0.01)["confusion_matrix"]
    (tn, fp), (fn, tp) = matrix["matrix"]
    assert tn + fp == (labels == 0).sum() and fn + tp == labels.sum()
    assert fp / (tn + fp) <= 0.01
    assert tp / (fn + tp) == pytest.approx(naive_recall_at_fpr(labels, scores, 0.01))


def test_the_html_report_embeds_every_plot_as_png(scored):
    frame, labels, scores = scored
    images = er.plots(FRAUD.task, labels, scores, (labels[:2000], scores[:2000] * 0.9))
    assert set(images) == {"roc", "pr", "calibration", "histogram"}
    assert all(data.startswith(b"\x89PNG") and len(data) > 5000 for data in images.values())
    evaluation = {"model_version": "v2", "blessed": False, "reasons": ["PR-AUC 0.1 is below the floor 0.2"],
                  "metrics": {"rows": 4000.0, "positives": 200.0, "roc_auc": 0.8, "pr_auc": 0.1, "recall_at_fpr": 0.2},
                  "details": er.details(FRAUD.task, frame, labels, scores, 0.01), "production_metrics": None, "truth": None}
    page = er.render_html(evaluation, {"model": "fraud v2"}, images)
    assert page.count('src="data:image/png;base64,') == 4 and "NOT blessed" in page and "below the floor" in page
    assert "by merchant_category" in page and "Model card" in page


def test_a_regression_report_plots_predicted_against_actual_and_slices_the_errors():
    from flywheel.usecase import load_usecase
    from tests.factories import REPO

    task = load_usecase(REPO / "usecases" / "flights").task
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"carrier": rng.choice(["AA", "UA"], 3000), "origin": rng.choice(["EWR", "JFK"], 3000)})
    labels = rng.gamma(1.5, 20, 3000) - 20
    predictions = labels + np.where(frame["carrier"] == "AA", 10.0, 0.0) + rng.normal(0, 3, 3000)
    details = er.details(task, frame, labels, predictions, 0.01)
    by_carrier = {row["value"]: row for row in details["segments"]["carrier"]}
    assert by_carrier["AA"]["bias"] == pytest.approx(10.0, abs=0.5) and abs(by_carrier["UA"]["bias"]) < 0.5
    assert details["error_quantiles"]["p50"] > 0
    images = er.plots(task, labels, predictions, (labels[:1000], labels[:1000] + 30))
    assert set(images) == {"predicted_vs_actual", "errors"} and all(d.startswith(b"\x89PNG") for d in images.values())
    evaluation = {"model_version": "v1", "blessed": True, "reasons": ["cleared the floors"], "task": task.model_dump(),
                  "metrics": {"rows": 3000.0, "mae": 5.0, "rmse": 7.0, "mae_skill": 0.7, "constant_mae": 17.0},
                  "details": details, "production_metrics": None, "truth": None}
    page = er.render_html(evaluation, {"model": "flights v1"}, images)
    assert "regression task: arr_delay (arr_delay_minutes)" in page and "by carrier" in page and "MAE of 17.0000" in page
    assert page.count('src="data:image/png;base64,') == 2


# ------------------------------------------------------------------ the ROC plot's chance line
def drawn_y(axis, line, xs: np.ndarray) -> np.ndarray:
    """The y (in data units) of ``line`` as it is drawn at each x: matplotlib joins a line's points by
    straight segments on the screen, so interpolate in display coordinates and map back."""
    to_screen, to_data = axis.transData, axis.transData.inverted()
    points = to_screen.transform(np.column_stack([line.get_xdata(), line.get_ydata()]))
    order = np.argsort(points[:, 0], kind="stable")
    screen_x = to_screen.transform(np.column_stack([xs, np.zeros_like(xs)]))[:, 0]
    screen_y = np.interp(screen_x, points[order, 0], points[order, 1])
    return to_data.transform(np.column_stack([screen_x, screen_y]))[:, 1]


def test_the_roc_chance_line_is_drawn_as_y_equals_x_on_the_symlog_axis():
    """Bug: the chance line was a straight segment from (0, 0) to (1, 1) on a symlog axis, drawn bent
    below y = x, so a good model seemed to fall below chance between FPR 0.02 and 0.1."""
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(5)
    labels = (rng.random(20_000) < 0.05).astype(int)
    scores = np.clip(0.35 * labels + rng.random(20_000) * 0.65, 0, 1)  # a good model: ROC-AUC about 0.87
    figure = er.roc_figure([("candidate", labels, scores)])
    try:
        axis = figure.axes[0]
        assert axis.get_xscale() == "symlog"
        figure.canvas.draw()
        chance = next(line for line in axis.get_lines() if line.get_label() == "chance")
        candidate = next(line for line in axis.get_lines() if line.get_label().startswith("candidate"))
        xs = np.concatenate([np.linspace(0.0, 0.01, 11), np.linspace(0.02, 0.1, 41), np.linspace(0.1, 1.0, 19)])
        np.testing.assert_allclose(drawn_y(axis, chance, xs), xs, rtol=0.01, atol=1e-4)
        low = (xs >= 0.02) & (xs <= 0.1)
        assert (drawn_y(axis, candidate, xs[low]) > drawn_y(axis, chance, xs[low])).all()
    finally:
        plt.close(figure)


# ------------------------------------------------------------------ segments' counts and warnings
def test_a_segment_with_one_positive_is_not_a_meaningful_roc_auc_of_one():
    """Bug: a segment with one positive showed ROC-AUC 1.0 with no count and no warning."""
    rng = np.random.default_rng(1)
    n = 6000
    labels = (rng.random(n) < 0.05).astype(int)
    scores = np.clip(labels * 0.3 + rng.random(n) * 0.6, 0, 1)
    frame = pd.DataFrame({"merchant_category": rng.choice(["grocery", "travel"], n), "channel": "web"})
    lonely = np.flatnonzero(labels == 0)[:60]
    labels[lonely[0]], scores[lonely[0]] = 1, 0.99  # the one positive, scored above all its segment's negatives
    frame.loc[lonely, "merchant_category"] = "jewellery"
    segments = er.segment_metrics(frame, labels, scores, ("merchant_category",))["merchant_category"]
    jewellery = next(r for r in segments if r["value"] == "jewellery")
    assert (jewellery["rows"], jewellery["positives"], jewellery["negatives"]) == (60, 1, 59)
    assert jewellery["roc_auc"] == 1.0 and jewellery["meaningful"] is False
    assert jewellery["warning"] == f"not meaningful: only 1 positive (at least {er.MIN_MEANINGFUL} needed)"
    assert er.MIN_MEANINGFUL == 30
    grocery = next(r for r in segments if r["value"] == "grocery")
    assert grocery["positives"] >= 30 and grocery["negatives"] >= 30 and grocery["meaningful"] is True and grocery["warning"] is None
    page = er._table(segments)
    row = page.split("<td>jewellery</td>")[1].split("</tr>")[0]
    assert "<td>60</td><td>1</td><td>59</td>" in row and "not meaningful: only 1 positive" in row
    assert "<td>1.0000</td>" not in row and 'class="not-meaningful"' in row


def test_regression_and_multiclass_segments_below_thirty_rows_are_marked():
    """The same bug for other tasks: a slice's MAE or accuracy from a handful of rows read as a figure."""
    frame = pd.DataFrame({"carrier": ["AA"] * 100 + ["ZZ"] * 29})
    truth = np.arange(129, dtype=float)
    by_carrier = {r["value"]: r for r in er.regression_slices(frame, truth, truth + 1, ("carrier",))["carrier"]}
    assert by_carrier["AA"]["meaningful"] and not by_carrier["ZZ"]["meaningful"]
    assert by_carrier["ZZ"]["warning"].startswith("not meaningful: only 29 rows")
    labels = np.array([0, 1] * 50 + [0] * 29)
    probabilities = np.eye(2)[labels] * 0.8 + 0.1
    rows = {r["value"]: r for r in er.multiclass_slices(frame, labels, probabilities, ("carrier",), ("on time", "late"))["carrier"]}
    assert rows["AA"]["rows per class"] == "on time 50, late 50" and rows["AA"]["meaningful"]
    assert rows["ZZ"]["rows per class"] == "on time 29, late 0" and not rows["ZZ"]["meaningful"]


def test_a_class_with_few_rows_has_a_not_meaningful_f1_in_words():
    assert er.meaningful({"row of class late": 2})["warning"] == "not meaningful: only 2 rows of class late (at least 30 needed)"
    assert er.meaningful({"positive": 1, "negative": 500})["warning"].startswith("not meaningful: only 1 positive (")
    assert er.meaningful({"positive": 30, "negative": 30}) == {"meaningful": True, "warning": None}
