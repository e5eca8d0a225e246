"""KServe's REST server as flywheel runs it, in every worker process.

KServe binds 0.0.0.0 with no host flag, and with several workers starts them with multiprocessing's
spawn, each importing KServe's FastAPI app afresh (so the app must be set up in the worker, not in
the parent). :class:`FlywheelRESTServer` is KServe's RESTServer with what flywheel adds: the
configured host, the access log and request ids, the body limit (gzip and deflate bodies inflated
within it), a v2 infer route that reads the body as the protocol's clients send it (JSON whatever
its Content-Type, or the binary tensor extension: :mod:`serving.tensors`), a 400 (not 422) for a
malformed v2 body, a 400 without a logged traceback for every client mistake, v2's versioned paths (the
served version answers there; another is a 404, where KServe answers 501), no model management
routes (KServe's unload would let any caller take the model out of service) and no explain route,
and a /metrics page that sums every worker's samples.

Importing this module imports kserve and prometheus_client: :func:`serving.server.serve` does so
only after it has set ``PROMETHEUS_MULTIPROC_DIR`` (with more than one worker).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import time
import uuid
import zlib
from typing import Any

import orjson
from fastapi.exceptions import RequestValidationError
from kserve.errors import InvalidInput, ModelNotReady
from kserve.protocol.rest.server import RESTServer
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from flywheel.errors import FlywheelError
from serving import metrics
from serving.tensors import HEADER, decode_rest, malformed

access_log = logging.getLogger("flywheel.access")

REQUEST_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
# KServe routes these but answers every one with 501 ("Model versioning not supported yet").
VERSIONED_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)(?P<rest>/ready|/infer)?")


def _error(status: int, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"error": message}).encode()


def _protocol(path: str) -> str | None:
    if path.startswith("/v1/models/") and path.endswith(":predict"):
        return "v1"
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "v2"
    return None


@functools.lru_cache(maxsize=1024)
def _requests_counter(protocol: str, status: int, version: str) -> Any:
    """The request counter's child for these labels (looked up once, not on every request)."""
    return metrics.REQUESTS.labels(protocol, str(status), version)


@functools.lru_cache(maxsize=8)
def _request_seconds(protocol: str) -> Any:
    return metrics.REQUEST_SECONDS.labels(protocol)


class ServingMiddleware:
    """Pure ASGI, around every request: a request id (the client's X-Request-ID if it is sane, else a
    new one) echoed in the response, the body limit (413 before the body is parsed), the request
    metrics and one JSON access-log line."""

    def __init__(self, app: Any, max_body_bytes: int, served_version: Any = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.served_version = served_version or (lambda name: None)  # model name -> the version it serves now

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        if request_id != given:  # the predictor sees the id the response and the access log carry (capture)
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k.lower() != b"x-request-id"]
                         + [(b"x-request-id", request_id.encode())])
        path = scope.get("path", "")
        versioned = VERSIONED_PATH.fullmatch(path)
        wrong_version = None
        if versioned:
            # The version this server serves answers on its versioned paths too; any other is not here.
            name, version, rest = versioned["name"], versioned["version"], versioned["rest"] or ""
            served = self.served_version(name)
            if served is not None and version == served:
                path = f"/v2/models/{name}{rest}"
                scope = dict(scope, path=path, raw_path=path.encode())
            else:
                wrong_version = (f"model {name!r} version {version!r} is not served here" +
                                 (f" (this server serves version {served!r})" if served is not None else ""))
        protocol = _protocol(path)
        state = {"status": 500, "version": ""}

        async def respond(status: int, body: bytes) -> None:
            state["status"] = status
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    (b"x-request-id", request_id.encode())]})
            await send({"type": "http.response.body", "body": body})

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                out = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-model-version"]
                state["version"] = next((v.decode() for k, v in message.get("headers", []) if k.lower() == b"x-model-version"), "")
                out.append((b"x-request-id", request_id.encode()))
                if state["version"]:
                    out.append((b"x-model-version", state["version"].encode()))
                message = dict(message, headers=out)
            await send(message)

        try:
            rejection = (_error(404, wrong_version) if wrong_version else _error(404, "Not Found") if _unserved(path)
                         else self._reject_early(headers))
            if rejection:
                await respond(*rejection)
            elif protocol is None:
                await self.app(scope, receive, send_with_id)
            else:
                body, too_large = await self._read_body(receive)
                encoding = headers.get(b"content-encoding", b"").strip().lower()
                problem = None
                if not too_large and encoding in DECOMPRESS:  # tritonclient's request compression: gzip or deflate
                    body, problem = _decompress(body, encoding, self.max_body_bytes)
                    too_large = problem == "too large"
                    scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-encoding", b"content-length")]
                                 + [(b"content-length", str(len(body)).encode())])
                if too_large:
                    await respond(*_error(413, f"the request body is larger than {self.max_body_bytes} bytes (serving.max_body_bytes)"
                                               + (" once decompressed" if encoding in DECOMPRESS else "")))
                elif problem:
                    await respond(*_error(400, problem))
                else:
                    await self.app(scope, _replay(body), send_with_id)
        except Exception:
            state["status"] = 500
            raise
        finally:
            seconds = time.perf_counter() - started
            if protocol is not None:
                _requests_counter(protocol, state["status"], state["version"] or "none").inc()
                _request_seconds(protocol).observe(seconds)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(orjson.dumps({
                    "time": time.time(), "request_id": request_id, "method": scope.get("method"), "path": path,
                    "status": state["status"], "ms": round(seconds * 1000, 3), "model_version": state["version"] or None,
                    "client": (scope.get("client") or [None])[0], "pid": os.getpid(),
                }).decode())

    def _reject_early(self, headers: dict[bytes, bytes]) -> tuple[int, bytes] | None:
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return _error(400, "header 'content-length' must be a whole number of bytes")
            if int(length) > self.max_body_bytes:
                return _error(413, f"the request body is larger than {self.max_body_bytes} bytes (serving.max_body_bytes)")
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding not in (b"", b"identity") + tuple(DECOMPRESS):
            return _error(415, f"header 'content-encoding': {encoding.decode('latin-1')[:40]!r} bodies are not supported; "
                               f"send the body plain, gzip or deflate")
        return None

    async def _read_body(self, receive: Any) -> tuple[bytes, bool]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), False


