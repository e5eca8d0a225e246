"""CPU of serving's online read: one scoring pass of 1 and of 8 one-transaction requests, from
Redis and from SQLite, in Feast's online layout (OnlineReader.read, as a scoring pass reads).

    python benchmarks/online_read.py [--quick]

A redis-server on loopback and a SQLite file hold the same 2,000 cards and 300 merchants (values
written in Feast's layout, flywheel.features.store; tests/unit/test_online_layout.py checks that
layout against Feast); a tenth of the merchants asked for are unknown. Each figure is process CPU
time per pass (time.process_time over many passes), which a machine shared with other work
disturbs far less than wall time; both stores' reads are checked equal first. Goal: a Redis pass
costs at most 1.5x the CPU of a SQLite one (SQLite serving meets issue 7's goals). Writes benchmarks/results/online_read.json (online_read-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from results_table import judge, write_results
from serving import start_redis, stop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from flywheel.features import store  # noqa: E402
from tests.factories import FRAUD_VIEWS  # noqa: E402  (the fraud use case's two views)

PROJECT = "flywheel_bench"
ROW_TIME_S = 1_790_000_000  # every row's time; requests an hour later read it (within every view's TTL)


def timestamp_bytes(seconds: int) -> bytes:
    from google.protobuf.timestamp_pb2 import Timestamp

    return Timestamp(seconds=seconds).SerializeToString()


def value_bytes(name: str, rng: random.Random) -> bytes:
    """A feature value as Feast serializes it: int64_val (a varint) for counts, else double_val."""
    if "count" in name:
        number, out = rng.randint(0, 300), bytearray(b"\x20")
        while number >= 0x80:
            out.append(number & 0x7F | 0x80)
            number >>= 7
        return bytes(out + bytes([number]))
    return b"\x29" + struct.pack("<d", rng.uniform(-100, 1000))


def fill(client, path: Path, cards: list[str], merchants: list[str]) -> None:
    rng = random.Random(3)
    database = sqlite3.connect(path)
    pipe = client.pipeline(transaction=False)
    for view, key, names in [(v.name, v.join_key, list(v.features)) for v in FRAUD_VIEWS]:
        database.execute(f'CREATE TABLE "{PROJECT}_{view}" (entity_key BLOB, feature_name TEXT, value BLOB, '
                         "event_ts TIMESTAMP, created_ts TIMESTAMP, PRIMARY KEY (entity_key, feature_name))")
        rows = []
        for entity in cards if key == "card_id" else merchants:
            values = {name: value_bytes(name, rng) for name in names}
            rows += [(store.entity_key_bytes(key, entity), name, raw, ROW_TIME_S, ROW_TIME_S) for name, raw in values.items()]
            pipe.hset(store.entity_key_bytes(key, entity) + PROJECT.encode(),
                      mapping={**{store.feature_hash_key(view, name): raw for name, raw in values.items()},
                               f"_ts:{view}".encode(): timestamp_bytes(ROW_TIME_S)})
        database.executemany(f'INSERT INTO "{PROJECT}_{view}" VALUES (?, ?, ?, ?, ?)', rows)
    pipe.execute()
    database.commit()
    database.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 passes a figure instead of 3,000")
    args = parser.parse_args()
    passes = 500 if args.quick else 3000
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    work = Path(tempfile.mkdtemp(prefix="flywheel-bench-online-read-"))
    redis_process, connection = start_redis(work / "redis")
    try:
        cards, merchants = [f"c{i:07d}" for i in range(2000)], [f"m{i:06d}" for i in range(300)]
        client = store.redis_client(connection, socket_timeout=1.0, retry=Retry(NoBackoff(), 1))
        fill(client, work / "online.db", cards, merchants)
        redis_reader = store.OnlineReader(PROJECT, FRAUD_VIEWS, redis=client)
        sqlite_reader = store.OnlineReader(PROJECT, FRAUD_VIEWS, sqlite_path=str(work / "online.db"))
        rng = random.Random(5)
        figures: dict[str, float] = {"passes": passes, "load_avg_1m": round(os.getloadavg()[0], 2)}

        def measure() -> None:
            for size in (1, 8):
                batches = [([rng.choice(cards) for _ in range(size)],
                            [rng.choice(merchants) if rng.random() > 0.1 else "unknown" for _ in range(size)])
                           for _ in range(passes)]
                for card_ids, merchant_ids in batches[:50]:  # the same features on every path
                    want = sqlite_reader.read({"card_id": card_ids, "merchant_id": merchant_ids})
                    got = redis_reader.read({"card_id": card_ids, "merchant_id": merchant_ids})
                    for name, values in want[0].items():
                        np.testing.assert_array_equal(got[0][name], values, err_msg=name)
                    for key, values in want[1].items():
                        np.testing.assert_array_equal(got[1][key], values, err_msg=key)
                at = np.full(size, (ROW_TIME_S + 3600) * 1_000_000, dtype=np.int64).view("datetime64[us]")
                for name, reader in (("sqlite", sqlite_reader), ("redis", redis_reader)):
                    started = time.process_time()
                    for card_ids, merchant_ids in batches:
                        reader.read({"card_id": card_ids, "merchant_id": merchant_ids})
                    figures[f"{name}_pass{size}_cpu_us"] = round((time.process_time() - started) / passes * 1e6, 1)
                    # As serving reads since issue 20: with the requests' times, each row checked against its view's TTL.
                    started = time.process_time()
                    for card_ids, merchant_ids in batches:
                        reader.read({"card_id": card_ids, "merchant_id": merchant_ids}, at=at)
                    figures[f"{name}_pass{size}_at_cpu_us"] = round((time.process_time() - started) / passes * 1e6, 1)
                    figures[f"{name}_pass{size}_at_over_plain"] = round(
                        figures[f"{name}_pass{size}_at_cpu_us"] / figures[f"{name}_pass{size}_cpu_us"], 3)
                figures[f"redis_over_sqlite_pass{size}"] = round(
                    figures[f"redis_pass{size}_cpu_us"] / figures[f"sqlite_pass{size}_cpu_us"], 2)

        measure()
        figures["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    finally:
        stop(redis_process)
    goals = judge(figures, {f"redis_over_sqlite_pass{size}": (1.5, "max") for size in (1, 8)})
    write_results(REPO / "benchmarks" / "results" / ("online_read-quick.json" if args.quick else "online_read.json"),
                  figures, goals, quick=args.quick)


if __name__ == "__main__":
    main()
