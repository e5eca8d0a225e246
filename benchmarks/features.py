"""Point-in-time training sets at scale: flywheel's as-of DuckDB store against Feast's own stores.

    python benchmarks/features.py [--quick]

For each size (250k, 1M and 4M transactions over 30 days; --quick: 25k, 100k and 400k) it generates
the transactions with `flywheel generate`, computes the card and merchant feature tables, applies
the feature views to a Feast world and builds the training set's join
(:func:`flywheel.features.store.historical_features`) in a fresh process: seconds of the join and
the process's peak RSS (getrusage). Ours is ``features.offline_store: duckdb-asof`` (Feast's DuckDB
store, its join a DuckDB ASOF JOIN). In the same run, on the same 200k transactions (--quick: 25k),
it also measures Feast's file store (one retrieval per view, in chunks: flywheel's path before) and
Feast's own DuckDB (ibis) store, and checks that all three give the same value in every cell.

Goals (issue 11): 1M transactions joined in under 20 s with peak memory under 3 GB; seconds per row at
the largest size at most 1.5x those at the smallest (linear); at least 20x the file store's rows/s on
the same rows.

Materialization (``--only materialize``): synthetic card and merchant tables (10 rows per card, 20 per
merchant; 10M card rows, --quick 1M) materialized with flywheel's streaming engine into SQLite and into
a redis-server on a free loopback port; and, in the same run on the first 1M rows (--quick 100k),
both flywheel's engine and Feast's own ``materialize`` (the baseline: its cost per row is what is
compared, it would take many minutes at 10M). Each in a fresh process: seconds, CPU seconds and
the process's peak RSS (getrusage). Goals: 10M source rows with peak memory under 2 GB; at least 3x
Feast's rows/s on the same rows, for SQLite and Redis.

Online reads (``--only online``): after materializing the baseline rows, p50/p99 of reading 1 and
1,000 (card, merchant) entities through Feast's ``get_online_features`` and through flywheel's
OnlineReader (serving's path), SQLite and Redis.

``--only training,materialize,online`` picks sections (default: all); figures of the sections not run
are kept from the results file. Writes benchmarks/results/features.json (--quick: features-quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from results_table import judge, write_results
from serving import start_redis, stop  # benchmarks/serving.py: a redis-server on loopback

ROOT = Path(__file__).resolve().parents[1]
OURS = "duckdb-asof"
STORES = ["file", "duckdb", OURS]  # features.offline_store values
NAMES = {"file": "file_store", "duckdb": "feast_duckdb", OURS: "ours"}

# Fraud's feature views and contract, as the loop builds them from usecases/fraud (each program runs alone).
FRAUD_PRELUDE = f"""
from pathlib import Path
from flywheel.features.views import views_of
from flywheel.usecase import load_usecase
FRAUD = load_usecase(Path({str(ROOT)!r}) / "usecases" / "fraud")
FRAUD_VIEWS, FRAUD_CONTRACT = views_of(FRAUD), FRAUD.contract
def fraud_tables(card, merchant):
    return {{"card_features": card, "merchant_features": merchant}}
"""

PREPARE = FRAUD_PRELUDE + """
import sys, glob
import pandas as pd
from tests.factories import generate  # usecases/fraud/generator.py
from flywheel.config import load_settings
from flywheel.features import engine
from flywheel.storage import Storage
rows, out = int(sys.argv[1]), sys.argv[2]
generate(Storage(out + "/raw"), out + "/raw", rows=rows, days=30, seed=11)
columns = ["transaction_id", "card_id", "merchant_id", "ts", "amount", "lat", "lon", "is_fraud"]
tx = pd.concat([pd.read_parquet(p, columns=columns) for p in sorted(glob.glob(out + "/raw/*.parquet"))], ignore_index=True)
tx.to_parquet(out + "/transactions.parquet")
for view in FRAUD_VIEWS:  # the loop's tables: the use case's declared aggregations, by flywheel's engine
    engine.entity_table(tx, FRAUD_CONTRACT, view.entity, list(view.aggregations)).to_parquet(out + f"/{view.entity}.parquet")
"""

JOIN = FRAUD_PRELUDE + """
import json, resource, sys, time
import pandas as pd
from flywheel.config import load_settings
from flywheel.features import store as feast_store
from tests.fraud_tables import CARD_FEATURES, MERCHANT_FEATURES
data, world, save = sys.argv[1], sys.argv[2], sys.argv[3]
settings = load_settings()
fs = feast_store.open_store(settings, world)
feast_store.apply_definitions(fs, FRAUD_VIEWS, fraud_tables(data + "/card.parquet", data + "/merchant.parquet"))
tx = pd.read_parquet(data + "/transactions.parquet")
feast_store.historical_features(fs, tx.head(10), FRAUD_VIEWS, FRAUD_CONTRACT)  # warm: imports and first-call set-up are not the join
started = time.perf_counter()
joined = feast_store.historical_features(fs, tx, FRAUD_VIEWS, FRAUD_CONTRACT)
seconds = time.perf_counter() - started
if save:
    joined[["transaction_id", *CARD_FEATURES, *MERCHANT_FEATURES]].to_parquet(save)
