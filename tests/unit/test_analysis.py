"""Judging canary windows: summaries of hand-made samples against hand-computed values, and each
threshold breaking a window on its own (the thresholds are the real defaults)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from flywheel.deploy.analysis import (
    Sample, ScorePair, Thresholds, WindowObservations, agreement, arm_stats, judge, summarise,
)
from flywheel.deploy.ramp import v1_bodies
from flywheel.deploy.traffic import predict_protocol, scores_of
from tests.factories import FRAUD_CONTRACT

CLIENT = {"requests": 0, "to_canary": 0, "answered_by_canary": 0, "fallbacks": 0, "failures": 0}


def ok(arm: str, ms: float) -> Sample:
    return Sample(arm, True, ms)


def healthy_window(**changes) -> WindowObservations:
    """100 stable calls at 1..100 ms, 60 canary calls at 1..60 ms, 60 identical score pairs."""
    samples = [ok("stable", ms) for ms in range(1, 101)] + [ok("canary", ms) for ms in range(1, 61)]
    pairs = [ScorePair((p / 60,), (p / 60,)) for p in range(60)]
    window = summarise(samples, pairs, CLIENT)
    return replace(window, **changes)


def test_arm_stats_match_hand_computed_percentiles():
    stats = arm_stats([ok("stable", ms) for ms in range(1, 101)] + [Sample("stable", False, 5000, "HTTP 503")] * 2
                      + [Sample("stable", False, 250, "timeout after 250 ms", timeout=True)])
    # numpy's linear percentile of 1..100: p50 at rank 49.5 -> 50.5; p99 at rank 98.01 -> 99.01.
    assert (stats.requests, stats.errors, stats.timeouts) == (103, 3, 1)
    assert stats.error_rate == pytest.approx(3 / 103)
    assert stats.p50_ms == pytest.approx(50.5) and stats.p99_ms == pytest.approx(99.01)  # failed calls' latency left out
    assert stats.error_examples == ["HTTP 503", "timeout after 250 ms"]


def test_agreement_over_every_instance_of_every_pair():
    pairs = [ScorePair((0.1, 0.9), (0.2, 0.4)), ScorePair((0.6,), (0.65,)), ScorePair((0.3,), (0.3, 0.3))]
    a = agreement(pairs, score_tolerance=0.1, decision_threshold=0.5)
    # The third pair's lengths differ: it pairs nothing. Diffs: 0.1, 0.5, 0.05.
    assert a.pairs == 3
    assert a.mean_abs_diff == pytest.approx((0.1 + 0.5 + 0.05) / 3)
    assert a.max_abs_diff == pytest.approx(0.5)
    assert a.score_agreement == pytest.approx(2 / 3)  # |0.1 - 0.2| is 0.1 exactly in floats: within the tolerance
    assert a.decision_agreement == pytest.approx(2 / 3)  # 0.9 vs 0.4 flips the decision


def test_a_healthy_window_passes_and_says_what_was_checked():
    verdict = judge(healthy_window(), Thresholds())
    assert verdict.passed and verdict.verdict == "pass"
    assert any("canary error rate 0.0000" in r for r in verdict.reasons)
    assert any("decisions (at 0.5) agree" in r for r in verdict.reasons)


@pytest.mark.parametrize("change, reason", [
    (lambda w: replace(w, canary=replace(w.canary, requests=49)), "only 49 requests reached the canary"),
    (lambda w: replace(w, canary=replace(w.canary, errors=2, error_rate=2 / 60)), "canary error rate 0.0333 > 0.0100"),
    (lambda w: replace(w, canary=replace(w.canary, p99_ms=251.0), stable=replace(w.stable, p99_ms=200.0)), "canary p99 latency 251.0 ms > 250.0 ms"),
    (lambda w: replace(w, canary=replace(w.canary, p99_ms=200.1), stable=replace(w.stable, p99_ms=100.0)), "> 2x stable's 100.0 ms"),
    (lambda w: replace(w, agreement=replace(w.agreement, mean_abs_diff=0.06)), "mean |stable - canary| 0.0600 > 0.05"),
    (lambda w: replace(w, agreement=replace(w.agreement, decision_agreement=0.94)), "decisions (at 0.5) agree on only 94.0%"),
    (lambda w: replace(w, agreement=replace(w.agreement, score_agreement=0.89)), "scores agree within 0.1 on 89.0%"),
    (lambda w: replace(w, agreement=replace(w.agreement, pairs=0)), "score agreement cannot be judged"),
    (lambda w: replace(w, canary=replace(w.canary, p50_ms=None, p99_ms=None, errors=60, error_rate=1.0)), "the canary answered none of its 60 requests"),
])
def test_each_broken_threshold_rolls_the_window_back(change, reason):
    verdict = judge(change(healthy_window()), Thresholds())
    assert verdict.verdict == "rollback"
    assert any(reason in r for r in verdict.reasons), verdict.reasons


def test_an_error_rate_above_stables_by_more_than_allowed_rolls_back():
    window = healthy_window()
    window = replace(window, canary=replace(window.canary, errors=1, error_rate=0.01), stable=replace(window.stable, error_rate=0.004))
    verdict = judge(window, Thresholds())  # 0.01 is within the absolute ceiling, but 0.004 + 0.005 < 0.01
    assert verdict.verdict == "rollback"
    assert verdict.reasons == ["canary error rate 0.0100 exceeds stable's 0.0040 by more than 0.0050"]
    assert judge(replace(window, stable=replace(window.stable, error_rate=0.005)), Thresholds()).passed


def test_thresholds_from_settings_like_objects():
    """``settings.deploy.canary`` has the shared names; the ones it lacks keep their defaults."""
    settings = SimpleNamespace(max_error_rate=0.5, min_requests=1, traffic_percent=10, windows=3)
    t = Thresholds.from_object(settings)
    assert (t.max_error_rate, t.min_requests, t.decision_threshold) == (0.5, 1, 0.5)
    window = healthy_window()
    window = replace(window, canary=replace(window.canary, errors=12, error_rate=0.2))
    assert judge(window, Thresholds()).verdict == "rollback"
    assert not any("canary error rate 0.2000 > " in r for r in judge(window, settings).reasons)


@pytest.mark.parametrize("method, path, protocol", [
    ("POST", "/v1/models/fraud:predict", "v1"), ("POST", "/v2/models/fraud/infer", "v2"),
    ("POST", "/v2/models/fraud/versions/3/infer", "v2"), ("GET", "/v1/models/fraud:predict", None),
    ("GET", "/v2/health/ready", None), ("POST", "/v1/models/fraud:explain", None),
])
def test_only_predict_requests_are_split(method, path, protocol):
    assert predict_protocol(method, path) == protocol


@pytest.mark.parametrize("protocol, body, scores", [
    ("v1", b'{"predictions": [{"fraud_probability": 0.25, "model_version": "3"}]}', (0.25,)),
    ("v1", b'{"predictions": [0.1, 0.7]}', (0.1, 0.7)),
    ("v2", b'{"outputs": [{"name": "x", "data": [1]}, {"name": "fraud_probability", "data": [0.5, 0.25]}]}', (0.5, 0.25)),
    ("v2", b'{"outputs": [{"name": "p", "shape": [2, 1], "data": [[0.5], [0.25]]}]}', (0.5, 0.25)),
    ("v1", b'{"predictions": [{"note": "no score"}]}', None),
    ("v1", b'{"predictions": [{"p": {"a": 0.25, "b": 0.75}}]}', (0.25, 0.75)),  # a multiclass answer: each class's
    ("v1", b'{"predictions": [true]}', None),
    ("v1", b'{"predictions": [NaN]}', None),
    ("v2", b'{"outputs": []}', None),
    ("v1", b"<html>oops</html>", None),
])
def test_scores_are_read_from_v1_and_v2_answers_or_refused(protocol, body, scores):
    # The platform names the model's output (its task's); without one, each v1 prediction's first field.
    named = "fraud_probability" if b"fraud_probability" in body else None
    assert scores_of(protocol, body, named) == scores


def test_v1_bodies_keep_request_fields_only_and_iso_times():
    import pandas as pd

    rows = [{"transaction_id": f"t{i}", "card_id": "c", "merchant_id": "m", "amount": 1.5 * i,
             "ts": pd.Timestamp("2026-11-01T12:00:00Z"), "is_fraud": True} for i in range(3)]
    bodies = v1_bodies(rows, per_request=2, fields=list(FRAUD_CONTRACT.request_fields()))
    assert [len(b["instances"]) for b in bodies] == [2, 1]
    assert bodies[0]["instances"][1] == {"transaction_id": "t1", "card_id": "c", "merchant_id": "m", "amount": 1.5,
                                         "ts": "2026-11-01T12:00:00+00:00"}


def test_canary_latency_is_compared_with_stables_on_the_same_requests():
    """A load spike slows both calls of a shadowed request: the canary is judged against stable's
    shadow calls, not against stable's calls at quieter moments."""
    quiet = [Sample("stable", True, 10.0)] * 200
    spiked_shadows = [Sample("stable", True, 120.0, shadow=True)] * 60
    canary = [Sample("canary", True, 200.0)] * 60
    pairs = [ScorePair((0.2,), (0.2,))] * 60
    window = summarise(quiet + spiked_shadows + canary, pairs, CLIENT)
    assert window.stable_shadow.requests == 60 and window.stable_shadow.p99_ms == pytest.approx(120.0)
    verdict = judge(window, Thresholds())
    assert verdict.passed, verdict.reasons  # 200 <= 2 x 120
    slower = summarise(quiet + spiked_shadows + [Sample("canary", True, 241.0)] * 60, pairs, CLIENT)
    assert any("> 2x stable's on the same requests 120.0 ms" in r for r in judge(slower, Thresholds()).reasons)
    no_shadows = summarise(quiet + canary, pairs, CLIENT)  # without shadow calls: stable's calls overall
    assert any("> 2x stable's 10.0 ms" in r for r in judge(no_shadows, Thresholds()).reasons)


