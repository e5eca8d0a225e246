"""Deploy: moving a blessed version into production, safely.

Modules: ``promote`` (the step's entry: the gate's blessing checked, then released to
``deploy.target``), ``local`` (the local release: two `flywheel serve` processes behind the
splitting proxy), ``release`` (the release on KServe: the InferenceService's canary), ``kserve``
(the InferenceService and its runtime from the kserve SDK, applied and watched), ``analysis`` (the
one pure judge of a canary window, for both targets), ``canary`` (the loop over windows: promote or
roll back, and the decision record), ``traffic`` (a splitting reverse proxy in front of a stable and
a canary model server on this machine) and ``ramp`` (driving the proxy's canary share through steps).
"""

__all__ = ["analysis", "canary", "kserve", "local", "promote", "ramp", "release", "traffic"]
