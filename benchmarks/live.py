"""Real-time features: freshness, update throughput, and serving with live updates on against off.

    python benchmarks/live.py [--quick] [--keep]

Set-up (benchmarks/serving.py's): in a temporary $FLYWHEEL_HOME, fraud's loop on generated data with
the SQLite online store, then again with the Redis one (a redis-server on loopback). Events are real
holdout transactions re-stamped after the lake's end, with ids of their own.

- **Update throughput** (per online store): N events appended to the log, then the updater
  (flywheel.deploy.live.updater_for, as `flywheel events apply` runs it) drains it: events/s
  applied, the world's bring-live time (lake snapshot and log history read, every entity rewritten)
  apart.
- **Freshness** (per online store): the updater running (in a thread here; `flywheel serve` runs it in a process);
  one event at a time (a new card each), appended to the log; the time until the online store holds
  that card's row (polled every 0.5 ms): p50 and p99.
- **Serving**: `flywheel serve` with live updates off and on (write-through of every scored row,
  the updater in the server's process), side by side on the same world, wrk at concurrency 8 with
  distinct transactions (every request a new event), 3 rounds alternating: p99 and requests/s.
  Goal (issue 20): p99 with updates on within 15% of off.

Quick: 30k rows over 14 days, 5k events, 100 freshness probes, 3 s loads; full: 200k rows over 30
days, 30k events, 300 probes, 10 s loads. Writes benchmarks/results/live.json (live-quick.json).
The quality on a replayed day is benchmarks/live_quality.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from results_table import judge, write_results
from wrk_output import lua_script

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
_spec = importlib.util.spec_from_file_location("bench_serving", Path(__file__).with_name("serving.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
ROUNDS = 3
CONCURRENCY = 8


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def events_of(instances: list[dict], prefix: str) -> list[bytes]:
    return [json.dumps({"row": {**row, "transaction_id": f"{prefix}-{i}"}}).encode() for i, row in enumerate(instances)]


def settings_for(env: dict[str, str], **extra: str):
    """The updater's settings for throughput and freshness: the events carry the demo's October 2026
    times, so the worlds move with them (``live.clock: events``); serving on/off runs the default
    wall clock, as a server does."""
    from flywheel.config import load_settings

    return load_settings(env=bench.clean_env(**{"FLYWHEEL_LIVE__CLOCK": "events", **env, **extra}))


def throughput(env: dict[str, str], instances: list[dict], store: str) -> dict[str, float]:
    """Append every event, then drain the log with the updater: events/s applied."""
    from flywheel.deploy.live import updater_for
    from flywheel.features.store import feast_home

    settings = settings_for(env)
    (feast_home(settings) / "events.db").unlink(missing_ok=True)
    updater = updater_for(settings)
    started = time.perf_counter()
    updater.worlds()  # bring the served world live: the lake's snapshot read, every entity within reach rewritten
    bring_live = time.perf_counter() - started
    updater.log.append(events_of(instances, f"{store}-tp"))
    started = time.perf_counter()
    stats = updater.drain()
    seconds = time.perf_counter() - started
    print(f"  {store:<7} bring-live {bring_live:6.2f} s; {stats.applied:,} events in {seconds:.2f} s: "
          f"{stats.applied / seconds:,.0f} events/s ({stats.batches} batches)", flush=True)
    return {f"{store}_bring_live_s": round(bring_live, 2), f"{store}_events_per_s": round(stats.applied / seconds, 1),
            f"{store}_events_applied": stats.applied}


def freshness(env: dict[str, str], instances: list[dict], store: str, probes: int) -> dict[str, float]:
    """Event appended to the log -> its card's row in the online store, with the updater running."""
    from flywheel.deploy.live import start_updater
    from flywheel.features.events import open_event_log
    from flywheel.features.store import open_online_reader

    settings = settings_for(env)
    thread, stop = start_updater(settings)
    try:
        from flywheel.features.build import world_of_model
        from flywheel.registry import Registry
        from flywheel.storage import Storage

        storage = Storage.from_settings(settings)
        world = world_of_model(storage, Registry(storage, settings.model_name).production().meta)
        reader = open_online_reader(settings, world)
        event_log = open_event_log(settings)
        event_log.append(events_of(instances[:1], f"{store}-warm"))  # waits for bring-live
        deadline = time.monotonic() + 300
        while event_log.backlog() and time.monotonic() < deadline:
            time.sleep(0.05)
        delays = []
        for i, row in enumerate(instances[1: probes + 1]):
            card = f"{store}-fresh-{i}"
            body = json.dumps({"row": {**row, "transaction_id": f"{store}-fresh-{i}", "card_id": card}}).encode()
            started = time.perf_counter()
            event_log.append([body])
            while True:
                _, known = reader.read({"card_id": [card], "merchant_id": [row["merchant_id"]]})
                if known["card_id"][0]:
                    break
                if time.perf_counter() - started > 30:
                    raise RuntimeError(f"event {i} never reached the online store")
                time.sleep(0.0005)
            delays.append((time.perf_counter() - started) * 1000)
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(timeout=10)
    p50, p99 = percentile(delays, 0.5), percentile(delays, 0.99)
    print(f"  {store:<7} freshness over {len(delays)} events: p50 {p50:.1f} ms, p99 {p99:.1f} ms", flush=True)
    return {f"{store}_freshness_p50_ms": round(p50, 2), f"{store}_freshness_p99_ms": round(p99, 2)}