def test_a_canary_slow_on_every_call_is_rolled_back_even_when_one_stable_stall_lifts_stables_p99():
    """Bug caught (a flaky rollback a window late in the local canary test): about 50 canary calls at
    200 ms against stable's 20 ms passed the window, because two stable calls stalled for 150 ms and a
    p99 over 50 calls is about their slowest (200 <= 2 x 150). The median judges every call."""
    stable = [Sample("stable", True, 20.0, shadow=True)] * 48 + [Sample("stable", True, 150.0, shadow=True)] * 2
    canary = [Sample("canary", True, 200.0)] * 50
    pairs = [ScorePair((0.2,), (0.2,))] * 50
    window = summarise(stable + canary, pairs, CLIENT)
    assert window.stable_shadow.p99_ms > 100 and window.canary.p99_ms <= 2 * window.stable_shadow.p99_ms  # p99 alone passes it
    verdict = judge(window, Thresholds())
    assert verdict.verdict == "rollback"
    assert verdict.reasons == ["canary median latency 200.0 ms > 3x stable's on the same requests 20.0 ms"], verdict.reasons
    # A canary as fast as stable passes the same window, its stall and all; so does one 2.9x slower.
    for ms in (20.0, 58.0):
        assert judge(summarise(stable + [Sample("canary", True, ms)] * 50, pairs, CLIENT), Thresholds()).passed, ms


