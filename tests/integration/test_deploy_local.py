"""The local release (`flywheel deploy --target local`, the pipeline's deploy step): a candidate
rolled out against production between two real `flywheel serve` processes behind the splitting
proxy, under a replay of the candidate's held-out transactions. The thresholds are the real
defaults; only the windows are short (settings: 20% then 50%, 60 canary requests each). A good
candidate's promotion is tested through the CLI, verbatim from the README (test_readme_releases.py)."""

from __future__ import annotations

import shutil

import pytest

from flywheel.config import load_settings
from flywheel.deploy.local import release_locally
from flywheel.registry import Registry
from flywheel.storage import Storage
from tests.candidates import copy_version, wider_copy
from tests.conftest import small_env

SHORT_WINDOWS = {"FLYWHEEL_DEPLOY__CANARY__STEPS": "[20, 50]", "FLYWHEEL_DEPLOY__CANARY__WINDOW_REQUESTS": "60"}


@pytest.fixture
def home(trained_loop, tmp_path):
    """A copy of the trained loop's home (registry, models, feature worlds): releases here never
    change what other tests see."""
    copy = tmp_path / "home"
    shutil.copytree(trained_loop["home"], copy)
    settings = load_settings(env=dict(small_env(copy), **SHORT_WINDOWS))
    assert settings.deploy.canary.steps == [20, 50] and settings.deploy.canary.max_p99_latency_ratio == 2.0
    registry = Registry(Storage.from_settings(settings), "fraud")
    return settings, registry, registry.production().version


def stored(registry: Registry, record) -> dict:
    data = registry.storage.read_json(record.uri)
    assert data == record.to_dict()
    return data


def test_a_ten_times_slower_candidate_is_rolled_back_and_no_request_fails(home, tmp_path):
    """Same scores, only slow (a network about 100x wider, padded with zero weights): the latency
    thresholds alone roll it back, and every replayed request is answered."""
    settings, registry, production = home
    # 6144 wide: one row's forward alone is about 10 ms on one thread (4096: about 5 ms, which on a
    # quiet machine, with requests scored in passes, came out under 2x stable's p99 and was promoted).
    candidate = wider_copy(registry, production, tmp_path, [6144, 6144])
    record = release_locally(registry.storage, settings, candidate, "release-slow")
    assert record.verdict == "rollback" and record.final_canary_percent == 0, record.reasons
    assert registry.production().version == production and registry.stage(candidate) == "archived"
    window = record.windows[-1]["observations"]
    canary, stable = window["canary"], window["stable_shadow"]
    # It was seen to be slow: too slow to wait for (answered from stable), or its p99 far above stable's.
    assert canary["timeouts"] > 0 or canary["p99_ms"] > 2 * stable["p99_ms"], window
    assert any("latency" in r or "timeouts" in r for r in record.reasons), record.reasons
    assert not any("agree" in r or "p_canary" in r for r in record.reasons), record.reasons  # not for its scores
    assert window["agreement"]["pairs"] == 0 or window["agreement"]["max_abs_diff"] < 1e-4  # it is not wrong, only slow
    # Zero failed requests during the whole rollout.
    assert record.client["failures"] == 0 and set(record.client["statuses"]) == {"200"}
    assert window["client"]["failures"] == 0
    assert stored(registry, record)["verdict"] == "rollback"


def test_a_candidate_that_cannot_load_is_rolled_back_before_any_traffic(home, tmp_path):
    settings, registry, production = home
    candidate = copy_version(registry, production, tmp_path, corrupt=True)
    record = release_locally(registry.storage, settings, candidate, "release-broken")
    assert record.verdict == "rollback" and record.windows == []
    assert "the candidate's server did not start" in record.reasons[0] and "cannot be loaded" in record.reasons[0]
    assert registry.production().version == production and registry.stage(candidate) == "archived"
