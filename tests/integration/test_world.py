"""One world, consistent (issue 5, defect 5) and tampered inputs refused (defect 1), at the step level.

Two generated datasets, each in its own lake, share one home: one model registry and one features
folder. The production model must always read the online features it was trained with, whatever
run came after it; a rerun on the same data must reuse everything; one changed input byte must
build everything anew; one changed byte of a published artifact must stop the step.

The oracles are read straight from the offline tables with pandas (the latest row of each card and
merchant), never through Feast.
"""

from __future__ import annotations

import asyncio

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pandas.testing import assert_frame_equal

from flywheel import steps
from flywheel.config import Settings, load_settings
from tests.factories import generate
from flywheel.errors import IntegrityError
from tests.fraud_tables import CARD_FEATURES, MERCHANT_FEATURES
from flywheel.registry import Registry
from flywheel.storage import Storage
from tests.factories import FRAUD_VIEWS

DAYS = 14
A_ROWS, A_SEED = 30_000, 11
B_ROWS, B_SEED = 8_000, 22
TAMPER_ROWS, TAMPER_SEED = 5_000, 31
# A goes through the real gate at its default floors (the small loop's data: with 3 epochs ROC-AUC
# about 0.91, PR-AUC about 0.37). B is refused on purpose: an unreachable ROC-AUC floor.
REFUSING_GATE = {"FLYWHEEL_GATE__MIN_ROC_AUC": "0.999"}


def world_env(home: Path, **extra: str) -> dict[str, str]:
    """Settings for small data: three epochs, every other value (gate floors included) the default."""
    return {"FLYWHEEL_HOME": str(home), "FLYWHEEL_TRAINING__EPOCHS": "3", **extra}


def features_from_raw(settings: Settings, source: str, run_id: str, lake_uri: str) -> tuple[dict, dict]:
    """ingest -> validate -> features; returns (the snapshot features read, the training set).

    The one place that knows which snapshot the features step gets from the steps before it.
    """
    staged = steps.ingest_step(source, run_id, settings, lake_uri=lake_uri)
    snapshot = steps.validate_step(staged, run_id, settings)  # the published snapshot
    return snapshot, steps.features_step(snapshot, run_id, settings)


def train_and_gate(settings: Settings, source: str, training_set: dict, run_id: str) -> tuple[dict, dict]:
    model = steps.train_step(training_set, run_id, settings)
    return model, steps.evaluate_step(training_set, model, run_id, f"{source}/_truth", settings)


def step_record(storage: Storage, run_id: str, step: str) -> dict[str, Any]:
    return steps.read_step_records(storage, run_id)[step]


def worlds_on_disk(settings: Settings) -> set[str]:
    folder = Path(settings.features.dir) / settings.namespace / "worlds"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def latest_rows(storage: Storage, table_uri: str, key: str) -> pd.DataFrame:
    """The latest row of each entity in an offline table (what a materialized online store must
    hold), for the entities whose latest time is not shared by two rows (no tie for Feast to break)."""
    table = storage.read_parquet(table_uri).to_pandas().sort_values([key, "event_timestamp"], kind="stable")
    last = table.groupby(key).tail(1).set_index(key)
    ties = table.merge(last[["event_timestamp"]].reset_index(), on=[key, "event_timestamp"]).groupby(key).size()
    return last.loc[ties[ties == 1].index]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Dataset A through the whole loop (promoted), then dataset B, another seed and size in another
    lake of the same home, through features, training and a gate that refuses it."""
    home = tmp_path_factory.mktemp("worlds")
    settings = load_settings(env=world_env(home))
    storage = Storage.from_settings(settings)
    out: dict[str, Any] = {"home": home, "settings": settings, "storage": storage}
    for name, rows, seed in (("a", A_ROWS, A_SEED), ("b", B_ROWS, B_SEED)):
        source = storage.uri("raw", name)
        generate(storage, source, rows=rows, days=DAYS, seed=seed)
        run_settings = settings if name == "a" else load_settings(env=world_env(home, **REFUSING_GATE))
        run_id = f"run-{name}"
        snapshot, training_set = features_from_raw(run_settings, source, run_id, storage.uri("lakes", name))
        model, evaluation = train_and_gate(run_settings, source, training_set, run_id)
        if name == "a":
            assert evaluation["blessed"], evaluation["reasons"]
            steps.deploy_step(model, evaluation, run_id, run_settings)
        else:
            assert not evaluation["blessed"], "B must be refused by the gate for this test to mean anything"
        features = step_record(storage, run_id, "features")["artifacts"]
        out[name] = {
            "source": source, "lake": storage.uri("lakes", name), "run_id": run_id, "snapshot": snapshot,
            "training_set": training_set, "model": model, "evaluation": evaluation,
            "cards": latest_rows(storage, features["card_features"], "card_id"),
            "merchants": latest_rows(storage, features["merchant_features"], "merchant_id"),
        }
    return out


def entities_that_differ(a: pd.DataFrame, b: pd.DataFrame, columns: list[str], count: int = 5) -> list[str]:
    """Ids present in both datasets whose latest values differ in each of ``columns``."""
    common = a.index.intersection(b.index).sort_values()
    differ = [i for i in common if all(a.at[i, c] != b.at[i, c] for c in columns)]
    assert len(differ) >= 3, f"only {len(differ)} shared ids differ between A and B: the test could not tell the worlds apart"
    return differ[:count]


def request_for(cards: list[str], merchants: list[str]) -> dict[str, Any]:
    return {
        "instances": [
            {
                "transaction_id": f"req-{i}", "card_id": card, "merchant_id": merchant, "merchant_category": "retail",
                "amount": 42.0 + i, "ts": "2026-10-11T12:00:00+00:00", "channel": "chip", "lat": 40.0, "lon": -80.0,
            }
            for i, (card, merchant) in enumerate(zip(cards, merchants))
        ]
    }


def served(settings: Settings, cards: list[str], merchants: list[str]) -> tuple[Any, pd.DataFrame, list[float]]:
    """A predictor loaded in-process from the registry: (it, its online features, its scores)."""
    from flywheel.features.store import online_features, open_served_store
    from serving.predictor import Predictor

    predictor = Predictor("fraud", settings)
    assert predictor.load() and predictor.ready
    rows = [{"card_id": c, "merchant_id": m} for c, m in zip(cards, merchants)]
    features = pd.DataFrame(online_features(open_served_store(settings, predictor.bundle.world), rows, FRAUD_VIEWS))
    predictions = asyncio.run(predictor.predict(request_for(cards, merchants)))["predictions"]
    assert {p["model_version"] for p in predictions} == {predictor.version}
    return predictor, features, [p["fraud_probability"] for p in predictions]


def expected(world: dict[str, Any], cards: list[str], merchants: list[str]) -> pd.DataFrame:
    """The online features a world must serve: its offline tables' latest rows, read with pandas."""
    card_part = world["cards"].loc[cards, list(CARD_FEATURES)].reset_index(drop=True)
    merchant_part = world["merchants"].loc[merchants, list(MERCHANT_FEATURES)].reset_index(drop=True)
    return pd.concat([card_part, merchant_part], axis=1).astype("float64")


