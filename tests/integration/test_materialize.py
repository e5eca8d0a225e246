"""flywheel's streaming materialization (flywheel.features.online_write) against Feast's own
``materialize`` on the same offline tables: the online stores they leave must be the same, byte for
byte (every entity, every feature, SQLite and a real redis-server), and read the same through
Feast's ``get_online_features``; a second run materializes only what changed since the first.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flywheel.config import load_settings
from flywheel.errors import FeatureStoreError
from flywheel.features import online_write, store as feast_store
from flywheel.features.definitions import CREATED_COLUMN
from tests.fraud_tables import CARD_FEATURES, CARD_VIEW, MERCHANT_FEATURES, MERCHANT_VIEW
from tests.factories import FRAUD_VIEWS, fraud_tables

T0 = pd.Timestamp("2026-10-01", tz="UTC")


def offline_tables(folder: Path, cards: int = 40, seed: int = 3) -> tuple[str, str]:
    """Card and merchant tables with what a writer can get wrong: several rows per entity, ties on
    event time broken by created time, NaN and null values, negative and huge integers, a zero,
    fractional seconds, non-ASCII ids, and rows outside the window."""
    rng = np.random.default_rng(seed)
    rows = cards * 4
    card_ids = [f"c{i:03d}" if i % 7 else f"卡-{i}" for i in rng.integers(0, cards, rows)]
    stamps = T0 + pd.to_timedelta(rng.integers(0, 5 * 86_400 * 10**6, rows), unit="us")
    card = pd.DataFrame({"card_id": card_ids, "event_timestamp": stamps, CREATED_COLUMN: stamps})
    for name, kind in CARD_FEATURES.items():
        if kind == "Int64":
            # Within 2**53: Feast's own materialize passes a column with nulls through float64 and
            # rounds larger integers (flywheel's writes them exactly), so beyond it the two differ.
            card[name] = pd.array(rng.integers(-(2**52), 2**52, rows), dtype="Int64")
            card.loc[::11, name] = pd.NA
            card.loc[::13, name] = 0
        else:
            card[name] = rng.normal(size=rows) * 10.0 ** rng.integers(-300, 300, rows)
            card.loc[::9, name] = np.nan
            card.loc[::17, name] = 0.0
    # A recomputed row beside the one it corrects: the same event time, created later, must win.
    tie = card.iloc[:5].copy()
    tie[CREATED_COLUMN] = tie[CREATED_COLUMN] + pd.Timedelta(seconds=5)
    for name in CARD_FEATURES:
        tie[name] = card[name].iloc[:5].to_numpy()[::-1]
    # Rows outside the window (before its start, after its end) must not be loaded.
    outside = card.iloc[5:8].copy()
    outside["event_timestamp"] = outside[CREATED_COLUMN] = [T0 - pd.Timedelta(days=3), T0 + pd.Timedelta(days=9),
                                                            T0 + pd.Timedelta(days=10)]
    card = pd.concat([card, tie, outside], ignore_index=True)
    merchant = pd.DataFrame({"merchant_id": [f"m{i % 9}" for i in range(30)],
                             "event_timestamp": [T0 + pd.Timedelta(hours=7 * i) for i in range(30)]})
    merchant[CREATED_COLUMN] = merchant["event_timestamp"]
    for name, kind in MERCHANT_FEATURES.items():
        merchant[name] = np.arange(30, dtype="int64") - 3 if kind == "Int64" else np.linspace(-1, 1e6, 30)
    merchant.loc[4, list(MERCHANT_FEATURES)[-1]] = np.nan
    for frame in (card, merchant):  # microseconds, as the feature tables are written
        for column in ("event_timestamp", CREATED_COLUMN):
            frame[column] = frame[column].astype("datetime64[us, UTC]")
    paths = str(folder / "card.parquet"), str(folder / "merchant.parquet")
    card.to_parquet(paths[0])
    merchant.to_parquet(paths[1])
    return paths


WINDOW = (T0.to_pydatetime() - dt.timedelta(days=1), T0.to_pydatetime() + dt.timedelta(days=6))


def world_store(home: Path, world: str, paths: tuple[str, str], **env: str):
    settings = load_settings(env={"FLYWHEEL_HOME": str(home), **env})
    store = feast_store.open_store(settings, world)
    feast_store.apply_definitions(store, FRAUD_VIEWS, fraud_tables(*paths))
    return settings, store


def sqlite_rows(settings, world: str) -> dict[str, set[tuple]]:
    project = feast_store.feast_project(settings, world)
    with sqlite3.connect(feast_store.world_dir(settings, world) / "online.db") as connection:
        return {view: set(connection.execute(
            f'SELECT * FROM "{project}_{view}"'))
            for view in (CARD_VIEW, MERCHANT_VIEW)}


def redis_hashes(redis_server, project: str) -> dict[bytes, dict[bytes, bytes]]:
    import redis

    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        return {key[: -len(project)]: client.hgetall(key) for key in client.scan_iter(match=b"*" + project.encode(), count=1000)}
    finally:
        client.close()


def read_everything(store, paths: tuple[str, str]) -> pd.DataFrame:
    """Every card and merchant of the tables through Feast's get_online_features."""
    cards = sorted(pd.read_parquet(paths[0])["card_id"].unique())
    merchants = sorted(pd.read_parquet(paths[1])["merchant_id"].unique())
    rows = [{"card_id": card, "merchant_id": merchants[i % len(merchants)]} for i, card in enumerate(cards)]
    rows += [{"card_id": cards[0], "merchant_id": merchant} for merchant in merchants]
    return pd.DataFrame(feast_store.online_features(store, rows, FRAUD_VIEWS))