def serving_on_off(env: dict[str, str], instances: list[dict], seconds: int, folder: Path, problems: dict[str, str]) -> dict[str, float]:
    """wrk at c=8 on `flywheel serve` with live updates off and on, alternating rounds."""
    bodies = [json.dumps({"instances": [{**row, "transaction_id": f"wrk-{i}"}]}) for i, row in enumerate(instances)]
    script = folder / "bodies.lua"
    script.write_text(lua_script(bodies))
    servers = {
        "off": bench.clean_env(**env),
        "on": bench.clean_env(**env, FLYWHEEL_LIVE__ENABLED="true"),
    }
    urls, processes, figures = {}, [], {}
    try:
        for name, server_env in servers.items():
            port = bench.free_port()
            urls[name] = f"http://{bench.HOST}:{port}/v1/models/fraud:predict"
            process, cold = bench.start_until_first_prediction([sys.executable, "-m", "flywheel.cli", "serve", "--port", str(port), "--grpc-port", "0"],
                                                               server_env, urls[name], bodies[0].encode(), folder / f"serve-{name}.log")
            processes.append(process)
        for url in urls.values():
            bench.wrk(url, script, CONCURRENCY, 1)
        results = {name: [] for name in urls}
        for _ in range(ROUNDS):
            for name, url in urls.items():
                result = bench.wrk(url, script, CONCURRENCY, seconds)
                results[name].append(result)
                if result.errors:
                    problems[f"serve_{name}"] = f"{result.errors} errors"
                print(f"  live {name:<3} c={CONCURRENCY} p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  "
                      f"{result.requests_per_s:8.1f} req/s  errors {result.errors}", flush=True)
        for name, runs in results.items():
            figures[f"serving_live_{name}_c8_p99_ms"] = round(statistics.median(r.p99_ms for r in runs), 2)
            figures[f"serving_live_{name}_c8_rps"] = round(statistics.median(r.requests_per_s for r in runs), 1)
    finally:
        for process in processes:
            bench.stop(process)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30k rows, 5k events, 3 s loads")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home")
    args = parser.parse_args()
    quick = args.quick
    rows, days = (30_000, 14) if quick else (200_000, 30)
    events, probes, seconds = (5_000, 100, 3) if quick else (30_000, 300, 10)
    home = Path(tempfile.mkdtemp(prefix="flywheel-bench-live-"))
    redis_process, redis_connection = bench.start_redis(home / "redis")
    problems: dict[str, str] = {}
    figures: dict[str, float] = {}
    try:
        envs = bench.set_up(home, rows, days, redis_connection, quick)
        instances = bench.holdout_transactions(envs["sqlite"], events + probes + 1)
        envs["redis"] = {**envs["redis"], "FLYWHEEL_LIVE__LOG": "redis"}  # on the cluster's path: a Redis Stream
        for store in ("sqlite", "redis"):
            figures.update(throughput(envs[store], instances[:events], store))
            figures.update(freshness(envs[store], instances[events:], store, probes))
        wrk_instances = bench.holdout_transactions(envs["sqlite"], 40_000 if not quick else 15_000)
        figures.update(serving_on_off(envs["sqlite"], wrk_instances, seconds, home, problems))
    finally:
        bench.stop(redis_process)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"kept {home}")
    figures["serving_live_on_over_off_p99"] = round(figures["serving_live_on_c8_p99_ms"] / figures["serving_live_off_c8_p99_ms"], 3)
    figures["serving_live_on_over_off_rps"] = round(figures["serving_live_on_c8_rps"] / figures["serving_live_off_c8_rps"], 3)
    goals = judge(figures, {"serving_live_on_over_off_p99": (1.15, "max")})
    write_results(RESULTS / ("live-quick.json" if quick else "live.json"), figures, goals, problems=problems)


if __name__ == "__main__":
    main()
