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
