"""The features step checks its point-in-time join against the merge_asof oracle on every build.

Feast's file (dask) offline store loses the values of entity rows that share a key and a time
(found by tests/unit/test_point_in_time.py): here, transactions of one merchant at one instant. With
that store the step must stop, naming the mismatch, and publish no training set; with the default
store the same lake builds one.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel import steps
from flywheel.config import load_settings
from flywheel.errors import FeatureStoreError
from flywheel.storage import Storage
from tests import factories


def test_a_join_that_disagrees_with_the_oracle_stops_the_step_and_publishes_nothing(tmp_path: Path):
    """Bug caught: a features step that publishes whatever the offline store returns."""
    tx = factories.make_transactions(400, seed=3, start="2026-05-01", days=2, cards=20, merchants=4, in_time_order=True)
    for i in range(10, 400, 10):  # every tenth transaction: at the merchant and the instant of the one before
        tx.loc[i, ["merchant_id", "ts"]] = tx.loc[i - 1, ["merchant_id", "ts"]].to_numpy()
    (tmp_path / "raw").mkdir()
    pq.write_table(pa.Table.from_pandas(tx, preserve_index=False), tmp_path / "raw" / "tx.parquet")
    env = {"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_FEATURES__ORACLE_SAMPLE_ROWS": "400"}
    settings = load_settings(env={**env, "FLYWHEEL_FEATURES__OFFLINE_STORE": "file"})
    storage = Storage.from_settings(settings)
    snapshot = steps.validate_step(steps.ingest_step(str(tmp_path / "raw"), "run-1", settings), "run-1", settings)

    with pytest.raises(FeatureStoreError, match=r"disagrees with the merge_asof oracle on \d+ value\(s\) of 400 sampled"):
        steps.features_step(snapshot, "run-1", settings)
    training_sets = Path(storage.uri("datasets", "training"))
    assert not list(training_sets.glob("*/manifest.json")), "a training set that failed its check was published"

    built = steps.features_step(snapshot, "run-2", load_settings(env=env))  # the default store
    assert built["rows"] == 400 and Path(built["uri"], "manifest.json").is_file()
