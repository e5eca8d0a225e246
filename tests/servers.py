"""Starting a server process in a test: a free loopback port, and waiting until it answers; a
throw-away redis-server on loopback."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(process: subprocess.Popen, url: str, seconds: float = 90) -> None:
    """Poll ``url`` until it answers 200; fail with the process's output if it exits or never does."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited early:\n{process.stdout.read() if process.stdout else ''}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    pytest.fail(f"the server did not become ready in {seconds:.0f}s:\n{process.stdout.read() if process.stdout else ''}")


class RedisServer:
    """A throw-away ``redis-server`` on a free loopback port: no persistence, its files in a temp dir.

    ``start()`` waits until the server answers PING; ``stop()`` shuts it down. ``connection`` is the
    ``host:port`` form that ``features.redis_connection`` (Feast's ``connection_string``) takes.
    """

    def __init__(self, port: int | None = None, binary: str = "redis-server") -> None:
        self.port = port or free_port()
        self.binary = binary
        self.process: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def connection(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, seconds: float = 20) -> "RedisServer":
        import redis

        if shutil.which(self.binary) is None:
            raise RuntimeError(f"{self.binary} is not installed (apt-get install redis-server)")
        self._dir = tempfile.TemporaryDirectory(prefix="flywheel-redis-")
        self.process = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
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
