"""evaluate() on a real trained loop: its metrics, and a production comparison on clean rows only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from flywheel import steps
from flywheel.config import load_settings
from flywheel.registry import Registry
from flywheel.training.model import load_version
from tests.unit.test_evaluation import naive_recall_at_fpr


def holdout_of(loop, training_set) -> pd.DataFrame:
    return loop["storage"].read_parquet(training_set["holdout_uri"]).to_pandas()


def test_evaluate_reports_the_candidates_metrics_on_its_holdout(trained_loop):
    loop = trained_loop
    evaluation = loop["evaluation"]
    holdout = holdout_of(loop, loop["training_set"])
    registry = Registry(loop["storage"], "fraud")
    scores = load_version(registry, evaluation["model_version"]).score(holdout)
    labels = holdout["is_fraud"].to_numpy()
    metrics = evaluation["metrics"]
    assert metrics["rows"] == len(holdout) and metrics["positives"] == labels.sum()
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert metrics["pr_auc"] == pytest.approx(average_precision_score(labels, scores))
    assert metrics["recall_at_fpr"] == pytest.approx(naive_recall_at_fpr(labels, scores, 0.01))
    # The best achievable PR-AUC comes from the true probabilities of the same rows.
    truth = pd.concat(
        loop["storage"].read_parquet(uri).to_pandas()
        for uri in loop["storage"].iter_objects(f"{loop['source']}/_truth", (".parquet",))
    )
    joined = holdout.merge(truth, on="transaction_id")
    best = average_precision_score(joined["is_fraud"], joined["fraud_probability"])
    assert evaluation["truth"]["truth_pr_auc"] == pytest.approx(best)
    assert evaluation["truth"]["pr_auc_vs_truth"] == pytest.approx(metrics["pr_auc"] / best, rel=1e-6)
    assert 0.3 < evaluation["truth"]["pr_auc_vs_truth"] < 1.2
    # The first model had no production to compare with.
    assert evaluation["production_version"] is None and evaluation["comparison"] is None


@pytest.fixture(scope="module")
def wider_holdout(trained_loop):
    """holdout_fraction 0.2 -> 0.4: half of the new holdout lies inside production's training window."""
    loop = trained_loop
    settings = load_settings(env=dict(loop["env"], FLYWHEEL_DATA__HOLDOUT_FRACTION="0.4"))
    training_set = steps.features_step(loop["snapshot"], "wider", settings)
    model = steps.train_step(training_set, "wider", settings)
    evaluation = steps.evaluate_step(training_set, model, "wider", "", settings)
    return training_set, model, evaluation


def test_production_is_compared_only_on_rows_it_did_not_train_on(trained_loop, wider_holdout):
    loop = trained_loop
    training_set, model, evaluation = wider_holdout
    production = Registry(loop["storage"], "fraud").production()
    assert evaluation["production_version"] == production.version != model["version"]
    holdout = holdout_of(loop, training_set)
    production_cutoff = pd.Timestamp(loop["training_set"]["cutoff"])  # production trained on rows before it
    clean = holdout[pd.to_datetime(holdout["ts"], utc=True) >= production_cutoff]
    assert 0.3 * len(holdout) < len(clean) < 0.7 * len(holdout)  # the setting really overlaps
    comparison = evaluation["comparison"]
    assert comparison["possible"], comparison["reason"]
    assert comparison["rows"] == len(clean) and comparison["positives"] == clean["is_fraud"].sum()
    recorded = loop["storage"].read_parquet(comparison["rows_uri"]).to_pandas()
    assert sorted(recorded["transaction_id"]) == sorted(clean["transaction_id"])
    # Production's numbers are its scores on those rows only: recomputed here independently.
    registry = Registry(loop["storage"], "fraud")
    labels = clean["is_fraud"].to_numpy()
    production_scores = load_version(registry, production).score(clean)
    candidate_scores = load_version(registry, model["version"]).score(clean)
    assert comparison["production"]["pr_auc"] == pytest.approx(average_precision_score(labels, production_scores))
    assert comparison["production"]["roc_auc"] == pytest.approx(roc_auc_score(labels, production_scores))
    assert comparison["candidate"]["pr_auc"] == pytest.approx(average_precision_score(labels, candidate_scores))
    assert comparison["production"]["recall_at_fpr"] == pytest.approx(naive_recall_at_fpr(labels, production_scores, 0.01))
    assert evaluation["production_metrics"] == comparison["production"]


def test_no_clean_rows_means_no_comparison_and_the_floors_decide(trained_loop, wider_holdout):
    loop = trained_loop
    training_set, model, _ = wider_holdout
    settings = load_settings(env=dict(loop["env"], FLYWHEEL_GATE__MIN_COMPARISON_POSITIVES="100000"))
    evaluation = steps.evaluate_step(training_set, model, "too-few", "", settings)
    comparison = evaluation["comparison"]
    assert not comparison["possible"] and "at least 100000 positive cases are needed" in comparison["reason"]
    assert evaluation["production_metrics"] is None
    assert any(reason.startswith("no comparison with production") for reason in evaluation["reasons"])
    assert evaluation["blessed"] == (
        evaluation["metrics"]["roc_auc"] >= settings.gate.min_roc_auc and evaluation["metrics"]["pr_auc"] >= settings.gate.min_pr_auc
        and evaluation["metrics"]["brier_skill"] >= settings.gate.min_brier_skill
    )
    assert np.isfinite(evaluation["metrics"]["roc_auc"])


