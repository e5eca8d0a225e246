"""Kubeflow Pipelines from the command line and notebooks: upload, submit, schedule and list runs.

Everything goes through ``kfp.Client`` (the KFP v2beta1 REST API). Host, namespace, experiment and
auth come from :class:`flywheel.config.KfpSettings`: a bearer token from ``FLYWHEEL_KFP_TOKEN``, else
the in-cluster service account token file (multi-user Kubeflow), else none (a port-forward).

Uploads are content-addressed: a pipeline version is named after the sha256 of the compiled YAML, so
uploading the same package twice reuses the version instead of piling up copies, and any change to the
pipeline becomes a new version of the same pipeline.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import urllib.error
import urllib.request
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from flywheel.config import KfpSettings, Settings
from flywheel.errors import ConfigError, KfpError

log = logging.getLogger(__name__)
T = TypeVar("T")
_EQUALS = 1  # the Filter proto's EQUALS operation


@dataclass(frozen=True)
class Uploaded:
    pipeline_id: str
    pipeline_name: str
    version_id: str
    version_name: str
    new_pipeline: bool
    new_version: bool


@dataclass(frozen=True)
class Submitted:
    run_id: str
    run_name: str
    experiment_id: str
    url: str


@dataclass(frozen=True)
class Scheduled:
    recurring_run_id: str
    name: str
    cron: str
    experiment_id: str
    url: str


@dataclass(frozen=True)
class RunRow:
    run_id: str
    name: str
    state: str
    created_at: str
    finished_at: str


def to_dict(record: Any) -> dict[str, Any]:
    """A result as a plain dict (for JSON output and notebooks)."""
    return asdict(record)


def _auth(kfp: KfpSettings) -> dict[str, Any]:
    """kfp.Client keyword arguments for the configured auth: an explicit token, else a token file."""
    if kfp.token is not None and kfp.token.get_secret_value():
        return {"existing_token": kfp.token.get_secret_value()}
    if Path(kfp.token_path).is_file():
        from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

        # Re-read on every request: the kubelet rotates projected tokens.
        return {"credentials": ServiceAccountTokenVolumeCredentials(path=kfp.token_path)}
    return {}


@contextlib.contextmanager
def _api_errors(kfp: KfpSettings, action: str) -> Iterator[None]:
    """Turn what kfp_server_api and urllib3 raise into one clear KfpError naming the host and the action."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as exc:
        detail = _server_message(exc.body) or exc.reason or ""
        hint = ""
        if exc.status in (401, 403):
            hint = (" (check FLYWHEEL_KFP_TOKEN, or the service account token at "
                    f"{kfp.token_path}, and kfp.namespace {kfp.namespace or '(none)'!r})")
        raise KfpError(f"KFP API at {kfp.host} refused to {action}: HTTP {exc.status} {detail}{hint}".rstrip()) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise KfpError(f"cannot reach the KFP API at {kfp.host} to {action}: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''} (is kfp.host right, and the port-forward up?)") from None


def _server_message(body: Any) -> str:
    if not body:
        return ""
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:300]
    return str(data.get("message") or data.get("error") or text)[:300] if isinstance(data, dict) else text[:300]


