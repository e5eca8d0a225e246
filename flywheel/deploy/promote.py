"""The deploy step: a version the gate blessed is released to ``deploy.target``.

``local``: it is rolled out against production as a canary between two `flywheel serve` processes
behind the splitting proxy (:mod:`flywheel.deploy.local`), judged, and promoted to the registry's
production version (which `flywheel serve` follows) or rolled back. ``kserve``: it rolls out on the
InferenceService as a canary and is promoted or rolled back the same way
(:mod:`flywheel.deploy.release`). Either way the decision record says why.
"""

from __future__ import annotations

from typing import Any

from flywheel.config import Settings
from flywheel.deploy.canary import latest_evaluation
from flywheel.errors import GateRefused
from flywheel.registry import ModelVersion, Registry
from flywheel.storage import Storage


def check_blessed(model_version: str, evaluation: dict[str, Any]) -> None:
    """Refuse (:class:`GateRefused`) a version the gate did not bless, or an evaluation of another version."""
    if not evaluation.get("blessed"):
        raise GateRefused(
            f"model {model_version} was not blessed by the evaluation gate and cannot be deployed: "
            + "; ".join(evaluation.get("reasons", []))
        )
    if evaluation.get("model_version") != model_version:
        raise GateRefused(
            f"the evaluation is of version {evaluation.get('model_version')}, not of {model_version}"
        )


def release(storage: Storage, settings: Settings, model_version: str, evaluation: dict[str, Any], run_id: str,
            target: str | None = None, api_client: Any = None) -> tuple[ModelVersion | None, dict[str, Any] | None]:
    """Release a blessed version to ``target`` (default ``deploy.target``). Returns the production
    version afterwards and the canary decision record."""
    target = target or settings.deploy.target
    check_blessed(model_version, evaluation)
    if target == "local":
        from flywheel.deploy.local import release_locally

        record = release_locally(storage, settings, model_version, run_id)
    else:
        from flywheel.deploy.release import release_on_kserve

        record = release_on_kserve(storage, settings, model_version, run_id, api_client=api_client)
    return Registry(storage, settings.model_name).production(), record.to_dict()
