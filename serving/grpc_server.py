"""The v2 gRPC service (KServe's ``GRPCInferenceService``) as flywheel serves it.

KServe's own gRPC server binds every interface (``[::]``), logs a traceback for every client
mistake, counts nothing, and lets any caller unload the model. This one is KServe's servicer with
flywheel's additions, the same as its REST server's: the configured host, the same scoring passes
(one event loop with REST), the schema's checks (``INVALID_ARGUMENT`` naming the input, never
``INTERNAL``), raw input contents checked as REST's binary data is, a model version in the request
that is not the served one is ``NOT_FOUND``, the request counter and histogram (``protocol="grpc"``,
the status as the HTTP status the call maps to, so one 5xx alert covers both protocols), one JSON
access-log line per call with its request id (the ``x-request-id`` metadata, echoed in the trailing
metadata with ``x-model-version``), and no model repository (load and unload are ``UNIMPLEMENTED``).
The largest message it takes is ``serving.max_body_bytes``, as REST's body limit.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from typing import Any, Awaitable, Callable

import grpc
import orjson
from grpc import aio
from kserve.errors import InferenceError, InvalidInput, ModelNotFound, ModelNotReady, ServerNotLive, ServerNotReady
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferRequest, InferResponse

from flywheel.errors import FlywheelError
from serving import metrics
from serving.rest import REQUEST_ID, access_log

log = logging.getLogger(__name__)

# Each status as the HTTP status it maps to (google.rpc's mapping), for the request counter.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message for an exception raised under a call."""
    if isinstance(exc, (InvalidInput, InferenceError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc.reason if hasattr(exc, "reason") else exc)
    if isinstance(exc, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc.reason)
    if isinstance(exc, (ModelNotReady, ServerNotReady, ServerNotLive)):
        return grpc.StatusCode.UNAVAILABLE, str(exc.reason)
    if isinstance(exc, FlywheelError):  # the online store or registry failed under the call
        return grpc.StatusCode.UNAVAILABLE, f"scoring is unavailable: {exc}"
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc) or "not implemented"
    return grpc.StatusCode.INTERNAL, "internal server error"


