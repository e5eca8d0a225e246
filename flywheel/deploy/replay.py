"""What the local release replays, and what it expects: held-out rows read as of their own times.

The local release judges a candidate on a replay of its held-out rows (requests from the past), but
a world's online store holds the present. Read against it, both models get features from after the
request (for flights, the aircraft's and airports' of weeks later): their scores then differ for
reasons that are not the models', and a real retrained candidate that the gate found better was
rolled back (measured: the served pair differed by 17.5 minutes on average where the evaluated pair
differed by 9.1 on the same rows).

So the replay is read the way the models were evaluated:

- **Features as of each request's time.** Each server reads, for its own model version's feature
  declarations, the rows the offline engine gives over the replay's span
  (:mod:`flywheel.features.history`; ``serving.replay_features``): a replayed request gets the very
  features its training-set row holds. The servers do not write the replay to the live event log.
- **The difference the gate accepted.** When the evaluation compared the candidate with this
  production version (the gate's verdict on it is checked before any release), the replay is the
  rows it compared them on (after production's training window), and each request carries what the
  candidate minus production scored on that row offline. The canary is
  then held to that difference (:class:`flywheel.deploy.analysis.ScorePair`): it must be served as it
  was evaluated, not agree with a model the gate found worse. A candidate without such an evaluation
  (a version published by hand, or compared with another production) or a multiclass one is held
  to stable's scores, as before.

When the features cannot be recomputed exactly (a version trained with other aggregation code, or
before its declarations were recorded), the servers read their online stores and nothing is
expected; the record's events say so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from flywheel.config import Settings
from flywheel.contract import Contract
from flywheel.deploy import canary
from flywheel.deploy.live import lake_of
from flywheel.deploy.ramp import v1_bodies
from flywheel.errors import ArtifactNotFound, DataError, FlywheelError
from flywheel.features.history import replay_tables, write_replay_tables
from flywheel.features.incremental import source_rows
from flywheel.registry import ModelVersion, Registry
from flywheel.storage import Storage
from flywheel.usecase import load_usecase

log = logging.getLogger(__name__)


@dataclass
class ReplayPlan:
    """The bodies to send, what each is expected to show, and each server's settings."""

    bodies: list[bytes]
    expected: dict[bytes, tuple[float, ...]] = field(default_factory=dict)  # sha256 of a body -> expected difference
    settings: dict[str, Settings] = field(default_factory=dict)  # role ("stable", "candidate") -> its server's settings
    folders: list[str] = field(default_factory=list)  # replay tables to remove once decided
    events: list[str] = field(default_factory=list)  # what the decision record says of the replay


def requests_needed(steps: Sequence[int], window_requests: int) -> int:
    """How many requests the local ramp sends: at each step, as many as give the canary a window."""
    return sum(math.ceil(window_requests * 100 / step) for step in steps)


def _evaluated_against(storage: Storage, candidate: str, stable: str) -> dict[str, Any] | None:
    """The newest evaluation of ``candidate`` if it compared it with ``stable`` on rows neither
    trained on. (Whether the gate blessed it is checked before any release, by
    :func:`flywheel.deploy.promote.check_blessed`; what the canary needs is the measured difference.)"""
    try:
        evaluation = canary.latest_evaluation(storage, candidate)
    except FlywheelError:
        return None
    comparison = evaluation.get("comparison") or {}
    if evaluation.get("production_version") == stable and comparison.get("possible") and comparison.get("since"):
        return evaluation
    return None


