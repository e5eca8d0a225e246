"""Real-time serving: latency and throughput of `flywheel serve` under wrk, beside a no-op KServe model.

    python benchmarks/serving.py [--quick] [--keep] [--usecase PATH] [--only protocols|capture]

Set-up, once, in a temporary $FLYWHEEL_HOME: a redis-server on loopback (no persistence), then
`flywheel generate` and `flywheel run` (SQLite online store), then `flywheel run` again on the same
data with the Redis online store (the lake, training set and model are reused; the features step
materializes the production model's world into Redis).

Then, for each worker count (1, and 2 when the settings have ``serving.workers``), in the same run:
- the no-op model server (benchmarks/noop_server.py: a ``kserve.Model`` returning a constant),
  `flywheel serve` with the SQLite and `flywheel serve` with the Redis online store, each a
  subprocess on 127.0.0.1 with that many workers, started one after the other and then kept up
  together, so that each load below runs on all three back to back (a shared machine's background
  load drifts; the ratios compare loads taken seconds apart);
- cold start: from the process's start to its first successful prediction (polled every 10 ms);
- wrk from a second process, one v1 transaction per request, the bodies rotating through real
  holdout transactions (so feature lookups hit real rows): p50 and p99 (wrk's latency
  distribution) and requests/s at concurrency 1, 8 and 64 (at most 2 wrk threads);
- batch scoring: 1,000 transactions per v1 request at concurrency 2 (at least 10 s), rows/s
  against the rows/s of one transaction per request at concurrency 8 (both saturate the server);
- the goals' loads (concurrency 8, and batch) run in 3 rounds, the servers alternating within each:
  their figures are the medians over the rounds (each round's requests/s and p99 are kept beside
  them), so one noisy moment of a shared machine neither makes nor breaks a goal.
A load with a failed request, or in which no request completed, is reported (``problems`` in the
JSON) and fails the goals of its server.
Goals (issue 7, on the 2-core machine), for each online store with 1 worker: p99 under 10 ms at
concurrency 8, at least 60% of the no-op model's requests/s at concurrency 8, cold start under
5 s, batch rows/s at least 20x single. Quick mode: 30k rows over 14 days, 3 training epochs, 3 s per
load; otherwise 200k rows over 30 days with the default settings, 10 s per load. Writes
benchmarks/results/serving.json (serving-quick.json with --quick).

``--only capture`` (also part of the whole run; issue 22): two `flywheel serve` (SQLite store, one
worker), capture off and capture at 100% (``monitoring.capture_rate`` 1, parts on local disk), loaded
at concurrency 8 in 7 alternating rounds (each round the other server goes first): p50, p99 and
requests/s of each, the captured rows by outcome (queued, dropped, written, failed) and the rows on
disk after the stop. Goals: p99 with capture at most 1.10x and requests/s at least 0.90x capture
off's, each the median over the rounds of the round's own ratio. Results in
serving-capture[-quick].json.

``--usecase PATH`` measures another use case the same way: `flywheel run --usecase PATH` on its own
demo data (its first 60,000 rows with --quick, all of it otherwise), requests of its contract's
fields from the holdout's last rows; results in serving-<use case>[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from programs import program
from results_table import judge, write_results
from wrk_output import WrkResult, lua_file_script, lua_script, parse_wrk, round_figures

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
HOST = "127.0.0.1"
CONCURRENCY = (1, 8, 64)
HEADLINE_CONCURRENCY = 8
BATCH_ROWS = 1_000
MODEL_NAME = "fraud"  # the served model's name: the use case's (main sets it with --usecase)
BATCH_CONCURRENCY = 2  # one batch in flight per core: the server is saturated, each batch's wait stays short
BATCH_MIN_SECONDS = 10  # a batch can take seconds on a slow server: enough of them must complete
ROUNDS = 3  # the headline loads (concurrency 8, and batch) run this many times, servers alternating; figures are medians
BODIES = 500  # distinct one-transaction bodies the Lua script rotates through
WRK_TIMEOUT = "30s"  # wrk drops a slower reply from its latency figures; nothing here should be that slow
PROTOCOL_GOALS = {  # issue 21, for the SQLite store with one worker: gRPC, and binary batches
    "grpc_served_c8_p99_ms": (5.0, "max"),
    "grpc_rps_over_noop_c8": (0.80, "min"),
    "binary_over_json_rows": (2.0, "min"),
}
CAPTURE_GOALS = {  # issue 22: capture at 100% beside capture off, SQLite store, one worker, concurrency 8
    "capture_p99_ratio": (1.10, "max"),
    "capture_rps_ratio": (0.90, "min"),
}
CAPTURE_ROUNDS = 7  # rounds of the capture load, the two servers alternating (and which goes first)
GOALS = {  # name: (target, "max" | "min"), for each online store with one worker
    "c8_p99_ms": (10.0, "max"),
    "rps_over_noop_c8": (0.60, "min"),
    "cold_start_s": (5.0, "max"),
    "batch_over_single": (20.0, "min"),
}


# ---------------------------------------------------------------- processes on loopback
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def clean_env(**flywheel: str) -> dict[str, str]:
    """This process's environment without any FLYWHEEL_* variable, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(flywheel)
    return env


