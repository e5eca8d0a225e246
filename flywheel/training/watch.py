"""Create a training job on Kubernetes, watch it to the end, and turn a failure into a clear error.

The watch polls the job's status conditions (a PyTorchJob's ``Succeeded``/``Failed``, a TrainJob's
``Complete``/``Failed``) and its pods, until the job ends or ``watch_timeout_s`` passes. A pod that
cannot start (unschedulable: no GPU node; its image cannot be pulled; its Secret is missing) for
``pending_timeout_s`` fails the step at once rather than at the timeout. Every failure is a
:class:`TrainingError` that says why, with the last lines of the pods' logs. The job is deleted
afterwards as ``training.cluster.cleanup`` says (``on_success`` keeps a failed job to inspect).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from flywheel.config import Settings
from flywheel import kube
from flywheel.errors import TrainingError
from flywheel.training.cluster import ClusterJob

log = logging.getLogger(__name__)
LOG_TAIL_LINES = 30
SUCCEEDED = {"pytorchjob": "Succeeded", "trainjob": "Complete"}
# Why a container waits and will keep waiting: the pod cannot start until someone fixes something.
STUCK_WAITING = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError"}


@dataclass
class JobOutcome:
    """How the job ended, for the step's log and the model's card."""

    name: str
    namespace: str
    kind: str
    seconds: float
    restarts: int = 0
    deleted: bool = False
    conditions: list[dict[str, Any]] = field(default_factory=list)


def api_client_from_environment() -> Any:
    """A Kubernetes API client: the pod's service account in a cluster, else ``$KUBECONFIG``/~/.kube/config."""
    return kube.api_client_from_environment(
        TrainingError, "train on", "use training.launcher=local (or `flywheel train --backend local`)")


def run_cluster_job(
    settings: Settings, job: ClusterJob, api_client: Any = None, clock: Callable[[], float] = time.monotonic
) -> JobOutcome:
    """Create ``job``, watch it until it succeeds (returned) or fails, times out or cannot start
    (:class:`TrainingError`), then clean it up as the settings say."""
    from kubernetes import client

    api_client = api_client or api_client_from_environment()
    custom = client.CustomObjectsApi(api_client)
    core = client.CoreV1Api(api_client)
    cfg = settings.training.cluster
    where = f"{job.kind} {job.namespace}/{job.name}"
    _create(custom, job, where)
    log.info("train: created %s (pods: %s); watching for up to %ds", where, job.pod_selector, cfg.watch_timeout_s)
    started = clock()
    succeeded = False
    try:
        outcome = _watch(custom, core, settings, job, where, started, clock)
        succeeded = True
        return outcome
    finally:
        deleted = _cleanup(custom, job, cfg.cleanup, succeeded, where)
        if succeeded:
            outcome.deleted = deleted


def _create(custom: Any, job: ClusterJob, where: str) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        custom.create_namespaced_custom_object(job.group, job.version, job.namespace, job.plural, job.body)
    except ApiException as exc:
        hint = {
            404: f"is the {job.kind} CRD ({job.plural}.{job.group}) installed, and does namespace {job.namespace} exist?",
            403: f"the service account may not create {job.plural}.{job.group} in {job.namespace}: grant it RBAC",
            409: "a job of that name already exists: delete it, or rerun (a new run gets a new name)",
            422: "the API server refused the manifest (see `flywheel train --render`)",
        }.get(exc.status, "")
        raise TrainingError(f"could not create {where}: HTTP {exc.status} {exc.reason}: {_api_message(exc)}. {hint}".rstrip(". ") + ".") from None
    except Exception as exc:  # urllib3's MaxRetryError, a refused connection: no API server at that address
        raise TrainingError(f"could not create {where}: the Kubernetes API is unreachable ({type(exc).__name__}: {exc})") from None


