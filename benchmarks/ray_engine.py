"""The features step's cluster engine (Ray, local mode) against the embedded path on one machine.

    python benchmarks/ray_engine.py [--quick]

For each size (100k and 400k transactions over 30 days; --quick: 10k and 50k) it generates the
transactions and feature tables as benchmarks/features.py does, then in a fresh process per engine
(``features.offline_store: duckdb-asof``, the embedded path, and ``ray``: Feast's Ray store and engine
through flywheel/features/ray_store.py, a local Ray on this machine) applies the views, runs a
10-row join (imports, and for Ray starting the local cluster: reported as start-up), then the
training-set join and the materialization of the whole span: seconds of each, the driver's CPU
seconds and its peak RSS (Ray's worker processes are not in it). The two joins must give the same
value in every cell.

A figure for deciding when to switch (README "When one machine is not enough"): on one machine Ray
only adds cost; it pays off when its workers are other machines. Writes
benchmarks/results/ray_engine.json (--quick: ray_engine-quick.json). No goals: a comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from features import FRAUD_PRELUDE, PREPARE, ROOT, run
from results_table import write_results

ENGINES = {"duckdb-asof": "embedded", "ray": "ray"}

STEP = FRAUD_PRELUDE + """
import json, resource, sys, time
import pandas as pd
from flywheel.config import load_settings
from flywheel.features import store as feast_store
from flywheel.features.build import materialize_window
from tests.fraud_tables import CARD_FEATURES, MERCHANT_FEATURES
data, save = sys.argv[1], sys.argv[2]
settings = load_settings()
began = time.perf_counter()
fs = feast_store.open_store(settings, "bench")
feast_store.apply_definitions(fs, FRAUD_VIEWS, fraud_tables(data + "/card.parquet", data + "/merchant.parquet"))
tx = pd.read_parquet(data + "/transactions.parquet")
feast_store.historical_features(fs, tx.head(10), FRAUD_VIEWS, FRAUD_CONTRACT)  # imports, first-call set-up, Ray's start
out = {"startup_seconds": time.perf_counter() - began}
cpu, started = time.process_time(), time.perf_counter()
joined = feast_store.historical_features(fs, tx, FRAUD_VIEWS, FRAUD_CONTRACT)
out.update(join_seconds=time.perf_counter() - started, join_cpu_seconds=time.process_time() - cpu)
joined[["transaction_id", *CARD_FEATURES, *MERCHANT_FEATURES]].to_parquet(save)
cpu, started = time.process_time(), time.perf_counter()
feast_store.materialize(fs, *materialize_window([data + "/card.parquet", data + "/merchant.parquet"]))
out.update(materialize_seconds=time.perf_counter() - started, materialize_cpu_seconds=time.process_time() - cpu,
           rows=len(joined), source_rows=len(pd.read_parquet(data + "/card.parquet")) + len(pd.read_parquet(data + "/merchant.parquet")),
           peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (10k and 50k transactions)")
    args = parser.parse_args()
    sizes = [10_000, 50_000] if args.quick else [100_000, 400_000]
    figures: dict[str, float] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-ray-") as tmp:
        for rows in sizes:
            data = Path(tmp) / str(rows)
            data.mkdir()
            print(f"{rows:,} transactions: generating and computing the feature tables", flush=True)
            run(PREPARE, str(rows), str(data))
            subprocess.run(["rm", "-rf", str(data / "raw")], check=True)
            label = f"{rows // 1000}k"
            for engine, name in ENGINES.items():
                env = {"FLYWHEEL_HOME": str(data / f"home-{name}"), "FLYWHEEL_FEATURES__OFFLINE_STORE": engine}
                out = json.loads(run(STEP, str(data), str(data / f"{name}.parquet"), env=env).strip().splitlines()[-1])
                print(f"  {engine}: {json.dumps({k: round(v, 2) for k, v in out.items()})}", flush=True)
                for key in ("startup_seconds", "join_seconds", "join_cpu_seconds", "materialize_seconds",
                            "materialize_cpu_seconds", "peak_mib"):
                    figures[f"{name}_{label}_{key}"] = round(out[key], 2)
                figures[f"{name}_{label}_join_rows_per_s"] = round(rows / out["join_seconds"])
                figures[f"{name}_{label}_materialize_source_rows_per_s"] = round(out["source_rows"] / out["materialize_seconds"])
            import pandas as pd
            from pandas.testing import assert_frame_equal

            embedded = pd.read_parquet(data / "embedded.parquet").set_index("transaction_id").sort_index()
            assert_frame_equal(pd.read_parquet(data / "ray.parquet").set_index("transaction_id").sort_index(), embedded, rtol=1e-9)
            figures[f"ray_vs_embedded_{label}_join_time_ratio"] = round(figures[f"ray_{label}_join_seconds"] / figures[f"embedded_{label}_join_seconds"], 1)
            figures[f"ray_vs_embedded_{label}_materialize_time_ratio"] = round(
                figures[f"ray_{label}_materialize_seconds"] / figures[f"embedded_{label}_materialize_seconds"], 1)
    name = "ray_engine-quick.json" if args.quick else "ray_engine.json"
    write_results(ROOT / "benchmarks" / "results" / name, figures, {}, quick=args.quick,
                  load_average_before=load_before, load_average_after=os.getloadavg(), cpus=os.cpu_count())


if __name__ == "__main__":
    main()
