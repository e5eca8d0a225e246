"""The monitor's cost: profiling captured rows part by part (flywheel.monitoring.profile).

    python benchmarks/monitoring.py [--quick] [--only profile]

Profile (``--only profile``): a capture-shaped table (8 number features with 1% nulls, 3 category
inputs of 5, 20 and 200 values, 1 output score; the capture's bookkeeping columns are not read by
the profiler and are left out) of 10M rows (--quick 1M), written as Parquet parts of 250k rows, and
a 1M-row baseline (--quick 200k) from the same distribution. A fresh process profiles the baseline,
then reads each part (only the profiled columns), profiles it on the baseline and merges it into
the window's profile, as a monitor reads a day of capture; then it compares the window with the
baseline (flywheel.monitoring.drift.compare). Figures: rows/s of profiling and merging alone and
with the Parquet reads, process CPU seconds, and the process's peak RSS (``resource.getrusage``
``ru_maxrss`` of that process: the interpreter and imports included, the data generation not: it
runs in another process).

Goals, and why: the monitor reads a day of capture every hour (monitoring.schedule); at 10M
captured rows a day (about 115 rows/s all day, one busy predictor) it should take seconds, not
minutes, on one core: at least 1M rows/s profiled, Parquet reads included (10 s for the day).
Memory: a part at a time, so the peak must not grow with the window: at most 1 GiB for 10M rows,
the default memory request of a pipeline step (StepResources).

Pipeline (``--only pipeline``): the monitoring pipeline (pipelines/monitoring.py, under kfp.local)
on a day of capture at 1,000 requests/s: 86.4M captured rows in 24 hourly parts (--quick: one hour,
3.6M rows), made from a small trained fraud loop's holdout rows (its inputs, features and the
model's scores, repeated over the day). Figures: the setup, the capture's size, and the pipeline's
wall time; goal: under 15 minutes for the day (the schedule is hourly: a day's monitor must finish
well inside the hour). The skew figures of this synthetic day mean nothing (repeated rows at other
times) and are not reported.

Flights (``--only flights``): the flights model trained on January to March 2013, then April to
December each ingested, served through the real server with capture on and monitored on its own
(tests/monitoring_scenarios.py, as tests/integration/test_monitoring_flights.py does for February
and March): per month the estimated MAE (no labels) beside the realised MAE and what crossed.
--quick: trained on January, February and March monitored. Goal: the label-free estimate within 20%
of the realised MAE on average over the months (how far a team can trust it before labels arrive).

Sections: ``--only profile,pipeline,flights`` (default: all); a section not run keeps its figures from the last
results file. Writes
benchmarks/results/monitoring.json (monitoring-quick.json with --quick).
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

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("profile", "pipeline", "flights")

NUMBERS = [f"feature.f{i}" for i in range(8)]
CATEGORIES = {"input.device": 5, "input.merchant_category": 20, "input.country": 200}
OUTPUT = "output.score"

GENERATE = """
import sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
rows, part_rows, out, seed = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
numbers, categories, output = {numbers!r}, {categories!r}, {output!r}
rng = np.random.default_rng(seed)
for index, first in enumerate(range(0, rows, part_rows)):
    n = min(part_rows, rows - first)
    columns = {{}}
    for i, name in enumerate(numbers):
        values = rng.lognormal(1 + i / 4, 1, n) if i % 2 else rng.normal(i, 1 + i, n)
        values[rng.random(n) < 0.01] = np.nan
        columns[name] = pa.array(values, from_pandas=True)  # NaN stored as null, as the capture does
    for name, size in categories.items():
        weights = 1 / np.arange(1, size + 1)  # Zipf-like: a few frequent values and a long tail
        picks = rng.choice(size, n, p=weights / weights.sum())
        columns[name] = pa.array(np.array([f"{{name[6:]}}-{{k}}" for k in range(size)], dtype=object)[picks])
    columns[output] = pa.array(rng.random(n))
    pq.write_table(pa.table(columns), f"{{out}}/part-{{index:05d}}.parquet")