def stop(process: subprocess.Popen) -> None:
    """Stop a server started in its own session, with every worker it forked or spawned."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    try:  # workers left behind by a parent that exited
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    """A redis-server on a free loopback port, no persistence; returns it and its ``host:port``."""
    import redis

    binary = program("redis-server")
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [binary, "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=(folder / "redis.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    client = redis.Redis(host=HOST, port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"redis-server exited early:\n{(folder / 'redis.log').read_text()}")
        try:
            if client.ping():
                return process, f"{HOST}:{port}"
        except redis.ConnectionError:
            time.sleep(0.05)
    stop(process)
    sys.exit("redis-server did not answer PING in 20 s")


def start_until_first_prediction(command: list[str], env: dict[str, str], url: str, body: bytes, log: Path,
                                 seconds: float = 180) -> tuple[subprocess.Popen, float]:
    """Start a server and poll ``url`` with ``body`` until it answers 200: (the process, the
    seconds from its start to that first successful prediction)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    while time.perf_counter() - started < seconds:
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(command)} exited ({process.returncode}) before answering:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return process, time.perf_counter() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.01)
    stop(process)
    raise RuntimeError(f"{' '.join(command)} gave no successful prediction in {seconds:.0f} s:\n{log.read_text()[-3000:]}")


# ---------------------------------------------------------------- set-up: a small loop, SQLite and Redis
def run_cli(args: list[str], env: dict[str, str], log: Path) -> None:
    """One `flywheel` command; its output to ``log``; a failure stops the benchmark with its tail."""
    with log.open("a") as out:
        out.write(f"$ flywheel {' '.join(args)}\n")
        out.flush()
        code = subprocess.call([sys.executable, "-m", "flywheel.cli", *args], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if code:
        sys.exit(f"flywheel {' '.join(args)} failed ({code}):\n{log.read_text()[-4000:]}")


def set_up(home: Path, rows: int | None, days: int, redis_connection: str, quick: bool,
           usecase: str = "", stores: tuple[str, ...] = ("sqlite", "redis")) -> dict[str, dict[str, str]]:
    """Generate data and run the loop with each online store; the environment of each store. With a
    ``usecase``: the loop on that use case's own demo data (``rows`` of it; None: all of it)."""
    base = {"FLYWHEEL_HOME": str(home)}
    if quick:
        base["FLYWHEEL_TRAINING__EPOCHS"] = "3"
    if usecase:
        base["FLYWHEEL_USECASE"] = str(Path(usecase).resolve())
    envs = {
        "sqlite": {**base, "FLYWHEEL_FEATURES__ONLINE_STORE": "sqlite"},
        "redis": {**base, "FLYWHEEL_FEATURES__ONLINE_STORE": "redis", "FLYWHEEL_FEATURES__REDIS_CONNECTION": redis_connection},
    }
    log = home / "setup.log"
    home.mkdir(parents=True, exist_ok=True)
    source = str(home / "raw" / "bench")
    started = time.perf_counter()
    if usecase:
        run = ["run", *(["--rows", str(rows)] if rows else [])]  # its demo data (source.py)
    else:
        run_cli(["generate", "--rows", str(rows), "--days", str(days), "--seed", "7", "--out", source], clean_env(**base), log)
        run = ["run", "--source", source]
    for store in stores:
        run_cli(run, clean_env(**envs[store]), log)
    print(f"set-up: {rows or 'all':,} rows, the loop with SQLite then Redis, in {time.perf_counter() - started:.0f} s ({log})"
          if rows else f"set-up: all rows, the loop with SQLite then Redis, in {time.perf_counter() - started:.0f} s ({log})",
          flush=True)
    return envs


def holdout_transactions(env: dict[str, str], count: int) -> list[dict]:
    """``count`` real rows from the production model's holdout (the last ones in time), as v1
    instances of the use case's request fields, stamped an hour after the holdout ends (every other
    time of a row keeps its distance from the event time); the id, if any, is the benchmark's own."""
    import pandas as pd

    from flywheel.config import load_settings
    from flywheel.features.build import latest_training_set
    from flywheel.storage import Storage
    from flywheel.usecase import load_usecase

    settings = load_settings(env=clean_env(**env))
    contract = load_usecase(settings.usecase).contract
    storage = Storage.from_settings(settings)
    holdout = storage.read_parquet(latest_training_set(storage).holdout_uri).to_pandas()
    rows = holdout.sort_values(contract.timestamp, kind="stable").tail(count)
    event = pd.to_datetime(rows[contract.timestamp], utc=True)
    shift = event.max() + pd.Timedelta(hours=1) - event
    fields = list(contract.request_fields())
    instances = []
    for i, (index, row) in enumerate(rows[fields].iterrows()):
        instance = {}
        for name, value in row.items():
            if value is None or value != value:
                continue
            if name in contract.timestamp_columns():
                value = (pd.Timestamp(value) + shift[index]).isoformat()
            elif hasattr(value, "item"):
                value = value.item()
            instance[name] = f"bench-{i}" if name == contract.id else value
        instances.append(instance)
    return instances


# ---------------------------------------------------------------- load
def wrk(url: str, script: Path, concurrency: int, seconds: int) -> WrkResult:
    threads = min(2, concurrency)
    command = [program("wrk"), "-t", str(threads), "-c", str(concurrency), "-d", f"{seconds}s", "--timeout", WRK_TIMEOUT,
               "--latency", "-s", str(script), url]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return parse_wrk(done.stdout)


def side_by_side(servers: dict[str, tuple[list[str], dict[str, str]]], scripts: dict[str, Path], first_body: bytes,
                 seconds: int, folder: Path, problems: dict[str, str]) -> dict[str, float]:
    """Start each server alone (its cold start), keep them all up, then load them in turn at each
    concurrency, so a change in the machine's background load hits every server alike; then the
    batch load on every server but the no-op. ``servers``: name -> (command, environment); what
    went wrong in a load goes to ``problems``."""
    figures: dict[str, float] = {}
    urls: dict[str, str] = {}
    processes: list[subprocess.Popen] = []
    try:
        for name, (command, env) in servers.items():
            port = free_port()
            urls[name] = f"http://{HOST}:{port}/v1/models/{MODEL_NAME}:predict"
            process, cold = start_until_first_prediction([*command, "--port", str(port)], env, urls[name], first_body,
                                                         folder / f"{name}.log")
            processes.append(process)
            figures[f"{name}_cold_start_s"] = round(cold, 2)
            print(f"  {name:<10} cold start {cold:.2f} s", flush=True)
        for url in urls.values():
            wrk(url, scripts["single"], HEADLINE_CONCURRENCY, 1)  # warm-up, not counted
        for concurrency in CONCURRENCY:
            rounds: dict[str, list[WrkResult]] = {name: [] for name in urls}
            for _ in range(ROUNDS if concurrency == HEADLINE_CONCURRENCY else 1):
                for name, url in urls.items():
                    result = wrk(url, scripts["single"], concurrency, seconds)
                    rounds[name].append(result)
                    print(f"  {name:<10} c={concurrency:<3} p50 {result.p50_ms:8.2f} ms  p99 {result.p99_ms:8.2f} ms  "
                          f"{result.requests_per_s:9.1f} req/s  errors {result.errors}", flush=True)
            for name, results in rounds.items():
                figures.update(round_figures(f"{name}_c{concurrency}", results, problems))
        batches: dict[str, list[WrkResult]] = {name: [] for name in urls if not name.startswith("noop")}
        for _ in range(ROUNDS):
            for name in batches:
                result = wrk(urls[name], scripts["batch"], BATCH_CONCURRENCY, max(seconds, BATCH_MIN_SECONDS))
                batches[name].append(result)
                print(f"  {name:<10} batch of {BATCH_ROWS} c={BATCH_CONCURRENCY}: p50 {result.p50_ms:.1f} ms  "
                      f"{result.requests_per_s * BATCH_ROWS:,.0f} rows/s  errors {result.errors}", flush=True)
        for name, results in batches.items():
            figures.update(round_figures(f"{name}_batch_c{BATCH_CONCURRENCY}", results, problems))
            figures[f"{name}_batch_rows_per_s"] = round(figures[f"{name}_batch_c{BATCH_CONCURRENCY}_rps"] * BATCH_ROWS, 1)
    finally:
        for process in processes:
            stop(process)
    return figures


# ---------------------------------------------------------------- the protocols: gRPC, binary
def v2_columns(metadata: dict, transactions: list[dict]) -> dict[str, Any]:
    """One numpy column per input of the model metadata that every transaction carries, typed as the
    metadata says (the only schema a client has)."""
    import numpy as np

    columns = {}
    for tensor in metadata["inputs"]:
        name, datatype = tensor["name"], tensor["datatype"]
        if not all(name in tx for tx in transactions):
            continue  # an optional field some rows lack: a tensor has no gaps
        values = [tx[name] for tx in transactions]
        if datatype == "BYTES":
            columns[name] = (np.array([str(v).encode() for v in values], dtype=np.object_), datatype)
        elif datatype == "BOOL":
            columns[name] = (np.array(values, dtype=bool), datatype)
        else:
            columns[name] = (np.array(values, dtype=np.int64 if datatype == "INT64" else np.float64), datatype)
    return columns


def v2_request(columns: dict[str, Any], binary: bool) -> Any:
    """A KServe InferRequest of these columns, binary (the standard clients' default) or JSON."""
    from kserve.protocol.infer_type import InferInput, InferRequest

    inputs = []
    for name, (values, datatype) in columns.items():
        tensor = InferInput(name, list(values.shape), datatype)
        tensor.set_data_from_numpy(values, binary_data=binary)
        inputs.append(tensor)
    return InferRequest(model_name=MODEL_NAME, infer_inputs=inputs)


def grpc_requests_file(metadata: dict, transactions: list[dict], path: Path) -> Path:
    """One-transaction ModelInferRequests with raw input contents (tritonclient's default),
    serialized and length-prefixed, for benchmarks/grpc_load.py."""
    import struct

    with open(path, "wb") as out:
        for tx in transactions:
            message = v2_request(v2_columns(metadata, [tx]), binary=True).to_grpc().SerializeToString()
            out.write(struct.pack("<I", len(message)) + message)
    return path


def grpc_load(target: str, requests: Path, concurrency: int, seconds: int) -> WrkResult:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "grpc_load.py"), "--target", target, "--requests", str(requests),
                           "--concurrency", str(concurrency), "--seconds", str(seconds)], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"grpc_load.py failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if out["errors"]:
        print(f"  gRPC errors: {out['errors']} (first: {out['first_error']})", flush=True)
    return WrkResult(requests=out["requests"], seconds=seconds, requests_per_s=out["rps"], p50_ms=out["p50_ms"], p75_ms=out["p75_ms"],
                     p90_ms=out["p90_ms"], p99_ms=out["p99_ms"], non_2xx=out["errors"])  # a failed call counts as a non-2xx reply


