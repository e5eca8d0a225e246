"""What every cluster object flywheel renders shares: YAML as a manifest spells it, and an API client.

Training (PyTorchJob, TrainJob) and deployment (InferenceService) build their objects with the typed
SDK models and talk to the API server through the ``kubernetes`` client; both use these.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from flywheel.errors import FlywheelError


class _NoAliases(yaml.SafeDumper):
    """A manifest spells out a repeated block (the labels) rather than as a YAML anchor and alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def manifest_yaml(*documents: dict[str, Any]) -> str:
    """One or more objects as a YAML manifest (documents separated by ``---``), keys in their order."""
    return "---\n".join(yaml.dump(doc, Dumper=_NoAliases, sort_keys=False) for doc in documents)


def api_client_from_environment(error: type[FlywheelError], purpose: str, instead: str) -> Any:
    """A Kubernetes API client: the pod's service account in a cluster, else ``$KUBECONFIG`` or
    ~/.kube/config. Without either, ``error`` says what it was for and what to do instead."""
    from kubernetes import client, config

    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
        else:
            # kubernetes reads $KUBECONFIG once, at import; read it now (it may name several files).
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    except config.ConfigException as exc:
        raise error(f"cannot reach a Kubernetes cluster to {purpose} ({exc}); set KUBECONFIG, or {instead}") from None
    return client.ApiClient()
