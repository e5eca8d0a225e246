"""How the model does: estimated before labels arrive, realised once they do.

Binary classifiers: confidence-based performance estimation (CBPE, as NannyML does it). A
calibration map, fitted on the model's evaluation holdout, turns a score into the probability that
the row is positive; if that map still holds (only the inputs moved, not the relation between
score and outcome), the expected confusion matrix of unlabelled rows follows from their calibrated
scores alone, and so do the expected PR-AUC and ROC-AUC.

Regressions: direct loss estimation (DLE, as NannyML does it). A small model of the absolute error,
fitted on the holdout from the prediction and the numeric features, predicts each unlabelled row's
expected error; their mean is the expected MAE. Like CBPE it assumes the inputs moved and the
relation that makes errors did not.

The references are plain JSON-serialisable dicts, so a monitor stores them beside the model. The
regression reference holds a fitted scikit-learn model as pickle bytes (base64) with its sha256 and
the scikit-learn version: a reference is read back only from the project's own storage, and the
hash refuses a corrupted one.
"""

from __future__ import annotations

import base64
import hashlib
import pickle
from typing import Any, Sequence, Union

import numpy as np
import pandas as pd

from flywheel.errors import DataError, IntegrityError

# Quantile bins of the expected calibration error (ECE): equal-count bins, so each bin's mean
# score and positive rate rest on the same number of rows.
CALIBRATION_BINS = 10

Values = Union[Sequence[float], np.ndarray]  # scores, labels, predictions: a list or a numpy array