def scores_with(storage: Storage, settings: Settings, version: str, features: pd.DataFrame, cards, merchants) -> list[float]:
    """The model version's scores of the request joined with the given features (no Feast, no predictor)."""
    from flywheel.training.model import load_version

    model = load_version(Registry(storage, settings.model_name), version)
    frame = pd.DataFrame(request_for(cards, merchants)["instances"]).assign(ts=lambda f: pd.to_datetime(f["ts"], utc=True))
    return [float(p) for p in model.score(pd.concat([frame, features], axis=1))]


def test_refused_run_leaves_production_reading_its_own_world_and_promotion_moves_model_and_features_together(worlds):
    """Bug caught: one shared online store, where B's materialization overwrote the features the
    production model A reads (A's model served on B's cards); or serving opening the newest world
    instead of the production model's; or a promotion that moves the model but not its features.
    Also: the online store missing a table's latest rows (a materialization window that stops
    before the merchants' day-end rows), which leaves serving on stale features."""
    settings, storage, a, b = worlds["settings"], worlds["storage"], worlds["a"], worlds["b"]
    registry = Registry(storage, settings.model_name)
    assert a["training_set"]["key"] != b["training_set"]["key"]
    assert {a["model"]["meta"]["feature_world"], b["model"]["meta"]["feature_world"]} <= worlds_on_disk(settings)
    cards = entities_that_differ(a["cards"], b["cards"], ["card_amount_mean_30d", "card_last_txn_unix"])
    merchants = entities_that_differ(a["merchants"], b["merchants"], ["merchant_amount_mean_30d"])[: len(cards)]
    cards = cards[: len(merchants)]
    want_a, want_b = expected(a, cards, merchants), expected(b, cards, merchants)

    # B was refused: production is still A, on A's world, with A's values for cards B also has.
    assert registry.production().version == a["model"]["version"]
    predictor, online, scores = served(settings, cards, merchants)
    assert predictor.version == a["model"]["version"]
    assert predictor.bundle.world == a["model"]["meta"]["feature_world"]
    assert_frame_equal(online[want_a.columns].astype("float64"), want_a, rtol=1e-9)
    assert scores == pytest.approx(scores_with(storage, settings, a["model"]["version"], want_a, cards, merchants), abs=1e-6)

    # Promote B by hand: the next predictor reads B's model AND B's world, with B's values.
    registry.promote(b["model"]["version"], run_id="manual-promote-b", reason="test: the world follows the model")
    try:
        predictor, online, scores = served(settings, cards, merchants)
        assert predictor.version == b["model"]["version"]
        assert predictor.bundle.world == b["model"]["meta"]["feature_world"] != a["model"]["meta"]["feature_world"]
        assert_frame_equal(online[want_b.columns].astype("float64"), want_b, rtol=1e-9)
        assert scores == pytest.approx(scores_with(storage, settings, b["model"]["version"], want_b, cards, merchants), abs=1e-6)
    finally:
        registry.promote(a["model"]["version"], run_id="manual-promote-a", reason="test: restore A")


