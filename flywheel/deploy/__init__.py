"""Deploy: moving a blessed version into production.

Modules: ``promote`` (embedded: the registry's production pointer, which `flywheel serve` follows);
``traffic`` (a splitting reverse proxy in front of a stable and a canary model server),
``canary_local`` (judging a window of what the proxy saw against thresholds) and ``ramp`` (driving
the canary's share through steps, then promoting or rolling back, with a decision record).
KServe InferenceService rollout with canary analysis builds on them.
"""

__all__ = ["promote", "traffic", "canary_local", "ramp"]