def _array(values: Values, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if array.size == 0:
        raise DataError(f"{what} is empty")
    if not np.all(np.isfinite(array)):
        raise DataError(f"{what} holds {int(np.count_nonzero(~np.isfinite(array)))} null, NaN or infinite values")
    return array


def _labels(labels: Values, size: int) -> np.ndarray:
    array = _array(labels, "the labels")
    if array.size != size:
        raise DataError(f"{array.size} labels for {size} scores")
    if not np.all((array == 0) | (array == 1)):
        raise DataError("binary labels must be 0 or 1 (or False/True)")
    return array


def calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error: over equal-count bins of the probabilities, the row-weighted mean
    of |mean probability - positive rate|."""
    order = np.argsort(probabilities, kind="stable")
    error = 0.0
    for chunk in np.array_split(order, min(bins, probabilities.size)):
        error += chunk.size * abs(probabilities[chunk].mean() - labels[chunk].mean())
    return float(error / probabilities.size)


def _calibrate(scores: np.ndarray, reference: dict[str, Any]) -> np.ndarray:
    # IsotonicRegression(out_of_bounds="clip").predict is exactly this interpolation between its
    # thresholds: keeping the thresholds keeps the map JSON-serialisable.
    x, y = reference["calibration"]["x"], reference["calibration"]["y"]
    return np.interp(scores, x, y)


def _groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by score, descending, and the index of the last row of each run of equal scores
    (one threshold per distinct score, as scikit-learn's curves do)."""
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    last = np.r_[np.flatnonzero(np.diff(ordered) != 0), ordered.size - 1]
    return order, last


def expected_average_precision(scores: np.ndarray, probabilities: np.ndarray) -> float | None:
    """The expected average precision of rows whose chance of being positive is ``probabilities``,
    ranked by ``scores``: at each threshold, expected true positives = the cumulative sum of p over
    the rows above it, precision = that over the rows above it, recall's step = the threshold's
    expected positives over all expected positives. (A ratio of expectations, as CBPE uses.)"""
    positives = probabilities.sum()
    if positives <= 0:
        return None
    order, last = _groups(scores)
    true_positives = np.cumsum(probabilities[order])[last]
    predicted = last + 1
    recall_step = np.diff(np.r_[0.0, true_positives]) / positives
    return float(np.sum(recall_step * true_positives / predicted))


def expected_roc_auc(scores: np.ndarray, probabilities: np.ndarray) -> float | None:
    """The expected ROC-AUC: the ROC curve of expected true positives (cumulative p) and expected
    false positives (cumulative 1 - p) over the thresholds, integrated by trapezoids."""
    positives, negatives = probabilities.sum(), (1 - probabilities).sum()
    if positives <= 0 or negatives <= 0:
        return None
    order, last = _groups(scores)
    tpr = np.r_[0.0, np.cumsum(probabilities[order])[last] / positives]
    fpr = np.r_[0.0, np.cumsum(1 - probabilities[order])[last] / negatives]
    return float(np.trapezoid(tpr, fpr))


def realised_binary(scores: Values, labels: Values) -> dict[str, Any]:
    """The realised metrics of scored rows whose labels arrived: ``pr_auc`` (scikit-learn's
    ``average_precision_score``), ``roc_auc``, ``positive_rate``, ``calibration_error`` (of the
    scores read as probabilities) and ``rows``. A metric a single class leaves undefined is None."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    score = _array(scores, "the scores")
    label = _labels(labels, score.size)
    both_classes = 0 < label.sum() < label.size
    return {
        "rows": int(score.size),
        "pr_auc": float(average_precision_score(label, score)) if label.sum() > 0 else None,
        "roc_auc": float(roc_auc_score(label, score)) if both_classes else None,
        "positive_rate": float(label.mean()),
        "calibration_error": calibration_error(score, label),
        "mean_score": float(score.mean()),
    }


def binary_reference(scores: Values, labels: Values, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """CBPE's reference, from the model's evaluation holdout: an isotonic calibration map from
    score to probability (its thresholds ``calibration: {x, y}``), the holdout's realised metrics
    (``pr_auc``, ``roc_auc``, ``positive_rate``, ``calibration_error``, ``mean_score``, ``rows``) and
    the metrics CBPE expects on the holdout itself (``expected_pr_auc``, ``expected_roc_auc``), the
    fair comparison for a window's estimate. JSON-serialisable."""
    from sklearn.isotonic import IsotonicRegression

    score = _array(scores, "the scores")
    label = _labels(labels, score.size)
    if not 0 < label.sum() < label.size:
        raise DataError("a calibration map needs both classes in the holdout's labels")
    isotonic = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(score, label)
    reference = {
        "kind": "binary",
        "calibration": {"x": [float(v) for v in isotonic.X_thresholds_], "y": [float(v) for v in isotonic.y_thresholds_]},
        "bins": int(bins),
        **realised_binary(score, label),
    }
    reference["calibration_error"] = calibration_error(score, label, bins)
    probabilities = _calibrate(score, reference)
    reference["expected_pr_auc"] = expected_average_precision(score, probabilities)
    reference["expected_roc_auc"] = expected_roc_auc(score, probabilities)
    return reference


def estimate_binary(scores: Values, reference: dict[str, Any]) -> dict[str, Any]:
    """CBPE's estimates for unlabelled scored rows: ``expected_pr_auc``, ``expected_roc_auc``,
    ``expected_positive_rate`` (the mean calibrated probability), ``mean_score`` and ``rows``."""
    if reference.get("kind") != "binary":
        raise DataError(f"estimate_binary needs a binary reference, not {reference.get('kind')!r}")
    score = _array(scores, "the scores")
    probabilities = _calibrate(score, reference)
    return {
        "rows": int(score.size),
        "expected_pr_auc": expected_average_precision(score, probabilities),
        "expected_roc_auc": expected_roc_auc(score, probabilities),
        "expected_positive_rate": float(probabilities.mean()),
        "mean_score": float(score.mean()),
    }


def _error_inputs(predictions: np.ndarray, features: pd.DataFrame | None, names: list[str]) -> np.ndarray:
    columns = [predictions]
    if names:
        if features is None:
            raise DataError(f"the regression reference was fitted with features {names}: pass them")
        missing = [name for name in names if name not in features.columns]
        if missing:
            raise DataError(f"features {missing} of the regression reference are not in the rows given")
        if len(features) != predictions.size:
            raise DataError(f"{len(features)} feature rows for {predictions.size} predictions")
        # NaN stays NaN: the gradient-boosted model routes missing values itself.
        columns += [pd.to_numeric(features[name], errors="coerce").to_numpy(dtype=float) for name in names]
    return np.column_stack(columns)


def realised_regression(predictions: Values, labels: Values) -> dict[str, Any]:
    """The realised metrics of predictions whose labels arrived: ``mae``, ``rmse``, ``bias`` (mean
    prediction minus label) and ``rows``."""
    prediction = _array(predictions, "the predictions")
    label = _array(labels, "the labels")
    if label.size != prediction.size:
        raise DataError(f"{label.size} labels for {prediction.size} predictions")
    error = prediction - label
    return {"rows": int(prediction.size), "mae": float(np.abs(error).mean()),
            "rmse": float(np.sqrt(np.mean(error ** 2))), "bias": float(error.mean())}


def regression_reference(predictions: Values, labels: Values,
                         features: pd.DataFrame | None = None) -> dict[str, Any]:
    """DLE's reference, from the model's evaluation holdout: a gradient-boosted model of the
    absolute error from the prediction and the numeric columns of ``features`` (pickle, base64,
    with its sha256 and scikit-learn's version), the holdout's realised metrics (``mae``, ``rmse``,
    ``bias``, ``rows``) and the MAE DLE expects on the holdout itself (``expected_mae``)."""
    import sklearn
    from sklearn.ensemble import HistGradientBoostingRegressor

    prediction = _array(predictions, "the predictions")
    realised = realised_regression(prediction, labels)
    names = [] if features is None else [str(name) for name in features.columns
                                         if pd.api.types.is_numeric_dtype(features[name])]
    inputs = _error_inputs(prediction, features, names)
    error = np.abs(prediction - _array(labels, "the labels"))
    # Squared loss: the model's answer is the conditional MEAN of |error|, whose average is the MAE.
    # A small model (few, shallow trees) is enough to follow how the error depends on the inputs.
    model = HistGradientBoostingRegressor(max_iter=60, max_depth=4, learning_rate=0.1, random_state=0)
    model.fit(inputs, error)
    blob = pickle.dumps(model, protocol=5)
    return {
        "kind": "regression",
        "features": names,
        "model": base64.b64encode(blob).decode("ascii"),
        "model_sha256": hashlib.sha256(blob).hexdigest(),
        "sklearn_version": sklearn.__version__,
        **realised,
        "expected_mae": float(np.clip(model.predict(inputs), 0, None).mean()),
    }


def _error_model(reference: dict[str, Any]):
    blob = base64.b64decode(reference["model"])
    if hashlib.sha256(blob).hexdigest() != reference["model_sha256"]:
        raise IntegrityError("the regression reference's error model does not match its sha256: it was corrupted or "
                             "edited; build the reference again from the evaluation holdout")
    import sklearn

    if reference.get("sklearn_version") != sklearn.__version__:
        raise DataError(f"the regression reference was fitted with scikit-learn {reference.get('sklearn_version')}, "
                        f"this is {sklearn.__version__}: build the reference again")
    return pickle.loads(blob)  # noqa: S301 - the project's own artifact, its sha256 checked above


def estimate_regression(predictions: Values, features: pd.DataFrame | None,
                        reference: dict[str, Any]) -> dict[str, Any]:
    """DLE's estimate for unlabelled predictions: ``expected_mae`` (the mean of the error model's
    answers, none below 0) and ``rows``."""
    if reference.get("kind") != "regression":
        raise DataError(f"estimate_regression needs a regression reference, not {reference.get('kind')!r}")
    prediction = _array(predictions, "the predictions")
    inputs = _error_inputs(prediction, features, list(reference["features"]))
    expected = np.clip(_error_model(reference).predict(inputs), 0, None)
    return {"rows": int(prediction.size), "expected_mae": float(expected.mean())}
