"""Deploy: moving a blessed version into production.

Modules: ``promote`` (embedded: the registry's production pointer, which `flywheel serve` follows).
KServe InferenceService rollout with canary analysis builds on it.
"""

__all__ = ["promote"]
