"""`flywheel generate` at scale: rows/s and peak memory, which must stay bounded by the chunk size.

    python benchmarks/generate.py [--quick]

Generates 10M rows (--quick: 1M) twice in child processes, with the default chunk (500k rows) and
a small one (100k rows), and reports each one's wall time, rows/s and peak RSS. Bounded memory shows
as a peak that does not grow with the number of rows and shrinks with the chunk size.
Writes benchmarks/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "generate.json"
FRAUD = Path(__file__).resolve().parents[1] / "usecases" / "fraud"
PEAK_TARGET_MIB = 1024.0  # 10M rows must fit comfortably on a laptop

CHILD = """
import resource, sys
from flywheel.storage import Storage
from flywheel.usecase import load_module, load_usecase
rows, chunk, out, fraud = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
generate = load_module(load_usecase(fraud), "generator").generate  # usecases/fraud/generator.py
generate(Storage(out), out, rows=rows, days=30, seed=7, chunk_rows=chunk)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def run_child(rows: int, chunk: int) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one generation in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="flywheel-gen-") as out:
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(rows), str(chunk), out, str(FRAUD)], check=True, capture_output=True, text=True
        )
        seconds = time.perf_counter() - started
    return seconds, int(result.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M rows instead of 10M")
    args = parser.parse_args()
    rows = 1_000_000 if args.quick else 10_000_000
    figures: dict[str, float] = {"rows": rows}
    for label, chunk in (("chunk500k", 500_000), ("chunk100k", 100_000)):
        seconds, peak = run_child(rows, chunk)
        figures[f"{label}_seconds"] = round(seconds, 1)
        figures[f"{label}_rows_per_s"] = round(rows / seconds)
        figures[f"{label}_peak_rss_mib"] = round(peak, 1)
    goals = {
        "chunk500k_peak_rss_mib": {
            "target": PEAK_TARGET_MIB,
            "value": figures["chunk500k_peak_rss_mib"],
            "met": figures["chunk500k_peak_rss_mib"] <= PEAK_TARGET_MIB,
        }
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"figures": figures, "goals": goals, "quick": args.quick}, indent=2) + "\n")
    for name, value in figures.items():
        print(f"{name:<26} {value}")
    print(f"goal peak RSS <= {PEAK_TARGET_MIB:.0f} MiB: {'met' if goals['chunk500k_peak_rss_mib']['met'] else 'NOT met'}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