""".format(numbers=NUMBERS, categories=CATEGORIES, output=OUTPUT)

PROFILE = """
import json, resource, sys, time
from pathlib import Path
import pyarrow.parquet as pq
from flywheel.config import MonitoringSettings
from flywheel.monitoring.drift import compare
from flywheel.monitoring.profile import Profile, profile_table
baseline_dir, window_dir = Path(sys.argv[1]), Path(sys.argv[2])
kinds = {{**{{name: "number" for name in {numbers!r}}}, **{{name: "category" for name in {categories!r}}}, {output!r}: "number"}}
settings = MonitoringSettings()
columns = list(kinds)
baseline_table = pq.read_table(sorted(baseline_dir.glob("*.parquet"))[0], columns=columns)
started = time.perf_counter()
baseline = profile_table(baseline_table, kinds, bins=settings.bins)
baseline_seconds = time.perf_counter() - started
del baseline_table
window, profile_seconds, read_seconds, parts = None, 0.0, 0.0, 0
wall, cpu = time.perf_counter(), time.process_time()
for path in sorted(window_dir.glob("*.parquet")):
    started = time.perf_counter()
    table = pq.read_table(path, columns=columns)
    read_done = time.perf_counter()
    part = profile_table(table, kinds, baseline=baseline)
    window = part if window is None else window.merge(part)
    profile_seconds += time.perf_counter() - read_done
    read_seconds += read_done - started
    parts += 1
    del table
