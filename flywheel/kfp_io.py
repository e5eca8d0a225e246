"""Moving step manifests in and out of KFP artifacts (anything with ``.path`` and ``.metadata``).

The artifact's file holds the step's whole JSON manifest; its metadata holds a short summary that
the Kubeflow UI shows. The data itself stays in flywheel's storage, addressed by the manifest's URIs.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable


def write_artifact(artifact: Any, manifest: dict[str, Any], summary: Iterable[str] = (), extra: dict[str, Any] | None = None) -> None:
    os.makedirs(os.path.dirname(artifact.path) or ".", exist_ok=True)
    with open(artifact.path, "w") as handle:
        json.dump(manifest, handle, default=str)
    for key in summary:
        if manifest.get(key) is not None:
            artifact.metadata[key] = manifest[key]
    for key, value in (extra or {}).items():
        artifact.metadata[key] = value


def read_artifact(artifact: Any) -> dict[str, Any]:
    with open(artifact.path) as handle:
        return json.load(handle)


def log_evaluation(metrics: Any, classification: Any, evaluation: dict[str, Any]) -> None:
    """The evaluation as KFP ``Metrics`` (every scalar) and ``ClassificationMetrics`` (the ROC curve
    and the confusion matrix at the gate's false-positive rate), which the Kubeflow UI draws."""
    details = evaluation.get("details") or {}
    scalars = {**evaluation["metrics"], **{k: v for k, v in details.items() if isinstance(v, (int, float))}}
    scalars.update({f"truth_{k}" if not k.startswith("truth") else k: v for k, v in (evaluation.get("truth") or {}).items()})
    if details.get("calibration"):
        scalars["expected_calibration_error"] = details["calibration"]["expected_calibration_error"]
    for name, value in scalars.items():
        if isinstance(value, (int, float)) and value == value:  # NaN is not a metric
            metrics.log_metric(name, float(value))
    if details.get("roc_curve"):
        curve = details["roc_curve"]
        classification.log_roc_curve(curve["fpr"], curve["tpr"], curve["threshold"])
    if details.get("confusion_matrix"):
        matrix = details["confusion_matrix"]
        classification.log_confusion_matrix(matrix["categories"], matrix["matrix"])


def write_text(artifact: Any, text: str) -> None:
    """An HTML or Markdown artifact's file: the page the Kubeflow UI renders."""
    os.makedirs(os.path.dirname(artifact.path) or ".", exist_ok=True)
    with open(artifact.path, "w") as handle:
        handle.write(text)


def log_metrics(metrics: Any, values: dict[str, float]) -> None:
    """Scalars as a KFP ``Metrics`` artifact (NaN is not a metric and is left out)."""
    for name, value in values.items():
        if isinstance(value, (int, float)) and value == value:
            metrics.log_metric(name, float(value))