def protocols(env: dict[str, str], transactions: list[dict], single_script: Path, seconds: int, folder: Path,
              problems: dict[str, str]) -> dict[str, float]:
    """gRPC against REST (`flywheel serve`, one worker, this store) at each concurrency, beside the
    no-op model served over the same gRPC server; then 1,000-row v2 batches, binary against JSON.
    The servers alternate within each round, as in :func:`side_by_side`."""
    figures: dict[str, float] = {}
    processes: list[subprocess.Popen] = []
    grpc_ports = {"grpc_noop": free_port(), "grpc_served": free_port()}
    commands = {
        "grpc_noop": ([sys.executable, str(REPO / "benchmarks" / "noop_server.py"), "--model-name", MODEL_NAME,
                       "--grpc-port", str(grpc_ports["grpc_noop"])], clean_env()),
        "grpc_served": ([sys.executable, "-m", "flywheel.cli", "serve", "--host", HOST, "--grpc-port", str(grpc_ports["grpc_served"])],
                        clean_env(**env, FLYWHEEL_SERVING__WORKERS="1")),
    }
    urls = {}
    try:
        for name, (command, command_env) in commands.items():
            port = free_port()
            urls[name] = f"http://{HOST}:{port}"
            process, _ = start_until_first_prediction([*command, "--port", str(port)], command_env,
                                                      f"{urls[name]}/v1/models/{MODEL_NAME}:predict",
                                                      json.dumps({"instances": [transactions[-1]]}).encode(), folder / f"{name}.log")
            processes.append(process)
        with urllib.request.urlopen(f"{urls['grpc_served']}/v2/models/{MODEL_NAME}", timeout=10) as answer:
            metadata = json.loads(answer.read())
        requests = grpc_requests_file(metadata, transactions[-BODIES:], folder / "grpc-requests.bin")
        loads = {
            "grpc_served": lambda c, s: grpc_load(f"{HOST}:{grpc_ports['grpc_served']}", requests, c, s),
            "grpc_noop": lambda c, s: grpc_load(f"{HOST}:{grpc_ports['grpc_noop']}", requests, c, s),
            "rest_served": lambda c, s: wrk(f"{urls['grpc_served']}/v1/models/{MODEL_NAME}:predict", single_script, c, s),
        }
        for load in loads.values():
            load(HEADLINE_CONCURRENCY, 1)  # warm-up, not counted
        for concurrency in CONCURRENCY:
            rounds: dict[str, list[WrkResult]] = {name: [] for name in loads}
            for _ in range(ROUNDS if concurrency == HEADLINE_CONCURRENCY else 1):
                for name, load in loads.items():
                    result = load(concurrency, seconds)
                    rounds[name].append(result)
                    print(f"  {name:<12} c={concurrency:<3} p50 {result.p50_ms:8.2f} ms  p99 {result.p99_ms:8.2f} ms  "
                          f"{result.requests_per_s:9.1f} req/s  errors {result.errors}", flush=True)
            for name, results in rounds.items():
                figures.update(round_figures(f"{name}_c{concurrency}", results, problems))
        for concurrency in CONCURRENCY:
            figures[f"grpc_rps_over_noop_c{concurrency}"] = ratio(figures[f"grpc_served_c{concurrency}_rps"],
                                                                  figures[f"grpc_noop_c{concurrency}_rps"], 4)
            figures[f"grpc_rps_over_rest_c{concurrency}"] = ratio(figures[f"grpc_served_c{concurrency}_rps"],
                                                                  figures[f"rest_served_c{concurrency}_rps"], 4)
        # 1,000-row batches: the same rows, as v2 JSON and as v2 binary (the standard clients' default).
        columns = v2_columns(metadata, transactions[-BATCH_ROWS:])
        document, _ = v2_request(columns, binary=False).to_rest()
        (folder / "batch-json.bin").write_bytes(json.dumps(document).encode())
        body, header_length = v2_request(columns, binary=True).to_rest()
        (folder / "batch-binary.bin").write_bytes(body)
        scripts = {
            "batch_v2_json": folder / "batch-json.lua", "batch_v2_binary": folder / "batch-binary.lua"}
        scripts["batch_v2_json"].write_text(lua_file_script(str(folder / "batch-json.bin"), {"Content-Type": "application/json"}))
        scripts["batch_v2_binary"].write_text(lua_file_script(str(folder / "batch-binary.bin"), {
            "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)}))
        batch_url = f"{urls['grpc_served']}/v2/models/{MODEL_NAME}/infer"
        batches: dict[str, list[WrkResult]] = {name: [] for name in scripts}
        for _ in range(ROUNDS):
            for name, script in scripts.items():
                result = wrk(batch_url, script, BATCH_CONCURRENCY, max(seconds, BATCH_MIN_SECONDS))
                batches[name].append(result)
                print(f"  {name:<16} {BATCH_ROWS} rows c={BATCH_CONCURRENCY}: p50 {result.p50_ms:.1f} ms  "
                      f"{result.requests_per_s * BATCH_ROWS:,.0f} rows/s  errors {result.errors}", flush=True)
        for name, results in batches.items():
            figures.update(round_figures(f"{name}_c{BATCH_CONCURRENCY}", results, problems))
            figures[f"{name}_rows_per_s"] = round(figures[f"{name}_c{BATCH_CONCURRENCY}_rps"] * BATCH_ROWS, 1)
        figures["binary_over_json_rows"] = ratio(figures["batch_v2_binary_rows_per_s"], figures["batch_v2_json_rows_per_s"], 3)
    finally:
        for process in processes:
            stop(process)
    return figures


# ---------------------------------------------------------------- capture: 100% beside off
def capture_rows(page: str) -> dict[str, float]:
    """flywheel_capture_rows_total by outcome, from a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.labels["outcome"]: sample.value for family in text_string_to_metric_families(page)
            for sample in family.samples if sample.name == "flywheel_capture_rows_total"}


def capture(env: dict[str, str], script: Path, first_body: bytes, seconds: int, folder: Path,
            problems: dict[str, str]) -> dict[str, float]:
    """Two `flywheel serve` (SQLite store, one worker): capture off and capture at 100%
    (monitoring.capture_rate 1, parts on local disk), loaded at concurrency 8 in alternating
    rounds (each round the other goes first); the captured rows' outcomes from the capture server's
    /metrics, and the rows found on disk once it stopped (its shutdown writes what waited)."""
    serve = [sys.executable, "-m", "flywheel.cli", "serve", "--host", HOST, "--grpc-port", "0"]
    servers = {"capture_off": clean_env(**env, FLYWHEEL_MONITORING__CAPTURE_RATE="0"),
               "capture_on": clean_env(**env, FLYWHEEL_MONITORING__CAPTURE_RATE="1")}
    figures: dict[str, float] = {}
    urls: dict[str, str] = {}
    processes: dict[str, subprocess.Popen] = {}
    seconds = max(seconds, 5)
    figures["capture_load_seconds"] = seconds
    try:
        for name, server_env in servers.items():
            port = free_port()
            urls[name] = f"http://{HOST}:{port}/v1/models/{MODEL_NAME}:predict"
            processes[name], _ = start_until_first_prediction([*serve, "--port", str(port)], server_env, urls[name], first_body,
                                                              folder / f"{name}.log")
        for url in urls.values():
            wrk(url, script, HEADLINE_CONCURRENCY, 2)  # warm-up, not counted
        rounds: dict[str, list[WrkResult]] = {name: [] for name in urls}
        for number in range(CAPTURE_ROUNDS):
            for name in (list(urls) if number % 2 == 0 else list(reversed(urls))):
                result = wrk(urls[name], script, HEADLINE_CONCURRENCY, seconds)
                rounds[name].append(result)
                print(f"  {name:<12} c={HEADLINE_CONCURRENCY} p50 {result.p50_ms:8.2f} ms  p99 {result.p99_ms:8.2f} ms  "
                      f"{result.requests_per_s:9.1f} req/s  errors {result.errors}", flush=True)
        for name, results in rounds.items():
            figures.update(round_figures(f"{name}_c{HEADLINE_CONCURRENCY}", results, problems))
        metrics_url = urls["capture_on"].split("/v1/")[0] + "/metrics"
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            outcomes = capture_rows(response.read().decode())
        for outcome in ("queued", "dropped", "written", "failed"):
            figures[f"capture_rows_{outcome}"] = outcomes.get(outcome, 0.0)
    finally:
        for process in processes.values():
            stop(process)
    from flywheel.config import load_settings
    from flywheel.monitoring.capture import read_capture
    from flywheel.storage import Storage

    figures["capture_rows_on_disk"] = read_capture(Storage.from_settings(load_settings(env=clean_env(**env))),
                                                   columns=["request_id"]).num_rows
    # The goals' ratios pair each round's two loads (taken seconds apart, the machine alike for both)
    # and take the median over the rounds: a shared machine's load drifts by more than 10% between
    # rounds. The ratios of the medians are kept beside them.
    off, on = rounds["capture_off"], rounds["capture_on"]
    for figure, of in (("p99", lambda r: r.p99_ms), ("rps", lambda r: r.requests_per_s), ("p50", lambda r: r.p50_ms)):
        figures[f"capture_{figure}_ratio"] = round(statistics.median(ratio(of(a), of(b), 4) for a, b in zip(on, off)), 3)
        unit = "" if figure == "rps" else "_ms"
        figures[f"capture_{figure}_ratio_of_medians"] = ratio(figures[f"capture_on_c{HEADLINE_CONCURRENCY}_{figure}{unit}"],
                                                              figures[f"capture_off_c{HEADLINE_CONCURRENCY}_{figure}{unit}"], 3)
    return figures


def ratio(numerator: float, denominator: float, digits: int) -> float:
    """numerator / denominator, rounded; 0 when the denominator's load completed nothing (a
    problem the run reports)."""
    return round(numerator / denominator, digits) if denominator else 0.0


def serving_has_workers() -> bool:
    """Whether the settings know ``serving.workers`` (the predictor's multi-worker support)."""
    from flywheel.config import ServingSettings

    return "workers" in ServingSettings.model_fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30k rows, 3 epochs, 3 s per load instead of 200k rows, 10 s")
    parser.add_argument("--keep", action="store_true", help="keep the temporary $FLYWHEEL_HOME and the servers' logs")
    parser.add_argument("--usecase", default="", help="another use case (its own demo data): results in serving-<name>.json")
    parser.add_argument("--only", choices=["", "protocols", "capture"], default="",
                        help="protocols: only the gRPC and binary loads (results in serving-protocols[-quick].json); "
                             "capture: only capture at 100%% beside capture off (serving-capture[-quick].json)")
    args = parser.parse_args()
    rows, days, seconds = (30_000, 14, 3) if args.quick else (200_000, 30, 10)
    if args.usecase:  # its demo data: a slice big enough for the gate to bless a model, or all of it
        rows = 60_000 if args.quick else None
        global MODEL_NAME
        MODEL_NAME = Path(args.usecase).resolve().name
    program("wrk")  # before the set-up: a missing wrk ends the run at once, naming how to install it

    work = Path(tempfile.mkdtemp(prefix="flywheel-bench-serving-"))
    redis_process, redis_connection = start_redis(work / "redis")
    try:
        envs = set_up(work / "home", rows, days, redis_connection, args.quick, args.usecase,
                      stores=("sqlite",) if args.only == "capture" else ("sqlite", "redis"))
        transactions = holdout_transactions(envs["sqlite"], max(BODIES, BATCH_ROWS))
        single = [json.dumps({"instances": [tx]}) for tx in transactions[-BODIES:]]
        batches = [json.dumps({"instances": transactions[-BATCH_ROWS:]})]
        scripts = {"single": work / "single.lua", "batch": work / "batch.lua"}
        scripts["single"].write_text(lua_script(single))
        scripts["batch"].write_text(lua_script(batches))
        first_body = single[0].encode()

        workers = [] if args.only in ("protocols", "capture") else [1, 2] if serving_has_workers() else [1]
        figures: dict[str, float] = {"rows": rows or 0, "load_seconds": seconds, "cpus": os.cpu_count() or 0}
        problems: dict[str, str] = {}
        serve = [sys.executable, "-m", "flywheel.cli", "serve", "--host", HOST, "--grpc-port", "0"]  # REST here; gRPC in protocols()
        noop = [sys.executable, str(REPO / "benchmarks" / "noop_server.py"), "--model-name", MODEL_NAME]
        for count in workers:
            print(f"{count} worker(s):", flush=True)
            worker_env = {"FLYWHEEL_SERVING__WORKERS": str(count)} if serving_has_workers() else {}
            servers = {f"noop_w{count}": ([*noop, "--workers", str(count)], clean_env())}
            servers.update({f"{store}_w{count}": (serve, clean_env(**envs[store], **worker_env)) for store in ("sqlite", "redis")})
            figures[f"load_avg_1m_w{count}"] = round(os.getloadavg()[0], 2)
            figures.update(side_by_side(servers, scripts, first_body, seconds, work, problems))
            figures[f"load_avg_1m_w{count}_end"] = round(os.getloadavg()[0], 2)  # the machine is shared: how busy it was
            for store in ("sqlite", "redis"):
                name = f"{store}_w{count}"
                for concurrency in CONCURRENCY:
                    figures[f"{name}_rps_over_noop_c{concurrency}"] = ratio(
                        figures[f"{name}_c{concurrency}_rps"], figures[f"noop_w{count}_c{concurrency}_rps"], 4)
                figures[f"{name}_batch_over_single"] = ratio(
                    figures[f"{name}_batch_rows_per_s"], figures[f"{name}_c{HEADLINE_CONCURRENCY}_rps"], 2)
        if args.only in ("", "protocols"):
            print("protocols (SQLite store, 1 worker): gRPC against REST and the no-op over gRPC; binary against JSON batches:", flush=True)
            figures[f"load_avg_1m_protocols"] = round(os.getloadavg()[0], 2)
            figures.update(protocols(envs["sqlite"], transactions, scripts["single"], seconds, work, problems))
        if args.only in ("", "capture"):
            print("capture (SQLite store, 1 worker): monitoring.capture_rate 1 beside 0, concurrency 8:", flush=True)
            figures["load_avg_1m_capture"] = round(os.getloadavg()[0], 2)
            figures.update(capture(envs["sqlite"], scripts["single"], first_body, seconds, work, problems))
    finally:
        stop(redis_process)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")

    targets = {f"{store}_w1_{goal}": target for store in ("sqlite", "redis") for goal, target in GOALS.items()} if workers else {}
    if args.only in ("", "protocols"):
        targets.update(PROTOCOL_GOALS)
    if args.only in ("", "capture"):
        targets.update(CAPTURE_GOALS)
    goals = judge(figures, targets)
    for name, goal in goals.items():  # a server whose load failed meets none of its goals
        if name in CAPTURE_GOALS:
            goal["met"] = goal["met"] and not any(load.startswith("capture_") for load in problems)
            continue
        if name in PROTOCOL_GOALS:
            goal["met"] = goal["met"] and not any(load.startswith(("grpc_", "rest_served", "batch_v2")) for load in problems)
            continue
        server = name.split("_w1_")[0] + "_w1_"
        if any(load.startswith(server) or load.startswith("noop_w1_") for load in problems):
            goal["met"] = False
    if problems:
        print(f"WARNING: loads with problems (their servers' goals count as not met): {problems}")
    name = ("serving" + (f"-{Path(args.usecase).resolve().name}" if args.usecase else "") + (f"-{args.only}" if args.only else "")
            + ("-quick" if args.quick else ""))
    write_results(RESULTS / f"{name}.json", figures, goals,
                  quick=args.quick, workers=workers, batch_rows=BATCH_ROWS, batch_concurrency=BATCH_CONCURRENCY,
                  concurrency=list(CONCURRENCY), problems=problems)


if __name__ == "__main__":
    main()
