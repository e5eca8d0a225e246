"""The deploy step. Embedded: the blessed version becomes the registry's production version, which
`flywheel serve` loads. (KServe InferenceService rollout with canary analysis builds on this.)"""

from __future__ import annotations

from typing import Any

from flywheel.config import Settings
from flywheel.errors import GateRefused
from flywheel.registry import ModelVersion, Registry
from flywheel.storage import Storage


def deploy(storage: Storage, settings: Settings, model_version: str, evaluation: dict[str, Any], run_id: str) -> ModelVersion:
    """Promote a blessed version to production; refuses a version the gate did not bless."""
    if not evaluation.get("blessed"):
        raise GateRefused(
            f"model {model_version} was not blessed by the evaluation gate and cannot be deployed: "
            + "; ".join(evaluation.get("reasons", []))
        )
    if evaluation.get("model_version") != model_version:
        raise GateRefused(
            f"the evaluation is of version {evaluation.get('model_version')}, not of {model_version}"
        )
    registry = Registry(storage, settings.model_name)
    current = registry.production()
    if current is not None and current.version == model_version:
        return current
    return registry.promote(model_version, run_id=run_id, reason="; ".join(evaluation.get("reasons", [])))