def call(arm: str, start_s: float, ms: float, timeout: bool = False, limit_ms: float | None = None) -> Sample:
    error = f"timeout after {limit_ms:.0f} ms" if timeout else ""
    return Sample(arm, not timeout, ms, error, timeout, arm == "stable", start_s, limit_ms)


def test_a_stall_both_arms_suffered_is_not_the_canarys_error():
    """Only the canary is held to a short timeout; stable's calls wait up to 30 s. When a stall
    slows every call in flight, the canary's time out and stable's do not, so counting those
    timeouts against the canary alone rolls back a good canary (2 stalls in 250 requests: 0.008 >
    stable's 0 + 0.005). A canary timeout beside a stable call that took at least the canary's
    limit is named but not the canary's error; one beside stable calls that answered in time is."""
    # Steady traffic: a stable call every 10 ms taking 5 ms, a canary call every 40 ms taking 5 ms.
    stable = [call("stable", k / 100, 5.0) for k in range(1000)]
    canary = [call("canary", k / 25 + 0.001, 5.0, limit_ms=250) for k in range(250)]
    pairs = [ScorePair((0.2,), (0.2,))] * 248
    # Two stalls of 400 ms at 2.0 s and 6.0 s: the stable calls in flight took 400 ms, the canary's timed out.
    stalled = {k for k in range(1000) if k / 100 in (2.0, 6.0)}
    stable = [call("stable", c.started_s, 400.0) if k in stalled else c for k, c in enumerate(stable)]
    in_stall = {k for k, c in enumerate(canary) if c.started_s in (2.001, 6.001)}
    assert len(in_stall) == 2
    shared = [call("canary", c.started_s, 250.0, timeout=True, limit_ms=250) if k in in_stall else c for k, c in enumerate(canary)]
    window = summarise(stable + shared, pairs, CLIENT)
    assert (window.canary.errors, window.canary.timeouts, window.canary.shared_stalls) == (2, 2, 2)
    verdict = judge(window, Thresholds())
    assert verdict.passed, verdict.reasons
    assert any("2 timeouts not counted" in r for r in verdict.reasons), verdict.reasons
    # The same canary timeouts while stable answered in time: the canary's own.
    own = summarise([call("stable", k / 100, 5.0) for k in range(1000)] + shared, pairs, CLIENT)
    assert own.canary.shared_stalls == 0
    assert judge(own, Thresholds()).reasons == ["canary error rate 0.0080 exceeds stable's 0.0000 by more than 0.0050"]
    # A stable call slower than usual but within the canary's limit excuses nothing.
    near = [call("stable", c.started_s, 240.0) if k in stalled else c for k, c in enumerate(stable)]
    assert summarise(near + shared, pairs, CLIENT).canary.shared_stalls == 0
    # Nor does a slow stable call that was not in flight at the same time as the canary's.
    apart = [call("stable", c.started_s + 0.3, 400.0) if k in stalled else c for k, c in enumerate(stable)]
    assert summarise(apart + shared, pairs, CLIENT).canary.shared_stalls == 0
    # A shared stall excuses only itself: 3 errors of the canary's own on 100 calls still roll back.
    mixed = [c for k, c in enumerate(shared) if k not in in_stall][:95] + [shared[k] for k in sorted(in_stall)] \
        + [Sample("canary", False, 5.0, "HTTP 500")] * 3
    mixed_window = summarise(stable + mixed, pairs[:95], CLIENT)
    assert mixed_window.canary.shared_stalls == 2 and mixed_window.canary.errors == 5
    reasons = judge(mixed_window, Thresholds()).reasons
    assert any("canary error rate 0.0300 > 0.0100 (3 of 100; 0 timeouts" in r for r in reasons), reasons