DECOMPRESS = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}  # zlib's wbits for each encoding


def _decompress(body: bytes, encoding: bytes, limit: int) -> tuple[bytes, str | None]:
    """A compressed body, inflated to at most ``limit`` bytes (a small bomb cannot fill memory);
    the problem, if any: "too large", or what is wrong with the data."""
    inflater = zlib.decompressobj(DECOMPRESS[encoding])
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        return b"", f"header 'content-encoding' says {encoding.decode()}, but the body is not {encoding.decode()} data: {exc}"
    if len(plain) > limit or inflater.unconsumed_tail:
        return b"", "too large"
    if not inflater.eof:
        return b"", f"the {encoding.decode()} body is truncated"
    return plain, None


def _unserved(path: str) -> bool:
    """KServe routes this server does not offer: its model repository extension lets any caller
    unload the model (every prediction a 404 until a restart) or load it again, and the model has
    no explainer (KServe answers :explain with a 501). They answer 404, as an unknown path does.
    (Refused here: FastAPI keeps included routers' routes where they cannot be removed.)"""
    return path.startswith("/v2/repository/") or path.endswith(":explain")


def _replay(body: bytes) -> Any:
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def _malformed_request(_: Request, exc: Any) -> Response:
    """A body that is not valid JSON or not the protocol's shape is the client's mistake: 400, not 422."""
    return JSONResponse(status_code=400, content={"error": malformed(exc.errors())})


async def _client_mistake(_: Request, exc: Exception) -> Response:
    """KServe's handler logs a traceback for every 400; a client's mistake is in the access log already."""
    message = str(exc)
    if message.startswith("Unrecognized request format: "):  # KServe's words for a JSON body it cannot parse
        message = "the request body is not valid JSON: " + message.removeprefix("Unrecognized request format: ")
    return JSONResponse(status_code=400, content={"error": message})


async def _http_error(_: Request, exc: HTTPException) -> Response:
    """Every error body has one shape, {"error": ...}, FastAPI's own (a body it cannot parse, 404, 405) too."""
    return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)}, headers=exc.headers)


async def _store_unavailable(_: Request, exc: Exception) -> Response:
    """The online store or registry failed under a request: the server's trouble, said plainly (503)."""
    return JSONResponse(status_code=503, content={"error": f"scoring is unavailable: {exc}"})


async def _metrics_page(request: Request) -> Response:
    content, content_type = metrics.exposition(request.headers.get("accept"))
    return Response(content=content, headers={"content-type": content_type})


def _configure_access_log() -> None:
    """One JSON line per request on stderr, whatever KServe did to the root logger."""
    if not access_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False


