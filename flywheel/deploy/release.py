"""Releasing a candidate on KServe: roll it out as a canary, analyse it, promote or roll back.

1. The registry marks the candidate ``canary``; the InferenceService is patched to name it with
   ``canaryTrafficPercent`` (KServe keeps the previous revision serving the rest) and watched until
   its latest revision is Ready. A revision that fails (or a timeout) is rolled back at once:
   ``canaryTrafficPercent: 0`` and the registry archives the candidate.
2. ``windows`` windows of held-out requests (rows of the candidate's holdout, as scoring requests)
   go to both tag-routed revisions (``prev``: stable, ``latest``: canary); each window is judged by
   :func:`flywheel.deploy.canary.analyse` (the same judge as the local target's).
3. Promote: ``canaryTrafficPercent: 100`` and the registry makes the candidate production (refused
   if another promotion landed meanwhile). Rollback: 0%, and the candidate is archived.
The decision record (metrics seen, thresholds, verdict, every action taken) is written to storage.
With no production version yet, the candidate is rolled out at 100% and promoted once Ready.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

from flywheel.config import Settings
from flywheel.deploy import canary
from flywheel.deploy.analysis import Thresholds, WindowObservations, thresholds_for
from flywheel.deploy.kserve import KServeClient, render_inference_service, service_name
from flywheel.errors import DeployError
from flywheel.registry import ModelVersion, Registry
from flywheel.storage import Storage
from flywheel.usecase import load_usecase

log = logging.getLogger(__name__)
# observe(stable_url, canary_url, instances, canary_percent): one window of both revisions' answers.
Observe = Callable[[str, str, list[dict[str, Any]], int], WindowObservations]


def held_out_requests(storage: Storage, model: ModelVersion, settings: Settings) -> Iterator[dict[str, Any]]:
    """The candidate's holdout rows (never trained on) as scoring requests, in time order, forever
    (cycling) so any number of windows can be filled."""
    rows = canary.held_out_rows(storage, model, canary.model_contract(model, load_usecase(settings.usecase).contract))
    while True:
        yield from rows


def http_observer(model_name: str, thresholds: Thresholds, timeout_s: float = 5.0, output: str | None = None) -> Observe:
    def observe(stable_url: str, canary_url: str, instances: list[dict[str, Any]], percent: int) -> WindowObservations:
        return canary.replay(stable_url, canary_url, instances, model_name, thresholds, percent, timeout_s=timeout_s,
                             output=output)

    return observe


def release_on_kserve(
    storage: Storage,
    settings: Settings,
    candidate_version: str,
    run_id: str,
    *,
    api_client: Any = None,
    observe: Observe | None = None,
    requests: Iterator[dict[str, Any]] | None = None,
) -> canary.DecisionRecord:
    """Roll ``candidate_version`` out on KServe as a canary and promote or roll it back."""
    cfg = settings.deploy.canary
    registry = Registry(storage, settings.model_name)
    candidate = registry.get(candidate_version)
    stable = registry.production()
    kserve = KServeClient(settings, api_client)
    name = service_name(settings)
    thresholds = thresholds_for(cfg, candidate.meta)  # agreement in the candidate's own output units
    record = canary.DecisionRecord(
        model_name=settings.model_name, candidate=candidate.version, stable=stable.version if stable else None,
        target="kserve", run_id=run_id, thresholds=thresholds.to_dict(), steps=[cfg.traffic_percent],
        meta={"windows": cfg.windows, "window_requests": cfg.window_requests},
    )

    def finish(verdict: str, reasons: list[str]) -> canary.DecisionRecord:
        record.verdict, record.reasons, record.decided_at = verdict, reasons, canary.now()
        record.final_canary_percent = 100 if verdict == canary.PROMOTE else 0
        canary.write_record(storage, record)
        log.info("deploy: %s %s (%s); record %s", verdict, candidate.version, "; ".join(reasons), record.uri)
        return record

    if stable is None or stable.version == candidate.version:
        obj = kserve.apply(render_inference_service(settings, candidate))
        record.events.append(f"applied InferenceService {name} with {candidate.version} at 100% (no stable version to compare with)")
        kserve.wait_ready(name, _generation(obj))
        record.events.append(f"InferenceService {name} is Ready")
        if stable is not None:
            return finish(canary.PROMOTE, [f"{candidate.version} is already production: the InferenceService serves it at 100%"])
        registry.promote(candidate.version, run_id=run_id, reason="first version: rolled out at 100% on KServe", expected_production=None)
        record.events.append(f"registry: {candidate.version} is production")
        return finish(canary.PROMOTE, ["no production version yet: the first version is rolled out whole once Ready"])

    if settings.deploy.protocol == "grpc" and observe is None:
        # Knative routes one port: a gRPC-exposed service has no REST port for the canary's replay.
        raise DeployError("deploy.protocol is grpc: the InferenceService exposes only its gRPC port (Knative routes one port "
                          "per container), and the canary replays held-out requests over REST; release with deploy.protocol "
                          "http, or promote this version after its canary elsewhere")
    if kserve.get(name) is None:  # the stable version must be serving before a canary can share its traffic
        obj = kserve.apply(render_inference_service(settings, stable))
        record.events.append(f"created InferenceService {name} with stable {stable.version}")
        kserve.wait_ready(name, _generation(obj))
    registry.start_canary(candidate.version, run_id=run_id, reason=f"canary at {cfg.traffic_percent}% on KServe")
    record.events.append(f"registry: {candidate.version} is canary")
    obj = kserve.apply(render_inference_service(settings, candidate, canary_percent=cfg.traffic_percent))
    record.events.append(f"patched InferenceService {name}: {candidate.version} at canaryTrafficPercent {cfg.traffic_percent}")
    try:
        status = kserve.wait_ready(name, _generation(obj))
    except DeployError as exc:
        _rollback(kserve, registry, name, candidate, run_id, str(exc), record)
        return finish(canary.ROLLBACK, [f"the canary revision did not become ready: {exc}"])
    record.events.append(f"InferenceService {name}: the canary revision is Ready")

    stable_url, canary_url = status.tag_url("prev"), status.tag_url("latest")
    observe = observe or http_observer(settings.model_name, thresholds, output=canary.model_output(candidate))
    requests = requests if requests is not None else held_out_requests(storage, candidate, settings)

    def window(percent: int, _: int) -> tuple[WindowObservations, dict[str, Any]]:
        return observe(stable_url, canary_url, [next(requests) for _ in range(cfg.window_requests)], percent), {}

    verdict = canary.analyse(record, [cfg.traffic_percent] * cfg.windows, window, thresholds)
    reasons = record.reasons
    if verdict == canary.ROLLBACK:
        _rollback(kserve, registry, name, candidate, run_id, "; ".join(reasons), record)
        return finish(verdict, reasons)
    kserve.set_canary_percent(name, 100)
    record.events.append(f"patched InferenceService {name}: canaryTrafficPercent 100")
    registry.promote(candidate.version, run_id=run_id, reason="canary analysis passed: " + "; ".join(reasons),
                     expected_production=stable.version)
    record.events.append(f"registry: {candidate.version} is production; {stable.version} archived")
    return finish(verdict, reasons)


def _rollback(kserve: KServeClient, registry: Registry, name: str, candidate: ModelVersion, run_id: str, why: str,
              record: canary.DecisionRecord) -> None:
    kserve.set_canary_percent(name, 0)
    record.events.append(f"patched InferenceService {name}: canaryTrafficPercent 0 (all traffic on the stable revision)")
    registry.abort_canary(candidate.version, run_id=run_id, reason=why)
    record.events.append(f"registry: canary {candidate.version} archived; production unchanged")


def _generation(obj: dict[str, Any]) -> int | None:
    generation = (obj.get("metadata") or {}).get("generation")
    return int(generation) if generation is not None else None
