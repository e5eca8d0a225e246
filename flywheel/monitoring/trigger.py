"""The trigger: a monitor result that crossed a threshold asks for a new model.

Every decision is recorded (``<use case>/monitoring/decisions/<run id>.json``) with its evidence (the
findings and their figures, the window, the result and report it came from), whether or not it
submitted anything:

- ``none``: nothing crossed (or the window was too small to judge);
- ``held``: something crossed, but a triggered run is still in flight (at most one at a time), or
  the last one started less than ``monitoring.cooldown_h`` ago;
- ``submitted``: the training pipeline was started: locally `flywheel run --source
  <monitoring.retrain_source>` in a process of its own, or on Kubeflow Pipelines
  (``monitoring.trigger_target: kfp``) through the KFP API. The run is told the decision's URI
  (``--triggered-by``, the pipeline's ``triggered_by`` parameter): the model it trains lists the
  decision among its lineage inputs, so `flywheel lineage` walks from a model back to the evidence
  that asked for it.
- ``failed``: the submission failed; the cause is recorded, and the lease released.

"At most one in flight" is a lease object (``monitoring/triggers/in-flight.json``) created only when
absent (the storage layer's create-if-absent), so two monitors racing cannot both submit; a lease
whose run has ended (a local run's summary exists, a KFP run reached a final state) is released by
the next decision.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from flywheel.config import Settings, write_settings
from flywheel.errors import ConfigError, FlywheelError
from flywheel.storage import Storage

log = logging.getLogger(__name__)

TRAINING_PIPELINE = "flywheel-training"  # pipelines.training.PIPELINE_NAME
FINAL_KFP_STATES = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "CANCELLED", "ERROR"}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def lease_uri(storage: Storage) -> str:
    return storage.uri("monitoring", "triggers", "in-flight.json")


def decisions_prefix(storage: Storage) -> str:
    return storage.uri("monitoring", "decisions")


def last_submitted(storage: Storage) -> dict[str, Any] | None:
    """The newest decision that submitted a run."""
    newest = None
    for uri in storage.iter_objects(decisions_prefix(storage), (".json",)):
        decision = storage.read_json(uri)
        if decision.get("action") == "submitted" and (newest is None or decision["at"] > newest["at"]):
            newest = decision
    return newest


def run_finished(storage: Storage, settings: Settings, lease: dict[str, Any]) -> bool | None:
    """Whether the leased run has ended (None: cannot tell)."""
    if lease.get("target") == "local":
        return storage.exists(storage.uri("runs", lease["run_id"], "summary.json"))
    from flywheel.kfp_client import KfpClient

    try:
        return KfpClient(settings).run_state(lease["run_id"]).upper() in FINAL_KFP_STATES
    except FlywheelError as exc:
        log.warning("cannot ask KFP for run %s's state: %s", lease["run_id"], exc)
        return None


def decide(storage: Storage, settings: Settings, result: dict[str, Any], *, submit: bool = True,
           wait: bool = False) -> dict[str, Any]:
    """Record (and act on) what the monitor result asks for; returns the decision record."""
    cfg = settings.monitoring
    now = _now()
    decision: dict[str, Any] = {
        "run_id": result["run_id"], "at": now.isoformat(), "model_version": result.get("model_version"),
        "window": {"since": result["since"], "until": result["until"], "rows": result["rows"]},
        "evidence": result.get("findings", []), "result_uri": result.get("result_uri", ""),
        "report_uri": result.get("report_uri", ""), "target": cfg.trigger_target,
    }
    uri = f"{decisions_prefix(storage)}/{result['run_id']}.json"
    decision["uri"] = uri
    if not result.get("findings"):
        decision.update(action="none", reason="nothing crossed a threshold" if result.get("judged") else
                        "the window was too small to judge")
        return _write(storage, uri, decision)
    if not submit:
        decision.update(action="none", reason="something crossed, but triggering is off (monitoring.trigger or --trigger)")
        return _write(storage, uri, decision)
    # A run in flight holds the lease: release it only once that run has ended.
    lease = lease_uri(storage)
    if storage.exists(lease):
        held = storage.read_json(lease)
        finished = run_finished(storage, settings, held)
        if not finished:
            state = "still running" if finished is False else "in an unknown state"
            decision.update(action="held", reason=f"triggered run {held['run_id']} (from {held['decision']}) is {state}",
                            in_flight=held)
            return _write(storage, uri, decision)
        storage.delete(lease)
    previous = last_submitted(storage)
    if previous is not None and cfg.cooldown_h > 0:
        ready = dt.datetime.fromisoformat(previous["at"]) + dt.timedelta(hours=cfg.cooldown_h)
        if now < ready:
            decision.update(action="held", reason=f"cool-down: the last triggered run ({previous['training_run']['run_id']}) "
                            f"started {previous['at']}; the next may start from {ready.isoformat()} "
                            f"(monitoring.cooldown_h={cfg.cooldown_h})", previous=previous["uri"])
            return _write(storage, uri, decision)
    if not cfg.retrain_source:
        decision.update(action="failed", reason="monitoring.retrain_source is empty: the triggered run needs the raw "
                        "files it ingests (FLYWHEEL_MONITORING__RETRAIN_SOURCE)")
        return _write(storage, uri, decision)
    training_run = f"triggered-{result['run_id']}"
    claim = {"run_id": training_run, "target": cfg.trigger_target, "decision": uri, "at": now.isoformat()}
    if not storage.create_if_absent(lease, json.dumps(claim).encode()):
        decision.update(action="held", reason="another monitor claimed the in-flight slot at the same moment")
        return _write(storage, uri, decision)
    decision.update(action="submitted", reason="; ".join(_describe(f) for f in result["findings"]))
    _write(storage, uri, decision)  # the run refers to it: it exists before the run starts
    try:
        decision["training_run"] = (_submit_local(storage, settings, training_run, uri, wait) if cfg.trigger_target == "local"
                                    else _submit_kfp(settings, training_run, uri))
        if decision["training_run"]["run_id"] != training_run:  # KFP names runs itself
            storage.write_bytes(lease, json.dumps({**claim, "run_id": decision["training_run"]["run_id"]}).encode())
    except Exception as exc:
        storage.delete(lease)
        decision.update(action="failed", reason=f"submitting the training pipeline failed: {type(exc).__name__}: {exc}")
    return _write(storage, uri, decision)


def _describe(finding: dict[str, Any]) -> str:
    return f"{finding['kind']} {finding['subject']}: {finding['figure']} {finding['value']:.4g} > {finding['threshold']:.4g}" \
        if finding["kind"] != "estimated" and finding["kind"] != "realised" else \
        f"{finding['kind']} {finding['subject']}: {finding['value']:.4g} against a threshold of {finding['threshold']:.4g}"


def _write(storage: Storage, uri: str, decision: dict[str, Any]) -> dict[str, Any]:
    storage.write_json(uri, decision)
    log.info("trigger %s: %s (%s)", decision["run_id"], decision["action"], decision.get("reason", ""))
    return decision


def _submit_local(storage: Storage, settings: Settings, run_id: str, decision_uri: str, wait: bool) -> dict[str, Any]:
    """`flywheel run` in a process of its own, with exactly these settings (as a file)."""
    from flywheel.deploy.local import server_env

    folder = settings.home / "runs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    settings_file = write_settings(settings, folder / "settings.yaml")
    command = [sys.executable, "-m", "flywheel.cli", "--config", str(settings_file), "run",
               "--source", settings.monitoring.retrain_source, "--run-id", run_id, "--triggered-by", decision_uri]
    log_path = folder / "triggered.log"
    env = {**server_env(settings), "FLYWHEEL_HOME": str(settings.home)}
    with open(log_path, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=not wait)
    record: dict[str, Any] = {"target": "local", "run_id": run_id, "pid": process.pid, "log": str(log_path),
                              "command": " ".join(command[1:])}
    if wait:
        code = process.wait()
        record["exit_code"] = code
        if code != 0:
            tail = "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-15:])
            raise FlywheelError(f"the triggered run {run_id} failed (exit code {code}); its log {log_path} ends:\n{tail}")
        summary = storage.uri("runs", run_id, "summary.json")
        if storage.exists(summary):
            record["summary"] = summary
    return record


def _submit_kfp(settings: Settings, run_name: str, decision_uri: str) -> dict[str, Any]:
    """A run of the newest uploaded version of the training pipeline (`flywheel upload` put it there:
    the version a person reviewed, with the use case it was published with)."""
    from flywheel.kfp_client import KfpClient

    if not settings.kfp.host:
        raise ConfigError("monitoring.trigger_target is kfp but kfp.host is empty")
    client = KfpClient(settings)
    uploaded = client.latest_version(TRAINING_PIPELINE)
    run = client.submit(uploaded, {"source_uri": settings.monitoring.retrain_source, "triggered_by": decision_uri}, run_name)
    return {"target": "kfp", "run_id": run.run_id, "run_name": run.run_name, "url": run.url,
            "pipeline_version": uploaded.version_name}


__all__ = ["decide", "last_submitted", "lease_uri", "run_finished"]
