"""Real-time features, quality on a replayed day: one model's scores with live updates, batch-only
(the online store as the last run left it) and offline point in time (issue 20).

    python benchmarks/live_quality.py [--quick] [--keep]

Data: the fraud generator (usecases/fraud/generator.py), N+1 days (N = 30, 62,000 rows; --quick:
N = 14, 30,000 rows), seed 7. Days 1..N are the training source, day N+1 the replayed day.

1. In one temporary FLYWHEEL_HOME ("served"): the loop's steps on days 1..N (ingest, validate,
   features: the world's online store materialized at the lake's end; train, 3 epochs with
   --quick). The model version the train step published is loaded as serving loads it
   (``serving.predictor.load_bundle``).
2. In a second FLYWHEEL_HOME ("offline"): ingest, validate and features on days 1..N+1; the training
   set's rows of day N+1 are what the offline path gives each of them (the point-in-time join).
3. Day N+1 scored three ways by that one model:
   - batch: each row's v1 request (``RequestSchema.v1``) with the features the online store holds
     as the last run materialized it (no update during the day), as ``serving.predictor.score`` does;
   - live: ``LiveFeatures`` seeded from the served lake's rows, its watermark just before the day
     (no rebuild: the world's materialization already holds each entity's row at its latest
     instant, the lake's end, and the check below proves it), then ``replay`` reads each row's
     features as a request at its time would, just before its own events are applied, writing the
     online store as the events come; the same transform and model;
   - offline: the training set's rows of day N+1, ``model.spec.transform`` and the model.
   Also the generator's true fraud probability of each row (the best achievable ranking).
4. Per way: PR-AUC, ROC-AUC, recall at 1% false positives (``flywheel.evaluation.ranking_metrics``,
   scikit-learn underneath); for burst frauds (frauds within 10 minutes of another transaction of
   the same card) their recall at the day's 1%-false-positive threshold and how many are in the top
   5% of scores. A paired bootstrap (1,000 resamples of the day's rows, the same for every way) of
   PR-AUC and ROC-AUC differences live - offline, live - batch and offline - batch, with 95%
   percentile intervals.
5. Check: the share of the day's rows whose live features equal the offline ones (every feature,
   1e-9 tolerance, NaN equal to NaN), and whose scores equal (1e-6).

Goals: ``live_vs_offline_pr_auc_equal`` (target 0 difference): met when every row's live features
equal offline and the bootstrap interval of live - offline contains 0; ``live_beats_batch_pr_auc``
(target: interval above 0): met when the interval's lower end is above 0 (with --quick the day is
small and this is noisy). The issue measured, on 30 days of 60k rows, PR-AUC 0.161 / ROC-AUC 0.742
as served with the last run's features and 0.282 / 0.903 point in time. Writes
benchmarks/results/live_quality.json (live_quality-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from results_table import write_results

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from tests.factories import request_of  # noqa: E402  (the v1 body a client sends for rows)

SEED = 7
START = "2026-10-01"
FPR = 0.01
BURST_GAP = pd.Timedelta(minutes=10)
TOP_SHARE = 0.05
RESAMPLES = 1000
FEATURE_TOLERANCE = 1e-9
SCORE_TOLERANCE = 1e-6
US = pd.Timedelta(microseconds=1)
WAYS = ("batch", "live", "offline")


# ---------------------------------------------------------------- data
def generate_split(root: Path, rows: int, days: int) -> tuple[str, str, pd.Timestamp]:
    """Generate ``days`` + 1 days; (the source of the first ``days`` days, the source of all of them,
    the replayed day's start). Both keep the generator's ``_truth`` beside their rows."""
    from flywheel.config import load_settings
    from flywheel.storage import Storage, join
    from tests.factories import generate

    storage = Storage.from_settings(load_settings(env={"FLYWHEEL_HOME": str(root / "generated")}))
    everything = str(root / "raw" / "all")
    result = generate(storage, everything, rows=rows, days=days + 1, seed=SEED, start=START)
    start = pd.Timestamp(START, tz="UTC") + pd.Timedelta(days=days)
    first = str(root / "raw" / "first-days")
    raw = pa.concat_tables([storage.read_parquet(uri) for uri in result.files])
    kept = raw.filter(pc.less(raw["ts"], pa.scalar(start.to_pydatetime(), raw.schema.field("ts").type)))
    storage.write_parquet(join(first, "part-00000.parquet"), kept)
    truth = pa.concat_tables([storage.read_parquet(uri) for uri in result.truth_files])
    storage.write_parquet(join(first, "_truth", "part-00000.parquet"),
                          truth.filter(pc.is_in(truth["transaction_id"], kept["transaction_id"])))
    return first, everything, start


def settings_of(home: Path, quick: bool):
    from flywheel.config import load_settings

    env = {"FLYWHEEL_HOME": str(home)}
    if quick:
        env["FLYWHEEL_TRAINING__EPOCHS"] = "3"
    return load_settings(env=env)


def lake_and_features(source: str, settings, run_id: str) -> tuple[dict, dict]:
    """ingest, validate, features: (the published snapshot, the training set)."""
    from flywheel import steps

    staged = steps.ingest_step(source, run_id, settings)
    published = steps.validate_step(staged, run_id, settings)
    return published, steps.features_step(published, run_id, settings)


def offline_rows(settings, training_set: dict) -> pd.DataFrame:
    from flywheel.features.build import TrainingSet
    from flywheel.storage import Storage

    storage = Storage.from_settings(settings)
    built = TrainingSet.from_dict(training_set)
    return pd.concat([storage.read_parquet(uri).to_pandas() for uri in (built.train_uri, built.holdout_uri)],
                     ignore_index=True)


def lake_rows(settings, published: dict) -> pd.DataFrame:
    from flywheel.lake import LakeSnapshot, read_snapshot
    from flywheel.storage import Storage
    from flywheel.usecase import load_usecase

    contract = load_usecase(settings.usecase).contract
    return read_snapshot(Storage.from_settings(settings), LakeSnapshot.from_dict(published), contract.arrow_schema()).to_pandas()


# ---------------------------------------------------------------- scoring
def served_scores(bundle, day: pd.DataFrame, features: dict[str, np.ndarray]) -> np.ndarray:
    """The model's scores of the day's requests with these looked-up features (serving's path)."""
    parsed = bundle.schema.v1(request_of(day, bundle.schema), len(day))
    return np.asarray(bundle.model.predict(bundle.model.spec.transform_columns({**parsed.columns, **features})), dtype=float).ravel()


def batch_features(bundle, day: pd.DataFrame) -> dict[str, np.ndarray]:
    """What the online store, as the last run materialized it, gives each request of the day."""
    parsed = bundle.schema.v1(request_of(day, bundle.schema), len(day))
    features, _ = bundle.reader.read(parsed.keys, at=parsed.columns.get(bundle.schema.time))
    return features


def live_features(settings, bundle, lake: pd.DataFrame, day: pd.DataFrame,
                  start: pd.Timestamp) -> tuple[pd.DataFrame, dict[str, float]]:
    """The features ``replay`` reads for each of the day's rows, the live path starting just before
    ``start`` from the online store as the world's materialization left it."""
    from flywheel.features.live import LiveFeatures, replay
    from flywheel.features.online_write import OnlineWriter
    from flywheel.features.views import views_of
    from flywheel.usecase import load_usecase

    usecase = load_usecase(settings.usecase)
    views = views_of(usecase)
    seconds = {}
    began = time.perf_counter()
    live = LiveFeatures(usecase.contract, views, OnlineWriter(settings, bundle.world, views))
    live.seed(lake, {}, until=start - US)
    seconds["seed"] = time.perf_counter() - began
    began = time.perf_counter()
    served = replay(live, bundle.reader.read, day, {}, join_keys=bundle.reader.join_keys)
    seconds["replay"] = time.perf_counter() - began
    return served, seconds


def equal_rows(got: dict[str, np.ndarray] | pd.DataFrame, want: pd.DataFrame, names: list[str]) -> np.ndarray:
    """Per row: every named feature equal (tolerance 1e-9; NaN equals NaN)."""
    same = np.ones(len(want), dtype=bool)
    for name in names:
        a = np.asarray(got[name], dtype="float64")
        b = want[name].to_numpy(dtype="float64")
        same &= np.isclose(a, b, rtol=FEATURE_TOLERANCE, atol=FEATURE_TOLERANCE) | (np.isnan(a) & np.isnan(b))
    return same


# ---------------------------------------------------------------- metrics
def bursts(everything: pd.DataFrame, day_ids: pd.Series) -> np.ndarray:
    """Per row of the day: within ``BURST_GAP`` of another transaction of the same card (either side)."""
    ordered = everything[["transaction_id", "card_id", "ts"]].sort_values(["card_id", "ts"], kind="stable")
    same_before = ordered["card_id"].eq(ordered["card_id"].shift(1))
    same_after = ordered["card_id"].eq(ordered["card_id"].shift(-1))
    gap_before = (ordered["ts"] - ordered["ts"].shift(1)).where(same_before)
    gap_after = (ordered["ts"].shift(-1) - ordered["ts"]).where(same_after)
    burst = (gap_before <= BURST_GAP) | (gap_after <= BURST_GAP)
    flags = pd.Series(burst.to_numpy(), index=ordered["transaction_id"].to_numpy())
    return flags.loc[day_ids.to_numpy()].to_numpy(dtype=bool)


def way_figures(labels: np.ndarray, scores: np.ndarray, burst_fraud: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import roc_curve

    from flywheel.evaluation import ranking_metrics

    ranked = ranking_metrics(labels, scores, fpr=FPR)
    false_positive_rate, true_positive_rate, thresholds = roc_curve(labels, scores)
    allowed = np.flatnonzero(false_positive_rate <= FPR)
    threshold = thresholds[allowed[np.argmax(true_positive_rate[allowed])]]
    top = np.argsort(-scores, kind="stable")[: int(np.ceil(TOP_SHARE * len(scores)))]
    return {
        "pr_auc": round(ranked["pr_auc"], 4),
        "roc_auc": round(ranked["roc_auc"], 4),
        "recall_at_1pct_fpr": round(ranked["recall_at_fpr"], 4),
        "burst_recall_at_1pct_fpr": round(float((scores[burst_fraud] >= threshold).mean()), 4) if burst_fraud.any() else float("nan"),
        "burst_frauds_in_top_5pct": float(burst_fraud[top].sum()),
    }


def paired_bootstrap(labels: np.ndarray, scores: dict[str, np.ndarray], pairs: list[tuple[str, str]]) -> dict[str, tuple[float, float, float]]:
    """PR-AUC and ROC-AUC differences over resamples of the rows (the same resamples for every way):
    ``<metric>_<a>_minus_<b>`` -> (observed difference, 2.5th percentile, 97.5th percentile)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    metrics = {"pr_auc": average_precision_score, "roc_auc": roc_auc_score}
    ways = sorted({way for pair in pairs for way in pair})
    rng = np.random.default_rng(0)
    draws: dict[str, list[float]] = {f"{m}_{a}_minus_{b}": [] for m in metrics for a, b in pairs}
    for _ in range(RESAMPLES):
        index = rng.integers(0, len(labels), len(labels))
        sample = labels[index]
        if sample.min() == sample.max():
            continue
        for metric, function in metrics.items():
            value = {way: function(sample, scores[way][index]) for way in ways}
            for a, b in pairs:
                draws[f"{metric}_{a}_minus_{b}"].append(value[a] - value[b])
    out = {}
    for metric, function in metrics.items():
        for a, b in pairs:
            name = f"{metric}_{a}_minus_{b}"
            low, high = np.percentile(draws[name], [2.5, 97.5])
            out[name] = (float(function(labels, scores[a]) - function(labels, scores[b])), float(low), float(high))
    return out


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="15 days, 30k rows, 3 epochs instead of 31 days, 62k rows")
    parser.add_argument("--keep", action="store_true", help="keep the temporary homes")
    args = parser.parse_args()
    days, rows = (14, 30_000) if args.quick else (30, 62_000)

    from flywheel import steps
    from flywheel.features.views import views_of
    from flywheel.usecase import load_usecase
    from serving.predictor import load_bundle

    root = Path(tempfile.mkdtemp(prefix="flywheel-live-quality-"))
    figures: dict[str, float] = {"days": float(days), "rows": float(rows)}
    seconds: dict[str, float] = {}
    total = time.perf_counter()
    try:
        began = time.perf_counter()
        first, everything, start = generate_split(root, rows, days)
        seconds["generate_s"] = time.perf_counter() - began

        # Offline point in time: the loop's features on every day, in a home of its own.
        began = time.perf_counter()
        offline_settings = settings_of(root / "offline", args.quick)
        offline_snapshot, offline_set = lake_and_features(everything, offline_settings, "offline")
        offline = offline_rows(offline_settings, offline_set)
        all_rows = lake_rows(offline_settings, offline_snapshot)
        seconds["offline_features_s"] = time.perf_counter() - began

        # The served world: the loop on days 1..N, its model as serving loads it.
        began = time.perf_counter()
        settings = settings_of(root / "served", args.quick)
        published, training_set = lake_and_features(first, settings, "served")
        seconds["served_features_s"] = time.perf_counter() - began
        began = time.perf_counter()
        model = steps.train_step(training_set, "served", settings)
        seconds["train_s"] = time.perf_counter() - began
        bundle = load_bundle(settings, model["version"])
        lake = lake_rows(settings, published)
        usecase = load_usecase(settings.usecase)
        contract = usecase.contract
        names = [name for view in views_of(usecase) for name in view.features]

        day = all_rows[all_rows[contract.timestamp] >= start].sort_values(contract.timestamp, kind="stable").reset_index(drop=True)
        truth_day = offline.set_index(contract.id).loc[day[contract.id]].reset_index()
        labels = day[contract.labels[0]].to_numpy().astype(int)
        assert (truth_day[contract.labels[0]].to_numpy().astype(int) == labels).all()
        figures.update(day_rows=float(len(day)), day_frauds=float(labels.sum()))

        # a. batch-only: the store as the last run left it (read before the live path writes it).
        began = time.perf_counter()
        looked_up = {"batch": batch_features(bundle, day)}
        seconds["batch_score_s"] = time.perf_counter() - began
        # b. live: seeded from the lake, the store as materialized, updated as the day's events come.
        live, live_seconds = live_features(settings, bundle, lake, day, start)
        looked_up["live"] = {name: live[name].to_numpy() for name in live.columns}
        seconds.update({f"live_{k}_s": v for k, v in live_seconds.items()})
        scores = {way: served_scores(bundle, day, looked_up[way]) for way in ("batch", "live")}
        # c. offline point in time: the training set's rows, the same model.
        scores["offline"] = np.asarray(bundle.model.score(truth_day), dtype=float).ravel()

        for way in ("batch", "live"):
            figures[f"{way}_features_equal_offline_share"] = round(float(equal_rows(looked_up[way], truth_day, names).mean()), 6)
        figures["live_scores_equal_offline_share"] = round(float(np.isclose(scores["live"], scores["offline"], rtol=0, atol=SCORE_TOLERANCE).mean()), 6)

        burst_fraud = bursts(all_rows, day[contract.id]) & (labels == 1)
        figures["day_burst_frauds"] = float(burst_fraud.sum())
        for way in WAYS:
            for name, value in way_figures(labels, scores[way], burst_fraud).items():
                figures[f"{way}_{name}"] = value
        truth = pd.read_parquet(Path(everything) / "_truth").set_index(contract.id)["fraud_probability"]
        best = truth.loc[day[contract.id]].to_numpy()
        for name, value in way_figures(labels, best, burst_fraud).items():
            figures[f"true_probability_{name}"] = value

        began = time.perf_counter()
        intervals = paired_bootstrap(labels, scores, [("live", "offline"), ("live", "batch"), ("offline", "batch")])
        seconds["bootstrap_s"] = time.perf_counter() - began
        for name, (observed, low, high) in intervals.items():
            figures[name] = round(observed, 6)
            figures[f"{name}_ci_low"] = round(low, 6)
            figures[f"{name}_ci_high"] = round(high, 6)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    seconds["total_s"] = time.perf_counter() - total
    figures.update({k: round(v, 2) for k, v in seconds.items()})

    observed, low, high = intervals["pr_auc_live_minus_offline"]
    equal = figures["live_features_equal_offline_share"] == 1.0 and low <= 0.0 <= high
    _, beat_low, _ = intervals["pr_auc_live_minus_batch"]
    goals = {
        "live_vs_offline_pr_auc_equal": {"target": 0.0, "value": round(observed, 6), "met": bool(equal)},
        "live_beats_batch_pr_auc": {"target": 0.0, "value": round(beat_low, 6), "met": bool(beat_low > 0.0)},
    }
    print(f"{'way':<17} {'PR-AUC':>7} {'ROC-AUC':>7} {'R@1%FPR':>7} {'burst R@1%':>10} {'bursts top5%':>12}")
    for way in (*WAYS, "true_probability"):
        print(f"{way:<17} {figures[f'{way}_pr_auc']:>7.4f} {figures[f'{way}_roc_auc']:>7.4f} {figures[f'{way}_recall_at_1pct_fpr']:>7.4f} "
              f"{figures[f'{way}_burst_recall_at_1pct_fpr']:>10.4f} {figures[f'{way}_burst_frauds_in_top_5pct']:>6.0f}/{figures['day_burst_frauds']:.0f}")
    name = "live_quality-quick.json" if args.quick else "live_quality.json"
    write_results(Path(__file__).parent / "results" / name, figures, goals)


if __name__ == "__main__":
    main()