def test_a_regressions_canary_agrees_in_minutes_and_has_no_decisions():
    """Bug caught: a flights canary judged its answers in minutes against probability margins (0.1),
    so every pair disagreed, or against a fraud decision threshold that means nothing for a delay."""
    from flywheel.config import CanarySettings
    from flywheel.deploy.analysis import ScorePair, agreement, thresholds_for
    from flywheel.usecase import load_usecase
    from tests.factories import REPO

    flights = load_usecase(REPO / "usecases" / "flights").task.model_dump(mode="json")
    declared = thresholds_for(CanarySettings(), {"task": flights, "target_scale": 40.0})
    assert (declared.score_tolerance, declared.max_mean_score_difference, declared.decision_threshold) == (5.0, 2.0, None)
    undeclared = dict(flights, evaluation=dict(flights["evaluation"], canary_tolerance=None, canary_mean_difference=None))
    default = thresholds_for(CanarySettings(), {"task": undeclared, "target_scale": 40.0})
    assert (default.score_tolerance, default.max_mean_score_difference) == (4.0, 2.0)  # a tenth, a twentieth of the spread
    assert thresholds_for(CanarySettings(), {"task": {"kind": "binary"}}) == Thresholds.from_object(CanarySettings())
    close = agreement([ScorePair((20.0,), (23.0,))] * 60, declared.score_tolerance, declared.decision_threshold)
    assert close.score_agreement == 1.0 and close.decision_agreement is None and close.mean_abs_diff == 3.0
    apart = agreement([ScorePair((20.0,), (30.0,))] * 60, declared.score_tolerance, declared.decision_threshold)
    assert apart.score_agreement == 0.0