def test_the_report_has_detailed_metrics_plots_and_a_model_card(trained_loop):
    from sklearn.metrics import brier_score_loss

    loop = trained_loop
    evaluation = loop["evaluation"]
    holdout = holdout_of(loop, loop["training_set"])
    scores = load_version(Registry(loop["storage"], "fraud"), evaluation["model_version"]).score(holdout)
    labels = holdout["is_fraud"].to_numpy()
    details = evaluation["details"]
    assert details["brier"] == pytest.approx(brier_score_loss(labels, scores), rel=1e-6)
    assert details["recall_at_fpr_0.05"] == pytest.approx(naive_recall_at_fpr(labels, scores, 0.05))
    assert {r["value"] for r in details["segments"]["channel"]} == set(holdout["channel"].astype(str))
    assert sum(r["rows"] for r in details["segments"]["merchant_category"]) == len(holdout)
    page = loop["storage"].read_bytes(evaluation["html_uri"]).decode()
    assert page.count("data:image/png;base64,") == 4 and "Model card" in page and evaluation["model_version"] in page
    assert loop["storage"].read_bytes(evaluation["html_uri"].replace("report.html", "roc.png")).startswith(b"\x89PNG")


def test_a_candidate_trained_on_shuffled_labels_is_not_blessed_and_production_is_unchanged(trained_loop, tmp_path):
    """The gate's job: a model that learned nothing must not reach production, whatever else happens."""
    from flywheel.errors import GateRefused
    from tests.factories import FRAUD_LABEL as LABEL

    loop = trained_loop
    storage, settings = loop["storage"], loop["settings"]
    registry = Registry(storage, "fraud")
    production_before, events_before = registry.production().version, len(registry.events())
    original = loop["training_set"]
    train = storage.read_parquet(original["train_uri"]).to_pandas()
    train[LABEL] = np.random.default_rng(0).permutation(train[LABEL].to_numpy())
    folder = storage.uri("datasets", "training", "shuffled-labels")
    ref = storage.write_parquet(f"{folder}/train.parquet", train)
    holdout_sha = original["files"][original["holdout_uri"]]
    shuffled = dict(original, uri=folder, train_uri=ref.uri, sha256=ref.sha256 + holdout_sha,
                    files={ref.uri: ref.sha256, original["holdout_uri"]: holdout_sha})
    storage.write_json(f"{folder}/manifest.json", shuffled)
    model = steps.train_step(shuffled, "shuffled", settings)
    evaluation = steps.evaluate_step(shuffled, model, "shuffled", "", settings)
    assert not evaluation["blessed"], evaluation["reasons"]
    # Why: it learned nothing from the labels, so its probabilities have no skill over always
    # predicting the fraud rate. Its ranking need not show it: fraud in this data is anomalous, and
    # a net fit to noise extrapolates to the tails with a random sign (seeds 0-5 here: ROC-AUC 0.28 to
    # 0.87, PR-AUC 0.01 to 0.28; this one measured 0.885 / 0.297), so the ranking floors alone can
    # bless it. The Brier skill floor refuses it on its own holdout, production or not.
    metrics = evaluation["metrics"]
    assert metrics["brier_skill"] < settings.gate.min_brier_skill <= loop["evaluation"]["metrics"]["brier_skill"]
    assert any(reason.startswith("Brier skill score") for reason in evaluation["reasons"]), evaluation["reasons"]
    labels = storage.read_parquet(original["holdout_uri"]).to_pandas()[LABEL].to_numpy().astype(float)
    scores = load_version(registry, model["version"]).score(storage.read_parquet(original["holdout_uri"]).to_pandas())
    rate = labels.mean()  # the oracle, written out: 1 - Brier / Brier of the constant base-rate forecast
    assert metrics["brier_skill"] == pytest.approx(1 - np.mean((scores - labels) ** 2) / (rate * (1 - rate)))
    without_production = load_settings(env=dict(loop["env"], FLYWHEEL_GATE__MIN_COMPARISON_POSITIVES="100000"))
    alone = steps.evaluate_step(shuffled, model, "shuffled-alone", "", without_production)
    assert not alone["comparison"]["possible"] and not alone["blessed"], alone["reasons"]
    with pytest.raises(GateRefused, match="was not blessed"):
        steps.deploy_step(model, evaluation, "shuffled", settings)
    assert registry.production().version == production_before
    new_events = registry.events()[events_before:]
    assert [e.action for e in new_events] == ["publish"] and new_events[0].version == model["version"]