print(json.dumps({"seconds": seconds, "rows": len(joined),
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


MAKE_TABLES = """
import sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from flywheel.features.definitions import CREATED_COLUMN
from tests.fraud_tables import CARD_FEATURES, MERCHANT_FEATURES
rows, out = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(7)
START = 1_790_812_800_000_000  # 2026-10-01 UTC, microseconds

def write(path, key, prefix, features, n, entities, chunk=1_000_000):
    writer = None  # written a million rows at a time: the generator's memory stays small too
    for first in range(0, n, chunk):
        m = min(chunk, n - first)
        ids = rng.integers(0, entities, m)
        ts = START + rng.integers(0, 30 * 86_400 * 10**6, m)
        columns = {key: pa.array(np.char.add(prefix, np.char.zfill(ids.astype(str), 8)).astype(object)),
                   "event_timestamp": pa.array(ts, pa.timestamp("us", tz="UTC")),
                   CREATED_COLUMN: pa.array(ts, pa.timestamp("us", tz="UTC"))}
        for name, kind in features.items():
            columns[name] = pa.array(rng.integers(0, 1000, m)) if kind == "Int64" else pa.array(rng.normal(size=m))
        table = pa.table(columns)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()

write(out + "/card.parquet", "card_id", "c", CARD_FEATURES, rows, max(rows // 10, 1))
write(out + "/merchant.parquet", "merchant_id", "m", MERCHANT_FEATURES, max(rows // 20, 1), max(rows // 400, 1))
"""

MATERIALIZE = FRAUD_PRELUDE + """
import json, resource, sys, time
import numpy as np, pyarrow.parquet as pq
from flywheel.config import load_settings
from flywheel.features import online_write, store as feast_store
from flywheel.features.build import materialize_window
data, world, engine, reads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
settings = load_settings()
tables = [data + "/card.parquet", data + "/merchant.parquet"]
fs = feast_store.open_store(settings, world)
feast_store.apply_definitions(fs, FRAUD_VIEWS, fraud_tables(*tables))
start, end = materialize_window(tables)
started, cpu = time.perf_counter(), time.process_time()
online_write.materialize_world(fs, settings, start, end, engine=engine)
out = {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
       "rows": sum(pq.ParquetFile(path).metadata.num_rows for path in tables),
       "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
if reads:
    cards = pq.read_table(tables[0], columns=["card_id"]).column(0).unique().to_pylist()
    merchants = pq.read_table(tables[1], columns=["merchant_id"]).column(0).unique().to_pylist()
    rng = np.random.default_rng(5)
    reader = feast_store.open_online_reader(settings, world)
    for size in (1, 1000):
        batches = [(list(rng.choice(cards, size)), list(rng.choice(merchants, size))) for _ in range(reads if size == 1 else max(reads // 20, 20))]
        for path in ("feast", "reader"):
            timings = []
            for card_ids, merchant_ids in batches:
                began = time.perf_counter()
                if path == "feast":
                    got = feast_store.online_features(fs, [{"card_id": c, "merchant_id": m} for c, m in zip(card_ids, merchant_ids)], FRAUD_VIEWS)
                    assert got["card_txn_count_24h"][0] is not None
                else:
                    features, known = reader.read({"card_id": card_ids, "merchant_id": merchant_ids})
                    assert known["card_id"].all()
                timings.append((time.perf_counter() - began) * 1000)
            out[f"{path}_{size}_p50_ms"] = float(np.percentile(timings[len(timings) // 10:], 50))  # the first tenth warms up
            out[f"{path}_{size}_p99_ms"] = float(np.percentile(timings[len(timings) // 10:], 99))
print(json.dumps(out))
"""


def materialize(data: Path, store: str, engine: str, redis: str, reads: int = 0) -> dict[str, float]:
    env = {"FLYWHEEL_HOME": str(data / f"home-{store}-{engine}"), "FLYWHEEL_FEATURES__ONLINE_STORE": store,
           "FLYWHEEL_FEATURES__REDIS_CONNECTION": redis}
    out = json.loads(run(MATERIALIZE, str(data), f"mat{engine}", engine, str(reads), env=env).strip().splitlines()[-1])
    print(f"  {engine} into {store}: {out['rows']:,} rows in {out['seconds']:.1f} s (CPU {out['cpu_seconds']:.1f} s), "
          f"peak {out['peak_mib']:.0f} MiB", flush=True)
    return out


def label_of(rows: int) -> str:
    return f"{rows // 1000}k" if rows < 1_000_000 else f"{rows // 1_000_000}M"


def materialize_sections(tmp: str, quick: bool, sections: set[str]) -> tuple[dict[str, float], dict[str, tuple[float, str]]]:
    """Materialization (ours at the large size; ours and Feast's on the baseline rows) and online reads."""
    large, baseline = (1_000_000, 100_000) if quick else (10_000_000, 1_000_000)
    figures: dict[str, float] = {}
    targets: dict[str, tuple[float, str]] = {}
    redis_process, redis = start_redis(Path(tmp) / "redis")
    try:
        for rows in (baseline, large) if "materialize" in sections else (baseline,):
            data = Path(tmp) / f"mat-{rows}"
            data.mkdir()
            print(f"{rows:,} card rows (+{rows // 20:,} merchant rows): writing the tables", flush=True)
            run(MAKE_TABLES, str(rows), str(data))
            label = label_of(rows)
            for store in ("sqlite", "redis"):
                if rows == baseline:
                    ours = materialize(data, store, "flywheel", redis, reads=200 if "online" in sections else 0)
                    for name, value in ours.items():
                        if name.startswith(("feast_", "reader_")):
                            figures[f"online_{store}_{name}"] = round(value, 3)
                    if "materialize" not in sections:
                        continue
                    theirs = materialize(data, store, "feast", redis)
                    for who, out in (("ours", ours), ("feast", theirs)):
                        figures[f"materialize_{store}_{who}_{label}_rows_per_s"] = round(out["rows"] / out["seconds"])
                        figures[f"materialize_{store}_{who}_{label}_cpu_rows_per_s"] = round(out["rows"] / out["cpu_seconds"])
                        figures[f"materialize_{store}_{who}_{label}_peak_mib"] = round(out["peak_mib"])
                    figures[f"materialize_{store}_speedup_vs_feast"] = round(theirs["seconds"] / ours["seconds"], 2)
                    figures[f"materialize_{store}_cpu_speedup_vs_feast"] = round(theirs["cpu_seconds"] / ours["cpu_seconds"], 2)
                    targets[f"materialize_{store}_speedup_vs_feast"] = (3.0, "min")
                else:
                    ours = materialize(data, store, "flywheel", redis)
                    figures[f"materialize_{store}_ours_{label}_seconds"] = round(ours["seconds"], 1)
                    figures[f"materialize_{store}_ours_{label}_rows_per_s"] = round(ours["rows"] / ours["seconds"])
                    figures[f"materialize_{store}_ours_{label}_cpu_rows_per_s"] = round(ours["rows"] / ours["cpu_seconds"])
                    figures[f"materialize_{store}_ours_{label}_peak_mib"] = round(ours["peak_mib"])
                    targets[f"materialize_{store}_ours_{label}_peak_mib"] = (2048.0, "max")
            subprocess.run(["rm", "-rf", str(data)], check=True)
    finally:
        stop(redis_process)
    return figures, targets


def run(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})))
    if done.returncode != 0:
        raise SystemExit(f"benchmark step failed:\n{done.stderr[-4000:]}")
    return done.stdout