class FlywheelRESTServer(RESTServer):
    """KServe's RESTServer with flywheel's additions, set up in whichever process serves."""

    host: str = "127.0.0.1"
    max_body_bytes: int = 1_048_576

    def configure(self, host: str, max_body_bytes: int) -> "FlywheelRESTServer":
        self.host, self.max_body_bytes = host, max_body_bytes
        self.config.host = host  # KServe hard-codes 0.0.0.0
        self.config.access_log = False  # flywheel writes its own, with the request id
        return self

    def run(self, sockets: Any = None) -> None:
        """A worker process's entry point (KServe's multi-process server): load the model here,
        where it will serve, before accepting a request."""
        for model in self.dataplane.model_registry.get_models().values():
            if hasattr(model, "load_in_worker"):
                model.load_in_worker()
        try:
            super().run(sockets)
        finally:  # the worker is stopping: write its captured rows still waiting
            for model in self.dataplane.model_registry.get_models().values():
                if hasattr(model, "close_capture"):
                    model.close_capture()

    def _add_middlewares(self, app: Any) -> None:
        _configure_access_log()
        logging.getLogger("uvicorn.access").disabled = True  # flywheel's own line replaces it
        app.add_middleware(ServingMiddleware, max_body_bytes=self.max_body_bytes, served_version=self._served_version)

    def _served_version(self, name: str) -> str | None:
        """The version the model of this name serves now in this process (None: no such model)."""
        model = self.dataplane.model_registry.get_model(name)
        version = getattr(model, "version", None) if model is not None else None
        return str(version) if version is not None else None

    def _register_endpoints(self, app: Any) -> None:
        app.add_api_route("/metrics", _metrics_page, methods=["GET"], include_in_schema=False)  # before KServe's own
        app.add_api_route("/v2/models/{model_name}/infer", self._infer_v2, methods=["POST"], include_in_schema=False)  # ditto
        super()._register_endpoints(app)

    async def _infer_v2(self, request: Request, model_name: str) -> Response:
        """v2 inference, as KServe's route answers it, but with the body read the way the protocol's
        clients send it (:func:`serving.tensors.decode_rest`): JSON whatever the Content-Type, or
        the binary tensor extension; binary outputs when the request asks for them."""
        if not await self.dataplane.model_ready(model_name, True):  # an unknown model: ModelNotFound, 404
            raise ModelNotReady(model_name)
        headers = dict(request.headers)
        infer_request = decode_rest(await request.body(), headers.get(HEADER), model_name)
        response, response_headers = await self.dataplane.infer(model_name=model_name, request=infer_request, headers=headers)
        body, encoded = self.dataplane.encode(model_name=model_name, response=response, headers=headers, req_attributes={})
        response_headers = {key: value for key, value in {**response_headers, **encoded}.items()
                            if key.lower() not in ("content-length", "content-type")}
        if isinstance(body, bytes):  # JSON header, then the outputs' bytes (Inference-Header-Content-Length says where)
            return Response(body, media_type="application/octet-stream", headers=response_headers)
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json", headers=response_headers)

    def _add_exception_handlers(self, app: Any) -> None:
        super()._add_exception_handlers(app)
        app.add_exception_handler(RequestValidationError, _malformed_request)
        app.add_exception_handler(InvalidInput, _client_mistake)
        app.add_exception_handler(HTTPException, _http_error)
        app.add_exception_handler(FlywheelError, _store_unavailable)


def multiprocess_server_class() -> type:
    """KServe's multi-process server, giving a starting worker time to load its model: KServe
    declares a worker hung (and restarts it) when it does not answer a ping within 5 s, which a
    worker still importing torch and Feast on a busy machine does not."""
    from kserve.protocol.rest.multiprocess.server import RESTServerMultiProcess, RESTServerProcess

    class PatientRESTServerMultiProcess(RESTServerMultiProcess):
        ping_timeout_s = 60.0

        async def keep_subprocess_alive(self, sockets: Any) -> None:
            if self.should_exit.is_set():
                return
            for index, process in enumerate(self._processes):
                if not process.is_alive(timeout=self.ping_timeout_s):
                    process.kill()
                    await process.wait_for_termination()
                    if self.should_exit.is_set():
                        return
                    logging.getLogger("kserve").warning("worker process [%s] died; starting another", process.pid)
                    process = RESTServerProcess(sockets, self._rest_server.run)
                    process.start()
                    self._processes[index] = process

    return PatientRESTServerMultiProcess