def test_rerun_on_the_same_data_reuses_training_set_model_and_world(worlds):
    """Bug caught: a rerun that builds a new world (or training set, or model) for the same inputs,
    e.g. a key that depends on the run id, the time or the lake's path."""
    settings, storage, a = worlds["settings"], worlds["storage"], worlds["a"]
    before = worlds_on_disk(settings)
    snapshot, training_set = features_from_raw(settings, a["source"], "run-a-again", a["lake"])
    model = steps.train_step(training_set, "run-a-again", settings)

    assert snapshot["sha256"] == a["snapshot"]["sha256"]
    assert training_set["key"] == a["training_set"]["key"] and training_set["reused"]
    assert step_record(storage, "run-a-again", "features")["reused"]
    assert model["version"] == a["model"]["version"] and step_record(storage, "run-a-again", "train")["reused"]
    assert model["meta"]["feature_world"] == a["model"]["meta"]["feature_world"]
    assert worlds_on_disk(settings) == before


def test_one_added_raw_row_in_a_new_lake_builds_a_new_training_set_world_and_model(worlds):
    """Bug caught: a content key blind to one input row (e.g. keyed on file names, row counts of
    another file or the lake's path), which would reuse A's training set and model for other data."""
    settings, storage, a = worlds["settings"], worlds["storage"], worlds["a"]
    raw_files = [uri for uri in storage.list(a["source"]) if uri.endswith(".parquet") and "/_" not in uri]
    assert len(raw_files) == 1, raw_files
    table = storage.read_parquet(raw_files[0])
    last = table.slice(table.num_rows - 1).to_pylist()[0]
    added = pa.Table.from_pylist([{**last, "transaction_id": f"{last['transaction_id']}-added"}], schema=table.schema)
    source = storage.uri("raw", "a-plus-one")
    storage.write_parquet(f"{source}/part-00000.parquet", pa.concat_tables([table, added]))

    before = worlds_on_disk(settings)
    snapshot, training_set = features_from_raw(settings, source, "run-a-plus-one", storage.uri("lakes", "a-plus-one"))
    model = steps.train_step(training_set, "run-a-plus-one", settings)

    assert snapshot["rows"] == a["snapshot"]["rows"] + 1
    assert snapshot["sha256"] != a["snapshot"]["sha256"]
    assert training_set["key"] != a["training_set"]["key"] and not training_set["reused"]
    assert not step_record(storage, "run-a-plus-one", "train")["reused"]
    assert model["version"] != a["model"]["version"] and model["training_key"] != a["model"]["training_key"]
    new_world = model["meta"]["feature_world"]
    assert new_world != a["model"]["meta"]["feature_world"]
    assert worlds_on_disk(settings) == before | {new_world}


# ---------------------------------------------------------------- tampered artifacts (defect 1)
@pytest.fixture(scope="module")
def tamper_loop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small dataset through ingest, validate and features (no training needed)."""
    home = tmp_path_factory.mktemp("tamper")
    settings = load_settings(env=world_env(home))
    storage = Storage.from_settings(settings)
    source = storage.uri("raw", "small")
    generate(storage, source, rows=TAMPER_ROWS, days=DAYS, seed=TAMPER_SEED)
    snapshot, training_set = features_from_raw(settings, source, "run-1", storage.uri("lake"))
    card_table = step_record(storage, "run-1", "features")["artifacts"]["card_features"]
    return {"settings": settings, "storage": storage, "snapshot": snapshot, "training_set": training_set, "card_table": card_table}


def change_one_row(path: Path, column: str, value: Any) -> None:
    """Rewrite a published parquet file with one value of its first row changed (still valid parquet)."""
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    assert values[0] != value
    values[0] = value
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(values, table.schema.field(column).type)), path)


@pytest.mark.parametrize(
    "artifact, column, value",
    [("holdout", "is_fraud", None), ("card_table", "card_amount_mean_30d", 1e6)],
    ids=["training-set-holdout", "card-offline-table"],
)
def test_a_published_artifact_changed_after_publication_is_refused_on_rerun(tamper_loop, artifact, column, value):
    """Bug caught: a rerun that reuses a training set or an offline table by its manifest alone,
    without re-hashing the files (it would train, evaluate or serve on edited data)."""
    settings, storage, snapshot = tamper_loop["settings"], tamper_loop["storage"], tamper_loop["snapshot"]
    uri = tamper_loop["training_set"]["holdout_uri"] if artifact == "holdout" else tamper_loop["card_table"]
    path = Path(uri)
    original = path.read_bytes()
    if value is None:  # flip one label
        value = 1 - pq.read_table(path).column(column)[0].as_py()
    try:
        change_one_row(path, column, value)
        with pytest.raises(IntegrityError) as refused:
            steps.features_step(snapshot, f"run-tampered-{artifact}", settings)
        assert uri in str(refused.value) and "refused" in str(refused.value)
        assert step_record(storage, f"run-tampered-{artifact}", "features")["status"] == "failed"
    finally:
        path.write_bytes(original)
    # Restored, the same rerun reuses it again: the refusal was about the change, nothing else.
    assert steps.features_step(snapshot, f"run-restored-{artifact}", settings)["reused"]
