"""Production stays fresh whatever the gate decides: a batch published after production's model was
trained reaches production's live world (no new model needed), and a world is never updated by
aggregation code other than the one that built it.

A small loop of its own (generated transactions, ingest, validate, features, train; the version
promoted directly: the gate is not what is tested here).
"""

from __future__ import annotations

import dataclasses
import logging

import pandas as pd
import pytest

from flywheel import steps
from flywheel.config import load_settings
from flywheel.deploy.live import LiveWorlds, bring_live
from flywheel.features.engine import entity_table
from flywheel.lake import latest_snapshot, read_snapshot
from flywheel.registry import Registry
from flywheel.storage import Storage
from tests.factories import FRAUD_CONTRACT, FRAUD_VIEWS, generate
from tests.integration.test_live_delivery import online_row


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    home = tmp_path_factory.mktemp("live-fresh")
    settings = load_settings(env={"FLYWHEEL_HOME": str(home), "FLYWHEEL_TRAINING__EPOCHS": "1"})
    storage = Storage.from_settings(settings)
    source = storage.uri("raw", "batch-1")
    generate(storage, source, rows=6_000, days=6, seed=21)
    snapshot = steps.validate_step(steps.ingest_step(source, "fresh-1", settings), "fresh-1", settings)
    training_set = steps.features_step(snapshot, "fresh-1", settings)
    model = steps.train_step(training_set, "fresh-1", settings)
    registry = Registry(storage, settings.model_name)
    registry.promote(model["version"], run_id="fresh-1", reason="the test's production")
    return {"home": home, "settings": settings, "storage": storage, "snapshot": snapshot, "registry": registry}


def test_a_batch_published_after_training_reaches_productions_live_world(small, tmp_path):
    settings, storage, registry = small["settings"], small["storage"], small["registry"]
    worlds = LiveWorlds(settings, refresh_s=0.0)
    [(world, live)] = worlds().items()
    lake = small["snapshot"]["lake_uri"]
    before = read_snapshot(storage, latest_snapshot(storage, lake), FRAUD_CONTRACT.arrow_schema()).to_pandas()
    # A new batch: the lake's last day again, a day later, as new transactions; ingested and
    # validated (published) by the pipeline's own steps.
    end = before["ts"].max()
    new = before[before["ts"] > end - pd.Timedelta(days=1)].copy()
    new["transaction_id"] = "fresh-" + new["transaction_id"]
    new["ts"] = new["ts"] + pd.Timedelta(days=1)
    card = new["card_id"].value_counts().index[0]
    folder = tmp_path / "batch-2"
    folder.mkdir()
    new.to_parquet(folder / "part.parquet", index=False)
    steps.validate_step(steps.ingest_step(str(folder), "fresh-2", settings, lake), "fresh-2", settings)
    assert registry.production().version == registry.versions()[-1]  # no new model: production unchanged
    [(again, live_again)] = worlds().items()
    assert again == world and live_again is not live  # brought live again from the new snapshot
    # The card's row at the world's watermark (the lake's latest time), not later (its expiries to come).
    everything = pd.concat([before, new], ignore_index=True)
    expected = entity_table(everything.query("card_id == @card"), FRAUD_CONTRACT, "card", list(FRAUD_VIEWS[0].aggregations),
                            until=everything["ts"].max() + pd.Timedelta(microseconds=1)).iloc[-1]
    found = online_row(settings, world, "card_features", "card_id", card)
    assert found["card_txn_count_24h"] == expected["card_txn_count_24h"] >= 2
    for name in FRAUD_VIEWS[0].features:
        assert found[name] == pytest.approx(float(expected[name]), rel=1e-12, nan_ok=True), name


def test_a_world_built_by_other_aggregation_code_is_not_updated_live(small, caplog):
    production = small["registry"].production()
    other = dataclasses.replace(production, meta={**production.meta, "engine_code": "0" * 64})
    with caplog.at_level(logging.ERROR):
        assert bring_live(small["settings"], small["storage"], other) is None
    assert "trained with other aggregation code" in caplog.text
