"""A stand-in for the Kubernetes API server: just the endpoints the training launcher and the KServe
deployment call (custom objects: create, get, merge-patch, delete; pods and their logs).

It serves plain HTTP on 127.0.0.1 (a free port) from a thread, so a real ``kubernetes.client``
talks to it exactly as to a cluster. Each test scripts what the job does through a
:class:`Scenario`: the job's status conditions and pods on each poll, the pods' logs, and a hook
that runs when the job is created (for a job that "trains" by writing its outputs to storage).
Every request is recorded, so a test can assert that a job was created, or was not, or was deleted.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

CUSTOM = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods$")
POD_LOG = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)/log$")


def condition(kind: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


def pod(name: str, phase: str = "Running", **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "kubeflow"}, "status": {"phase": phase, **status}}


def unschedulable_pod(name: str, message: str) -> dict[str, Any]:
    return pod(name, "Pending", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}])


def waiting_pod(name: str, container: str, reason: str, message: str) -> dict[str, Any]:
    return pod(name, "Pending", containerStatuses=[{
        "name": container, "image": "img", "imageID": "", "ready": False, "restartCount": 0,
        "state": {"waiting": {"reason": reason, "message": message}}}])


def failed_pod(name: str, container: str, exit_code: int = 1) -> dict[str, Any]:
    return pod(name, "Failed", containerStatuses=[{
        "name": container, "image": "img", "imageID": "", "ready": False, "restartCount": 0,
        "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}])


@dataclass
class Scenario:
    """What the cluster does with a created job. ``conditions(n)`` and ``pods(n)`` give the job's
    conditions and pods at the n-th read of the job (0 first); ``logs`` maps a pod to its log."""

    conditions: Callable[[int], list[dict[str, Any]]] = lambda n: []
    pods: Callable[[int], list[dict[str, Any]]] = lambda n: []
    logs: dict[str, str] = field(default_factory=dict)
    on_create: Callable[[dict[str, Any]], None] | None = None
    # A whole status instead of conditions: ``status(n, obj)`` at the n-th read of the object ``obj``
    # (as created and patched so far, with metadata.generation counting its spec changes).
    status: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any = None


class StandIn:
    """The server's state: the scenario, the objects created, every request."""

    def __init__(self, scenario: Scenario | None = None) -> None:
        self.scenario = scenario or Scenario()
        self.objects: dict[str, dict[str, Any]] = {}
        self.requests: list[Request] = []
        self.reads = 0
        self.lock = threading.Lock()
        self.url = ""

    def calls(self, method: str, pattern: str = "") -> list[Request]:
        return [r for r in self.requests if r.method == method and pattern in r.path]

    @property
    def created(self) -> list[dict[str, Any]]:
        return [r.body for r in self.calls("POST")]

    def api_client(self) -> Any:
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        configuration.retries = 0
        return client.ApiClient(configuration)

    def kubeconfig(self, folder: Path) -> Path:
        """A kubeconfig naming this server, as ``$KUBECONFIG`` would on a workstation."""
        path = folder / "kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {"token": "standin"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin"}}],
        }))
        return path

    # ------------------------------------------------------------ the API
    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        with self.lock:
            self.requests.append(Request(method, path, query, body))
        if match := CUSTOM.match(path):
            return self._custom(method, match, body)
        if PODS.match(path) and method == "GET":
            items = self.scenario.pods(max(self.reads - 1, 0)) if self.objects else []
            return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
        if (match := POD_LOG.match(path)) and method == "GET":
            name = match["name"]
            if name not in self.scenario.logs:
                return 400, _status(400, "BadRequest", f'container "x" in pod "{name}" is waiting to start')
            lines = self.scenario.logs[name].splitlines()
            tail = int(query.get("tailLines", ["0"])[0]) or len(lines)
            return 200, "\n".join(lines[-tail:]) + "\n"
        return 404, _status(404, "NotFound", f"the stand-in does not serve {method} {path}")

    def _custom(self, method: str, match: re.Match[str], body: Any) -> tuple[int, Any]:
        name = match["name"]
        if method == "POST" and name is None:
            name = body["metadata"]["name"]
            if name in self.objects:
                return 409, _status(409, "AlreadyExists", f'{match["plural"]} "{name}" already exists')
            body.setdefault("metadata", {})["generation"] = 1
            self.objects[name] = body
            if self.scenario.on_create is not None:
                self.scenario.on_create(body)
            return 201, body
        if name not in self.objects:
            return 404, _status(404, "NotFound", f'{match["plural"]} "{name}" not found')
        if method == "GET":
            with self.lock:
                n = self.reads
                self.reads += 1
            obj = self.objects[name]
            if self.scenario.status is not None:
                return 200, {**obj, "status": self.scenario.status(n, obj)}
            return 200, {**obj, "status": {"conditions": self.scenario.conditions(n)}}
        if method == "PATCH":  # a JSON merge patch (RFC 7386), what the client sends for a dict body
            obj = merge_patch(self.objects[name], body)
            if obj.get("spec") != self.objects[name].get("spec"):
                obj["metadata"]["generation"] = self.objects[name]["metadata"].get("generation", 1) + 1
            self.objects[name] = obj
            return 200, obj
        if method == "DELETE":
            del self.objects[name]
            return 200, _status(200, "Success", "")
        return 405, _status(405, "MethodNotAllowed", method)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: maps merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure" if code >= 400 else "Success",
            "code": code, "reason": reason, "message": message}


@contextmanager
def kube_standin(scenario: Scenario | None = None) -> Iterator[StandIn]:
    """A running stand-in on 127.0.0.1:<free port>; stopped on exit."""
    state = StandIn(scenario)

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            code, answer = state.handle(self.command, url.path, parse_qs(url.query), body)
            data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain" if isinstance(answer, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PATCH = _serve

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