def _watch(custom: Any, core: Any, settings: Settings, job: ClusterJob, where: str, started: float,
           clock: Callable[[], float]) -> JobOutcome:
    cfg = settings.training.cluster
    stuck_since: dict[str, float] = {}  # pod → when it was first seen unable to start
    while True:
        obj = _get(custom, job, where)
        conditions = [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
        types = {c.get("type") for c in conditions}
        pods = _pods(core, job)
        if SUCCEEDED[job.backend] in types:
            seconds = clock() - started
            log.info("train: %s succeeded in %.0fs", where, seconds)
            return JobOutcome(job.name, job.namespace, job.kind, seconds, _restarts(pods), conditions=conditions)
        if "Failed" in types:
            failed = next(c for c in conditions if c.get("type") == "Failed")
            raise TrainingError(
                f"{where} failed ({failed.get('reason', 'no reason given')}: {failed.get('message', '')})"
                f"{_pod_states(pods)}{_log_tails(core, job, pods)}{_kept(job, settings, False)}"
            )
        now = clock()
        stuck = {name: why for name, why in (_why_stuck(pod) for pod in pods) if why}
        stuck_since = {name: stuck_since.get(name, now) for name in stuck}
        for name, why in stuck.items():
            if now - stuck_since[name] >= cfg.pending_timeout_s:
                raise TrainingError(
                    f"{where} cannot start: pod {name} {why} (for {now - stuck_since[name]:.0f}s, "
                    f"training.cluster.pending_timeout_s={cfg.pending_timeout_s}){_kept(job, settings, False)}"
                )
        if now - started >= cfg.watch_timeout_s:
            state = ", ".join(sorted(types)) or "no condition yet"
            raise TrainingError(
                f"{where} timed out: not finished after {now - started:.0f}s (training.cluster.watch_timeout_s="
                f"{cfg.watch_timeout_s}; last conditions: {state}){_pod_states(pods)}{_log_tails(core, job, pods)}"
                f"{_kept(job, settings, False)}"
            )
        time.sleep(cfg.poll_interval_s)


def _get(custom: Any, job: ClusterJob, where: str) -> dict[str, Any]:
    from kubernetes.client.exceptions import ApiException

    try:
        return custom.get_namespaced_custom_object(job.group, job.version, job.namespace, job.plural, job.name)
    except ApiException as exc:
        if exc.status == 404:
            raise TrainingError(f"{where} disappeared while it was watched (deleted by someone else?)") from None
        raise TrainingError(f"could not read {where}: HTTP {exc.status} {exc.reason}: {_api_message(exc)}") from None


def _pods(core: Any, job: ClusterJob) -> list[Any]:
    try:
        pods = core.list_namespaced_pod(job.namespace, label_selector=job.pod_selector).items or []
    except Exception as exc:  # no RBAC to list pods: watch the job's conditions alone, say why pods are missing
        log.warning("train: cannot list the pods of %s/%s (%s): no pod states or logs", job.namespace, job.name, exc)
        return []
    return sorted(pods, key=lambda pod: pod.metadata.name)  # master / node-0 first, by the operators' naming


def _why_stuck(pod: Any) -> tuple[str, str]:
    """(pod name, why it cannot start) or (name, "") when it can: unschedulable, or a container
    waiting for a reason that does not go away by itself (a bad image, a missing Secret)."""
    name = pod.metadata.name
    status = pod.status
    if status is None or status.phase != "Pending":
        return name, ""
    for condition in status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False" and condition.reason == "Unschedulable":
            return name, f"is Unschedulable: {condition.message or 'no node fits it'}"
    for container in (status.init_container_statuses or []) + (status.container_statuses or []):
        waiting = container.state.waiting if container.state else None
        if waiting is not None and waiting.reason in STUCK_WAITING:
            return name, f"container {container.name} is waiting: {waiting.reason}: {waiting.message or ''}".rstrip(": ")
    return name, ""


def _restarts(pods: list[Any]) -> int:
    return sum(c.restart_count or 0 for pod in pods for c in (pod.status.container_statuses or []) if pod.status)


def _pod_states(pods: list[Any]) -> str:
    if not pods:
        return "\nno pods were found for the job"
    lines = []
    for pod in pods:
        state = pod.status.phase if pod.status else "unknown"
        for container in (pod.status.container_statuses or []) if pod.status else []:
            terminated = container.state.terminated if container.state else None
            waiting = container.state.waiting if container.state else None
            if terminated is not None:
                state += f", {container.name} exited {terminated.exit_code} ({terminated.reason or 'no reason'})"
            elif waiting is not None:
                state += f", {container.name} waiting ({waiting.reason})"
        lines.append(f"  {pod.metadata.name}: {state}")
    return "\npods:\n" + "\n".join(lines)


def _log_tails(core: Any, job: ClusterJob, pods: list[Any], lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of each pod's training container."""
    parts = []
    for pod in pods:
        name = pod.metadata.name
        try:
            response = core.read_namespaced_pod_log(
                name, job.namespace, container=job.container, tail_lines=lines, _preload_content=False
            )
            text = response.data.decode("utf-8", errors="replace").rstrip()
        except Exception as exc:  # a pod that never started has no log; say so rather than fail again
            text = f"(no log: {getattr(exc, 'reason', None) or exc})"
        parts.append(f"\nlast lines of pod {name} ({job.container}):\n{text or '(empty log)'}")
    return "".join(parts)


def _kept(job: ClusterJob, settings: Settings, succeeded: bool) -> str:
    policy = settings.training.cluster.cleanup
    if policy == "always" or (policy == "on_success" and succeeded):
        return f"\nthe job was deleted (training.cluster.cleanup={policy})"
    return (f"\nthe job was kept to inspect (training.cluster.cleanup={policy}): "
            f"kubectl -n {job.namespace} describe {job.plural}.{job.group} {job.name}")


def _cleanup(custom: Any, job: ClusterJob, policy: str, succeeded: bool, where: str) -> bool:
    if not (policy == "always" or (policy == "on_success" and succeeded)):
        return False
    from kubernetes import client

    try:
        custom.delete_namespaced_custom_object(
            job.group, job.version, job.namespace, job.plural, job.name,
            body=client.V1DeleteOptions(propagation_policy="Background"),  # its pods go with it
        )
    except Exception as exc:  # a failed cleanup must not hide why the job failed
        log.warning("train: could not delete %s: %s", where, exc)
        return False
    log.info("train: deleted %s (cleanup=%s)", where, policy)
    return True


def _api_message(exc: Any) -> str:
    import json

    try:
        return str(json.loads(exc.body).get("message", exc.body))
    except (TypeError, ValueError, AttributeError):
        return str(exc.body or "")
