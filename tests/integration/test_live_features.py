"""Real-time features: one definition, two paths, proven equal on a replay in time order.

A use case's lake is built and its offline point-in-time training set made (the features step: the
engine's tables, Feast's point-in-time join). Then its last day is replayed as the events it was, in
time order, through the live path (:class:`flywheel.features.live.LiveFeatures` writing the world's
online store), starting from the state just before that day: each row's features are read as
serving reads them (:class:`OnlineReader`), just before the events of its own time are applied. What
serving read must equal what the training set holds for that row, feature by feature, and so must
the model inputs computed from them, for fraud (labels known three days later, a merchant's fraud
rate) and for flights (labels at landing, an aircraft's previous leg, hourly weather as a source).

Bugs caught: a live path that reads the state of the last run (the issue's 0.16 PR-AUC); an event
that feeds its own row's features; a label counted before it is known; a source row joined before
it is known; windows that differ from the offline engine's; an event applied twice.
"""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd
import pytest

from flywheel import steps
from flywheel.config import load_settings
from flywheel.demo import demo_dataset
from flywheel.features.build import TrainingSet
from flywheel.features.incremental import source_rows
from flywheel.features.live import Events, LiveFeatures, replay
from flywheel.features.online_write import OnlineWriter
from flywheel.features.store import feast_project, open_online_reader, world_dir
from flywheel.features.transform import FeatureSpec
from flywheel.features.views import views_of
from flywheel.lake import LakeSnapshot, read_snapshot
from flywheel.storage import Storage
from flywheel.usecase import load_usecase
from serving.requests import RequestSchema
from tests.factories import REPO, generate, request_of

US = pd.Timedelta(microseconds=1)


def built(home, usecase_folder, write_source) -> dict:
    """A use case's lake and features (no model): settings, use case, lake rows, sources, training set."""
    settings = load_settings(env={"FLYWHEEL_HOME": str(home), "FLYWHEEL_USECASE": str(usecase_folder)})
    storage = Storage.from_settings(settings)
    usecase = load_usecase(settings.usecase)
    source, lake = write_source(storage, usecase, settings)
    staged = steps.ingest_step(source, "live-1", settings, lake)
    published = steps.validate_step(staged, "live-1", settings)
    training_set = TrainingSet.from_dict(steps.features_step(published, "live-1", settings))
    snapshot = LakeSnapshot.from_dict(published)
    rows = read_snapshot(storage, snapshot, usecase.contract.arrow_schema()).to_pandas()
    offline = pd.concat([storage.read_parquet(uri).to_pandas() for uri in (training_set.train_uri, training_set.holdout_uri)],
                        ignore_index=True)
    return {"settings": settings, "usecase": usecase, "rows": rows, "sources": source_rows(storage, snapshot, usecase),
            "training_set": training_set, "offline": offline}


@pytest.fixture(scope="module")
def flights(tmp_path_factory):
    def write(storage, usecase, settings):
        source, lake, _ = demo_dataset(storage, usecase, 6000, settings.data)
        return source, lake

    return built(tmp_path_factory.mktemp("live-flights"), REPO / "usecases" / "flights", write)


@pytest.fixture(scope="module")
def fraud(tmp_path_factory):
    def write(storage, usecase, settings):
        source = storage.uri("raw", "live")
        generate(storage, source, rows=12_000, days=8, seed=5)
        return source, ""

    return built(tmp_path_factory.mktemp("live-fraud"), REPO / "usecases" / "fraud", write)


def empty_online_store(settings, world: str, views) -> None:
    """The world's online tables emptied: the live path must bring them to the day's start itself."""
    with sqlite3.connect(world_dir(settings, world) / "online.db") as connection:
        for view in views:
            connection.execute(f'DELETE FROM "{feast_project(settings, world)}_{view.name}"')


def live_from(loop: dict, start: pd.Timestamp) -> tuple[LiveFeatures, object]:
    """The live state of ``loop``'s world as it was just before ``start``: buffered from the lake's
    earlier rows and written to the emptied online store."""
    settings, usecase, world = loop["settings"], loop["usecase"], loop["training_set"].world
    views = views_of(usecase)
    empty_online_store(settings, world, views)
    live = LiveFeatures(usecase.contract, views, OnlineWriter(settings, world, views))
    rows = loop["rows"]
    earlier = {name: frame[known(frame, usecase.contract.sources[name]) < start] for name, frame in loop["sources"].items()}
    live.seed(rows[rows[usecase.contract.timestamp] < start], earlier, until=start - US)
    live.rebuild()
    return live, open_online_reader(settings, world, views)


def known(frame: pd.DataFrame, declared) -> pd.Series:
    return frame[declared.timestamp] + pd.Timedelta(declared.delay)


def replay_last_day(loop: dict) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(the day's rows, the features serving read for them, the training set's rows for them)."""
    contract = loop["usecase"].contract
    rows = loop["rows"].sort_values(contract.timestamp, kind="stable").reset_index(drop=True)
    start = rows[contract.timestamp].iloc[int(len(rows) * 0.94)].floor("h")  # about half the last day
    live, reader = live_from(loop, start)
    day = rows[rows[contract.timestamp] >= start].reset_index(drop=True)
    later = {name: frame[known(frame, contract.sources[name]) >= start] for name, frame in loop["sources"].items()}
    served = replay(live, reader.read, day, later, join_keys=reader.join_keys)
    offline = loop["offline"].set_index(contract.id)
    return day, served, offline


def assert_live_equals_offline(loop: dict, min_rows: int) -> None:
    usecase = loop["usecase"]
    contract = usecase.contract
    day, served, offline = replay_last_day(loop)
    features = [name for view in views_of(usecase) for name in view.features]
    trained = day[day[contract.id].isin(offline.index)].index.to_numpy()  # rows the training set holds
    assert len(trained) >= min_rows, len(trained)
    truth = offline.loc[day.loc[trained, contract.id]]
    mismatched = {}
    for name in features:
        got = served[name].to_numpy(dtype="float64")[trained]
        want = truth[name].to_numpy(dtype="float64")
        same = np.isclose(got, want, rtol=1e-9, atol=1e-9) | (np.isnan(got) & np.isnan(want))
        if not same.all():
            first = int(np.flatnonzero(~same)[0])
            mismatched[name] = (int((~same).sum()), day.loc[trained[first], contract.id], got[first], want[first])
    assert not mismatched, f"served != offline (count, first id, served, offline): {mismatched}"
    assert (truth[features].notna().mean() > 0.3).sum() >= len(features) // 2, "the day exercises too few features"
    # The model inputs: serving's transform of the request and what it read, against training's.
    spec = FeatureSpec.fit(offline.reset_index(), usecase)
    schema = RequestSchema(contract)
    parsed = schema.v1(request_of(day.loc[trained], schema), len(trained))
    looked_up = {name: served[name].to_numpy()[trained] for name in features}
    serving_inputs = spec.transform_columns({**parsed.columns, **looked_up})
    training_inputs = spec.transform(truth.reset_index())
    np.testing.assert_allclose(serving_inputs, training_inputs, rtol=1e-6, atol=1e-6)


def test_flights_replayed_live_reads_what_the_training_set_holds(flights):
    assert_live_equals_offline(flights, min_rows=200)


def test_fraud_replayed_live_reads_what_the_training_set_holds(fraud):
    assert_live_equals_offline(fraud, min_rows=400)
