"""Small KServe models for canary tests, served by a real KServe ModelServer on 127.0.0.1.

``python -m tests.canary_models --port P --behaviour B [--delay-ms D]`` serves model ``fraud``
(v1 ``/v1/models/fraud:predict`` and v2 ``/v2/models/fraud/infer``). Each instance's score is a
deterministic function of its ``amount`` (:func:`expected_score`, which tests use as their
oracle); the behaviours:

- ``good``: the score, after ``delay_ms``;
- ``erroring``: HTTP 500 for every request whose first transaction id hashes to 0 mod 5 (a fifth);
- ``slow``: the score, after 10 x ``delay_ms``;
- ``shuffled``: a score unrelated to the amount (from a hash of the transaction id).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import zlib
from typing import Any

BEHAVIOURS = ("good", "erroring", "slow", "shuffled")


def expected_score(amount: float) -> float:
    """What a good model answers for a transaction of ``amount``."""
    return 1.0 / (1.0 + math.exp(-(float(amount) - 150.0) / 40.0))


def shuffled_score(transaction_id: str) -> float:
    return (zlib.crc32(transaction_id.encode()) % 1000) / 1000.0


def erroring_request(transaction_id: str) -> bool:
    """Whether the erroring model fails a request whose first transaction has this id."""
    return zlib.crc32(("err:" + transaction_id).encode()) % 5 == 0


def _instances_of(payload: Any) -> list[dict[str, Any]]:
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferRequest

    if isinstance(payload, InferRequest):
        columns = {tensor.name: list(tensor.data) for tensor in payload.inputs}
        if "amount" not in columns:
            raise InvalidInput("input 'amount' is required")
        ids = columns.get("transaction_id", [""] * len(columns["amount"]))
        return [{"amount": a, "transaction_id": t.decode() if isinstance(t, bytes) else str(t)} for a, t in zip(columns["amount"], ids)]
    if isinstance(payload, dict) and isinstance(payload.get("instances"), list) and payload["instances"]:
        instances = payload["instances"]
        for index, instance in enumerate(instances):
            if not isinstance(instance, dict) or not isinstance(instance.get("amount"), (int, float)):
                raise InvalidInput(f"instance {index}: a number 'amount' is required")
        return instances
    raise InvalidInput("'instances' must be a non-empty list of rows")


def build_model(name: str, behaviour: str, delay_ms: float) -> Any:
    import kserve
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    class CanaryTestModel(kserve.Model):
        def load(self) -> bool:
            self.ready = True
            return self.ready

        async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
            instances = _instances_of(payload)
            ids = [str(i.get("transaction_id", "")) for i in instances]
            await asyncio.sleep((10 if behaviour == "slow" else 1) * delay_ms / 1000)
            if behaviour == "erroring" and erroring_request(ids[0]):
                raise RuntimeError("the erroring test model fails this request on purpose")
            if behaviour == "shuffled":
                scores = [shuffled_score(t) for t in ids]
            else:
                scores = [expected_score(i["amount"]) for i in instances]
            if isinstance(payload, InferRequest):
                output = InferOutput(name="fraud_probability", shape=[len(scores)], datatype="FP64", data=scores)
                return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=[output])
            return {"predictions": [{"fraud_probability": s, "model_version": behaviour} for s in scores]}

    model = CanaryTestModel(name)
    model.load()
    return model


def serve(port: int, behaviour: str, delay_ms: float, name: str = "fraud") -> None:
    """Serve the model with KServe's ModelServer on 127.0.0.1 only (KServe itself binds 0.0.0.0)."""
    sys.argv = sys.argv[:1]  # KServe parses sys.argv for its own flags
    from kserve import ModelServer
    from kserve.model_server import FASTAPI_APP_IMPORT_STRING
    from kserve.protocol.rest.server import RESTServer

    class LoopbackModelServer(ModelServer):
        def start(self, models: list[Any]) -> None:
            self._register_and_check_atleast_one_model_is_ready(models)
            self._rest_server = RESTServer(
                FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension, self.http_port,
                workers=1, grace_period=1, event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive,
            )
            self._rest_server.config.host = "127.0.0.1"
            self._rest_server.config.access_log = False
            self.servers.append(self._rest_server.start())
            logging.getLogger("uvicorn.access").disabled = True  # a line per request costs this 2-core machine
            self.setup_event_loop()
            self.register_signal_handler()
            asyncio.run(self._serve())

    LoopbackModelServer(http_port=port, workers=1, enable_grpc=False, enable_latency_logging=False).start([build_model(name, behaviour, delay_ms)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--behaviour", choices=BEHAVIOURS, required=True)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--name", default="fraud")
    args = parser.parse_args()
    serve(args.port, args.behaviour, args.delay_ms, args.name)


if __name__ == "__main__":
    main()
