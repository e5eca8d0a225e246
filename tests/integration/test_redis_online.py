"""The loop with Feast's Redis online store, against a real redis-server on loopback.

The small loop runs with ``features.online_store=redis``; the online features read back through
flywheel's own read path must equal the offline tables' latest row per entity, computed here with
pandas (never through Feast); each feature world must be a Redis key space of its own (the Feast
project ``<project>_<world>``); and ``flywheel serve`` must score over HTTP from Redis.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from pandas.testing import assert_frame_equal

from flywheel import steps
from flywheel.config import load_settings
from tests.factories import generate
from flywheel.errors import FeatureStoreError
from tests.fraud_tables import CARD_FEATURES, MERCHANT_FEATURES
from flywheel.features.store import open_served_store, open_store, online_features
from flywheel.storage import Storage
from tests.conftest import SMALL_DAYS, SMALL_ROWS, run_loop, small_env
from tests.servers import RedisServer, free_port, wait_until_ready
from tests.factories import FRAUD_VIEWS


def redis_env(home: Path, redis: RedisServer, **extra: str) -> dict[str, str]:
    return {**small_env(home), "FLYWHEEL_FEATURES__ONLINE_STORE": "redis",
            "FLYWHEEL_FEATURES__REDIS_CONNECTION": redis.connection, **extra}


def latest_per_entity(table: pd.DataFrame, key: str, names: tuple[str, ...] | list[str]) -> pd.DataFrame:
    """The oracle: each entity's latest offline row (what a materialized online store holds), for
    the entities whose latest time is not shared by two rows (no tie for a store to break)."""
    table = table.sort_values([key, "event_timestamp"], kind="stable")
    latest_time = table.groupby(key)["event_timestamp"].transform("max")
    latest = table[table["event_timestamp"] == latest_time]
    unique = latest.groupby(key).filter(lambda rows: len(rows) == 1)
    return unique.set_index(key)[list(names)].astype("float64").sort_index()


@pytest.fixture(scope="module")
def redis_loop(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> dict[str, Any]:
    """The small loop (every step, no KFP) with the Redis online store."""
    home = tmp_path_factory.mktemp("redis-loop")
    env = redis_env(home, redis_server)
    settings = load_settings(env=env)
    assert settings.features.online_store == "redis"
    storage = Storage.from_settings(settings)
    source = storage.uri("raw", "small")
    generate(storage, source, rows=SMALL_ROWS, days=SMALL_DAYS, seed=11)
    loop = run_loop(settings, source, "redis-1")
    features = steps.read_step_records(storage, "redis-1")["features"]["artifacts"]
    return {
        "home": home, "env": env, "settings": settings, "storage": storage, **loop,
        "world": loop["model"]["meta"]["feature_world"],
        "cards": storage.read_parquet(features["card_features"]).to_pandas(),
        "merchants": storage.read_parquet(features["merchant_features"]).to_pandas(),
    }


def project_keys(redis: RedisServer, project: str) -> list[bytes]:
    """The Redis keys of one Feast project (Feast appends the project name to each entity key)."""
    import redis as redis_client

    client = redis_client.Redis(host="127.0.0.1", port=redis.port)
    try:
        return list(client.scan_iter(match=b"*" + project.encode(), count=1000))
    finally:
        client.close()


def test_online_features_read_from_redis_equal_the_offline_tables_latest_rows(redis_loop):
    """Bug caught: a Redis online store that misses or mangles rows (a materialization window that
    stops short of the merchants' day-end rows, a wrong entity key serialization, values from an
    older row winning), or a world that silently reads SQLite instead of Redis."""
    settings, world = redis_loop["settings"], redis_loop["world"]
    want_cards = latest_per_entity(redis_loop["cards"], "card_id", CARD_FEATURES)
    want_merchants = latest_per_entity(redis_loop["merchants"], "merchant_id", MERCHANT_FEATURES)
    assert len(want_cards) > 500 and len(want_merchants) > 100, (len(want_cards), len(want_merchants))

    store = open_served_store(settings, world)
    assert store.config.online_store.type == "redis"
    assert not (Path(settings.features.dir) / settings.namespace / "worlds" / world / "online.db").exists(), "the world wrote a SQLite store"
    # Every card, each paired with a merchant (cycled): one read covers both views' entities.
    merchants = list(want_merchants.index)
    rows = [{"card_id": card, "merchant_id": merchants[i % len(merchants)]} for i, card in enumerate(want_cards.index)]
    online = pd.DataFrame(online_features(store, rows, FRAUD_VIEWS))

    got_cards = online.set_index("card_id")[list(CARD_FEATURES)].astype("float64").sort_index()
    assert_frame_equal(got_cards, want_cards, rtol=1e-9, check_names=False)
    got_merchants = (online.drop_duplicates("merchant_id").set_index("merchant_id")[list(MERCHANT_FEATURES)]
                     .astype("float64").sort_index())
    assert_frame_equal(got_merchants, want_merchants.loc[got_merchants.index], rtol=1e-9, check_names=False)
    assert len(got_merchants) == len(want_merchants)


def test_a_feature_world_is_a_redis_project_of_its_own(redis_loop, redis_server, tmp_path):
    """Bug caught: worlds sharing one Redis key space (a fixed project name), so a later run's
    materialization would overwrite the features the production model reads."""
    settings, world = redis_loop["settings"], redis_loop["world"]
    keys = project_keys(redis_server, f"{settings.features.project}_{world}")
    cards, merchants = redis_loop["cards"]["card_id"].nunique(), redis_loop["merchants"]["merchant_id"].nunique()
    assert len(keys) == cards + merchants, (len(keys), cards, merchants)
    # The same definitions under another project, in the same Redis, read none of this world's rows.
    served = open_served_store(settings, world)
    other = open_store(load_settings(env=redis_env(tmp_path / "other", redis_server, FLYWHEEL_FEATURES__PROJECT="other")), world)
    other.apply([*served.list_entities(), *served.list_feature_views()])
    card, merchant = redis_loop["cards"]["card_id"].iloc[0], redis_loop["merchants"]["merchant_id"].iloc[0]
    assert online_features(served, [{"card_id": card, "merchant_id": merchant}], FRAUD_VIEWS)[next(iter(CARD_FEATURES))] != [None]
    values = online_features(other, [{"card_id": card, "merchant_id": merchant}], FRAUD_VIEWS)
    assert all(values[name] == [None] for name in (*CARD_FEATURES, *MERCHANT_FEATURES)), values


def test_a_served_world_with_no_rows_in_redis_is_refused(redis_loop):
    """Bug caught: serving from a Redis that lost its data (restarted without persistence, flushed,
    another instance) answers every lookup with "no features" and scores every card as new."""
    with RedisServer() as empty:
        settings = load_settings(env=redis_env(redis_loop["home"], empty))
        with pytest.raises(FeatureStoreError, match="no rows"):
            open_served_store(settings, redis_loop["world"])
        # `flywheel serve` says so in one line and exits, rather than serving defaults.
        done = subprocess.run(
            [sys.executable, "-m", "flywheel.cli", "serve", "--host", "127.0.0.1", "--port", str(free_port()), "--grpc-port", "0"],
            env=dict(os.environ, **redis_env(redis_loop["home"], empty)), capture_output=True, text=True, timeout=120,
        )
    assert done.returncode != 0
    assert "no rows in the Redis online store" in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.fixture(scope="module")
def redis_server_process(redis_loop):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "flywheel.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0"],
        env=dict(os.environ, **redis_loop["env"]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(process, f"{base}/v1/models/fraud")
    yield base
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


def test_flywheel_serve_scores_a_transaction_over_http_with_redis_features(redis_loop, redis_server_process):
    """Bug caught: `flywheel serve` ignoring ``features.online_store=redis`` (or failing to open the
    Redis world): it must answer with the production model from the Redis store."""
    holdout = redis_loop["storage"].read_parquet(redis_loop["training_set"]["holdout_uri"]).to_pandas()
    row = holdout.iloc[-1]
    tx = {
        "transaction_id": "redis-1", "card_id": row.card_id, "merchant_id": row.merchant_id,
        "merchant_category": row.merchant_category, "amount": float(row.amount),
        "ts": (row.ts + pd.Timedelta(hours=1)).isoformat(), "channel": row.channel,
        "lat": float(row.lat), "lon": float(row.lon),
    }
    response = httpx.post(f"{redis_server_process}/v1/models/fraud:predict", json={"instances": [tx]}, timeout=10)
    assert response.status_code == 200, response.text
    prediction = response.json()["predictions"][0]
    assert 0.0 <= prediction["fraud_probability"] <= 1.0
    assert prediction["model_version"] == redis_loop["model"]["version"]


def copy_project(source: RedisServer, target: RedisServer, project: str) -> None:
    """Every key of one Feast project from one redis-server into another (DUMP and RESTORE)."""
    import redis as redis_client

    keys = project_keys(source, project)
    reading, writing = redis_client.Redis(port=source.port), redis_client.Redis(port=target.port)
    try:
        dumps = reading.pipeline(transaction=False)
        for key in keys:
            dumps.dump(key)
        restores = writing.pipeline(transaction=False)
        for key, dumped in zip(keys, dumps.execute()):
            restores.restore(key, 0, dumped, replace=True)
        restores.execute()
    finally:
        reading.close()
        writing.close()


def test_a_redis_that_hangs_or_goes_away_under_the_served_reader_is_a_clear_error_in_bounded_time(redis_loop, redis_server):
    """Bug caught: serving's Redis read, which blocks the event loop, hanging the server for as long
    as Redis does not answer (no socket timeout); a redis-py exception escaping as a 500 instead of
    the FeatureStoreError the server answers 503 with; or a reader left broken (a dead pooled
    connection) once Redis is back."""
    import signal
    import time
    from concurrent.futures import ThreadPoolExecutor

    from flywheel.features.store import SERVING_REDIS_TIMEOUT_S, open_online_reader

    settings, world = redis_loop["settings"], redis_loop["world"]
    project = f"{settings.features.project}_{world}"
    holdout = redis_loop["storage"].read_parquet(redis_loop["training_set"]["holdout_uri"]).to_pandas().iloc[:20]
    cards, merchants = list(holdout["card_id"]), list(holdout["merchant_id"])
    own = RedisServer().start()
    try:
        copy_project(redis_server, own, project)
        reader = open_online_reader(load_settings(env=redis_env(redis_loop["home"], own)), world)
        features, known = reader.read({"card_id": cards, "merchant_id": merchants})
        assert known["card_id"].all() and known["merchant_id"].all()

        os.kill(own.process.pid, signal.SIGSTOP)  # Redis stops answering; its socket stays open
        started = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            try:
                # One attempt and one immediate retry, each bounded by the socket timeout.
                pending = pool.submit(reader.read, {"card_id": cards, "merchant_id": merchants})
                with pytest.raises(FeatureStoreError, match=r"online read from Redis .* failed: TimeoutError"):
                    pending.result(timeout=2 * SERVING_REDIS_TIMEOUT_S + 2.0)
            finally:
                os.kill(own.process.pid, signal.SIGCONT)
        assert time.monotonic() - started < 2 * SERVING_REDIS_TIMEOUT_S + 2.0

        port = own.port
        own.stop()
        started = time.monotonic()
        with pytest.raises(FeatureStoreError, match=r"online read from Redis .* failed: ConnectionError"):
            reader.read({"card_id": cards, "merchant_id": merchants})
        assert time.monotonic() - started < 1.0, "a refused connection must fail at once, not after backoff sleeps"

        own = RedisServer(port=port).start()  # back, on the same address (its data restored)
        copy_project(redis_server, own, project)
        again, known_again = reader.read({"card_id": cards, "merchant_id": merchants})
        assert known_again["card_id"].all() and known_again["merchant_id"].all()
        for name, values in features.items():
            pd.testing.assert_series_equal(pd.Series(again[name]), pd.Series(values), check_names=False, obj=name)
    finally:
        own.stop()


def test_live_updates_write_redis_rows_that_the_served_reader_reads_ties_replaced_and_old_rows_expired(redis_loop, redis_server):
    """Live updates on the cluster's online store: a new card's events reach the served Redis reader;
    a late event at the same instant rewrites the row (Feast's writer would skip a row no newer than
    the stored one, leaving the earlier count); the served read drops a row older than its view's
    TTL at the request's time (the training join's rule), from the row time Redis keeps."""
    from flywheel.features.live import Events, LiveFeatures
    from flywheel.features.online_write import OnlineWriter
    from flywheel.features.store import open_online_reader
    from tests.factories import FRAUD_CONTRACT, make_transactions

    settings, world = redis_loop["settings"], redis_loop["world"]
    own = RedisServer().start()
    try:
        copy_project(redis_server, own, f"{settings.features.project}_{world}")
        own_settings = load_settings(env=redis_env(redis_loop["home"], own))
        live = LiveFeatures(FRAUD_CONTRACT, FRAUD_VIEWS, OnlineWriter(own_settings, world, FRAUD_VIEWS))
        reader = open_online_reader(own_settings, world, FRAUD_VIEWS)
        rows = make_transactions(2, seed=9, cards=1, merchants=1, days=1, in_time_order=True, id_prefix="redis-live-")
        rows["card_id"] = "redis-live-card"
        live.apply(Events(rows=rows.assign(is_fraud=None)))
        last = rows["ts"].max()

        def count(at: pd.Timestamp) -> tuple[float, bool]:
            features, known = reader.read({"card_id": ["redis-live-card"], "merchant_id": [rows["merchant_id"].iloc[0]]},
                                          at=pd.Series([at]).dt.tz_localize(None).to_numpy("datetime64[us]"))
            return features["card_txn_count_1h"][0], bool(known["card_id"][0])

        assert count(last + pd.Timedelta(minutes=1)) == (2.0 if last - rows["ts"].min() < pd.Timedelta(hours=1) else 1.0, True)
        tie = rows.tail(1).assign(transaction_id="redis-live-tie", is_fraud=None)
        live.apply(Events(rows=tie))
        expected = 3.0 if last - rows["ts"].min() < pd.Timedelta(hours=1) else 2.0
        assert count(last + pd.Timedelta(minutes=1)) == (expected, True)
        ttl = FRAUD_VIEWS[0].ttl
        assert count(last + ttl)[1] and not count(last + ttl + pd.Timedelta(seconds=1))[1]
    finally:
        own.stop()
