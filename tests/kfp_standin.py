"""A stand-in for the Kubeflow Pipelines v2beta1 REST API: the endpoints `flywheel upload | submit |
schedule | runs` call through the real ``kfp.Client``.

It serves plain HTTP on 127.0.0.1 (a free port) from a thread and keeps pipelines, versions,
experiments, runs and recurring runs in memory. Like the real API server it refuses, with the HTTP
status and a ``{"code", "message"}`` body:

- a request without the expected ``Authorization: Bearer <token>`` (401), when a token is set;
- a JSON body that does not match the API's message (unknown or output-only fields, wrong types,
  a missing required field, a bad enum value): the schemas below are written from the v2beta1
  swagger definitions (``backend/api/v2beta1/swagger/*.swagger.json`` in kubeflow/pipelines), the
  input fields of each message only, so a client sending a field the server would reject fails here;
- an upload that is not a compiled KFP pipeline, a duplicate pipeline or version name (409);
- a run or recurring run whose parameters the pipeline does not declare, or that lacks a required
  one; a cron that is not six fields; ``max_concurrency`` outside 1..10;
- on a multi-user deployment (``namespace`` set), experiment and pipeline calls without that namespace.

Every request is recorded (method, path, query, headers, JSON body) for the tests' assertions; a test
moves a run's state with :meth:`KfpStandin.set_state` (what the cluster would do).
"""

from __future__ import annotations

import datetime as dt
import email.parser
import email.policy
import json
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, urlparse

import jsonschema
import yaml

API = "/apis/v2beta1"

# ---------------------------------------------------------------- request schemas (input fields only)
_STRING = {"type": "string"}
_TIME = {"type": "string", "format": "date-time"}
_PROTO_VALUE = {"type": ["string", "number", "boolean", "object", "array", "null"]}
_RUNTIME_CONFIG = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"parameters": {"type": "object", "additionalProperties": _PROTO_VALUE}, "pipeline_root": _STRING},
}
_VERSION_REFERENCE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["pipeline_id"],
    "properties": {"pipeline_id": {"type": "string", "minLength": 1}, "pipeline_version_id": _STRING},
}
# The pipeline source is a oneof: an inline spec or a reference to an uploaded version.
_ONE_SOURCE = {"oneOf": [{"required": ["pipeline_spec"]}, {"required": ["pipeline_version_reference"]}]}
_INT64 = {"type": ["integer", "string"], "pattern": r"^-?[0-9]+$"}  # proto3 JSON: int64 as a number or a string

EXPERIMENT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["display_name"],
    "properties": {"display_name": {"type": "string", "minLength": 1}, "description": _STRING, "namespace": _STRING},
}
RUN = {
    "type": "object",
    "additionalProperties": False,
    "required": ["display_name"],
    "properties": {
        "experiment_id": _STRING,
        "display_name": {"type": "string", "minLength": 1},
        "description": _STRING,
        "pipeline_version_id": _STRING,
        "pipeline_spec": {"type": "object"},
        "pipeline_version_reference": _VERSION_REFERENCE,
        "runtime_config": _RUNTIME_CONFIG,
        "service_account": _STRING,
        "recurring_run_id": _STRING,
    },
    **_ONE_SOURCE,
}
RECURRING_RUN = {
    "type": "object",
    "additionalProperties": False,
    "required": ["display_name", "mode", "trigger"],
    "properties": {
        "display_name": {"type": "string", "minLength": 1},
        "description": _STRING,
        "pipeline_version_id": _STRING,
        "pipeline_spec": {"type": "object"},
        "pipeline_version_reference": _VERSION_REFERENCE,
        "runtime_config": _RUNTIME_CONFIG,
        "service_account": _STRING,
        "max_concurrency": _INT64,
        "trigger": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "cron_schedule": {"type": "object", "additionalProperties": False,
                                  "properties": {"start_time": _TIME, "end_time": _TIME, "cron": _STRING}},
                "periodic_schedule": {"type": "object", "additionalProperties": False,
                                      "properties": {"start_time": _TIME, "end_time": _TIME, "interval_second": _INT64}},
            },
        },
        "mode": {"enum": ["MODE_UNSPECIFIED", "ENABLE", "DISABLE"]},
        "no_catchup": {"type": "boolean"},
        "namespace": _STRING,
        "experiment_id": _STRING,
    },
    **_ONE_SOURCE,
}
FILTER = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"predicates": {"type": "array", "items": {
        "type": "object",
        "required": ["key"],
        "properties": {
            "operation": {"enum": [1, 2, 3, 5, 6, 7, 8, 9, "EQUALS", "NOT_EQUALS", "GREATER_THAN", "GREATER_THAN_EQUALS",
                                   "LESS_THAN", "LESS_THAN_EQUALS", "IN", "IS_SUBSTRING"]},
            "key": _STRING, "string_value": _STRING, "stringValue": _STRING,
            "int_value": {"type": "integer"}, "long_value": _INT64, "timestamp_value": _TIME,
        },
    }}},
}
RUN_STATES = {"RUNTIME_STATE_UNSPECIFIED", "PENDING", "RUNNING", "SUCCEEDED", "SKIPPED", "FAILED", "CANCELING",
              "CANCELED", "PAUSED"}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check(schema: dict[str, Any], body: Any, what: str) -> None:
    try:
        jsonschema.validate(body, schema, format_checker=jsonschema.FormatChecker())
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(body)"
        raise ApiError(400, f"Invalid input error: {what} at {where}: {exc.message}") from None


