"""`make run` from a fresh clone: set-up time, run time, rows, ROC-AUC, PR-AUC and PR-AUC vs the truth.

    python benchmarks/make_run.py [--quick]

Clones this repository into a temporary folder, times `make setup` (creates .venv from the lock)
and then `make run` (the pipeline on generated data; set-up is already done, so this is the run),
and reads the run's summary. --quick reuses this checkout's .venv and runs 50k rows.
Writes benchmarks/results/make_run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_table import judge, write_results

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "make_run.json"
GOALS = {  # name: (target, "max" | "min")
    "run_seconds": (300.0, "max"),  # "a default size that finishes in a few minutes here"
    "roc_auc": (0.80, "min"),
    "pr_auc_vs_truth": (0.75, "min"),
}


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reuse this checkout's .venv and run 50k rows")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    clone = work / "flywheel"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env["FLYWHEEL_HOME"] = str(clone / ".flywheel")
    if args.quick:
        os.symlink(REPO / ".venv", clone / ".venv")
        env["FLYWHEEL_DATA__ROWS"] = "50000"
        setup_s = 0.0
    else:
        setup_s = timed(["make", "setup"], clone, env)
    run_s = timed(["make", "run"], clone, env)
    summary_path = max((clone / ".flywheel" / "store" / "fraud" / "runs").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    summary = json.loads(summary_path.read_text())
    metrics, truth = summary["metrics"], summary["truth"]
    figures = {
        "setup_seconds": round(setup_s, 1),
        "run_seconds": round(run_s, 1),
        "total_seconds": round(setup_s + run_s, 1),
        "pipeline_seconds": summary["pipeline_seconds"],
        "rows": summary["steps"][0]["rows"],
        "holdout_rows": int(metrics["rows"]),
        "holdout_fraud": int(metrics["positives"]),
        "roc_auc": round(metrics["roc_auc"], 4),
        "pr_auc": round(metrics["pr_auc"], 4),
        "truth_pr_auc": round(truth["truth_pr_auc"], 4),
        "pr_auc_vs_truth": round(truth["pr_auc_vs_truth"], 4),
    }
    for step in summary["steps"]:
        figures[f"step_{step['step']}_seconds"] = step["seconds"]
    write_results(RESULTS, figures, judge(figures, GOALS), quick=args.quick)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
