"""Batch scoring: `flywheel score` runs the scoring DAG under kfp.local on the small trained loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
import yaml

from flywheel.registry import Registry
from flywheel.training.model import load_version

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"


def flywheel(*args: str, env: dict[str, str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    return subprocess.run([sys.executable, "-m", "flywheel.cli", *args], env={**clean, "PYTHONPATH": str(REPO), **env},
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def scored(trained_loop, tmp_path_factory):
    """The last two days of the holdout scored in chunks of one day, into a folder of the test's."""
    loop = trained_loop
    holdout = pd.read_parquet(loop["storage"].local_copy(loop["training_set"]["holdout_uri"], tmp_path_factory.mktemp("h")))
    days = sorted(holdout["ts"].dt.strftime("%Y-%m-%d").unique())[-2:]
    out = tmp_path_factory.mktemp("scores") / "out"
    result = flywheel("score", "--start", days[0], "--end", days[1], "--chunk-days", "1", "--out", str(out),
                      env=loop["env"], cwd=loop["home"])
    return loop, holdout, days, out, result


def test_scoring_writes_a_partition_per_day_and_a_summary(scored):
    loop, _, days, out, result = scored
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.glob("date=*")) == [f"date={d}" for d in days]
    summary = json.loads((out / "summary.json").read_text())
    # The lake's rows of those days, counted straight from its parquet files.
    lake = ds.dataset(str(Path(loop["storage"].uri("lake")) / "transactions"), format="parquet", partitioning="hive")
    lake_rows = lake.to_table(columns=["transaction_id", "ts"]).to_pandas()
    in_range = lake_rows[lake_rows["ts"].dt.strftime("%Y-%m-%d").isin(days)]
    scores = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("date=*/scores.parquet"))], ignore_index=True)
    assert summary["rows"] == len(scores) == len(in_range) > 0
    assert set(scores["transaction_id"]) == set(in_range["transaction_id"])
    production = Registry(loop["storage"], "fraud").production()
    assert summary["model_version"] == production.version and set(scores["model_version"]) == {production.version}
    assert summary["chunks"] == 2 and summary["days"] == 2
    assert summary["flagged"] == int((scores["fraud_probability"] >= summary["alert_threshold"]).sum())
    assert f"scored {len(scores):,} rows" in result.stdout and f"{summary['flagged']:,} at or above" in result.stdout
    # A binary task: the contract's id, timestamp and join keys, the task's output, the version; the
    # summary's means per output column, the probability's mean under its old name too.
    assert list(scores.columns) == ["transaction_id", "ts", "card_id", "merchant_id", "fraud_probability", "model_version"]
    assert (summary["task"], summary["output"]) == ("binary", "fraud_probability")
    assert summary["means"] == {"fraud_probability": pytest.approx(scores["fraud_probability"].mean())}
    assert summary["mean_probability"] == pytest.approx(scores["fraud_probability"].mean())


def test_batch_scores_equal_the_models_scores_on_the_training_time_features(scored):
    """Train/score consistency: the chunk recomputes each transaction's features from the lake; they
    must be the ones the training set's point-in-time join gave the same transaction, so the model's
    score on the holdout rows (features from training time) is the batch score."""
    loop, holdout, days, out, _ = scored
    model = load_version(Registry(loop["storage"], "fraud"), Registry(loop["storage"], "fraud").production())
    rows = holdout[holdout["ts"].dt.strftime("%Y-%m-%d").isin(days)]
    expected = pd.Series(model.score(rows), index=rows["transaction_id"].to_numpy())
    scores = pd.concat([pd.read_parquet(p) for p in out.glob("date=*/scores.parquet")]).set_index("transaction_id")
    common = expected.index.intersection(scores.index)
    assert len(common) == len(rows) > 100
    np.testing.assert_allclose(scores.loc[common, "fraud_probability"].to_numpy(), expected.loc[common].to_numpy(), rtol=1e-5, atol=1e-7)


def test_every_partition_has_lineage_back_to_the_lake_and_the_model(scored):
    from flywheel import lineage

    loop, _, _, out, _ = scored
    storage = loop["storage"]
    production = Registry(storage, "fraud").production()
    for path in sorted(out.glob("date=*/scores.parquet")):
        tree = lineage.trace(storage, str(path))
        inputs = {leaf["uri"] for leaf in lineage.leaves(tree)} | {i["uri"] for i in tree.get("inputs", [])}
        assert production.manifest_uri in inputs
        assert any("/lake/transactions/date=" in uri for uri in inputs)


@pytest.mark.parametrize("args, problem", [
    (["--start", "2026-10-10", "--end", "2026-10-01"], "is after end_date"),
    (["--start", "2026-13-01", "--end", "2026-10-01"], "must be a date YYYY-MM-DD"),
    (["--start", "2030-01-01", "--end", "2030-01-02"], "has no rows from 2030-01-01 to 2030-01-02"),
])
def test_a_bad_range_is_one_clear_error(trained_loop, args, problem):
    result = flywheel("score", *args, env=trained_loop["env"], cwd=trained_loop["home"])
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert problem in result.stderr, result.stderr


def test_scoring_without_a_production_model_says_to_train_first(tmp_path):
    result = flywheel("score", "--start", "2026-10-01", "--end", "2026-10-02", env={"FLYWHEEL_HOME": str(tmp_path)}, cwd=tmp_path)
    assert result.returncode != 0 and "no production version" in result.stderr and "Traceback" not in result.stderr


def test_compiled_scoring_pipeline_matches_the_golden_file(tmp_path):
    """Catches accidental interface and cache-key changes. After an intended change, refresh with:
    .venv/bin/flywheel compile --out tests/pipeline/golden"""
    result = flywheel("compile", "--out", str(tmp_path), env={"FLYWHEEL_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    compiled = list(yaml.safe_load_all((tmp_path / "flywheel-scoring.yaml").read_text()))
    golden = list(yaml.safe_load_all((GOLDEN / "flywheel-scoring.yaml").read_text()))
    for spec in (compiled[0], golden[0]):
        spec.pop("sdkVersion", None)
    assert compiled == golden
    spec = compiled[0]
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {"start_date", "end_date", "out_uri", "run_id", "chunk_days", "lake_uri"}
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"plan-scoring", "for-loop-1", "summarize"}
    assert tasks["for-loop-1"]["iteratorPolicy"] == {"parallelismLimit": 4}  # settings scoring.max_parallel_chunks
    # The summary gathers every chunk's result (fan-in after the fan-out).
    assert tasks["summarize"]["inputs"]["parameters"]["results"]["taskOutputParameter"]["producerTask"] == "for-loop-1"
    assert tasks["plan-scoring"]["cachingOptions"] == {} and tasks["summarize"]["cachingOptions"] == {}