total_seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
started = time.perf_counter()
drift = compare(baseline, window, settings)
compare_seconds = time.perf_counter() - started
stored = json.dumps(window.to_dict())
assert Profile.from_dict(json.loads(stored)) == window
print(json.dumps({{"rows": window.rows, "parts": parts, "baseline_rows": baseline.rows,
                  "baseline_seconds": baseline_seconds, "profile_seconds": profile_seconds,
                  "read_seconds": read_seconds, "total_seconds": total_seconds, "cpu_seconds": cpu_seconds,
                  "compare_seconds": compare_seconds, "profile_json_bytes": len(stored),
                  "crossed": sum(d.crossed for d in drift),
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
""".format(numbers=NUMBERS, categories=list(CATEGORIES), output=OUTPUT)


def run_python(code: str, *args: str) -> str:
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=environment)
    if done.returncode != 0:
        raise SystemExit(f"benchmark step failed:\n{done.stderr[-3000:]}")
    return done.stdout


def profile_section(quick: bool) -> tuple[dict[str, float], dict[str, dict]]:
    """Profile 10M captured rows (--quick 1M) part by part on a 1M-row baseline (--quick 200k)."""
    rows, baseline_rows, part_rows = (1_000_000, 200_000, 250_000) if quick else (10_000_000, 1_000_000, 250_000)
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-monitoring-") as tmp:
        baseline_dir, window_dir = Path(tmp, "baseline"), Path(tmp, "window")
        baseline_dir.mkdir()
        window_dir.mkdir()
        print(f"generating a {baseline_rows:,}-row baseline and {rows:,} captured rows", flush=True)
        run_python(GENERATE, str(baseline_rows), str(baseline_rows), str(baseline_dir), "1")
        run_python(GENERATE, str(rows), str(part_rows), str(window_dir), "2")
        print("profiling", flush=True)
        out = json.loads(run_python(PROFILE, str(baseline_dir), str(window_dir)).strip().splitlines()[-1])
    assert out["rows"] == rows, out
    label = f"{rows // 1_000_000}M"
    figures = {
        "profile_rows": rows,
        "profile_parts": out["parts"],
        "profile_columns": len(NUMBERS) + len(CATEGORIES) + 1,
        "profile_rows_per_s": round(rows / out["profile_seconds"]),
        "profile_with_reads_rows_per_s": round(rows / out["total_seconds"]),
        f"profile_{label}_seconds": round(out["total_seconds"], 2),
        f"profile_{label}_read_seconds": round(out["read_seconds"], 2),
        f"profile_{label}_cpu_seconds": round(out["cpu_seconds"], 2),
        "profile_peak_rss_mib": round(out["peak_mib"]),
        "profile_baseline_rows": baseline_rows,
        "profile_baseline_seconds": round(out["baseline_seconds"], 2),
        "profile_compare_ms": round(out["compare_seconds"] * 1000, 2),
        "profile_json_bytes": out["profile_json_bytes"],
        "profile_same_distribution_crossed": out["crossed"],
    }
    goals = judge(figures, {"profile_with_reads_rows_per_s": (1_000_000, "min"),
                            "profile_peak_rss_mib": (1024, "max"),
                            "profile_same_distribution_crossed": (0, "max")})
    return figures, goals


PIPELINE = """
import json, sys, time
from pathlib import Path
import numpy as np, pandas as pd, pyarrow as pa
from flywheel.config import load_settings
from flywheel.storage import Storage
from flywheel.registry import Registry
from flywheel.monitoring.capture import part_uri, INPUT, FEATURE, OUTPUT
from flywheel.training.model import load_version
from tests.conftest import run_loop, small_env
from tests.factories import generate

home, rows, hours = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
env = small_env(home)
settings = load_settings(env=env)
storage = Storage.from_settings(settings)
began = time.perf_counter()
generate(storage, storage.uri("raw", "base"), rows=30_000, days=14, seed=11)
loop = run_loop(settings, storage.uri("raw", "base"), "base")
setup = time.perf_counter() - began
version = Registry(storage, settings.model_name).production()
holdout = storage.read_parquet(loop["training_set"]["holdout_uri"]).to_pandas()
scores = np.asarray(load_version(Registry(storage, settings.model_name), version).score(holdout)).reshape(-1)
day = holdout["ts"].max().normalize()
per_hour = rows // hours
columns = {INPUT + c: holdout[c] for c in ["transaction_id", "card_id", "merchant_id", "merchant_category", "amount",
                                             "ts", "channel", "lat", "lon"]}
columns.update({FEATURE + r.split(":")[1]: holdout[r.split(":")[1]] for r in loop["training_set"]["feature_refs"]})
base = pa.Table.from_pandas(pd.DataFrame({**columns, OUTPUT + "fraud_probability": scores}), preserve_index=False)
written = 0
began = time.perf_counter()
rng = np.random.default_rng(0)
for hour in range(hours):
    pick = rng.integers(0, base.num_rows, per_hour)
    part = base.take(pa.array(pick))
    start = day + pd.Timedelta(hours=hour)
    times = (start + pd.to_timedelta(np.sort(rng.integers(0, 3_600_000_000, per_hour)), unit="us")).astype("datetime64[us, UTC]")
    meta = {"request_id": pa.array([f"r{hour}-{i}" for i in range(per_hour)]),
            "captured_at": pa.array(times), "model_version": pa.array([version.version] * per_hour), "row_time": pa.array(times)}
    for name, values in meta.items():
        part = part.append_column(name, values)
    storage.write_parquet(part_uri(storage, start.to_pydatetime(), f"part-{hour:02d}.parquet"), part)
    written += part.num_rows
capture_seconds = time.perf_counter() - began
size = sum(p.stat().st_size for p in Path(storage.uri("monitoring", "capture")).rglob("*.parquet"))
from pipelines.monitoring import run_locally
began = time.perf_counter()
run_locally(settings, "bench-monitor", since=day.isoformat(), until=(day + pd.Timedelta(hours=hours)).isoformat())
pipeline = time.perf_counter() - began
result = json.loads(Path(storage.uri("monitoring", "runs", "bench-monitor", "result.json")).read_text())
print(json.dumps({"setup_seconds": setup, "rows": written, "capture_seconds": capture_seconds, "capture_bytes": size,
                  "pipeline_seconds": pipeline, "monitored_rows": result["rows"], "monitor_step_seconds": result["seconds"]}))
"""


def pipeline_section(quick: bool) -> tuple[dict[str, float], dict[str, dict]]:
    """The monitoring pipeline on a day of capture at 1,000 requests/s (--quick: an hour)."""
    hours = 1 if quick else 24
    rows = 1_000 * 3_600 * hours
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-monitoring-pipeline-") as tmp:
        print(f"a trained loop, then {rows:,} captured rows over {hours} hour(s), then the monitoring pipeline", flush=True)
        out = json.loads(run_python(PIPELINE, tmp, str(rows), str(hours)).strip().splitlines()[-1])
    assert out["monitored_rows"] == rows, out
    figures = {
        "pipeline_captured_rows": rows,
        "pipeline_capture_mib": round(out["capture_bytes"] / 2**20, 1),
        "pipeline_seconds": round(out["pipeline_seconds"], 1),
        "pipeline_monitor_step_seconds": round(out["monitor_step_seconds"], 1),
        "pipeline_rows_per_s": round(rows / out["monitor_step_seconds"]),
        "pipeline_setup_seconds": round(out["setup_seconds"], 1),
    }
    goals = judge(figures, {"pipeline_seconds": (900 if not quick else 60, "max")})
    return figures, goals


def flights_section(quick: bool) -> tuple[dict[str, float], dict[str, dict]]:
    """Flights monitored month by month (trained on January to March; --quick: January)."""
    sys.path.insert(0, str(REPO))
    from tests.monitoring_scenarios import flights_month_by_month

    base, months = (("2013-01", "2013-01"), ["2013-02", "2013-03"]) if quick else \
        (("2013-01", "2013-03"), [f"2013-{m:02d}" for m in range(4, 13)])
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-monitoring-flights-") as tmp:
        out = flights_month_by_month(Path(tmp), base, months, epochs=5, log=lambda line: print(line[:300], flush=True))
    table = out["months"]
    print(f"\n| month | flights | estimated MAE | realised MAE (90% interval) | crossed |")
    print("| --- | --- | --- | --- | --- |")
    figures: dict[str, float] = {"flights_evaluation_mae": round(table[0]["evaluation_mae"], 2)}
    gaps = []
    for row in table:
        low, high = row["realised_interval"]
        kinds = sorted({name.split(" ", 1)[0] for name in row["crossed"]})
        print(f"| {row['month']} | {row['rows']:,} | {row['estimated_mae']:.2f} | {row['realised_mae']:.2f} "
              f"({low:.2f} to {high:.2f}) | {len(row['crossed'])}: {', '.join(kinds) or 'nothing'} |")
        month = row["month"].replace("-", "_")
        figures[f"flights_{month}_estimated_mae"] = round(row["estimated_mae"], 2)
        figures[f"flights_{month}_realised_mae"] = round(row["realised_mae"], 2)
        figures[f"flights_{month}_crossed"] = len(row["crossed"])
        gaps.append(abs(row["estimated_mae"] - row["realised_mae"]) / row["realised_mae"])
    figures["flights_estimate_relative_error"] = round(float(sum(gaps) / len(gaps)), 3)
    figures["flights_monitor_month_seconds"] = round(sum(r["seconds"] for r in table) / len(table), 1)
    goals = judge(figures, {"flights_estimate_relative_error": (0.2, "max")})
    return figures, goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M captured rows instead of 10M")
    parser.add_argument("--only", default=",".join(SECTIONS), metavar="SECTIONS",
                        help=f"comma-separated sections to run: {', '.join(SECTIONS)} (default: all)")
    args = parser.parse_args()
    sections = {section.strip() for section in args.only.split(",") if section.strip()}
    unknown = sections - set(SECTIONS)
    if unknown or not sections:
        parser.error(f"--only takes {', '.join(SECTIONS)}, not {', '.join(sorted(unknown)) or 'nothing'}")
    path = REPO / "benchmarks" / "results" / ("monitoring-quick.json" if args.quick else "monitoring.json")
    previous = json.loads(path.read_text()) if path.is_file() else {}
    figures: dict[str, float] = {"load_avg_1m": round(os.getloadavg()[0], 2)}
    goals: dict[str, dict] = {}
    for section, run in (("profile", profile_section), ("pipeline", pipeline_section), ("flights", flights_section)):
        if section in sections:
            section_figures, section_goals = run(args.quick)
            figures.update(section_figures)
            goals.update(section_goals)
    figures["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    # A section not run keeps its figures from the last run (figures are named after their section).
    kept = {key: value for key, value in previous.get("figures", {}).items()
            if key not in figures and key.split("_", 1)[0] not in sections}
    kept_goals = {key: value for key, value in previous.get("goals", {}).items()
                  if key not in goals and key.split("_", 1)[0] not in sections}
    write_results(path, {**kept, **figures}, {**kept_goals, **goals}, quick=args.quick)


if __name__ == "__main__":
    main()
