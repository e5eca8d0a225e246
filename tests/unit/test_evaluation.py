"""The gate at the real default thresholds: absolute floors AND no worse than production on clean rows."""

import numpy as np
import pytest

from flywheel.config import GateSettings, load_settings
from flywheel.errors import DataError
from flywheel.evaluation import Comparison, brier_skill, gate, gate_rules, ranking_metrics
from tests.factories import FRAUD

DEFAULTS = GateSettings()
RULES = gate_rules(FRAUD.task, DEFAULTS)  # a binary task: the gate settings' floors and regressions


def naive_recall_at_fpr(labels, scores, fpr):
    """Oracle: the best recall over every threshold whose false-positive rate is at most ``fpr``."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    best = 0.0
    for threshold in np.unique(scores):
        flagged = scores >= threshold
        if flagged[labels == 0].mean() <= fpr:
            best = max(best, flagged[labels == 1].mean())
    return best


def comparison(candidate, production, rows=5000, positives=80):
    return Comparison("prod-v1", True, "compared", rows=rows, positives=positives, candidate=candidate, production=production)


def good(**changes):
    metrics = {"roc_auc": 0.90, "pr_auc": 0.30, "recall_at_fpr": 0.40, "brier_skill": 0.18}
    metrics.update(changes)
    return metrics


def test_the_defaults_are_the_documented_floors():
    settings = load_settings(env={})
    assert settings.gate == DEFAULTS
    assert (DEFAULTS.min_roc_auc, DEFAULTS.min_pr_auc, DEFAULTS.recall_at_fpr) == (0.80, 0.20, 0.01)
    assert DEFAULTS.min_brier_skill == 0.02


def test_ranking_metrics_of_a_perfect_and_a_reversed_scorer():
    labels = np.array([0, 0, 0, 1, 1])
    assert ranking_metrics(labels, np.array([0.1, 0.2, 0.3, 0.8, 0.9])) == {"roc_auc": 1.0, "pr_auc": 1.0, "recall_at_fpr": 1.0}
    reversed_ = ranking_metrics(labels, np.array([0.9, 0.8, 0.7, 0.2, 0.1]))
    assert reversed_["roc_auc"] == 0.0 and reversed_["recall_at_fpr"] == 0.0


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.2])
def test_recall_at_fpr_matches_a_naive_threshold_sweep(fpr):
    rng = np.random.default_rng(3)
    labels = (rng.random(3000) < 0.05).astype(int)
    scores = np.round(rng.normal(labels * 1.5, 1.0), 2)  # rounded: ties, as real scores have
    assert ranking_metrics(labels, scores, fpr)["recall_at_fpr"] == pytest.approx(naive_recall_at_fpr(labels, scores, fpr))


def test_brier_skill_against_the_base_rate_forecast():
    labels = np.array([0, 0, 0, 1])  # rate 0.25: the constant forecast's Brier is 0.25 * 0.75
    assert brier_skill(labels, np.full(4, 0.25)) == pytest.approx(0.0)
    assert brier_skill(labels, labels.astype(float)) == pytest.approx(1.0)
    assert brier_skill(labels, np.array([0.1, 0.1, 0.1, 0.7])) == pytest.approx(1 - (3 * 0.01 + 0.09) / 4 / 0.1875)
    with pytest.raises(DataError, match="only one class"):
        brier_skill(np.zeros(4), np.zeros(4))


def test_one_class_holdout_is_a_clear_error():
    with pytest.raises(DataError, match="only one class"):
        ranking_metrics(np.zeros(10), np.random.rand(10))


def test_first_model_needs_only_the_floors():
    assert gate(good(), None, RULES) == (True, [])


@pytest.mark.parametrize(
    "metrics, message",
    [
        (good(roc_auc=0.79), "ROC-AUC 0.7900 is below the floor 0.8000"),
        (good(pr_auc=0.19), "PR-AUC 0.1900 is below the floor 0.2000"),
        (good(brier_skill=0.01), "Brier skill score 0.0100 is below the floor 0.0200 (its probabilities are hardly better "
                                 "than always predicting the base rate: it learned little from the labels)"),
    ],
)
def test_below_a_default_floor_is_not_blessed_even_without_production(metrics, message):
    blessed, reasons = gate(metrics, None, RULES)
    assert not blessed and reasons == [message]


@pytest.mark.parametrize(
    "candidate, label",
    [
        (good(pr_auc=0.28), "PR-AUC 0.2800 is worse than production prod-v1's 0.3000"),
        (good(roc_auc=0.885), "ROC-AUC 0.8850 is worse than production prod-v1's 0.9000"),
        (good(recall_at_fpr=0.37), "recall at FPR 0.01 0.3700 is worse than production prod-v1's 0.4000"),
    ],
)
def test_worse_than_production_on_any_compared_metric_is_not_blessed(candidate, label):
    blessed, reasons = gate(candidate, comparison(candidate, good()), RULES)
    assert not blessed
    assert len(reasons) == 1 and reasons[0].startswith(label) and "5,000 rows neither model trained on" in reasons[0]


def test_within_the_allowed_regressions_is_blessed():
    candidate = good(pr_auc=0.291, roc_auc=0.891, recall_at_fpr=0.381)
    assert gate(candidate, comparison(candidate, good()), RULES) == (True, [])


def test_the_comparison_uses_the_compared_rows_not_the_holdout_metrics():
    """Production is judged against the candidate's metrics on the SAME clean rows, not the full holdout."""
    holdout = good(pr_auc=0.35)  # the candidate on its whole holdout
    on_clean_rows = good(pr_auc=0.25)
    blessed, reasons = gate(holdout, comparison(on_clean_rows, good(pr_auc=0.30)), RULES)
    assert not blessed and "0.2500 is worse than production" in reasons[0]