def test_a_pair_with_an_evaluated_difference_is_judged_against_it_not_against_stable():
    """A replayed held-out request carries what the candidate minus production scored offline on its
    row: the canary is held to that difference. Pairs without one are held to stable's scores."""
    pairs = [ScorePair((10.0,), (19.0,), expected=(9.0,)),   # served as evaluated: deviation 0
             ScorePair((10.0,), (16.0,), expected=(9.0,)),   # 3 less than evaluated
             ScorePair((10.0,), (30.0,), expected=(-5.0,)),  # 25 off what was evaluated
             ScorePair((4.0,), (6.0,))]                      # nothing expected: |4 - 6|
    a = agreement(pairs, score_tolerance=5.0, decision_threshold=None)
    assert (a.pairs, a.expected_pairs) == (4, 3)
    assert a.mean_abs_diff == pytest.approx((0 + 3 + 25 + 2) / 4)
    assert a.max_abs_diff == pytest.approx(25.0)
    assert a.score_agreement == pytest.approx(3 / 4)
    assert a.mean_raw_diff == pytest.approx((9 + 6 + 20 + 2) / 4)


def test_a_candidate_served_as_evaluated_passes_however_far_from_stable_and_one_that_is_not_fails():
    thresholds = Thresholds(score_tolerance=5.0, max_mean_score_difference=2.0, decision_threshold=None)
    served_as_evaluated = [ScorePair((float(p),), (p + 12.0,), expected=(12.0,)) for p in range(60)]
    window = healthy_window(agreement=agreement(served_as_evaluated, 5.0, None))
    verdict = judge(window, thresholds)
    assert verdict.passed, verdict.reasons
    assert any("within 5 of the evaluated one on 60 of them" in r and "mean |stable - canary| 12.0000" in r
               for r in verdict.reasons)
    skewed = [ScorePair((float(p),), (p + 12.0,), expected=(2.0,)) for p in range(60)]  # served 10 off its evaluation
    verdict = judge(healthy_window(agreement=agreement(skewed, 5.0, None)), thresholds)
    assert not verdict.passed
    assert any("mean |canary - stable vs the evaluated difference| 10.0000 > 2" in r for r in verdict.reasons), verdict.reasons


def test_decisions_are_judged_only_where_no_difference_was_evaluated():
    pairs = [ScorePair((0.4,), (0.6,), expected=(0.2,)), ScorePair((0.4,), (0.45,)), ScorePair((0.7,), (0.2,))]
    a = agreement(pairs, score_tolerance=0.1, decision_threshold=0.5)
    assert a.decision_agreement == pytest.approx(1 / 2)  # the first pair's flip was evaluated: not counted
    only_expected = agreement(pairs[:1], score_tolerance=0.1, decision_threshold=0.5)
    assert only_expected.decision_agreement is None
