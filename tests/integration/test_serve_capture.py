"""Capture in the predictor (monitoring.capture_rate): a real `flywheel serve` writes the rows it
scored, with their inputs, the features it read, its outputs, the model version and the request id,
as the monitoring layout's Parquet parts (read back with flywheel.monitoring.capture.read_capture).

Each test's requests carry ids of their own prefix, so tests sharing the trained loop's storage
read only their own rows."""

from __future__ import annotations

import asyncio
import math
import os
import re

import grpc
import httpx
import numpy as np
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flywheel import steps
from flywheel.config import load_settings
from flywheel.monitoring.capture import read_capture
from tests.fraud_tables import CARD_FEATURES, MERCHANT_FEATURES
from tests.servers import flywheel_server

V1 = "/v1/models/fraud:predict"
V2 = "/v2/models/fraud/infer"
OUTPUT = "fraud_probability"


def latest(table: pd.DataFrame, key: str, names: list[str]) -> pd.DataFrame:
    """The oracle: each entity's latest offline row (what materialization leaves online), by pandas."""
    ordered = table.sort_values([key, "event_timestamp", "created_timestamp"], kind="stable")
    return ordered.groupby(key).tail(1).set_index(key)[names].astype("float64")


@pytest.fixture(scope="module")
def offline(trained_loop):
    storage = trained_loop["storage"]
    artifacts = steps.read_step_records(storage, "loop-1")["features"]["artifacts"]
    cards_raw = storage.read_parquet(artifacts["card_features"]).to_pandas()
    merchants_raw = storage.read_parquet(artifacts["merchant_features"]).to_pandas()
    end = max(cards_raw["event_timestamp"].max(), merchants_raw["event_timestamp"].max())  # every view's TTL (30 days) covers the data
    return {"cards": latest(cards_raw, "card_id", list(CARD_FEATURES)),
            "merchants": latest(merchants_raw, "merchant_id", list(MERCHANT_FEATURES)),
            "ts": pd.Timestamp(end).tz_convert("UTC") if pd.Timestamp(end).tzinfo else pd.Timestamp(end).tz_localize("UTC")}


