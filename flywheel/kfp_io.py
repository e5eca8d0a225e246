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