class KfpClient:
    """flywheel's operations on one Kubeflow Pipelines deployment (a thin layer over ``kfp.Client``)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.kfp = settings.kfp
        if not self.kfp.host:
            raise ConfigError("kfp.host is not set: set FLYWHEEL_KFP__HOST (for example http://localhost:8080 "
                              "after `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`) or kfp.host in the settings file")
        self._client = self._connect()

    def _preflight(self, auth: dict[str, Any]) -> None:
        """One GET of the API's healthz with these credentials. kfp.Client asks healthz itself, but
        retries any refusal five times, 5 s apart, logging tracebacks: a wrong token or host must
        fail at once with one clear line."""
        token = auth.get("existing_token") or (_read_token(self.kfp.token_path) if "credentials" in auth else "")
        request = urllib.request.Request(f"{self.kfp.host}/apis/v2beta1/healthz",
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=30):
                return
        except urllib.error.HTTPError as exc:
            detail = _server_message(exc.read()) or exc.reason
            hint = ""
            if exc.code in (401, 403):
                hint = (" (check FLYWHEEL_KFP_TOKEN, or the service account token at "
                        f"{self.kfp.token_path}, and kfp.namespace {self.kfp.namespace or '(none)'!r})")
            raise KfpError(f"KFP API at {self.kfp.host} refused to connect: HTTP {exc.code} {detail}{hint}") from None

    def _connect(self) -> Any:
        import kfp

        auth = _auth(self.kfp)
        with _api_errors(self.kfp, "connect"):
            self._preflight(auth)
        kwargs: dict[str, Any] = {"host": self.kfp.host, **auth}
        if self.kfp.namespace:
            kwargs["namespace"] = self.kfp.namespace
        with _api_errors(self.kfp, "connect"), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), \
                _sqlite_converters_kept():
            warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later": known
            return kfp.Client(**kwargs)

    def _call(self, action: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # kfp.Client prints links; flywheel prints its own.
        with _api_errors(self.kfp, action), contextlib.redirect_stdout(io.StringIO()), _sqlite_converters_kept():
            return fn(*args, **kwargs)

    @property
    def namespace(self) -> str | None:
        return self.kfp.namespace or None

    def url(self, fragment: str) -> str:
        return f"{self.kfp.host}/#/{fragment}"

    # ------------------------------------------------------------ pipelines
    def _find_pipeline(self, name: str) -> Any:
        found = self._call(f"look up pipeline {name!r}", self._client.list_pipelines,
                           filter=_name_filter(name), namespace=self.namespace, page_size=2)
        pipelines = found.pipelines or []
        return pipelines[0] if pipelines else None

    def _find_version(self, pipeline_id: str, version_name: str) -> Any:
        found = self._call(f"look up version {version_name!r}", self._client.list_pipeline_versions,
                           pipeline_id=pipeline_id, filter=_name_filter(version_name), page_size=2)
        versions = found.pipeline_versions or []
        return versions[0] if versions else None

    def upload(self, package: str | Path, pipeline_name: str, description: str = "") -> Uploaded:
        """Upload a compiled pipeline, or a new version of it; a package already uploaded is reused."""
        path = Path(package)
        if not path.is_file():
            raise KfpError(f"pipeline package {path} does not exist (run `flywheel compile` first)")
        version_name = f"{pipeline_name}-{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
        existing = self._find_pipeline(pipeline_name)
        if existing is None:
            created = self._call(f"upload pipeline {pipeline_name!r}", self._client.upload_pipeline,
                                 str(path), pipeline_name=pipeline_name, description=description or None,
                                 namespace=self.namespace)
            # The first version carries the pipeline's name; add the content-named one as the default.
            version = self._call(f"upload version {version_name!r}", self._client.upload_pipeline_version,
                                 str(path), version_name, pipeline_id=created.pipeline_id, description=description or None)
            return Uploaded(created.pipeline_id, pipeline_name, version.pipeline_version_id, version_name, True, True)
        version = self._find_version(existing.pipeline_id, version_name)
        if version is not None:
            return Uploaded(existing.pipeline_id, pipeline_name, version.pipeline_version_id, version_name, False, False)
        version = self._call(f"upload version {version_name!r}", self._client.upload_pipeline_version,
                             str(path), version_name, pipeline_id=existing.pipeline_id, description=description or None)
        return Uploaded(existing.pipeline_id, pipeline_name, version.pipeline_version_id, version_name, False, True)

    def latest_version(self, pipeline_name: str) -> Uploaded:
        """The newest uploaded version of a pipeline (what a trigger runs: the version a person uploaded)."""
        existing = self._find_pipeline(pipeline_name)
        if existing is None:
            raise KfpError(f"no pipeline {pipeline_name!r} on {self.kfp.host}: upload it first (`flywheel upload`)")
        found = self._call(f"list versions of {pipeline_name!r}", self._client.list_pipeline_versions,
                           pipeline_id=existing.pipeline_id, sort_by="created_at desc", page_size=50)
        versions = sorted(found.pipeline_versions or [], key=lambda v: _time(v.created_at), reverse=True)
        if not versions:
            raise KfpError(f"pipeline {pipeline_name!r} has no version on {self.kfp.host}: upload it (`flywheel upload`)")
        return Uploaded(existing.pipeline_id, pipeline_name, versions[0].pipeline_version_id, versions[0].display_name,
                        False, False)

    # ------------------------------------------------------------ experiments, runs, schedules
    def experiment_id(self) -> str:
        """The settings' experiment, created when missing."""
        experiment = self._call(f"get or create experiment {self.kfp.experiment!r}", self._client.create_experiment,
                                self.kfp.experiment, namespace=self.namespace)
        return experiment.experiment_id

    def submit(self, uploaded: Uploaded, params: Mapping[str, Any], run_name: str) -> Submitted:
        """Start one run of an uploaded pipeline version in the settings' experiment."""
        experiment_id = self.experiment_id()
        run = self._call(f"create run {run_name!r}", self._client.run_pipeline,
                         experiment_id=experiment_id, job_name=run_name, params=dict(params),
                         pipeline_id=uploaded.pipeline_id, version_id=uploaded.version_id,
                         pipeline_root=self.kfp.pipeline_root or None, service_account=self.kfp.service_account or None)
        return Submitted(run.run_id, run_name, experiment_id, self.url(f"runs/details/{run.run_id}"))

    def schedule(self, uploaded: Uploaded, params: Mapping[str, Any], name: str, cron: str | None = None) -> Scheduled:
        """A recurring run: one at a time (max_concurrency=1) and no catch-up after a pause, so a
        paused schedule resumes with one run rather than a backlog of retrainings."""
        cron = cron or self.kfp.schedule_cron
        if len(cron.split()) != 6:
            raise ConfigError(f"KFP cron has six fields, seconds first ('0 0 2 * * *' is 02:00 daily), not {cron!r}")
        experiment_id = self.experiment_id()
        recurring = self._call(f"create recurring run {name!r}", self._client.create_recurring_run,
                               experiment_id=experiment_id, job_name=name, cron_expression=cron, max_concurrency=1,
                               no_catchup=True, params=dict(params), pipeline_id=uploaded.pipeline_id,
                               version_id=uploaded.version_id, enabled=True, pipeline_root=self.kfp.pipeline_root or None,
                               service_account=self.kfp.service_account or None)
        return Scheduled(recurring.recurring_run_id, name, cron, experiment_id,
                         self.url(f"recurringrun/details/{recurring.recurring_run_id}"))

    def run_state(self, run_id: str) -> str:
        """A run's state (PENDING, RUNNING, SUCCEEDED, FAILED, ...)."""
        run = self._call(f"get run {run_id!r}", self._client.get_run, run_id)
        return str(run.state or "UNKNOWN")

    def runs(self, limit: int = 20) -> list[RunRow]:
        """The experiment's latest runs, newest first, with their state."""
        experiment_id = self.experiment_id()
        found = self._call("list runs", self._client.list_runs, experiment_id=experiment_id, page_size=limit,
                           sort_by="created_at desc")
        return [
            RunRow(run.run_id, run.display_name or "", str(run.state or "UNKNOWN"),
                   _time(run.created_at), _time(run.finished_at))
            for run in (found.runs or [])
        ]


