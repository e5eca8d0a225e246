"""Deploy: moving a blessed version into production, safely.

Modules: ``promote`` (the step's entry: the gate's blessing checked, then released to
``deploy.target``; locally, the registry's production pointer, which `flywheel serve` follows),
``kserve`` (the InferenceService and its runtime from the kserve SDK, applied and watched),
``canary`` (judging windows of observations: promote or rollback, and the decision record) and
``release`` (the canary rollout on KServe with automatic rollback).
"""

__all__ = ["canary", "kserve", "promote", "release"]
