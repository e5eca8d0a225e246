"""Client scenarios that must run in a process of their own (tests/integration/test_standard_clients.py
starts each with ``python -m tests.client_scenarios NAME JSON``): tritonclient's gRPC stubs and
KServe's define the same protobuf messages, which one process cannot hold both of. Each scenario
asserts; a failure exits non-zero with its traceback."""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np

OUTPUT = "fraud_probability"


def columns(metadata_inputs: list[dict], rows: list[dict]) -> dict[str, np.ndarray]:
    """One numpy column per input the model metadata lists, typed as it says."""
    made = {}
    for tensor in metadata_inputs:
        name, datatype = tensor["name"], tensor["datatype"]
        values = [row[name] for row in rows]
        if datatype == "BYTES":
            made[name] = np.array([str(v).encode() for v in values], dtype=np.object_)
        elif datatype == "FP64":
            made[name] = np.array(values, dtype=np.float64)
        elif datatype == "INT64":
            made[name] = np.array(values, dtype=np.int64)
        elif datatype == "BOOL":
            made[name] = np.array(values, dtype=bool)
        else:
            raise AssertionError(f"the metadata names a datatype this scenario does not know: {tensor}")
    return made


def _triton_inputs(triton, made: dict[str, np.ndarray]) -> list:
    inputs = []
    for name, values in made.items():
        tensor = triton.InferInput(name, list(values.shape), triton.np_to_triton_dtype(values.dtype))
        tensor.set_data_from_numpy(values)
        inputs.append(tensor)
    return inputs


def triton_grpc_scores(grpc: str, rows: list[dict], expected: list[float], version: str) -> None:
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(grpc)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("fraud")
    metadata = client.get_model_metadata("fraud", as_json=True)
    assert metadata["versions"] == [version], metadata
    assert {tensor["name"] for tensor in metadata["inputs"]} == set(rows[0])
    assert client.get_server_metadata(as_json=True)["extensions"] == ["binary_tensor_data"]
    inputs = _triton_inputs(triton, columns(metadata["inputs"], rows))
    result = client.infer("fraud", inputs, request_id="grpc-request", headers={"x-request-id": "grpc-call"})
    scores = result.as_numpy(OUTPUT)
    assert scores.shape == (len(rows),), scores.shape
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-7)
    assert result.get_response().model_version == version and result.get_response().id == "grpc-request"
    assert result.as_numpy("unknown_entities").shape == (len(rows),)


def triton_grpc_mistakes(grpc: str, rows: list[dict]) -> None:
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(grpc)
    made = columns(client.get_model_metadata("fraud", as_json=True)["inputs"], rows)

    def refused(inputs, **options) -> InferenceServerException:
        try:
            client.infer("fraud", inputs, **options)
        except InferenceServerException as exc:
            return exc
        raise AssertionError("the request was scored")

    made["ts"] = np.array([b"2026-11-01T12:00:00Z", b"yesterday"], dtype=np.object_)
    error = refused(_triton_inputs(triton, made))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "instance 1: field 'ts'" in error.message(), error
    made["ts"] = np.array([b"2026-11-01T12:00:00Z"] * len(rows), dtype=np.object_)
    short = _triton_inputs(triton, made)
    amount = next(t for t in short if t.name() == "amount")
    amount._raw_content = amount._raw_content[:-3]  # a truncated tensor
    error = refused(short)
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "input 'amount'" in error.message(), error
    error = refused(_triton_inputs(triton, made), model_version="no-such-version")
    assert error.status() == "StatusCode.NOT_FOUND" and "not served here" in error.message(), error
    try:
        client.unload_model("fraud")
    except InferenceServerException as exc:
        assert exc.status() == "StatusCode.UNIMPLEMENTED", exc
    else:
        raise AssertionError("the model was unloaded over gRPC")
    assert client.is_model_ready("fraud"), "the model still serves"