@contextlib.contextmanager
def _sqlite_converters_kept() -> Iterator[None]:
    """kfp.Client asks whether it runs in a notebook by importing IPython, whose history module
    registers sqlite3's process-wide "timestamp" converter as ISO strings over Feast's epoch seconds:
    every Feast SQLite online read later in the same process failed ("Invalid isoformat string").
    Found when the monitor's trigger (kfp.Client in process) ran before feature tests. Whatever a
    KFP call registers is undone after it."""
    import sqlite3

    adapters, converters = dict(sqlite3.adapters), dict(sqlite3.converters)
    try:
        yield
    finally:
        sqlite3.adapters.clear()
        sqlite3.adapters.update(adapters)
        sqlite3.converters.clear()
        sqlite3.converters.update(converters)


def _read_token(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise KfpError(f"cannot read the service account token {path}: {exc.strerror or exc}") from None


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": _EQUALS, "key": "display_name", "stringValue": name}]})


def _time(value: Any) -> str:
    if value is None:
        return ""
    text = value.isoformat() if hasattr(value, "isoformat") else str(value)
    return "" if text.startswith("1970-01-01") else text


def parse_params(pairs: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` pairs from the command line as pipeline parameters."""
    params: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"--param takes NAME=VALUE, not {pair!r}")
        params[name] = value
    return params
