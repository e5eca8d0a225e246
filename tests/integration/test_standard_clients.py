"""The Open Inference Protocol's standard clients against `flywheel serve`, each with its defaults:
tritonclient's HTTP client (binary tensors on, no Content-Type) and gRPC client (raw contents), and
KServe's InferenceRESTClient (v2, binary) and InferenceGRPCClient, single rows and batches. A
request is built only from what the server's model metadata says; every score must equal the v1
JSON score of the same row, and come with the version that scored it."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pandas as pd
import pytest

from tests.client_scenarios import columns as arrays  # one numpy column per input the metadata lists
from tests.servers import flywheel_server

V1 = "/v1/models/fraud:predict"
OUTPUT = "fraud_probability"


@pytest.fixture(scope="module")
def server(trained_loop, tmp_path_factory):
    with flywheel_server(trained_loop["env"], tmp_path_factory.mktemp("clients") / "server.log") as running:
        yield running, trained_loop


def rows(loop, count: int) -> list[dict]:
    """``count`` real transactions of the holdout, an hour after their time (as the serving tests do)."""
    holdout = loop["storage"].read_parquet(loop["training_set"]["holdout_uri"]).to_pandas().tail(count)
    return [{
        "transaction_id": f"req-{i}", "card_id": row.card_id, "merchant_id": row.merchant_id,
        "merchant_category": row.merchant_category, "amount": float(row.amount),
        "ts": (row.ts + pd.Timedelta(hours=1)).isoformat(), "channel": row.channel,
        "lat": float(row.lat), "lon": float(row.lon),
    } for i, row in enumerate(holdout.itertuples())]


def v1_scores(base: str, batch: list[dict]) -> np.ndarray:
    answer = httpx.post(f"{base}{V1}", json={"instances": batch}, timeout=30)
    assert answer.status_code == 200, answer.text
    return np.array([p[OUTPUT] for p in answer.json()["predictions"]])


def test_the_metadata_describes_every_input_and_output_and_the_served_version(server):
    """Bug caught: model metadata with no inputs or outputs (a client cannot discover the schema),
    and server metadata claiming an extension (model_repository) the server does not serve."""
    import tritonclient.http as triton

    running, loop = server
    client = triton.InferenceServerClient(running.base.removeprefix("http://"))
    metadata = client.get_model_metadata("fraud")
    inputs = {tensor["name"]: tensor for tensor in metadata["inputs"]}
    assert set(inputs) == set(rows(loop, 1)[0]), "every request field is an input"
    assert inputs["amount"]["datatype"] == "FP64" and inputs["card_id"]["datatype"] == "BYTES"
    assert inputs["ts"]["datatype"] == "BYTES" and all(tensor["shape"] == [-1] for tensor in inputs.values())
    outputs = {tensor["name"]: tensor for tensor in metadata["outputs"]}
    assert outputs[OUTPUT] == {"name": OUTPUT, "datatype": "FP32", "shape": [-1]}
    assert outputs["unknown_entities"]["datatype"] == "BYTES"
    assert metadata["versions"] == [loop["model"]["version"]]
    server_metadata = client.get_server_metadata()
    assert server_metadata["extensions"] == ["binary_tensor_data"]
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("fraud")


@pytest.mark.parametrize("count", [1, 64])
@pytest.mark.parametrize("binary", [True, False], ids=["binary-default", "json-no-content-type"])
def test_tritonclient_http_scores_as_v1_does(server, count, binary):
    """Bugs caught: tritonclient's default request (the binary tensor extension) refused; its JSON
    body (binary_data=False), sent with no Content-Type, taken for binary; binary outputs (its
    default, binary_data_output) wrong or misplaced."""
    import tritonclient.http as triton

    running, loop = server
    batch = rows(loop, count)
    client = triton.InferenceServerClient(running.base.removeprefix("http://"))
    metadata = client.get_model_metadata("fraud")
    inputs = []
    for name, values in arrays(metadata["inputs"], batch).items():
        tensor = triton.InferInput(name, list(values.shape), triton.np_to_triton_dtype(values.dtype))
        tensor.set_data_from_numpy(values, binary_data=binary)
        inputs.append(tensor)
    result = client.infer("fraud", inputs, request_id=f"triton-{count}")
    scores = result.as_numpy(OUTPUT)
    assert scores.dtype == np.float32 and scores.shape == (count,)
    np.testing.assert_allclose(scores, v1_scores(running.base, batch), rtol=1e-5, atol=1e-7)
    response = result.get_response()
    assert response["model_version"] == loop["model"]["version"] and response["id"] == f"triton-{count}"
    assert result.as_numpy("unknown_entities").shape == (count,)
    # Outputs asked for by name, each as the client says: JSON for one, binary for the other.
    asked = [triton.InferRequestedOutput(OUTPUT, binary_data=False), triton.InferRequestedOutput("unknown_entities", binary_data=True)]
    again = client.infer("fraud", inputs, outputs=asked)
    np.testing.assert_allclose(again.as_numpy(OUTPUT), scores, rtol=1e-6)
    assert "data" in next(o for o in again.get_response()["outputs"] if o["name"] == OUTPUT)


def test_tritonclient_http_mistakes_are_400s_naming_the_input(server):
    """Bug caught: a binary tensor of the wrong type or a bad value as a 500 or an unnamed error."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    running, loop = server
    client = triton.InferenceServerClient(running.base.removeprefix("http://"))
    columns = arrays(client.get_model_metadata("fraud")["inputs"], rows(loop, 3))
    columns["amount"] = np.array([10.0, -5.0, 1.0])  # below the contract's bound, in binary
    inputs = []
    for name, values in columns.items():
        tensor = triton.InferInput(name, list(values.shape), triton.np_to_triton_dtype(values.dtype))
        tensor.set_data_from_numpy(values)
        inputs.append(tensor)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("fraud", inputs)
    assert caught.value.status() == "400" and "instance 1: field 'amount'" in caught.value.message()
    inputs = [tensor for tensor in inputs if tensor.name() != "amount"]  # a good amount, then a bad id
    amount = triton.InferInput("amount", [3], "FP64")
    amount.set_data_from_numpy(np.array([10.0, 5.0, 1.0]))
    inputs.append(amount)
    where = next(i for i, tensor in enumerate(inputs) if tensor.name() == "card_id")
    inputs[where] = triton.InferInput("card_id", [3], "FP32")  # an id sent as numbers
    inputs[where].set_data_from_numpy(np.ones(3, dtype=np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("fraud", inputs)
    assert caught.value.status() == "400" and "input 'card_id' must have datatype BYTES" in caught.value.message()


def isolated(scenario: str, **arguments) -> None:
    """A scenario of tests/client_scenarios.py in a fresh interpreter, as a team's client would run:
    tritonclient's gRPC stubs and KServe's define the same protobuf messages (inference.*), and
    protobuf refuses the second in one process."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-m", "tests.client_scenarios", scenario, json.dumps(arguments)],
                          capture_output=True, text=True, timeout=180, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, f"{scenario} failed:\n{done.stdout}\n{done.stderr[-6000:]}"


@pytest.mark.parametrize("count", [1, 64])
def test_tritonclient_grpc_scores_as_v1_does(server, count):
    """Bug caught: no gRPC service at all (KServe's off), or raw input contents read wrongly."""
    running, loop = server
    batch = rows(loop, count)
    isolated("triton_grpc_scores", grpc=running.grpc, rows=batch, expected=v1_scores(running.base, batch).tolist(),
             version=loop["model"]["version"])


def test_tritonclient_grpc_mistakes_are_invalid_argument_naming_the_input(server):
    """Bugs caught: a schema mistake as INTERNAL; raw contents whose length disagrees with the shape
    read anyway; another version answered by this one; the model unloadable over gRPC."""
    running, loop = server
    isolated("triton_grpc_mistakes", grpc=running.grpc, rows=rows(loop, 2))


@pytest.mark.parametrize("count", [1, 16])
def test_kserve_clients_score_as_v1_does(server, count):
    """KServe's own clients with their defaults: InferenceRESTClient (v2, binary inputs) and
    InferenceGRPCClient."""
    running, loop = server
    batch = rows(loop, count)
    isolated("kserve_clients_score", base=running.base, grpc=running.grpc, rows=batch,
             expected=v1_scores(running.base, batch).tolist(), version=loop["model"]["version"])


def test_grpc_calls_are_counted_and_logged_like_rest(server):
    """Bug caught: gRPC traffic invisible to the request counter and the access log."""
    import time

    from prometheus_client.parser import text_string_to_metric_families

    running, loop = server

    def counted(status: str) -> float:
        text = httpx.get(f"{running.base}/metrics", timeout=10).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "flywheel_requests_total" and s.labels["protocol"] == "grpc" and s.labels["status"] == status)

    before_ok, before_bad = counted("200"), counted("400")
    isolated("triton_grpc_one_good_one_bad", grpc=running.grpc, rows=rows(loop, 1), request_id="grpc-logged-1")
    assert counted("200") == before_ok + 1 and counted("400") == before_bad + 1
    lines: list[dict] = []
    for _ in range(50):
        lines = [json.loads(line) for line in running.output().splitlines() if line.startswith("{") and "grpc-logged-1" in line]
        if lines:
            break
        time.sleep(0.1)
    assert lines and lines[0]["method"] == "grpc" and lines[0]["status"] == 200
    assert lines[0]["model_version"] == loop["model"]["version"] and lines[0]["path"].endswith("/ModelInfer")


def test_grpc_limits_are_the_rest_limits(server):
    """Bugs caught: a gRPC request over serving.max_batch scored, or a message over
    serving.max_body_bytes read whole (REST refuses both)."""
    running, loop = server
    settings = loop["settings"].serving
    isolated("triton_grpc_limits", grpc=running.grpc, rows=rows(loop, 4), max_batch=settings.max_batch,
             max_bytes=settings.max_body_bytes)


def test_a_taken_grpc_port_is_refused_before_the_model_loads(trained_loop):
    """Bug caught: a server that loads its model for minutes and then dies on a taken gRPC port, or
    serves REST without the gRPC its clients expect."""
    import os
    import socket
    import subprocess
    import sys

    from tests.servers import free_port

    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        grpc_port = taken.getsockname()[1]
        env = dict(os.environ, **trained_loop["env"])
        done = subprocess.run([sys.executable, "-m", "flywheel.cli", "serve", "--port", str(port), "--grpc-port", str(grpc_port)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and f"cannot serve on 127.0.0.1:{grpc_port}" in done.stderr, done.stderr
        assert "--grpc-port" in done.stderr and "Traceback" not in done.stderr, done.stderr
    same = subprocess.run([sys.executable, "-m", "flywheel.cli", "serve", "--port", str(port), "--grpc-port", str(port)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert same.returncode != 0 and "both" in same.stderr and "Traceback" not in same.stderr, same.stderr
    wrong = subprocess.run([sys.executable, "-m", "flywheel.cli", "serve", "--grpc-port", "70000"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "70000 must be a port" in wrong.stderr, wrong.stderr