def plan_replay(storage: Storage, settings: Settings, stable: ModelVersion, candidate: ModelVersion, contract: Contract,
                run_id: str, count: int) -> ReplayPlan:
    """The local release's replay of ``candidate``'s held-out rows against ``stable``: ``count``
    requests' rows in time order, each server's settings, and the expected differences."""
    frame = canary.held_out_frame(storage, candidate, contract)
    if frame.empty:
        raise DataError(f"the holdout of model {candidate.version} is empty: no requests to replay")
    times = pd.to_datetime(frame[contract.timestamp], utc=True)
    evaluation = _evaluated_against(storage, candidate.version, stable.version)
    events: list[str] = []
    if evaluation is not None:
        since = pd.Timestamp(evaluation["comparison"]["since"])
        unseen = (times >= since).to_numpy()
        if unseen.any():
            frame, times = frame[unseen].reset_index(drop=True), times[unseen].reset_index(drop=True)
            events.append(f"replay: the held-out rows from {since.isoformat()} on, which neither model trained on "
                          f"(the rows the gate compared them on)")
    frame, times = frame.head(count), times.head(count)
    plan = ReplayPlan(bodies=[json.dumps(body).encode() for body in v1_bodies(canary.request_rows(frame, contract))])
    start, end = times.min(), times.max()

    # Features as of each request's time, per version, with its own declarations.
    lake_uri = lake_of(storage, candidate.meta)
    usecase = load_usecase(settings.usecase)

    def sources_of(snapshot: Any, first_day: str) -> dict[str, pd.DataFrame]:
        return source_rows(storage, snapshot, usecase, first=first_day)

    if not settings.deploy.canary.replay_point_in_time:
        plan.events = events + ["replay: features read from the online stores (the present): "
                                "deploy.canary.replay_point_in_time is off; no evaluated difference expected"]
        return plan
    for role, version in (("stable", stable), ("candidate", candidate)):
        folder = storage.uri("runs", run_id, "replay-features", version.version)
        try:
            tables = replay_tables(storage, version.meta, lake_uri, start, end, sources_of)
        except (DataError, ArtifactNotFound) as exc:
            plan.settings.clear()
            plan.events = events + [f"replay: features read from the online stores (the present), not as of each "
                                    f"request's time: {role} {version.version}: {exc}; no evaluated difference expected"]
            return plan
        plan.folders.append(write_replay_tables(storage, folder, tables, version.version))
        plan.settings[role] = settings.model_copy(update={
            "serving": settings.serving.model_copy(update={"replay_features": folder}),
            "live": settings.live.model_copy(update={"enabled": False}),  # a replay is no event
        })
    events.append(f"replay: {len(plan.bodies)} requests from {start.isoformat()} to {end.isoformat()}, each server "
                  "reading its model's features as of each request's time (the offline engine's rows)")

    if evaluation is not None:
        try:
            expected = _expected(storage, settings, stable, candidate, frame)
        except Exception as exc:  # e.g. production reads features the candidate's rows lack: judge against stable
            expected = None
            events.append(f"replay: the evaluated difference could not be recomputed ({type(exc).__name__}: {exc})")
        if expected is None:
            events.append("replay: no evaluated difference expected: the canary is held to stable's scores")
        else:
            for body, difference in zip(plan.bodies, expected):
                plan.expected[hashlib.sha256(body).digest()] = (float(difference),)
            events.append(f"replay: each request expects the candidate's difference from production the evaluation "
                          f"measured on its row (mean |difference| {float(np.mean(np.abs(expected))):.4g})")
    plan.events = events
    return plan


def _expected(storage: Storage, settings: Settings, stable: ModelVersion, candidate: ModelVersion,
              frame: pd.DataFrame) -> np.ndarray | None:
    """Per row, the candidate's minus production's prediction offline (the evaluation's computation:
    both models on the holdout rows' point-in-time features); None for answers that are not one number."""
    from flywheel.training.model import load_version

    registry = Registry(storage, settings.model_name)
    scored = [load_version(registry, version).score(frame) for version in (candidate, stable)]
    if any(np.ndim(s) != 1 for s in scored):
        return None
    return np.asarray(scored[0], dtype=float) - np.asarray(scored[1], dtype=float)


def remove_replay(storage: Storage, plan: ReplayPlan) -> None:
    """Remove the replay's tables (the decision record keeps what was judged)."""
    for folder in plan.folders:
        try:
            storage.delete_tree(folder)
        except Exception as exc:  # leftovers are garbage, never a failed release
            log.warning("deploy: could not remove the replay tables %s: %s", folder, exc)


__all__ = ["ReplayPlan", "plan_replay", "remove_replay", "requests_needed"]
