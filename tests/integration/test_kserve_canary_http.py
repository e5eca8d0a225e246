"""The KServe release's canary judged on real HTTP requests: the tag URLs the InferenceService
reports (through the loopback Kubernetes stand-in) are where the replay goes, to two real predictor
servers. Moved out of tests/unit/test_kserve_deploy.py: it starts servers and sends traffic, and
reads nothing of the checkout."""

from __future__ import annotations

import pytest

from flywheel.deploy.release import release_on_kserve
from tests.kube_standin import Scenario, kube_standin
from tests.unit.test_kserve_deploy import existing_service, ready, registry, settings  # noqa: F401 (fixtures)


@pytest.mark.parametrize("canary_delay_s, verdict", [(0.01, "promote"), (0.1, "rollback")])
def test_the_canary_is_judged_on_real_requests_to_the_tag_routed_revisions(settings, registry, canary_delay_s, verdict):
    """End to end over HTTP: the tag URLs the InferenceService reports are where the replay goes; a
    canary 10x slower than stable (100 ms against 10 ms) is rolled back, an equally fast one promoted.
    One window of the default size: the windows that follow it are the same replay again, and their
    count (the default three) is held by test_kserve_deploy's release tests."""
    from tests.unit.test_canary import start_predictors, stop_predictors

    reg, stable, candidate = registry
    canary = settings.deploy.canary.model_copy(update={"windows": 1})
    settings = settings.model_copy(update={"deploy": settings.deploy.model_copy(update={"canary": canary})})
    assert settings.deploy.canary.window_requests == 200 and settings.deploy.canary.max_p99_latency_ratio == 2.0  # the defaults
    servers, (stable_url, canary_url) = start_predictors((False, 0.01), (False, canary_delay_s))

    def status(n, obj):
        out = ready(obj)
        out["components"]["predictor"]["traffic"][0]["url"] = stable_url
        out["components"]["predictor"]["traffic"][1]["url"] = canary_url
        return out

    def amounts():
        n = 0
        while True:
            n += 1
            yield {"card_id": "c", "merchant_id": "m", "amount": float(n % 500), "ts": "2026-11-01T00:00:00+00:00"}

    try:
        with kube_standin(Scenario(status=status)) as standin:
            existing_service(standin, settings, registry)
            record = release_on_kserve(reg.storage, settings, candidate, f"run-http-{verdict}", api_client=standin.api_client(),
                                       requests=amounts())
    finally:
        stop_predictors(servers)
    assert record.verdict == verdict, record.reasons
    assert reg.production().version == (candidate if verdict == "promote" else stable)
    assert len(record.windows) == 1
    window = record.windows[0]["observations"]
    assert window["canary"]["requests"] == window["stable"]["requests"] == settings.deploy.canary.window_requests
    assert window["agreement"]["score_agreement"] == 1.0  # the same scorer behind both URLs