@pytest.mark.parametrize("online", ["sqlite", "redis"])
def test_the_streamed_store_is_the_one_feasts_materialize_writes(online, tmp_path, request):
    """Bugs caught: any byte of Feast's layout written differently (a value's protobuf, a null or NaN
    written as a number, an entity key, a Redis field or timestamp, the SQLite value_text or epoch
    seconds); a tie on event time not resolved by created time; rows outside the window loaded; an
    entity missing (a chunk boundary dropping rows: chunks of 7 entities here)."""
    paths = offline_tables(tmp_path)
    env = {}
    if online == "redis":
        redis_server = request.getfixturevalue("redis_server")
        env = {"FLYWHEEL_FEATURES__ONLINE_STORE": "redis", "FLYWHEEL_FEATURES__REDIS_CONNECTION": redis_server.connection}
    settings, theirs = world_store(tmp_path / "home", f"feast{online}", paths, **env)
    feast_store.materialize(theirs, *WINDOW)
    _, ours = world_store(tmp_path / "home", f"ours{online}", paths, **env)
    done = online_write.materialize_views(ours, WINDOW[1], WINDOW[0], chunk_rows=7, memory_mib=64)

    table = pd.read_parquet(paths[0])
    inside = table[(table.event_timestamp >= WINDOW[0]) & (table.event_timestamp <= WINDOW[1])]
    by_view = {view.view: view for view in done}
    assert by_view[CARD_VIEW].source_rows == len(inside) and by_view[CARD_VIEW].entities == inside.card_id.nunique()
    if online == "sqlite":
        want, got = sqlite_rows(settings, f"feast{online}"), sqlite_rows(settings, f"ours{online}")
        assert len(got[CARD_VIEW]) == inside.card_id.nunique() * len(CARD_FEATURES)
        for view in (CARD_VIEW, MERCHANT_VIEW):
            assert got[view] == want[view], sorted(got[view] ^ want[view])[:4]
    else:
        want = redis_hashes(redis_server, feast_store.feast_project(settings, f"feast{online}"))
        got = redis_hashes(redis_server, feast_store.feast_project(settings, f"ours{online}"))
        assert len(got) == inside.card_id.nunique() + 9
        assert got == want, [(key, got.get(key), want.get(key)) for key in set(got) | set(want) if got.get(key) != want.get(key)][:3]
    pd.testing.assert_frame_equal(read_everything(ours, paths), read_everything(theirs, paths))


def test_a_second_run_materializes_only_what_changed_since_the_first(tmp_path):
    """Bugs caught: a run that re-reads the whole table every time (no materialize-incremental), an
    interval not recorded in the registry as Feast records it (Feast's own materialize-incremental
    would start over), and an update that loses the entities it did not touch."""
    paths = offline_tables(tmp_path, cards=20)
    settings, store = world_store(tmp_path / "home", "incr", paths)
    first = online_write.materialize_world(store, settings, *WINDOW)
    assert {view.view: view.start for view in first}[CARD_VIEW] == WINDOW[0].replace(tzinfo=dt.timezone.utc)
    view = feast_store.open_store(settings, "incr").get_feature_view(CARD_VIEW)
    assert view.most_recent_end_time == WINDOW[1].replace(tzinfo=dt.timezone.utc)

    # New rows arrive after the first window: one card changes, one is new; the rest must stay.
    table = pd.read_parquet(paths[0])
    later = WINDOW[1] + dt.timedelta(hours=1)
    changed = table[table.event_timestamp <= WINDOW[1]].sort_values("event_timestamp").iloc[[0]].assign(
        event_timestamp=later, **{CREATED_COLUMN: later, "card_txn_count_1h": 123})
    new = changed.assign(card_id="c-new", card_txn_count_1h=7)
    pd.concat([table, changed, new], ignore_index=True).to_parquet(paths[0])
    second_end = WINDOW[1] + dt.timedelta(days=1)
    second = {done.view: done for done in online_write.materialize_world(store, settings, WINDOW[0], second_end)}
    assert second[CARD_VIEW].start == WINDOW[1].replace(tzinfo=dt.timezone.utc)
    assert (second[CARD_VIEW].source_rows, second[CARD_VIEW].entities) == (2, 2)
    merchants = pd.read_parquet(paths[1])
    arrived = merchants[(merchants.event_timestamp >= WINDOW[1]) & (merchants.event_timestamp <= second_end)]
    assert 0 < len(arrived) < len(merchants)
    assert (second[MERCHANT_VIEW].source_rows, second[MERCHANT_VIEW].entities) == (len(arrived), arrived.merchant_id.nunique())

    reader = feast_store.open_online_reader(settings, "incr")
    everyone = sorted(set(table[table.event_timestamp <= WINDOW[1]].card_id) | {"c-new"})
    features, known = reader.read({"card_id": everyone, "merchant_id": ["m0"] * len(everyone)})
    assert known["card_id"].all()
    counts = dict(zip(everyone, features["card_txn_count_1h"]))
    assert counts[changed.card_id.iloc[0]] == 123 and counts["c-new"] == 7
    # Feast's own materialize-incremental continues from the recorded end: nothing new to load.
    assert feast_store.open_store(settings, "incr").get_feature_view(CARD_VIEW).most_recent_end_time == second_end.replace(tzinfo=dt.timezone.utc)


