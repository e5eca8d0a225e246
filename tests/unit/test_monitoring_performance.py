"""Label-free performance: CBPE's expected PR-AUC and ROC-AUC track the realised ones on simulated
labels, also when the scores' distribution moves; DLE's expected MAE rises with the realised MAE
under a covariate shift that makes errors larger."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from flywheel.errors import DataError, IntegrityError
from flywheel.monitoring.performance import (
    binary_reference, estimate_binary, estimate_regression, expected_average_precision, realised_binary,
    realised_regression, regression_reference)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def binary_rows(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Scores of a monotone but miscalibrated model; labels drawn from the true probability. A shift
    moves the input (covariate shift): P(label | score) is unchanged, the score distribution is not."""
    x = rng.normal(shift, 1.0, n)
    truth = sigmoid(1.5 * x - 2.5)
    score = sigmoid(0.8 * x - 1.0)
    return score, (rng.random(n) < truth).astype(float)


def test_expected_average_precision_is_exact_when_probabilities_are_certain() -> None:
    # With p in {0, 1} the expectation is the realised value: a check of the formula itself.
    rng = np.random.default_rng(1)
    labels = (rng.random(500) < 0.3).astype(float)
    scores = np.where(labels == 1, rng.random(500) * 0.8 + 0.2, rng.random(500) * 0.8)
    assert expected_average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_expected_pr_auc_matches_the_realised_one_on_calibrated_labels() -> None:
    rng = np.random.default_rng(2)
    reference = binary_reference(*binary_rows(rng, 20_000))
    scores, labels = binary_rows(rng, 20_000)
    estimate, realised = estimate_binary(scores, reference), realised_binary(scores, labels)
    assert estimate["expected_pr_auc"] == pytest.approx(realised["pr_auc"], abs=0.02)
    assert estimate["expected_roc_auc"] == pytest.approx(realised["roc_auc"], abs=0.01)
    assert estimate["expected_positive_rate"] == pytest.approx(realised["positive_rate"], abs=0.01)
    assert reference["expected_pr_auc"] == pytest.approx(reference["pr_auc"], abs=0.02)


def test_under_covariate_shift_the_estimate_follows_the_realised_value() -> None:
    rng = np.random.default_rng(3)
    reference = binary_reference(*binary_rows(rng, 20_000))
    before = realised_binary(*binary_rows(rng, 20_000))
    scores, labels = binary_rows(rng, 20_000, shift=1.0)
    estimate, realised = estimate_binary(scores, reference), realised_binary(scores, labels)
    # The shift moves PR-AUC a lot (more positives ranked); the estimate moves with it.
    assert realised["pr_auc"] - before["pr_auc"] > 0.15
    assert estimate["expected_pr_auc"] == pytest.approx(realised["pr_auc"], abs=0.02)
    assert estimate["expected_positive_rate"] == pytest.approx(realised["positive_rate"], abs=0.01)
    # The raw scores are miscalibrated: without the calibration map the estimate would be far off.
    assert abs(estimate["mean_score"] - realised["positive_rate"]) > 0.05


def test_realised_binary_is_scikit_learns_and_a_single_class_leaves_roc_undefined() -> None:
    rng = np.random.default_rng(4)
    scores, labels = binary_rows(rng, 2000)
    realised = realised_binary(scores, labels)
    assert realised["pr_auc"] == average_precision_score(labels, scores)
    assert realised["roc_auc"] == roc_auc_score(labels, scores)
    assert realised_binary([0.1, 0.2], [0, 0])["roc_auc"] is None


def test_binary_reference_is_json_serialisable_and_refuses_one_class() -> None:
    rng = np.random.default_rng(5)
    reference = binary_reference(*binary_rows(rng, 3000))
    assert json.loads(json.dumps(reference, allow_nan=False)) == reference
    assert 0 <= reference["calibration_error"] < 0.5 and reference["kind"] == "binary"
    with pytest.raises(DataError, match="both classes"):
        binary_reference([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(DataError, match="0 or 1"):
        binary_reference([0.1, 0.2], [0, 2])
    with pytest.raises(DataError, match="NaN"):
        estimate_binary([0.1, float("nan")], reference)


def regression_rows(rng: np.random.Generator, n: int, shifted: bool = False) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """A model that knows the mean (2x) while the noise grows with x: a shift towards large x makes
    the errors larger without changing how error depends on x."""
    x = rng.beta(5, 1, n) if shifted else rng.uniform(0, 1, n)
    other = rng.normal(size=n)
    labels = 2 * x + rng.normal(0, 0.1 + 2 * x, n)
    return 2 * x, labels, pd.DataFrame({"x": x, "noise_feature": other, "name": ["row"] * n})


def test_expected_mae_rises_with_the_realised_mae_under_covariate_shift() -> None:
    rng = np.random.default_rng(6)
    reference = regression_reference(*regression_rows(rng, 10_000))
    assert reference["features"] == ["x", "noise_feature"]  # numeric features only
    assert reference["expected_mae"] == pytest.approx(reference["mae"], rel=0.05)
    predictions, labels, features = regression_rows(rng, 10_000)
    same = estimate_regression(predictions, features, reference)["expected_mae"]
    assert same == pytest.approx(realised_regression(predictions, labels)["mae"], rel=0.05)
    predictions, labels, features = regression_rows(rng, 10_000, shifted=True)
    realised = realised_regression(predictions, labels)["mae"]
    estimate = estimate_regression(predictions, features, reference)["expected_mae"]
    assert realised > same * 1.4  # the shift made errors larger
    assert estimate == pytest.approx(realised, rel=0.08)


def test_regression_reference_without_features_uses_the_prediction_alone() -> None:
    rng = np.random.default_rng(7)
    predictions, labels, _ = regression_rows(rng, 5000)
    reference = regression_reference(predictions, labels)
    assert reference["features"] == []
    shifted_predictions, shifted_labels, _ = regression_rows(rng, 5000, shifted=True)
    estimate = estimate_regression(shifted_predictions, None, reference)["expected_mae"]
    assert estimate == pytest.approx(realised_regression(shifted_predictions, shifted_labels)["mae"], rel=0.1)


def test_realised_regression_metrics() -> None:
    assert realised_regression([1.0, 2.0, 4.0], [1.0, 1.0, 1.0]) == {
        "rows": 3, "mae": pytest.approx(4 / 3), "rmse": pytest.approx(np.sqrt(10 / 3)), "bias": pytest.approx(4 / 3)}


def test_a_tampered_regression_reference_is_refused() -> None:
    rng = np.random.default_rng(8)
    reference = json.loads(json.dumps(regression_reference(*regression_rows(rng, 2000))))
    predictions, _, features = regression_rows(rng, 100)
    assert estimate_regression(predictions, features, reference)["rows"] == 100  # survives a JSON trip
    with pytest.raises(DataError, match="features"):
        estimate_regression(predictions, None, reference)
    reference["model_sha256"] = "0" * 64
    with pytest.raises(IntegrityError, match="sha256"):
        estimate_regression(predictions, features, reference)
