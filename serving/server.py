"""`flywheel serve`: the KServe ModelServer with the fraud predictor, bound to a chosen address."""

from __future__ import annotations

import logging
import sys
from typing import Any

from flywheel.config import Settings

log = logging.getLogger(__name__)


async def _malformed_request(_: Any, exc: Any) -> Any:
    """A body that is not valid JSON or not the protocol's shape is the client's mistake: 400, not 422."""
    from fastapi.responses import JSONResponse

    problems = "; ".join(
        f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: {err.get('msg')}" for err in exc.errors()
    )
    return JSONResponse(status_code=400, content={"error": f"malformed request: {problems}"})


def build_server(host: str, port: int) -> Any:
    """A KServe ModelServer (REST only, one worker) that binds ``host`` rather than 0.0.0.0."""
    from kserve import ModelServer
    from kserve.model_server import FASTAPI_APP_IMPORT_STRING
    from kserve.model_server import app
    from kserve.protocol.rest.server import RESTServer
    from fastapi.exceptions import RequestValidationError

    app.add_exception_handler(RequestValidationError, _malformed_request)

    class BoundModelServer(ModelServer):
        """KServe's server binds 0.0.0.0 with no host flag; this one binds the configured address."""

        def start(self, models: list[Any]) -> None:
            self._register_and_check_atleast_one_model_is_ready(models)
            self._rest_server = RESTServer(
                FASTAPI_APP_IMPORT_STRING,
                self.dataplane,
                self.model_repository_extension,
                self.http_port,
                access_log_format=self.access_log_format,
                workers=1,
                grace_period=self.grace_period,
                event_loop=self.event_loop,
                timeout_keep_alive=self.timeout_keep_alive,
            )
            self._rest_server.config.host = host
            self.servers.append(self._rest_server.start())
            self.setup_event_loop()
            self.register_signal_handler()
            import asyncio

            asyncio.run(self._serve())

    return BoundModelServer(http_port=port, workers=1, enable_grpc=False)


def check_address(host: str, port: int) -> None:
    """Fail early and clearly when the address cannot be bound (in use, or not this machine's)."""
    import socket

    from flywheel.errors import FlywheelError

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise FlywheelError(f"cannot serve on {host}:{port}: {exc.strerror or exc}; choose another --port or --host") from None


def serve(settings: Settings, host: str, port: int, model_name: str | None = None) -> None:
    """Load the production model and serve it until interrupted."""
    check_address(host, port)
    # KServe parses sys.argv for its own flags at import time; keep flywheel's flags away from it.
    sys.argv = sys.argv[:1]
    from serving.predictor import FraudPredictor

    predictor = FraudPredictor(model_name or settings.model_name, settings)
    predictor.load()
    print(f"serving {predictor.name} (version {predictor.version}) on http://{host}:{port} "
          f"(v1: /v1/models/{predictor.name}:predict, v2: /v2/models/{predictor.name}/infer)", flush=True)
    build_server(host, port).start([predictor])