def _call(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Around every RPC: errors as statuses, the request id, metrics (ModelInfer) and the access log."""
    name = method.__name__
    counted = name == "ModelInfer"

    @functools.wraps(method)
    async def wrapper(self: "FlywheelServicer", request: Any, context: aio.ServicerContext) -> Any:
        started = time.perf_counter()
        given = next((value for key, value in context.invocation_metadata() or () if key == "x-request-id"), "")
        request_id = given if isinstance(given, str) and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        state = {"code": grpc.StatusCode.OK, "version": "", "request_id": request_id}
        try:
            response = await method(self, request, context, state)
            return response
        except aio.AbortError:
            raise
        except Exception as exc:
            code, message = _status(exc)
            state["code"] = code
            if code == grpc.StatusCode.INTERNAL:
                log.exception("gRPC %s failed", name)
            await context.abort(code, message[:4000], trailing_metadata=(("x-request-id", request_id),))
        finally:
            seconds = time.perf_counter() - started
            code = state["code"]
            if state["code"] == grpc.StatusCode.OK:
                context.set_trailing_metadata((("x-request-id", request_id),) + (
                    (("x-model-version", state["version"]),) if state["version"] else ()))
            if counted:
                _requests_counter(HTTP_STATUS.get(code, 500), state["version"] or "none").inc()
                metrics.REQUEST_SECONDS.labels("grpc").observe(seconds)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(orjson.dumps({
                    "time": time.time(), "request_id": request_id, "method": "grpc", "path": f"/inference.GRPCInferenceService/{name}",
                    "status": HTTP_STATUS.get(code, 500), "grpc_status": code.name, "ms": round(seconds * 1000, 3),
                    "model_version": state["version"] or None, "client": context.peer(), "pid": os.getpid(),
                }).decode())

    return wrapper


@functools.lru_cache(maxsize=1024)
def _requests_counter(status: int, version: str) -> Any:
    return metrics.REQUESTS.labels("grpc", str(status), version)


class FlywheelServicer(InferenceServicer):
    """KServe's servicer, each call through :func:`_call`; ModelInfer checks the version asked for
    and decodes raw contents strictly (in the predictor); ModelMetadata names the served version.

    Calls join REST's scoring passes, but rarely meet each other there: grpc's asyncio server takes
    new calls one at a time through its poller thread, so at concurrency 8 almost every pass held one
    call (measured: 6,662 passes of one, 50 of two) and each call pays a pass of its own (about
    950 calls/s against 2,200 requests/s over REST, same model, 2 cores). Waiting longer for
    company did not help (turns of the loop: no change; asyncio's millisecond timers: passes of 8,
    1,090 calls/s, p50 4 ms at concurrency 1), nor did grpc's threaded server handing calls to the
    loop (540 calls/s: the threads fight for the interpreter)."""

    @_call
    async def ServerLive(self, request: Any, context: Any, state: dict) -> Any:
        return await InferenceServicer.ServerLive(self, request, context)

    @_call
    async def ServerReady(self, request: Any, context: Any, state: dict) -> Any:
        return await InferenceServicer.ServerReady(self, request, context)

    @_call
    async def ServerMetadata(self, request: Any, context: Any, state: dict) -> Any:
        return await InferenceServicer.ServerMetadata(self, request, context)

    @_call
    async def ModelReady(self, request: Any, context: Any, state: dict) -> Any:
        self._check_version(request.name, request.version)
        return pb.ModelReadyResponse(ready=await self._data_plane.model_ready(model_name=request.name))

    @_call
    async def ModelMetadata(self, request: Any, context: Any, state: dict) -> Any:
        self._check_version(request.name, request.version)
        metadata = await self._data_plane.model_metadata(model_name=request.name)
        return pb.ModelMetadataResponse(name=metadata["name"], versions=metadata.get("versions", []), platform=metadata["platform"],
                                        inputs=metadata["inputs"], outputs=metadata["outputs"])

    @_call
    async def ModelInfer(self, request: Any, context: Any, state: dict) -> Any:
        self._check_version(request.model_name, request.model_version)
        self.validate_grpc_request(request)
        if not await self._data_plane.model_ready(request.model_name, True):
            raise ModelNotReady(request.model_name)
        headers = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        headers["x-request-id"] = state["request_id"]  # the call's id (given or made), as the access log has it
        response, response_headers = await self._data_plane.infer(
            request=InferRequest.from_grpc(request), headers=headers, model_name=request.model_name)
        state["version"] = response_headers.get("x-model-version", "")
        if isinstance(response, InferResponse):
            return response.to_grpc()
        return response

    @_call
    async def RepositoryModelLoad(self, request: Any, context: Any, state: dict) -> Any:
        raise NotImplementedError("the model repository extension is not served: the server serves one model, which no caller may load or unload")

    @_call
    async def RepositoryModelUnload(self, request: Any, context: Any, state: dict) -> Any:
        raise NotImplementedError("the model repository extension is not served: the server serves one model, which no caller may load or unload")

    def _check_version(self, name: str, version: str) -> None:
        """A version asked for must be the one served (empty: whichever is)."""
        model = self._data_plane.get_model_from_registry(name)  # ModelNotFound for another name
        served = getattr(model, "version", None)
        if version and str(version) != str(served):
            raise ModelNotFound(name) if served is None else _VersionNotServed(name, version, served)


class _VersionNotServed(ModelNotFound):
    def __init__(self, name: str, version: str, served: Any) -> None:
        super().__init__(name)
        self.reason = f"model {name!r} version {version!r} is not served here (this server serves version {served!r})"


class GRPCServer:
    """The aio gRPC server on ``host:port``, in the event loop the REST server runs in (one worker)
    or the parent process's (several: the parent holds a model of its own for it)."""

    def __init__(self, host: str, port: int, dataplane: Any, max_message_bytes: int, grace_period: float = 10) -> None:
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.dataplane = dataplane
        self.max_message_bytes = max_message_bytes
        self.grace_period = grace_period
        self._server: aio.Server | None = None

    async def start(self) -> None:
        self._server = aio.server(options=[
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a second server on a taken port fails, as REST's does
        ])
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(FlywheelServicer(self.dataplane, None), self._server)
        if self._server.add_insecure_port(self.address) == 0:
            raise FlywheelError(f"cannot serve gRPC on {self.address}: the port is taken; choose another --grpc-port (0: no gRPC)")
        await self._server.start()
        await self._server.wait_for_termination()

    async def stop(self, sig: int | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace=self.grace_period)