def triton_grpc_one_good_one_bad(grpc: str, rows: list[dict], request_id: str) -> None:
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(grpc)
    inputs = _triton_inputs(triton, columns(client.get_model_metadata("fraud", as_json=True)["inputs"], rows))
    client.infer("fraud", inputs, headers={"x-request-id": request_id})
    try:
        client.infer("fraud", [tensor for tensor in inputs if tensor.name() == "amount"])  # required inputs missing
    except InferenceServerException as exc:
        assert exc.status() == "StatusCode.INVALID_ARGUMENT" and "missing required input" in exc.message(), exc
    else:
        raise AssertionError("a request without its required inputs was scored")


def triton_grpc_limits(grpc: str, rows: list[dict], max_batch: int, max_bytes: int) -> None:
    """Too many rows is INVALID_ARGUMENT naming the limit; a message over the body limit is refused
    by gRPC itself (RESOURCE_EXHAUSTED), before it is read; the server answers afterwards."""
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(grpc)
    metadata = client.get_model_metadata("fraud", as_json=True)["inputs"]
    many = (rows * (max_batch // len(rows) + 1))[:max_batch + 1]
    try:
        client.infer("fraud", _triton_inputs(triton, columns(metadata, many)))
    except InferenceServerException as exc:
        assert exc.status() == "StatusCode.INVALID_ARGUMENT" and f"at most {max_batch} rows" in exc.message(), exc
    else:
        raise AssertionError("a request over serving.max_batch was scored")
    huge = dict(rows[0], transaction_id="x" * (max_bytes + 1))
    try:
        client.infer("fraud", _triton_inputs(triton, columns(metadata, [huge])))
    except InferenceServerException as exc:
        assert exc.status() == "StatusCode.RESOURCE_EXHAUSTED", exc
    else:
        raise AssertionError("a message over serving.max_body_bytes was read")
    result = client.infer("fraud", _triton_inputs(triton, columns(metadata, rows[:1])))
    assert result.as_numpy(OUTPUT).shape == (1,)


def kserve_clients_score(base: str, grpc: str, rows: list[dict], expected: list[float], version: str) -> None:
    import httpx
    from kserve import InferenceGRPCClient, InferenceRESTClient, RESTConfig
    from kserve.protocol.infer_type import InferInput, InferRequest

    metadata = httpx.get(f"{base}/v2/models/fraud", timeout=10).json()
    made = columns(metadata["inputs"], rows)

    def request(binary: bool = True) -> InferRequest:
        inputs = []
        for tensor in metadata["inputs"]:
            values = made[tensor["name"]]
            one = InferInput(tensor["name"], list(values.shape), tensor["datatype"])
            one.set_data_from_numpy(values, binary_data=binary)  # binary_data=True: KServe's default
            inputs.append(one)
        return InferRequest(model_name="fraud", infer_inputs=inputs, request_id="kserve-request")

    headers: dict[str, str] = {}

    async def both():
        rest = InferenceRESTClient(RESTConfig(protocol="v2"))
        over_grpc = InferenceGRPCClient(grpc)
        try:
            return (await rest.infer(base, request(), model_name="fraud", response_headers=headers),
                    await over_grpc.infer(request()), await over_grpc.infer(request(binary=False)))
        finally:
            await rest.close()
            await over_grpc.close()

    by_rest, by_grpc, by_grpc_typed = asyncio.run(both())  # the last with typed contents, not raw bytes
    for response in (by_rest, by_grpc, by_grpc_typed):
        output = next(o for o in response.outputs if o.name == OUTPUT)
        np.testing.assert_allclose(np.asarray(output.as_numpy(), dtype=np.float64).reshape(-1), expected, rtol=1e-5, atol=1e-7)
    # KServe's REST client drops the body's model_version (InferResponse.from_bytes); the header has it.
    assert headers["x-model-version"] == version, headers
    assert by_grpc.model_version == version == by_grpc_typed.model_version, by_grpc.model_version


if __name__ == "__main__":
    globals()[sys.argv[1]](**json.loads(sys.argv[2]))
