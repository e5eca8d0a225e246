"""Deploy: moving a blessed version into production, safely.

Modules: ``promote`` (the step's entry: the gate's blessing checked, then released to
``deploy.target``; locally, the registry's production pointer, which `flywheel serve` follows),
``kserve`` (the InferenceService and its runtime from the kserve SDK, applied and watched),
``canary`` (judging windows of observations: promote or rollback, and the decision record),
``release`` (the canary rollout on KServe with automatic rollback), ``traffic`` (a splitting
reverse proxy in front of a stable and a canary model server on this machine), ``canary_local``
(judging a window of what the proxy saw) and ``ramp`` (driving the proxy's canary share through
steps, then promoting or rolling back, with a decision record).
"""

__all__ = ["canary", "canary_local", "kserve", "promote", "ramp", "release", "traffic"]
