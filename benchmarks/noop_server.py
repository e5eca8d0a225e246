"""A no-op KServe model server: the baseline `benchmarks/serving.py` measures `flywheel serve` against.

    python benchmarks/noop_server.py --port P [--workers N] [--model-name fraud]

A ``kserve.Model`` whose predict returns a constant score per instance (v1), behind KServe's own
ModelServer with the given number of uvicorn workers, bound to 127.0.0.1 (KServe binds every
interface and has no host flag, so the REST server's bind address is set before it starts). What
it costs is KServe itself: the HTTP server, JSON decoding and encoding, the data plane's routing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

HOST = "127.0.0.1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model-name", default="fraud")
    parser.add_argument("--grpc-port", type=int, default=0, help="also serve v2 gRPC here (KServe's own gRPC server)")
    return parser.parse_args(argv)


# KServe parses sys.argv for its own flags when imported: parse ours first, then hide them. The
# classes live at module level because KServe starts its workers with multiprocessing's spawn,
# which pickles the model by reference (a worker imports this file as __mp_main__).
ARGS = parse_args() if __name__ == "__main__" else None
sys.argv = sys.argv[:1]

from kserve import Model, ModelServer  # noqa: E402
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse  # noqa: E402
from concurrent import futures  # noqa: E402

from grpc import aio  # noqa: E402
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc  # noqa: E402
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor  # noqa: E402
from kserve.protocol.grpc.server import GRPCServer  # noqa: E402
from kserve.protocol.grpc.servicer import InferenceServicer  # noqa: E402
from kserve.model_server import FASTAPI_APP_IMPORT_STRING  # noqa: E402
from kserve.protocol.rest.multiprocess.server import RESTServerMultiProcess  # noqa: E402
from kserve.protocol.rest.server import RESTServer  # noqa: E402


class NoopModel(Model):
    """Answers every v1 instance with the same score: no features, no model."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.ready = False

    def load(self) -> bool:
        self.ready = True
        return self.ready

    def predict(self, payload: Any, headers: Any = None) -> Any:
        if isinstance(payload, InferRequest):  # v2 (REST or gRPC): a constant per row of the first input
            rows = payload.inputs[0].shape[0] if payload.inputs else 0
            score = InferOutput(name="fraud_probability", shape=[rows], datatype="FP32", data=[0.0] * rows)
            return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=[score], model_version="noop",
                                 from_grpc=payload.from_grpc)
        instances = payload.get("instances", []) if isinstance(payload, dict) else []
        return {"predictions": [{"fraud_probability": 0.0, "model_version": "noop"} for _ in instances]}


class LoopbackGRPCServer(GRPCServer):
    """KServe's own gRPC server (its servicer and interceptors), bound to 127.0.0.1 (KServe's binds
    ``[::]``): the no-op model over gRPC, the baseline for `flywheel serve`'s gRPC."""

    async def start(self, max_workers: int) -> None:
        self._server = aio.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                                  interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()))
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self._data_plane, self._model_repository_extension), self._server)
        self._server.add_insecure_port(f"{HOST}:{self._port}")
        await self._server.start()
        await self._server.wait_for_termination()


class LoopbackModelServer(ModelServer):
    """KServe's ModelServer.start, REST only, with the REST server bound to 127.0.0.1."""

    def start(self, models: list[Any]) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        common = dict(access_log_format=self.access_log_format, workers=self.workers, grace_period=self.grace_period,
                      event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive)
        if self.workers > 1:
            server = RESTServerMultiProcess(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                                            self.http_port, **common)
            server._rest_server.config.host = HOST
            self._rest_multiprocess_server = server
        else:
            server = RESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                                self.http_port, **common)
            server.config.host = HOST
            self._rest_server = server
        self.servers.append(server.start())
        if ARGS is not None and ARGS.grpc_port:
            self._grpc_server = LoopbackGRPCServer(ARGS.grpc_port, self.dataplane, self.model_repository_extension, kwargs={})
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())


def main(args: argparse.Namespace) -> None:
    model = NoopModel(args.model_name)
    model.load()
    print(f"no-op model {args.model_name} on http://{HOST}:{args.port} with {args.workers} worker(s)", flush=True)
    LoopbackModelServer(http_port=args.port, workers=args.workers, enable_grpc=False).start([model])


if __name__ == "__main__":
    main(ARGS)