def transactions(offline, count: int, seed: int) -> list[dict]:
    """Known cards and merchants, at the data's end; every third row leaves the optional fields out."""
    rng = np.random.default_rng(seed)
    cards = rng.choice(offline["cards"].index, size=count, replace=False)
    merchants = rng.choice(offline["merchants"].index, size=count, replace=True)
    rows = []
    for n, (card, merchant) in enumerate(zip(cards, merchants)):
        ts = (offline["ts"] + pd.Timedelta(seconds=n)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        row = {"transaction_id": f"tx-{seed}-{n}", "card_id": str(card), "merchant_id": str(merchant),
               "amount": round(float(rng.uniform(1, 500)), 2), "ts": ts}
        if n % 3:
            row.update(merchant_category="grocery", channel="chip", lat=float(rng.uniform(-60, 60)), lon=float(rng.uniform(-120, 120)))
        rows.append(row)
    return rows


def same_fields(rows: list[dict]) -> list[dict]:
    """The rows with only the fields every one of them has (a v2 input is one tensor per field)."""
    names = [name for name in rows[0] if all(name in row for row in rows)]
    return [{name: row[name] for name in names} for row in rows]


def v2_inputs(rows: list[dict]) -> list[dict]:
    names = [name for name in rows[0]]
    return [{"name": name, "shape": [len(rows)], "datatype": "FP64" if isinstance(rows[0][name], float) else "BYTES",
             "data": [row[name] for row in rows]} for name in names]


def grpc_infer(address: str, rows: list[dict], request_id: str | None) -> tuple[list[float], str]:
    """One ModelInfer call with typed contents (KServe's stubs); (scores, the x-request-id it answered with)."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc

    tensors = []
    for tensor in v2_inputs(rows):
        if tensor["datatype"] == "FP64":
            contents = pb.InferTensorContents(fp64_contents=tensor["data"])
        else:
            contents = pb.InferTensorContents(bytes_contents=[str(v).encode() for v in tensor["data"]])
        tensors.append(pb.ModelInferRequest.InferInputTensor(name=tensor["name"], datatype=tensor["datatype"],
                                                             shape=tensor["shape"], contents=contents))
    with grpc.insecure_channel(address) as channel:
        stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
        metadata = [("x-request-id", request_id)] if request_id else []
        response, call = stub.ModelInfer.with_call(pb.ModelInferRequest(model_name="fraud", inputs=tensors), metadata=metadata, timeout=30)
    output = next(o for o in response.outputs if o.name == OUTPUT)
    index = [o.name for o in response.outputs].index(OUTPUT)
    scores = (np.frombuffer(response.raw_output_contents[index], dtype=np.float32).tolist() if response.raw_output_contents
              else list(output.contents.fp32_contents))
    return scores, dict(call.trailing_metadata())["x-request-id"]


def metric(text: str, name: str, **labels: str) -> float:
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def captured(storage, prefix: str) -> pd.DataFrame:
    table = read_capture(storage)
    if table.num_rows == 0:
        return pd.DataFrame()
    frame = table.to_pandas()
    return frame[frame["request_id"].str.startswith(prefix)].reset_index(drop=True)


def test_every_scored_row_is_captured_over_v1_v2_and_grpc(trained_loop, offline, tmp_path):
    """Bugs caught: a protocol whose rows are not captured; ids other than the request's (or none when
    the client sent none); outputs, inputs or features other than the ones the model scored with;
    rows left in memory at shutdown (the flush interval is an hour here: only the stop writes)."""
    env = dict(trained_loop["env"], FLYWHEEL_MONITORING__CAPTURE_RATE="1", FLYWHEEL_MONITORING__CAPTURE_FLUSH_S="3600")
    rows = transactions(offline, 24, seed=1)
    rows[5] = dict(rows[5], card_id="card-never-seen-capture")  # unknown: NaN features, known.card_id false
    sent: dict[str, tuple[list[dict], list[float]]] = {}  # request id -> (rows, scores)
    with flywheel_server(env, tmp_path / "server.log") as running:
        version = httpx.get(f"{running.base}/v2/models/fraud", timeout=10).json()["versions"][0]
        before = httpx.get(f"{running.base}/metrics", timeout=10).text  # (servers this process starts may share a metrics folder)
        for n in range(4):  # v1, one or three rows
            batch = rows[n * 3:n * 3 + 3] if n % 2 else rows[n * 3:n * 3 + 1]
            headers = {"x-request-id": f"cap-v1-{n}"} if n != 3 else {}
            response = httpx.post(f"{running.base}{V1}", json={"instances": batch}, headers=headers, timeout=10)
            assert response.status_code == 200, response.text
            request_id = response.headers["x-request-id"]
            assert request_id == headers.get("x-request-id", request_id)
            sent[request_id] = (batch, [p[OUTPUT] for p in response.json()["predictions"]])
        generated_v1 = request_id
        batch = same_fields(rows[12:16])
        response = httpx.post(f"{running.base}{V2}", json={"inputs": v2_inputs(batch)}, headers={"x-request-id": "cap-v2-0"}, timeout=10)
        assert response.status_code == 200, response.text
        sent["cap-v2-0"] = (batch, next(o for o in response.json()["outputs"] if o["name"] == OUTPUT)["data"])
        batch = same_fields(rows[16:20])
        scores, request_id = grpc_infer(running.grpc, batch, "cap-grpc-0")
        assert request_id == "cap-grpc-0"
        sent[request_id] = (batch, scores)
        batch = same_fields(rows[20:24])
        scores, generated_grpc = grpc_infer(running.grpc, batch, None)
        sent[generated_grpc] = (batch, scores)
        page = httpx.get(f"{running.base}/metrics", timeout=10).text
        total = sum(len(batch) for batch, _ in sent.values())
        grew = {outcome: metric(page, "flywheel_capture_rows_total", outcome=outcome) - metric(before, "flywheel_capture_rows_total", outcome=outcome)
                for outcome in ("queued", "written")}
        assert total == 20 and grew["queued"] == total
        assert grew["written"] == 0, "nothing written before the flush interval"
    assert "cap-" not in generated_v1 and "cap-" not in generated_grpc and generated_v1 != generated_grpc

    table = read_capture(trained_loop["storage"])
    frame = table.to_pandas()
    frame = frame[frame["request_id"].isin(list(sent))].reset_index(drop=True)
    assert len(frame) == total, f"every scored row is captured once: {len(frame)}"
    assert set(frame["request_id"]) == set(sent)
    assert (frame["model_version"] == version).all()
    assert table.schema.field("captured_at").type == table.schema.field("row_time").type
    assert str(table.schema.field("row_time").type) == "timestamp[us, tz=UTC]"
    assert str(table.schema.field("input.ts").type) == "timestamp[us, tz=UTC]"
    assert str(table.schema.field(f"output.{OUTPUT}").type) == "double"

    cards, merchants = offline["cards"], offline["merchants"]
    for request_id, (batch, scores) in sent.items():
        mine = frame[frame["request_id"] == request_id].sort_values("input.ts").reset_index(drop=True)
        assert len(mine) == len(batch)
        np.testing.assert_allclose(mine[f"output.{OUTPUT}"], scores, rtol=1e-6, err_msg=request_id)
        for row, (_, got) in zip(batch, mine.iterrows()):
            assert got["input.transaction_id"] == row["transaction_id"] and got["input.card_id"] == row["card_id"]
            assert got["input.merchant_id"] == row["merchant_id"] and got["input.amount"] == row["amount"]
            assert got["input.ts"] == pd.Timestamp(row["ts"]) == got["row_time"]
            for name in ("merchant_category", "channel", "lat", "lon"):
                if name in row:
                    assert got[f"input.{name}"] == row[name], (request_id, name)
                else:
                    assert got[f"input.{name}"] is None or (isinstance(got[f"input.{name}"], float) and math.isnan(got[f"input.{name}"])), \
                        f"an absent optional {name} is null"
            known_card = row["card_id"] in cards.index
            assert bool(got["known.card_id"]) == known_card and bool(got["known.merchant_id"])
            for name in CARD_FEATURES:
                expected = cards.loc[row["card_id"], name] if known_card else math.nan
                assert got[f"feature.{name}"] == pytest.approx(expected, rel=1e-9, nan_ok=True), (request_id, name)
            for name in MERCHANT_FEATURES:
                assert got[f"feature.{name}"] == pytest.approx(merchants.loc[row["merchant_id"], name], rel=1e-9), (request_id, name)
    captured_features = {name.removeprefix("feature.") for name in frame.columns if name.startswith("feature.")}
    assert captured_features == set(CARD_FEATURES) | set(MERCHANT_FEATURES)


def run_in_process(settings, requests: list[tuple[str, dict]]) -> object:
    """A real Predictor (loaded from the registry) answering v1 bodies in this process; returns it, closed."""
    from serving.predictor import Predictor

    predictor = Predictor("fraud", settings)
    predictor.load()

    async def answer_all():
        for request_id, body in requests:
            await predictor.predict(body, headers={"x-request-id": request_id})

    asyncio.run(answer_all())
    predictor.close_capture()
    return predictor


def test_a_capture_rate_samples_that_share_of_requests_whole(trained_loop, offline):
    """Bugs caught: a rate that is ignored, or applied per row (a sampled request must keep all its
    rows, so the monitor sees requests as they came); rate 0 writing anything."""
    base = trained_loop["env"]
    rows = transactions(offline, 2, seed=2)
    requests = [(f"share-{n}", {"instances": rows}) for n in range(400)]
    settings = load_settings(env=dict(base, FLYWHEEL_MONITORING__CAPTURE_RATE="0.3", FLYWHEEL_MONITORING__CAPTURE_FLUSH_S="0.2"))
    run_in_process(settings, requests)
    share = captured(trained_loop["storage"], "share-")
    per_request = share.groupby("request_id").size()
    assert (per_request == 2).all(), "a sampled request's rows are captured together"
    # 400 requests at 0.3: 120 expected, sd 9.2; 4.5 sd either side.
    assert 120 - 41 <= len(per_request) <= 120 + 41, len(per_request)

    zero = load_settings(env=dict(base, FLYWHEEL_MONITORING__CAPTURE_RATE="0"))
    predictor = run_in_process(zero, [(f"zero-{n}", {"instances": rows}) for n in range(100)])
    assert predictor._captures is None, "rate 0 starts no writer"
    assert captured(trained_loop["storage"], "zero-").empty


def test_a_full_queue_drops_and_a_failing_storage_counts_and_says_why(trained_loop, offline, tmp_path):
    """Bugs caught: a full capture queue that blocks or fails the request, drops that are not counted,
    a storage failure that crashes serving, goes unsaid, or is retried forever."""
    storage = trained_loop["storage"]
    day = "2031-01-02"  # a day of its own: its partition folder is a file here, so every write under it fails
    blocker = storage.uri("monitoring", "capture", f"date={day}")
    os.makedirs(os.path.dirname(blocker), exist_ok=True)
    with open(blocker, "w") as sink:
        sink.write("not a folder")
    env = dict(trained_loop["env"], FLYWHEEL_MONITORING__CAPTURE_RATE="1", FLYWHEEL_MONITORING__CAPTURE_QUEUE_ROWS="2",
               FLYWHEEL_MONITORING__CAPTURE_FLUSH_S="0.05")
    rows = [dict(row, ts=f"{day}T12:00:0{n}Z") for n, row in enumerate(transactions(offline, 3, seed=3))]
    try:
        with flywheel_server(env, tmp_path / "server.log") as running:
            before = httpx.get(f"{running.base}/metrics", timeout=10).text  # (servers this process starts may share a metrics folder)

            def grew(page: str, outcome: str) -> float:
                return metric(page, "flywheel_capture_rows_total", outcome=outcome) - metric(before, "flywheel_capture_rows_total", outcome=outcome)

            for n in range(5):  # three rows: more than the queue holds, always dropped
                response = httpx.post(f"{running.base}{V1}", json={"instances": rows}, headers={"x-request-id": f"full-{n}"}, timeout=10)
                assert response.status_code == 200, response.text
            for n in range(4):  # one row: queued, then its write fails
                response = httpx.post(f"{running.base}{V1}", json={"instances": rows[:1]}, headers={"x-request-id": f"fail-{n}"}, timeout=10)
                assert response.status_code == 200, response.text
            page = ""
            for _ in range(100):
                page = httpx.get(f"{running.base}/metrics", timeout=10).text
                if grew(page, "failed") == 4:
                    break
                asyncio.run(asyncio.sleep(0.05))
            assert grew(page, "dropped") == 15
            assert grew(page, "queued") == 4
            assert grew(page, "failed") == 4
            assert grew(page, "written") == 0
            assert httpx.post(f"{running.base}{V1}", json={"instances": rows[:1]}, timeout=10).status_code == 200, "still serving"
        log = running.output()
        assert re.search(r"capture: \d+ rows of model version \S+ were not written: \w+", log), log[-3000:]
        assert "NotADirectoryError" in log or "FileExistsError" in log or "StorageError" in log, log[-3000:]
    finally:
        os.remove(blocker)
    assert captured(storage, "full-").empty and captured(storage, "fail-").empty