def join(data: Path, store: str, save: str = "") -> dict[str, float]:
    home = data / f"home-{store}"
    env = {"FLYWHEEL_HOME": str(home), "FLYWHEEL_FEATURES__OFFLINE_STORE": store}
    out = json.loads(run(JOIN, str(data), "bench" + store.replace("-", ""), save, env=env).strip().splitlines()[-1])
    print(f"  {store}: {out['rows']:,} rows in {out['seconds']:.1f} s, peak {out['peak_mib']:.0f} MiB", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (25k, 100k, 400k; baseline 25k)")
    parser.add_argument("--only", default="training,materialize,online", metavar="SECTIONS",
                        help="comma-separated sections to run: training, materialize, online (default: all)")
    args = parser.parse_args()
    sections = {section.strip() for section in args.only.split(",") if section.strip()}
    unknown = sections - {"training", "materialize", "online"}
    if unknown or not sections:
        parser.error(f"--only takes training, materialize and online, not {', '.join(sorted(unknown)) or 'nothing'}")
    name = "features-quick.json" if args.quick else "features.json"
    path = ROOT / "benchmarks" / "results" / name
    previous = json.loads(path.read_text()) if path.is_file() else {}
    figures: dict[str, float] = {}
    goals: dict[str, dict] = {}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-features-") as tmp:
        if sections & {"materialize", "online"}:
            mat_figures, mat_targets = materialize_sections(tmp, args.quick, sections)
            figures.update(mat_figures)
            goals.update(judge(mat_figures, mat_targets))
            notes["materialize_baseline"] = (
                "Feast's own materialize measured on the first size only (1M card rows + 50k merchant rows; --quick 100k): "
                "the speedups compare ours and Feast's on the same rows in the same run; ours alone at 10M (--quick 1M) "
                "for the peak-memory goal. Synthetic tables: 10 rows per card, 20 per merchant.")
    if "training" in sections:
        training_figures, training_goals, baselines = training_section(args.quick)
        figures.update(training_figures)
        goals.update(training_goals)
        notes["baselines"] = baselines
    # The sections not run keep their figures from the last run.
    kept = {key: value for key, value in previous.get("figures", {}).items() if key not in figures and _section(key) not in sections}
    kept_goals = {key: value for key, value in previous.get("goals", {}).items() if key not in goals and _section(key) not in sections}
    extra = {key: value for key, value in previous.items() if key not in ("figures", "goals", "load_average")}
    write_results(path, {**kept, **figures}, {**kept_goals, **goals}, **{**extra, **notes, "quick": args.quick},
                  load_average=os.getloadavg())


def _section(figure: str) -> str:
    return "materialize" if figure.startswith("materialize_") else "online" if figure.startswith("online_") else "training"


def training_section(quick: bool) -> tuple[dict[str, float], dict[str, dict], str]:
    """Training-set joins: ours at three sizes, the file store and Feast's DuckDB store on the baseline rows."""
    sizes = [25_000, 100_000, 400_000] if quick else [250_000, 1_000_000, 4_000_000]
    baseline_rows = 25_000 if quick else 200_000
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-features-") as tmp:
        for rows in sorted({baseline_rows, *sizes}):
            data = Path(tmp) / str(rows)
            data.mkdir()
            print(f"{rows:,} transactions: generating and computing the feature tables", flush=True)
            run(PREPARE, str(rows), str(data))
            label = f"{rows // 1000}k" if rows < 1_000_000 else f"{rows // 1_000_000}M"
            if rows == baseline_rows:
                import pandas as pd
                from pandas.testing import assert_frame_equal

                measured = {store: join(data, store, str(data / f"{store}.parquet")) for store in STORES}
                ours = pd.read_parquet(data / f"{OURS}.parquet").set_index("transaction_id").sort_index()
                for store, out in measured.items():
                    # Every store gives the same value in every cell (these rows share no key and time).
                    other = pd.read_parquet(data / f"{store}.parquet").set_index("transaction_id").sort_index()
                    assert_frame_equal(other, ours, rtol=1e-9)
                    name = NAMES[store]
                    figures[f"{name}_{label}_seconds"] = round(out["seconds"], 2)
                    figures[f"{name}_{label}_rows_per_s"] = round(rows / out["seconds"])
                    figures[f"{name}_{label}_peak_mib"] = round(out["peak_mib"])
                figures["speedup_per_row_vs_file_store"] = round(measured["file"]["seconds"] / measured[OURS]["seconds"], 1)
                figures["speedup_per_row_vs_feast_duckdb"] = round(measured["duckdb"]["seconds"] / measured[OURS]["seconds"], 1)
                baseline_label = label
            if rows in sizes and rows != baseline_rows:
                out = join(data, OURS)
                figures[f"ours_{label}_seconds"] = round(out["seconds"], 2)
                figures[f"ours_{label}_rows_per_s"] = round(rows / out["seconds"])
                figures[f"ours_{label}_peak_mib"] = round(out["peak_mib"])
            for path in data.glob("raw"):
                subprocess.run(["rm", "-rf", str(path)], check=True)
    small, middle, large = (f"{r // 1000}k" if r < 1_000_000 else f"{r // 1_000_000}M" for r in sizes)
    per_row = {label: figures[f"ours_{label}_seconds"] / rows for label, rows in zip((small, middle, large), sizes)}
    figures["seconds_per_row_growth_largest_vs_smallest"] = round(per_row[large] / per_row[small], 2)
    goals = judge(figures, {
        f"ours_{middle}_seconds": (20.0, "max"),
        f"ours_{middle}_peak_mib": (3072.0, "max"),
        "seconds_per_row_growth_largest_vs_smallest": (1.5, "max"),
        "speedup_per_row_vs_file_store": (20.0, "min"),
    })
    return figures, goals, (f"on {baseline_label} transactions: Feast's file store (one retrieval per view in chunks of "
                            "25,000, flywheel's path before) and Feast's own DuckDB (ibis) store, every view in one call")


if __name__ == "__main__":
    main()