def test_bad_materialize_input_is_a_clear_error(tmp_path):
    paths = offline_tables(tmp_path, cards=5)
    settings, store = world_store(tmp_path / "home", "bad", paths)
    with pytest.raises(FeatureStoreError, match="start .* is after end"):
        online_write.materialize_views(store, WINDOW[0], WINDOW[1], chunk_rows=10, memory_mib=64)
    with pytest.raises(FeatureStoreError, match="no feature view named nope"):
        online_write.materialize_views(store, WINDOW[1], WINDOW[0], chunk_rows=10, memory_mib=64, views=["nope"])
    with pytest.raises(FeatureStoreError, match="chunk_rows must be at least 1"):
        online_write.materialize_views(store, WINDOW[1], WINDOW[0], chunk_rows=0, memory_mib=64)
    Path(paths[1]).unlink()
    with pytest.raises(FeatureStoreError, match="offline table of merchant_features is missing"):
        online_write.materialize_views(store, WINDOW[1], WINDOW[0], chunk_rows=10, memory_mib=64)


def test_a_view_never_materialized_starts_from_its_tables_first_row(tmp_path):
    """Bug caught: a first incremental run that starts at now - TTL (Feast's default) and so loads
    nothing from tables older than that."""
    paths = offline_tables(tmp_path, cards=6)
    _, store = world_store(tmp_path / "home", "first", paths)
    done = {view.view: view for view in online_write.materialize_views(store, WINDOW[1], chunk_rows=100, memory_mib=64)}
    table = pd.read_parquet(paths[0])
    assert done[CARD_VIEW].start == table.event_timestamp.min().to_pydatetime()
    assert done[CARD_VIEW].source_rows == int((table.event_timestamp <= WINDOW[1]).sum())


def test_a_world_materialized_into_sqlite_is_loaded_whole_into_redis_and_again_after_redis_loses_it(tmp_path, redis_server):
    """Bug caught (found by benchmarks/serving.py): a world's registry records what was materialized,
    but the rows live in the online store. The same world (same data, same key) written to SQLite
    and then served from Redis got nothing written to Redis (the registry said "done"), and the
    server refused the empty world; so would a Redis that restarted without persistence."""
    import redis

    paths = offline_tables(tmp_path)
    home = tmp_path / "home"
    settings, sqlite_store = world_store(home, "shared", paths)
    online_write.materialize_world(sqlite_store, settings, *WINDOW)
    env = {"FLYWHEEL_FEATURES__ONLINE_STORE": "redis", "FLYWHEEL_FEATURES__REDIS_CONNECTION": redis_server.connection}
    redis_settings, redis_store = world_store(home, "shared", paths, **env)
    project = feast_store.feast_project(redis_settings, "shared")
    first = online_write.materialize_world(redis_store, redis_settings, *WINDOW)
    table = pd.read_parquet(paths[0])
    inside = table[(table.event_timestamp >= WINDOW[0]) & (table.event_timestamp <= WINDOW[1])]
    assert {view.view: view.entities for view in first}[CARD_VIEW] == inside.card_id.nunique()
    loaded = redis_hashes(redis_server, project)
    assert len(loaded) == inside.card_id.nunique() + 9
    again = online_write.materialize_world(redis_store, redis_settings, *WINDOW)  # holds it: nothing new
    assert all(view.entities == 0 for view in again)
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    client.delete(*client.scan_iter(match=b"*" + project.encode()))
    client.close()
    online_write.materialize_world(redis_store, redis_settings, *WINDOW)
    assert redis_hashes(redis_server, project) == loaded
