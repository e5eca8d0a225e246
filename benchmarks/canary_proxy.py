"""The local canary's splitting proxy: what it costs a request, and two real rollouts.

Starts KServe ModelServers on 127.0.0.1 with the test models of tests/canary_models.py (no sleep,
so the proxy's own cost shows), then measures, at ``--concurrency`` requests in flight:
direct to stable; through the proxy at 0% canary; through the proxy at 50% canary (each canary
request also shadowed to stable). Then ramps a good canary (promoted) and an erroring one (rolled
back) with the default thresholds, and writes both decision records next to the results.

    python benchmarks/canary_proxy.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_table import judge, write_results  # noqa: E402
from flywheel.deploy.ramp import ramp_canary, v1_bodies  # noqa: E402
from flywheel.deploy.traffic import start_proxy  # noqa: E402
from flywheel.storage import Storage  # noqa: E402
from tests.factories import FRAUD_CONTRACT  # noqa: E402
from tests.servers import free_port  # noqa: E402

FRAUD_FIELDS = list(FRAUD_CONTRACT.request_fields())  # what a fraud request carries

V1 = "/v1/models/fraud:predict"
RESULTS = ROOT / "benchmarks" / "results"


def start_server(behaviour: str, delay_ms: float, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.canary_models", "--port", str(port), "--behaviour", behaviour, "--delay-ms", str(delay_ms)],
            env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
        )
    return process, f"http://127.0.0.1:{port}"


def wait_ready(base: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"a model server exited early (code {process.returncode})")
        try:
            if httpx.get(f"{base}/v1/models/fraud", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the model server at {base} did not become ready")


async def load(url: str, bodies: list[bytes], requests: int, concurrency: int) -> tuple[float, np.ndarray, int]:
    """Requests/s, latencies (ms) and failures of ``requests`` posts, ``concurrency`` at a time."""
    latencies: list[float] = []
    failures = 0
    counter = iter(range(requests))
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker() -> None:
            nonlocal failures
            for i in counter:
                started = time.perf_counter()
                try:
                    response = await client.post(url, content=bodies[i % len(bodies)], headers={"Content-Type": "application/json"})
                    failures += response.status_code != 200
                except httpx.HTTPError:
                    failures += 1
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return requests / elapsed, np.array(latencies), failures


def transactions(n: int) -> list[dict]:
    rng = np.random.default_rng(7)
    return [{"transaction_id": f"tx-{i}", "card_id": f"card-{i % 37}", "merchant_id": f"m-{i % 11}",
             "amount": float(rng.uniform(1, 300)), "ts": "2026-11-01T12:00:00Z"} for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per measurement")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    requests = 1000 if args.quick else 4000
    logs = Path(tempfile.mkdtemp(prefix="canary-proxy-bench-"))
    servers = {name: start_server(behaviour, 0.0, logs / f"{name}.log")
               for name, behaviour in (("stable", "good"), ("good", "good"), ("erroring", "erroring"))}
    try:
        for process, base in servers.values():
            wait_ready(base, process)
        replay = v1_bodies(transactions(400), fields=FRAUD_FIELDS)
        bodies = [json.dumps(b).encode() for b in replay]
        stable, good, erroring = (servers[n][1] for n in ("stable", "good", "erroring"))
        figures: dict[str, float] = {}
        asyncio.run(load(stable + V1, bodies, 200, args.concurrency))  # warm up
        rps, lat, failed = asyncio.run(load(stable + V1, bodies, requests, args.concurrency))
        figures.update(direct_rps=round(rps, 1), direct_p50_ms=round(float(np.percentile(lat, 50)), 2),
                       direct_p99_ms=round(float(np.percentile(lat, 99)), 2))
        for percent in (0, 50):
            with start_proxy(stable, good, canary_percent=percent) as proxy:
                asyncio.run(load(proxy.url + V1, bodies, 200, args.concurrency))
                rps, lat, failed = asyncio.run(load(proxy.url + V1, bodies, requests, args.concurrency))
            figures.update({f"proxy_{percent}pct_rps": round(rps, 1),
                            f"proxy_{percent}pct_p50_ms": round(float(np.percentile(lat, 50)), 2),
                            f"proxy_{percent}pct_p99_ms": round(float(np.percentile(lat, 99)), 2),
                            f"proxy_{percent}pct_failures": failed})
        figures["proxy_0pct_added_p50_ms"] = round(figures["proxy_0pct_p50_ms"] - figures["direct_p50_ms"], 2)

        storage = Storage(str(RESULTS))
        records = {}
        for verdict, canary in (("promote", good), ("rollback", erroring)):
            with start_proxy(stable, canary) as proxy:
                record = ramp_canary(proxy, replay, V1, steps=[10, 50], window_requests=500, concurrency=args.concurrency,
                                     storage=storage, record_uri=storage.uri("canary_decisions", f"{verdict}.json"),
                                     meta={"stable": "good test model", "candidate": f"{'good' if canary == good else 'erroring'} test model"}).to_dict()
            records[verdict] = record
            figures[f"{verdict}_verdict_is_{verdict}"] = int(record["verdict"] == verdict)
            figures[f"{verdict}_client_failures"] = record["client"]["failures"]
            figures[f"{verdict}_duration_s"] = record["duration_s"]
        goals = judge(figures, {
            "promote_verdict_is_promote": (1, "min"), "rollback_verdict_is_rollback": (1, "min"),
            "promote_client_failures": (0, "max"), "rollback_client_failures": (0, "max"),
            "proxy_0pct_failures": (0, "max"), "proxy_50pct_failures": (0, "max"),
        })
        write_results(RESULTS / "canary_proxy.json", figures, goals, concurrency=args.concurrency, requests=requests,
                      load_average=os.getloadavg()[0], decision_records=[str(Path(r["uri"]).relative_to(RESULTS)) for r in records.values()])
    finally:
        for process, _ in servers.values():
            process.terminate()
        for process, _ in servers.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    main()
