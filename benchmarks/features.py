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
the same rows. Writes benchmarks/results/features.json (--quick: features-quick.json).
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

ROOT = Path(__file__).resolve().parents[1]
OURS = "duckdb-asof"
STORES = ["file", "duckdb", OURS]  # features.offline_store values
NAMES = {"file": "file_store", "duckdb": "feast_duckdb", OURS: "ours"}

PREPARE = """
import sys, glob
import pandas as pd
from flywheel.datagen import generate
from flywheel.config import load_settings
from flywheel.features import compute
from flywheel.storage import Storage
rows, out = int(sys.argv[1]), sys.argv[2]
generate(Storage(out + "/raw"), out + "/raw", rows=rows, days=30, seed=11)
columns = ["transaction_id", "card_id", "merchant_id", "ts", "amount", "lat", "lon", "is_fraud"]
tx = pd.concat([pd.read_parquet(p, columns=columns) for p in sorted(glob.glob(out + "/raw/*.parquet"))], ignore_index=True)
tx.to_parquet(out + "/transactions.parquet")
compute.card_feature_table(tx).to_parquet(out + "/card.parquet")
compute.merchant_feature_table(tx, load_settings(env={}).features.label_delay).to_parquet(out + "/merchant.parquet")
"""

JOIN = """
import json, resource, sys, time
import pandas as pd
from flywheel.config import load_settings
from flywheel.features import store as feast_store
from flywheel.features.definitions import CARD_FEATURES, MERCHANT_FEATURES
data, world, save = sys.argv[1], sys.argv[2], sys.argv[3]
settings = load_settings()
fs = feast_store.open_store(settings, world)
feast_store.apply_definitions(fs, data + "/card.parquet", data + "/merchant.parquet")
tx = pd.read_parquet(data + "/transactions.parquet")
feast_store.historical_features(fs, tx.head(10))  # warm: imports and first-call set-up are not the join
started = time.perf_counter()
joined = feast_store.historical_features(fs, tx)
seconds = time.perf_counter() - started
if save:
    joined[["transaction_id", *CARD_FEATURES, *MERCHANT_FEATURES]].to_parquet(save)
print(json.dumps({"seconds": seconds, "rows": len(joined),
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


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
    args = parser.parse_args()
    sizes = [25_000, 100_000, 400_000] if args.quick else [250_000, 1_000_000, 4_000_000]
    baseline_rows = 25_000 if args.quick else 200_000
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
    name = "features-quick.json" if args.quick else "features.json"
    write_results(ROOT / "benchmarks" / "results" / name, figures, goals, quick=args.quick,
                  baselines=f"on {baseline_label} transactions: Feast's file store (one retrieval per view in chunks of "
                  "25,000, flywheel's path before) and Feast's own DuckDB (ibis) store, every view in one call",
                  load_average=os.getloadavg())


if __name__ == "__main__":
    main()
