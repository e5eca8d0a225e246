"""`flywheel serve`: KServe's ModelServer with the fraud predictor, on the configured address.

With ``workers`` > 1, KServe's own multi-process server spawns the worker processes (each loads
its own model: see :class:`serving.predictor.Predictor`); :mod:`serving.rest` is what each of
them serves with.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from flywheel.config import Settings

log = logging.getLogger(__name__)


def prepare_environment(settings: Settings, workers: int) -> str | None:
    """Before prometheus_client or torch is imported: one math thread per worker and, with several
    workers, a fresh multiprocess metrics folder (workers inherit it, so one scrape sums them all;
    returned, to be removed at exit). One worker keeps its metrics in memory: it is the whole server,
    and an in-memory sample costs a fraction of a file-backed one on every request."""
    os.environ["OMP_NUM_THREADS"] = str(settings.serving.torch_threads)
    if workers == 1:
        return None
    folder = tempfile.mkdtemp(prefix="flywheel-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    return folder


def build_server(host: str, port: int, workers: int, max_body_bytes: int, grpc_port: int = 0) -> Any:
    """A KServe ModelServer with ``workers`` REST processes and, with a ``grpc_port``, the v2 gRPC
    service (in this process, beside REST's one worker or the workers' parent), binding ``host``."""
    import asyncio

    from kserve import ModelServer
    from kserve.model_server import FASTAPI_APP_IMPORT_STRING
    from serving.dataplane import FlywheelDataPlane
    from serving.rest import FlywheelRESTServer, multiprocess_server_class

    class BoundModelServer(ModelServer):
        def start(self, models: list[Any]) -> None:
            # Shared by REST and gRPC: the server metadata claims only what is served; the model's names its version.
            self.dataplane = FlywheelDataPlane(model_registry=self.registered_models)
            self._register_and_check_atleast_one_model_is_ready(models)
            rest = FlywheelRESTServer(
                FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension, self.http_port,
                workers=workers, grace_period=self.grace_period, event_loop=self.event_loop,
                timeout_keep_alive=self.timeout_keep_alive,
            ).configure(host, max_body_bytes)
            if workers > 1:
                # KServe's own multi-process server (spawned workers, restarted if one dies), with our RESTServer.
                self._rest_multiprocess_server = multiprocess_server_class()(
                    FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension, self.http_port,
                    workers=workers, grace_period=self.grace_period, event_loop=self.event_loop,
                    timeout_keep_alive=self.timeout_keep_alive,
                )
                self._rest_multiprocess_server._rest_server = rest
                self.servers.append(self._rest_multiprocess_server.start())
            else:
                self._rest_server = rest
                self.servers.append(rest.start())
            if grpc_port:
                from serving.grpc_server import GRPCServer

                self._grpc_server = GRPCServer(host, grpc_port, self.dataplane, max_body_bytes, grace_period=self.grace_period)
                self.servers.append(self._grpc_server.start())
            self.setup_event_loop()
            self.register_signal_handler()
            from serving.predictor import settle_heap

            settle_heap()  # the web server's modules too, now that they are imported
            asyncio.run(self._serve())

    # KServe's own gRPC server stays off: it binds every interface (see serving.grpc_server).
    return BoundModelServer(http_port=port, workers=workers, enable_grpc=False, enable_latency_logging=False)


def check_address(host: str, port: int, flag: str = "--port") -> None:
    """Fail early and clearly when the address cannot be bound (in use, or not this machine's)."""
    import socket

    from flywheel.errors import FlywheelError

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise FlywheelError(f"cannot serve on {host}:{port}: {exc.strerror or exc}; choose another {flag} or --host") from None


def _die_with_parent() -> None:
    """In the updater's process (Linux): receive SIGTERM when the server that started it dies."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_updater_process(settings: Settings, version: str | None) -> subprocess.Popen:
    """The live-feature updater (`flywheel events run`) in a process of its own, with this server's
    exact settings: one updater whatever the workers, and its work never holds the serving
    process's interpreter (in a thread of the server it doubled p99 at concurrency 8, measured by
    benchmarks/live.py)."""
    from flywheel.config import write_settings

    folder = tempfile.mkdtemp(prefix="flywheel-live-")
    config = write_settings(settings, os.path.join(folder, "flywheel.yaml"))
    command = [sys.executable, "-m", "flywheel.cli", "--config", str(config), "events", "run"]
    if version:
        command += ["--version", version]
    env = dict(os.environ, FLYWHEEL_USECASE=str(settings.usecase))
    return subprocess.Popen(command, env=env, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)


def serve(settings: Settings, host: str, port: int, workers: int = 1, model_name: str | None = None,
          version: str | None = None, grpc_port: int | None = None) -> None:
    """Load the model (production, or ``version``) and serve it until interrupted: REST on ``port``,
    v2 gRPC on ``grpc_port`` (default ``serving.grpc_port``; 0: none)."""
    grpc_port = settings.serving.grpc_port if grpc_port is None else grpc_port
    check_address(host, port)
    if grpc_port:
        if grpc_port == port:
            from flywheel.errors import FlywheelError

            raise FlywheelError(f"the HTTP and gRPC ports are both {port}: choose another --grpc-port (0: no gRPC)")
        check_address(host, grpc_port, flag="--grpc-port")
    # KServe parses sys.argv for its own flags at import time; keep flywheel's flags away from it.
    sys.argv = sys.argv[:1]
    metrics_dir = prepare_environment(settings, workers)
    updater = None
    predictor = None
    try:
        from serving.predictor import Predictor

        predictor = Predictor(model_name or settings.model_name, settings, version=version)
        predictor.load()
        following = f"pinned to version {version}" if version else f"following production every {settings.serving.reload_interval_s:g}s"
        print(f"serving {predictor.name} (version {predictor.version}, {following}) on http://{host}:{port} with "
              f"{workers} worker(s) (v1: /v1/models/{predictor.name}:predict, v2: /v2/models/{predictor.name}/infer, "
              f"metrics: /metrics)" + (f"; v2 gRPC on {host}:{grpc_port}" if grpc_port else ""), flush=True)
        if workers == 1 or grpc_port:
            predictor.start_reloading()  # each REST worker process follows production itself; this one for gRPC
        if settings.monitoring.capture_rate > 0:
            from flywheel.monitoring.capture import capture_root
            from flywheel.storage import Storage

            print(f"capture: {settings.monitoring.capture_rate:.0%} of requests, to {capture_root(Storage.from_settings(settings))} "
                  f"(every {settings.monitoring.capture_flush_s:g}s at least)", flush=True)
        if settings.live.enabled:
            if settings.live.run_updater:
                updater = start_updater_process(settings, version)
            print(f"live features: on (events from the {settings.live.log} log"
                  f"{'; each scored row is one' if settings.live.write_through else ''}; "
                  f"{'updated here' if settings.live.run_updater else 'updated by flywheel events run'})", flush=True)
        build_server(host, port, workers, settings.serving.max_body_bytes, grpc_port).start([predictor])
    finally:
        if predictor is not None:
            predictor.close_capture()  # the captured rows still waiting, written before the process ends
        if updater is not None:
            updater.terminate()
            try:
                updater.wait(timeout=10)
            except subprocess.TimeoutExpired:
                updater.kill()
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