def test_an_impossible_comparison_falls_back_to_the_floors():
    impossible = Comparison("prod-v1", False, "only 12 fraud cases")
    assert gate(good(), impossible, RULES) == (True, [])
    assert not gate(good(pr_auc=0.1), impossible, RULES)[0]


# --- other tasks: regression and multiclass ---------------------------------------------------------

def test_regression_metrics_match_a_naive_computation_in_the_labels_units():
    rng = np.random.default_rng(5)
    labels = rng.normal(10, 20, 3000)
    predictions = labels + rng.normal(2, 5, 3000)
    from flywheel.evaluation import regression_metrics

    metrics = regression_metrics(labels, predictions, median=float(np.median(labels[:1000])), tolerance=5.0)
    errors = [p - y for p, y in zip(predictions.tolist(), labels.tolist())]
    assert metrics["mae"] == pytest.approx(sum(abs(e) for e in errors) / len(errors))
    assert metrics["rmse"] == pytest.approx((sum(e * e for e in errors) / len(errors)) ** 0.5)
    assert metrics["bias"] == pytest.approx(sum(errors) / len(errors))
    assert metrics["within_tolerance"] == pytest.approx(sum(abs(e) <= 5.0 for e in errors) / len(errors))
    constant = sum(abs(np.median(labels[:1000]) - y) for y in labels.tolist()) / len(labels)
    assert metrics["mae_skill"] == pytest.approx(1 - metrics["mae"] / constant)


def test_a_constant_regression_has_no_skill_and_fails_the_default_floor():
    from flywheel.evaluation import regression_metrics
    from flywheel.usecase import load_usecase
    from tests.factories import REPO

    labels = np.random.default_rng(1).normal(0, 10, 500)
    metrics = regression_metrics(labels, np.full(500, 0.0), median=0.0, tolerance=None)
    assert metrics["mae_skill"] == pytest.approx(0.0)
    flights = load_usecase(REPO / "usecases" / "flights").task  # floors: MAE skill 0.05, regressions: MAE 0.25
    blessed, reasons = gate(metrics, None, gate_rules(flights, DEFAULTS))
    assert not blessed and reasons == ["MAE skill 0.0000 is below the floor 0.0500"]


def test_a_regression_is_compared_with_production_in_minutes_lower_being_better():
    from flywheel.usecase import load_usecase
    from tests.factories import REPO

    rules = gate_rules(load_usecase(REPO / "usecases" / "flights").task, DEFAULTS)
    base = {"mae": 20.0, "rmse": 30.0, "mae_skill": 0.12}
    assert gate(base, comparison({**base, "mae": 20.2}, base), rules) == (True, [])  # 0.2 minutes worse: allowed
    blessed, reasons = gate(base, comparison({**base, "mae": 20.3}, base), rules)
    assert not blessed and reasons == ["MAE 20.3000 is worse than production prod-v1's 20.0000 by more than 0.2500 "
                                       "(on 5,000 rows neither model trained on)"]
    assert gate(base, comparison({**base, "mae": 15.0}, base), rules) == (True, [])  # better is never worse


def test_multiclass_metrics_and_the_skill_over_the_classes_shares():
    from sklearn.metrics import f1_score, log_loss

    from flywheel.evaluation import multiclass_metrics

    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 2000)
    logits = rng.normal(0, 1, (2000, 3)) + 2.0 * np.eye(3)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    shares = np.bincount(labels, minlength=3) / 2000
    metrics = multiclass_metrics(labels, probabilities, shares)
    assert metrics["log_loss"] == pytest.approx(log_loss(labels, probabilities))
    assert metrics["accuracy"] == pytest.approx((probabilities.argmax(axis=1) == labels).mean())
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, probabilities.argmax(axis=1), average="macro"))
    assert metrics["log_loss_skill"] > 0.2
    constant = multiclass_metrics(labels, np.tile(shares, (2000, 1)), shares)
    assert constant["log_loss_skill"] == pytest.approx(0.0, abs=1e-9)


def test_a_floor_that_cannot_be_measured_is_a_refusal_not_a_pass():
    """Bug caught: a NaN metric (an undefined skill) compared False against its floor and passed."""
    from flywheel.usecase import load_usecase
    from tests.factories import REPO

    rules = gate_rules(load_usecase(REPO / "usecases" / "flights").task, DEFAULTS)
    blessed, reasons = gate({"mae": 1.0, "mae_skill": float("nan")}, None, rules)
    assert not blessed and "could not be measured" in reasons[0]
