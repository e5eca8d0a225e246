"""The gate: an absolute floor AND no worse than production."""

import numpy as np
import pytest

from flywheel.config import load_settings
from flywheel.errors import DataError
from flywheel.evaluation import gate, ranking_metrics


@pytest.fixture
def settings(tmp_path):
    return load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_GATE__MIN_PR_AUC": "0.3",
                              "FLYWHEEL_GATE__MIN_ROC_AUC": "0.8", "FLYWHEEL_GATE__MAX_REGRESSION": "0.01"})


def test_ranking_metrics_of_a_perfect_and_a_random_scorer():
    labels = np.array([0, 0, 0, 1, 1])
    assert ranking_metrics(labels, np.array([0.1, 0.2, 0.3, 0.8, 0.9])) == {"roc_auc": 1.0, "pr_auc": 1.0}
    reversed_ = ranking_metrics(labels, np.array([0.9, 0.8, 0.7, 0.2, 0.1]))
    assert reversed_["roc_auc"] == 0.0


def test_one_class_holdout_is_a_clear_error():
    with pytest.raises(DataError, match="only one class"):
        ranking_metrics(np.zeros(10), np.random.rand(10))


def test_first_model_needs_only_the_floors(settings):
    assert gate({"roc_auc": 0.9, "pr_auc": 0.4}, None, settings) == (True, [])


def test_below_the_floor_is_not_blessed_even_without_production(settings):
    blessed, reasons = gate({"roc_auc": 0.75, "pr_auc": 0.4}, None, settings)
    assert not blessed and "ROC-AUC 0.7500 is below the floor 0.8000" in reasons[0]


def test_worse_than_production_is_not_blessed(settings):
    blessed, reasons = gate({"roc_auc": 0.9, "pr_auc": 0.40}, {"roc_auc": 0.9, "pr_auc": 0.45}, settings)
    assert not blessed and "worse than production" in reasons[0]


def test_within_the_allowed_regression_is_blessed(settings):
    assert gate({"roc_auc": 0.9, "pr_auc": 0.445}, {"roc_auc": 0.9, "pr_auc": 0.45}, settings)[0]
