"""Batch scoring follows the use case: the scores' columns come from its contract and its model's task,
and the summary says what the task's answers mean (flagged rows only where there is a probability to
flag). The chunks' scoring itself runs end to end in tests/pipeline/test_scoring_pipeline.py (fraud)
and tests/integration/test_flights.py (flights)."""

from __future__ import annotations

import pytest

from flywheel.config import load_settings
from flywheel.errors import UseCaseError
from flywheel.scoring import describe, score_columns, summarize
from flywheel.storage import Storage
from flywheel.task import Task
from flywheel.usecase import load_usecase
from tests.factories import FRAUD, REPO

FLIGHTS = load_usecase(REPO / "usecases" / "flights")


def multiclass(output: str = "risk") -> Task:
    return Task(kind="multiclass", label="level", output=output, loss="cross_entropy", early_stopping="log_loss",
                classes=("low", "mid", "high"))


def test_the_scores_columns_are_the_contracts_keys_and_the_tasks_output():
    """Bug caught: fraud's columns written for every use case (a flights row scored without its
    flight id, or with a fraud_probability column)."""
    assert score_columns(FRAUD.contract, FRAUD.task) == (["transaction_id", "ts", "card_id", "merchant_id"], ["fraud_probability"])
    assert score_columns(FLIGHTS.contract, FLIGHTS.task) == (
        ["flight_id", "scheduled_departure", "tailnum", "origin", "dest", "carrier", "route"], ["arr_delay_minutes"])
    assert score_columns(FRAUD.contract, multiclass())[1] == ["risk_low", "risk_mid", "risk_high"]


@pytest.mark.parametrize("output", ["card_id", "model_version"])
def test_an_output_named_like_a_key_is_a_clear_error(output):
    """Bug caught: the answer silently overwriting the join key (or the version) it is written beside."""
    task = FRAUD.task.model_copy(update={"output": output})
    with pytest.raises(UseCaseError, match=f"names the scores' column\\(s\\) {output}.*choose another output name"):
        score_columns(FRAUD.contract, task)


def chunk(start: str, rows: int, task: str | None, output: str | None, sums: dict, flagged=None, predicted=None) -> dict:
    files = {f"/scores/date={start}/scores.parquet": "0" * 64} if rows else {}
    return {"start": start, "end": start, "rows": float(rows), "files": files, "model_version": "v1", "task": task,
            "output": output, "sums": sums, "flagged": flagged, "predicted": predicted or {}}


def summary_of(tmp_path, results: list[dict]) -> dict:
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path)})
    storage = Storage.from_settings(settings)
    plan = {"start": results[0]["start"], "end": results[-1]["end"], "model_version": "v1", "snapshot_sha256": "s",
            "out_uri": str(tmp_path / "out"), "chunks": [{"start": r["start"], "end": r["end"]} for r in results]}
    summary = summarize(storage, settings, plan, results, "run-1")
    assert storage.read_json(summary["uri"]) == {k: v for k, v in summary.items() if k != "uri"}
    return summary


def test_a_binary_summary_counts_flagged_rows_and_the_mean_probability(tmp_path):
    summary = summary_of(tmp_path, [
        chunk("2026-11-01", 4, "binary", "p", {"p": 1.0}, flagged=1),
        chunk("2026-11-02", 0, None, None, {}),  # a day without rows: nothing scored, no task
        chunk("2026-11-03", 6, "binary", "p", {"p": 2.0}, flagged=2),
    ])
    assert (summary["rows"], summary["days"], summary["chunks"]) == (10, 2, 3)
    assert (summary["task"], summary["output"], summary["flagged"], summary["alert_threshold"]) == ("binary", "p", 3, 0.5)
    assert summary["means"] == {"p": pytest.approx(0.3)} and summary["mean_probability"] == pytest.approx(0.3)
    assert describe(summary) == "scored 10 rows over 2 day(s) in 3 chunk(s) with model v1: 3 at or above 0.5"


def test_a_regression_summary_has_the_mean_answer_and_nothing_to_flag(tmp_path):
    """Bug caught: minutes of delay counted as "flagged" against a probability threshold."""
    summary = summary_of(tmp_path, [chunk("2026-11-01", 4, "regression", "delay", {"delay": 30.0}),
                                    chunk("2026-11-02", 1, "regression", "delay", {"delay": -5.0})])
    assert summary["means"] == {"delay": pytest.approx(5.0)}
    assert not {"flagged", "alert_threshold", "mean_probability", "predicted"} & set(summary)
    assert describe(summary).endswith("with model v1: mean delay 5")


def test_a_multiclass_summary_has_each_class_mean_and_the_rows_per_likeliest_class(tmp_path):
    columns = ["risk_low", "risk_mid", "risk_high"]
    summary = summary_of(tmp_path, [
        chunk("2026-11-01", 2, "multiclass", "risk", dict(zip(columns, [1.2, 0.6, 0.2])), predicted={"low": 1, "mid": 1, "high": 0}),
        chunk("2026-11-02", 2, "multiclass", "risk", dict(zip(columns, [0.2, 0.4, 1.4])), predicted={"low": 0, "mid": 0, "high": 2}),
    ])
    assert summary["means"] == {name: pytest.approx(value) for name, value in zip(columns, [0.35, 0.25, 0.4])}
    assert summary["predicted"] == {"low": 1, "mid": 1, "high": 2} and "flagged" not in summary
    assert describe(summary).endswith("most likely risk: low 1, mid 1, high 2")


def test_chunks_scored_for_different_tasks_are_refused(tmp_path):
    from flywheel.errors import DataError

    with pytest.raises(DataError, match="scored for different tasks"):
        summary_of(tmp_path, [chunk("2026-11-01", 1, "binary", "p", {"p": 0.5}, flagged=1),
                              chunk("2026-11-02", 1, "regression", "delay", {"delay": 3.0})])