def pipeline_inputs(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {}) or {}


@dataclass
class KfpStandin:
    token: str = ""  # required bearer token; empty: none required
    namespace: str = ""  # a multi-user deployment's profile namespace; empty: single-user
    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)  # version id -> version (with "spec")
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    recurring_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set_state(self, run_id: str, state: str) -> None:
        assert state in RUN_STATES, state
        with self.lock:
            self.runs[run_id]["state"] = state
            if state in {"SUCCEEDED", "FAILED", "CANCELED", "SKIPPED"}:
                self.runs[run_id]["finished_at"] = _now()

    def calls(self, method: str, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method and r["path"] == API + path]

    # ------------------------------------------------------------ dispatch
    def handle(self, method: str, path: str, query: dict[str, str], headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        if self.token and headers.get("authorization") != f"Bearer {self.token}":
            raise ApiError(401, "Unauthenticated: missing or invalid bearer token")
        if not path.startswith(API + "/"):
            raise ApiError(404, f"Not Found: {path}")
        route = path[len(API):]
        content_type = headers.get("content-type", "")
        body: Any = None
        if raw and content_type.startswith("application/json"):
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise ApiError(400, f"Invalid input error: body is not JSON: {exc}") from None
        self.requests.append({"method": method, "path": path, "query": query, "headers": headers, "body": body})
        with self.lock:
            if method == "GET" and route == "/healthz":
                return 200, {"multi_user": bool(self.namespace)}
            if method == "POST" and route == "/pipelines/upload":
                return 200, self._upload(query, headers, raw)
            if method == "POST" and route == "/pipelines/upload_version":
                return 200, self._upload_version(query, headers, raw)
            if method == "GET" and route == "/pipelines":
                self._need_namespace(query.get("namespace", ""), "ListPipelines")
                items = self._filtered(self.pipelines.values(), query)
                return 200, {"pipelines": items, "total_size": len(items)}
            parts = route.strip("/").split("/")
            if method == "GET" and len(parts) == 3 and parts[0] == "pipelines" and parts[2] == "versions":
                if parts[1] not in self.pipelines:
                    raise ApiError(404, f"NotFoundError: pipeline {parts[1]}")
                mine = [_public(v) for v in self.versions.values() if v["pipeline_id"] == parts[1]]
                items = self._filtered(mine, query)
                return 200, {"pipeline_versions": items, "total_size": len(items)}
            if method == "GET" and len(parts) == 2 and parts[0] == "runs":
                if parts[1] not in self.runs:
                    raise ApiError(404, f"NotFoundError: run {parts[1]}")
                return 200, self.runs[parts[1]]
            if method == "POST" and route == "/experiments":
                return 200, self._create_experiment(body)
            if method == "GET" and route == "/experiments":
                self._need_namespace(query.get("namespace", ""), "ListExperiments")
                items = self._filtered(self.experiments.values(), query)
                return 200, {"experiments": items, "total_size": len(items)}
            if method == "POST" and route == "/runs":
                return 200, self._create_run(body)
            if method == "GET" and route == "/runs":
                return 200, self._list_runs(query)
            if method == "POST" and route == "/recurringruns":
                return 200, self._create_recurring_run(body)
        raise ApiError(404, f"Not Found: {method} {path}")

    def _need_namespace(self, given: str, what: str) -> None:
        if self.namespace and given != self.namespace:
            raise ApiError(400 if not given else 403,
                           f"Invalid input error: In multi-user mode, {what} requires namespace {self.namespace!r}, got {given!r}")

    def _filtered(self, items: Any, query: dict[str, str]) -> list[dict[str, Any]]:
        items = list(items)
        if query.get("filter"):
            try:
                parsed = json.loads(query["filter"])
            except ValueError:
                raise ApiError(400, "Invalid input error: filter is not JSON") from None
            _check(FILTER, parsed, "filter")
            for predicate in parsed.get("predicates", []):
                if predicate.get("operation") not in (1, "EQUALS") or predicate["key"] not in ("display_name", "name"):
                    raise ApiError(400, f"the stand-in only filters display_name EQUALS, not {predicate}")
                wanted = predicate.get("stringValue", predicate.get("string_value"))
                items = [i for i in items if i.get("display_name") == wanted]
        size = int(query.get("page_size") or 0)
        return items[:size] if size > 0 else items

    # ------------------------------------------------------------ pipelines
    def _package(self, headers: dict[str, str], raw: bytes) -> tuple[dict[str, Any], str]:
        if not headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, "Invalid input error: an upload is multipart/form-data")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + headers["content-type"].encode() + b"\r\n\r\n" + raw)
        files = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        if "uploadfile" not in files:
            raise ApiError(400, f"Invalid input error: the form has no 'uploadfile' part, only {sorted(files)}")
        text = files["uploadfile"].get_payload(decode=True).decode()
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as exc:
            raise ApiError(400, f"Invalid input error: the package is not YAML: {exc}") from None
        spec = docs[0] if docs else {}
        missing = [k for k in ("pipelineInfo", "root", "deploymentSpec", "schemaVersion") if k not in spec]
        if missing:
            raise ApiError(400, f"Invalid input error: not a KFP pipeline spec (no {', '.join(missing)})")
        return spec, text

    def _upload(self, query: dict[str, str], headers: dict[str, str], raw: bytes) -> dict[str, Any]:
        spec, _ = self._package(headers, raw)
        name = query.get("name") or query.get("display_name") or ""
        if not name:
            raise ApiError(400, "Invalid input error: pipeline name is empty")
        self._need_namespace(query.get("namespace", ""), "UploadPipeline")
        if any(p["display_name"] == name for p in self.pipelines.values()):
            raise ApiError(409, f"Already exists: a pipeline named {name!r} exists; upload a version instead")
        pipeline_id = str(uuid.uuid4())
        self.pipelines[pipeline_id] = {"pipeline_id": pipeline_id, "display_name": name, "name": name,
                                       "description": query.get("description", ""), "created_at": _now(),
                                       "namespace": query.get("namespace", "")}
        self._add_version(pipeline_id, name, spec)  # the server creates the first version itself
        return self.pipelines[pipeline_id]

    def _upload_version(self, query: dict[str, str], headers: dict[str, str], raw: bytes) -> dict[str, Any]:
        spec, _ = self._package(headers, raw)
        pipeline_id, name = query.get("pipelineid", ""), query.get("name", "")
        if pipeline_id not in self.pipelines:
            raise ApiError(404, f"NotFoundError: pipeline {pipeline_id!r}")
        if not name:
            raise ApiError(400, "Invalid input error: pipeline version name is empty")
        if any(v["pipeline_id"] == pipeline_id and v["display_name"] == name for v in self.versions.values()):
            raise ApiError(409, f"Already exists: pipeline {pipeline_id} has a version named {name!r}")
        return _public(self._add_version(pipeline_id, name, spec))

    def _add_version(self, pipeline_id: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        version_id = str(uuid.uuid4())
        self.versions[version_id] = {"pipeline_id": pipeline_id, "pipeline_version_id": version_id, "display_name": name,
                                     "name": name, "created_at": _now(), "spec": spec}
        return self.versions[version_id]

    # ------------------------------------------------------------ experiments, runs
    def _create_experiment(self, body: Any) -> dict[str, Any]:
        _check(EXPERIMENT, body, "Experiment")
        self._need_namespace(body.get("namespace", ""), "CreateExperiment")
        if any(e["display_name"] == body["display_name"] and e["namespace"] == body.get("namespace", "")
               for e in self.experiments.values()):
            raise ApiError(409, f"Already exists: experiment {body['display_name']!r}")
        experiment_id = str(uuid.uuid4())
        self.experiments[experiment_id] = {"experiment_id": experiment_id, "display_name": body["display_name"],
                                           "description": body.get("description", ""), "created_at": _now(),
                                           "namespace": body.get("namespace", ""), "storage_state": "AVAILABLE"}
        return self.experiments[experiment_id]

    def _resolve(self, body: dict[str, Any]) -> dict[str, Any]:
        """The pipeline spec a run or recurring run refers to; its parameters checked against it."""
        if "pipeline_spec" in body:
            spec = body["pipeline_spec"].get("pipeline_spec", body["pipeline_spec"])
        else:
            reference = body["pipeline_version_reference"]
            version = self.versions.get(reference.get("pipeline_version_id", ""))
            if version is None or version["pipeline_id"] != reference["pipeline_id"]:
                raise ApiError(404, f"NotFoundError: pipeline version {reference}")
            spec = version["spec"]
        if body.get("experiment_id") and body["experiment_id"] not in self.experiments:
            raise ApiError(404, f"NotFoundError: experiment {body['experiment_id']}")
        declared = pipeline_inputs(spec)
        given = (body.get("runtime_config") or {}).get("parameters") or {}
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise ApiError(400, f"Invalid input error: the pipeline has no input parameter(s) {unknown}")
        missing = sorted(n for n, d in declared.items() if not d.get("isOptional") and n not in given)
        if missing:
            raise ApiError(400, f"Invalid input error: input parameter(s) {missing} are required")
        return spec

    def _create_run(self, body: Any) -> dict[str, Any]:
        _check(RUN, body, "Run")
        self._resolve(body)
        run_id = str(uuid.uuid4())
        run = {key: value for key, value in body.items() if key != "pipeline_spec"}
        run.update(run_id=run_id, state="PENDING", created_at=_now(), storage_state="AVAILABLE")
        self.runs[run_id] = run
        return run

    def _list_runs(self, query: dict[str, str]) -> dict[str, Any]:
        runs = list(self.runs.values())
        if query.get("experiment_id"):
            runs = [r for r in runs if r.get("experiment_id") == query["experiment_id"]]
        elif self.namespace:
            self._need_namespace(query.get("namespace", ""), "ListRuns")
        sort = query.get("sort_by", "")
        if sort:
            key, _, order = sort.partition(" ")
            if key not in ("created_at", "display_name", "run_id") or order not in ("", "asc", "desc"):
                raise ApiError(400, f"Invalid input error: cannot sort by {sort!r}")
            runs.sort(key=lambda r: r.get(key, ""), reverse=order == "desc")
        size = int(query.get("page_size") or 0)
        page = runs[:size] if size > 0 else runs
        return {"runs": page, "total_size": len(runs)}

    def _create_recurring_run(self, body: Any) -> dict[str, Any]:
        _check(RECURRING_RUN, body, "RecurringRun")
        self._resolve(body)
        trigger = body["trigger"]
        if ("cron_schedule" in trigger) == ("periodic_schedule" in trigger):
            raise ApiError(400, "Invalid input error: a trigger needs exactly one of cron_schedule and periodic_schedule")
        if "cron_schedule" in trigger and len(trigger["cron_schedule"].get("cron", "").split()) != 6:
            raise ApiError(400, f"Invalid input error: invalid cron {trigger['cron_schedule'].get('cron')!r}: expected 6 fields")
        concurrency = int(body.get("max_concurrency", 1))
        if not 1 <= concurrency <= 10:
            raise ApiError(400, f"Invalid input error: max_concurrency {concurrency} must be in [1, 10]")
        if body.get("mode") not in ("ENABLE", "DISABLE"):
            raise ApiError(400, "Invalid input error: mode must be ENABLE or DISABLE")
        recurring_id = str(uuid.uuid4())
        recurring = {key: value for key, value in body.items() if key != "pipeline_spec"}
        recurring.update(recurring_run_id=recurring_id, created_at=_now(), updated_at=_now(),
                         status="ENABLED" if body["mode"] == "ENABLE" else "DISABLED")
        self.recurring_runs[recurring_id] = recurring
        return recurring


def _public(version: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in version.items() if key != "spec"}


def _handler(api: KfpStandin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            parsed = urlparse(self.path)
            query = {key: values[-1] for key, values in parse_qs(parsed.query).items()}
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {key.lower(): value for key, value in self.headers.items()}
            try:
                status, payload = api.handle(method, parsed.path, query, headers, raw)
            except ApiError as exc:
                status, payload = exc.status, {"code": exc.status, "message": exc.message, "details": []}
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def do_DELETE(self) -> None:  # noqa: N802
            self._serve("DELETE")

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def kfp_standin(token: str = "", namespace: str = "") -> Iterator[KfpStandin]:
    """A KFP API stand-in serving on 127.0.0.1 for the duration of the block."""
    api = KfpStandin(token=token, namespace=namespace)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
