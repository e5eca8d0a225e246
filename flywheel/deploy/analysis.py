"""Judging a canary window, the one judge of both targets: what was seen, summarised, against thresholds.

Pure: no I/O and no clock. Locally the splitting proxy (:mod:`flywheel.deploy.traffic`) records
raw samples per arm (one :class:`Sample` per upstream call) and the score pairs of shadowed
requests; on KServe :func:`flywheel.deploy.canary.replay` records the same for requests sent to
both revisions. :func:`summarise` turns them into a :class:`WindowObservations`, and :func:`judge`
compares that with :class:`Thresholds`. The same samples always give the same verdict.

The thresholds are ``settings.deploy.canary``'s (``Thresholds.from_object(settings.deploy.canary)``),
with the same defaults.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, Protocol, Sequence

import numpy as np

PASS, ROLLBACK = "pass", "rollback"


@dataclass(frozen=True)
class Thresholds:
    """What a canary window must show to pass. Defaults are ``CanarySettings``' defaults."""

    min_requests: int = 50  # canary requests in the window; fewer judges nothing: rollback
    max_error_rate: float = 0.01  # the canary's failed calls / calls (5xx, connection errors, timeouts)
    max_error_rate_increase: float = 0.005  # above the stable version's error rate
    max_p99_latency_ms: float = 250.0  # the canary's p99, absolute
    max_p99_latency_ratio: float = 2.0  # the canary's p99 / the stable version's
    # The canary's median / the stable version's. A window's p99 over some 50 calls is about its
    # slowest call, so one stalled stable call lifts stable's p99 enough to hide a canary that is
    # slow on every call; the median is not moved by a stall.
    max_p50_latency_ratio: float = 3.0
    score_tolerance: float = 0.1  # two scores closer than this agree
    min_score_agreement: float = 0.9  # share of paired scores that agree within the tolerance
    max_mean_score_difference: float = 0.05  # mean |p_stable - p_canary| over the pairs
    decision_threshold: float | None = 0.5  # a binary score at or above it is a positive decision (None: no decisions)
    min_decision_agreement: float = 0.95  # share of pairs with the same decision

    @classmethod
    def from_object(cls, source: Any) -> "Thresholds":
        """Thresholds from any object with (some of) these attributes, e.g. ``settings.deploy.canary``;
        the ones it lacks keep their defaults."""
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls) if hasattr(source, f.name)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def thresholds_for(source: Any, model_meta: dict[str, Any]) -> Thresholds:
    """The canary's thresholds for a model: ``settings.deploy.canary``'s, with the agreement checks in
    the model's own output units. A binary model's scores are probabilities: the settings as they
    are. A regression's answers are in the label's units: two agree within the use case's
    ``canary_tolerance`` (default a tenth of the training label's spread), on average within its
    ``canary_mean_difference`` (default a twentieth); there are no decisions to agree on. A
    multiclass model's answers are probabilities per class: the settings' margins, no decisions."""
    thresholds = Thresholds.from_object(source)
    task = model_meta.get("task") or {}
    kind = task.get("kind", "binary")
    if kind == "binary":
        return thresholds
    rules = task.get("evaluation") or {}
    tolerance, mean = thresholds.score_tolerance, thresholds.max_mean_score_difference
    if kind == "regression":
        scale = float(model_meta.get("target_scale") or 1.0)
        tolerance = rules.get("canary_tolerance") or 0.1 * scale
        mean = rules.get("canary_mean_difference") or 0.05 * scale
    else:
        tolerance = rules.get("canary_tolerance") or tolerance
        mean = rules.get("canary_mean_difference") or mean
    return replace(thresholds, score_tolerance=float(tolerance), max_mean_score_difference=float(mean),
                   decision_threshold=None)


class ThresholdsLike(Protocol):
    min_requests: int
    max_error_rate: float
    max_error_rate_increase: float
    max_p99_latency_ms: float
    max_p99_latency_ratio: float
    max_p50_latency_ratio: float
    score_tolerance: float
    min_score_agreement: float


@dataclass(frozen=True)
class Sample:
    """One upstream call: to which arm, whether it failed (and how), and how long it took."""

    arm: Literal["stable", "canary"]
    ok: bool
    latency_ms: float
    error: str = ""  # "HTTP 503", "timeout after 250 ms", "connection: ...", "unreadable scores"
    timeout: bool = False
    shadow: bool = False  # a stable call made alongside a canary call, for the same request
    started_s: float | None = None  # when the call was sent (a monotonic clock), where known
    limit_ms: float | None = None  # the timeout the call was held to, where known


@dataclass(frozen=True)
class ScorePair:
    """The scores stable and canary gave the same request (one per instance of the body), and, for a
    replayed held-out request whose difference the evaluation measured, ``expected``: the candidate's
    minus production's scores on that row offline (point-in-time features, the evaluated models)."""

    stable: tuple[float, ...]
    canary: tuple[float, ...]
    expected: tuple[float, ...] | None = None


@dataclass
class ArmStats:
    """One arm's calls in a window. Latency percentiles are over answered calls (None: none answered)."""

    requests: int
    errors: int
    timeouts: int
    error_rate: float
    p50_ms: float | None
    p99_ms: float | None
    error_examples: list[str] = field(default_factory=list)
    shared_stalls: int = 0  # of the errors: timeouts in a stall stable's calls suffered too (see shared_stalls)

    @property
    def own_error_rate(self) -> float:
        """The error rate without the shared stalls: the failures that are the arm's own."""
        return max(0.0, self.error_rate - self.shared_stalls / self.requests) if self.requests else self.error_rate


@dataclass
class Agreement:
    """How the canary's scores compare with stable's on the requests both answered."""

    pairs: int  # scored instances both arms answered
    mean_abs_diff: float | None
    max_abs_diff: float | None
    score_agreement: float | None  # share with |p_stable - p_canary| <= score_tolerance
    decision_agreement: float | None  # share with the same decision at decision_threshold
    # Of the pairs, those judged against the difference the evaluation measured on the same row
    # (|(canary - stable) - (candidate - production offline)|): the canary must differ from stable as
    # the evaluated models did, not agree with a model the gate found worse.
    expected_pairs: int = 0
    mean_raw_diff: float | None = None  # mean |p_stable - p_canary|, whatever was expected
    raw_score_agreement: float | None = None  # share with |p_stable - p_canary| <= score_tolerance, whatever was expected


@dataclass
class WindowObservations:
    """What one window showed. ``stable``: every call to stable; ``stable_shadow``: only the calls
    made alongside a canary call for the same request, at the same moment (the fair latency
    comparison: a load spike slows both). ``client``: what the proxy's clients got (``failures``:
    answers of 5xx or no answer at all, whichever arm they came from; ``fallbacks``: canary failures
    answered by stable instead)."""

    stable: ArmStats
    canary: ArmStats
    agreement: Agreement
    client: dict[str, int]
    canary_percent: int = 0
    stable_shadow: ArmStats | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def arm_stats(samples: Sequence[Sample], examples: int = 3) -> ArmStats:
    """Requests, errors and latency percentiles of one arm's samples."""
    latencies = np.array([s.latency_ms for s in samples if s.ok], dtype=float)
    errors = [s for s in samples if not s.ok]
    distinct: list[str] = []
    for s in errors:
        if s.error not in distinct and len(distinct) < examples:
            distinct.append(s.error)
    return ArmStats(
        requests=len(samples),
        errors=len(errors),
        timeouts=sum(s.timeout for s in samples),
        error_rate=len(errors) / len(samples) if samples else 0.0,
        p50_ms=_percentile(latencies, 50),
        p99_ms=_percentile(latencies, 99),
        error_examples=distinct,
    )


def agreement(pairs: Sequence[ScorePair], score_tolerance: float, decision_threshold: float | None) -> Agreement:
    """Score and decision agreement over every instance of every pair of equal length (no decision
    agreement without a threshold: a regression or multiclass model's answers are not decisions)."""
    stable: list[float] = []
    canary: list[float] = []
    expected: list[float] = []  # NaN: nothing expected (0 difference: agree with stable)
    for pair in pairs:
        if len(pair.stable) == len(pair.canary):
            stable.extend(pair.stable)
            canary.extend(pair.canary)
            known = pair.expected is not None and len(pair.expected) == len(pair.canary)
            expected.extend(pair.expected if known else [math.nan] * len(pair.canary))  # type: ignore[arg-type]
    if not stable:
        return Agreement(0, None, None, None, None)
    s, c, e = np.array(stable, dtype=float), np.array(canary, dtype=float), np.array(expected, dtype=float)
    judged = ~np.isnan(e)
    raw = np.abs(s - c)
    diff = np.where(judged, np.abs((c - s) - np.where(judged, e, 0.0)), raw)
    # Decisions are judged where nothing was expected: where the evaluation measured the difference,
    # the scores' check says whether the canary decides as the evaluated candidate did.
    decided = ~judged
    return Agreement(
        pairs=len(s),
        mean_abs_diff=float(diff.mean()),
        max_abs_diff=float(diff.max()),
        score_agreement=float((diff <= score_tolerance).mean()),
        decision_agreement=(None if decision_threshold is None or not decided.any()
                            else float(((s[decided] >= decision_threshold) == (c[decided] >= decision_threshold)).mean())),
        expected_pairs=int(judged.sum()),
        mean_raw_diff=float(raw.mean()),
        raw_score_agreement=float((raw <= score_tolerance).mean()),
    )


def shared_stalls(samples: Sequence[Sample]) -> int:
    """Canary timeouts in a stall that stable's calls suffered too: for each canary call that timed
    out, is there a stable call in flight at the same time that took at least the canary's limit
    (or timed out itself)? Then the moment was slow (the machine, the node, the network), not the
    canary. Only the canary is held to a short timeout (stable's calls wait up to 30 s), so
    without this a stall both arms see is counted against the canary alone. A canary that stalls
    on its own has no such stable call beside it. Samples without times count as not shared."""
    slow = [(s.started_s, s.started_s + s.latency_ms / 1000, s.latency_ms, s.timeout)
            for s in samples if s.arm == "stable" and s.started_s is not None and (s.ok or s.timeout)]
    if not slow:
        return 0
    start, end, latency, timed_out = (np.array(column) for column in zip(*slow))
    count = 0
    for c in samples:
        if c.arm != "canary" or not c.timeout or c.started_s is None:
            continue
        limit_ms = c.limit_ms if c.limit_ms is not None else c.latency_ms
        overlapping = (start < c.started_s + c.latency_ms / 1000) & (end > c.started_s)
        count += bool((overlapping & (timed_out | (latency >= limit_ms))).any())
    return count


def summarise(samples: Sequence[Sample], pairs: Sequence[ScorePair], client: dict[str, int],
              thresholds: Thresholds | None = None, canary_percent: int = 0) -> WindowObservations:
    """One window's samples and score pairs as observations (tolerance and decision threshold from
    ``thresholds``)."""
    t = thresholds or Thresholds()
    return WindowObservations(
        stable=arm_stats([s for s in samples if s.arm == "stable"]),
        canary=replace(arm_stats([s for s in samples if s.arm == "canary"]), shared_stalls=shared_stalls(samples)),
        agreement=agreement(pairs, t.score_tolerance, t.decision_threshold),
        client=dict(client),
        canary_percent=canary_percent,
        stable_shadow=arm_stats([s for s in samples if s.arm == "stable" and s.shadow]),
    )


@dataclass(frozen=True)
class Judgement:
    """``pass`` or ``rollback``, with the reasons: every broken threshold for a rollback, every
    check made for a pass."""

    verdict: Literal["pass", "rollback"]
    reasons: list[str]

    @property
    def passed(self) -> bool:
        return self.verdict == PASS


def judge(observations: WindowObservations, thresholds: Thresholds | ThresholdsLike) -> Judgement:
    """Judge one window. The canary fails it by being unjudgeable (too few requests, no answered
    pairs), by erring (absolute, or above stable's), by being slow (p99 absolute, or against
    stable's; the median against stable's), or by disagreeing with stable's scores (within the tolerance, on the mean difference,
    or on the fraud decision)."""
    t = thresholds if isinstance(thresholds, Thresholds) else Thresholds.from_object(thresholds)
    c, s, a = observations.canary, observations.stable, observations.agreement
    broken: list[str] = []
    checked: list[str] = []

    def check(ok: bool, good: str, bad: str) -> None:
        (checked if ok else broken).append(good if ok else bad)

    check(c.requests >= t.min_requests, f"{c.requests} canary requests >= {t.min_requests}",
          f"only {c.requests} requests reached the canary (at least {t.min_requests} are needed to judge)")
    # Timeouts stable suffered on the same requests are the moment's, not the canary's: they are
    # named in the reasons but judged as neither arm's error.
    rate = c.own_error_rate
    excused = (f"; {c.shared_stalls} timeouts not counted: stable's calls for the same requests did not answer "
               f"within the canary's limit either") if c.shared_stalls else ""
    check(rate <= t.max_error_rate, f"canary error rate {rate:.4f} <= {t.max_error_rate:.4f}{excused}",
          f"canary error rate {rate:.4f} > {t.max_error_rate:.4f} ({c.errors - c.shared_stalls} of {c.requests}; "
          f"{c.timeouts - c.shared_stalls} timeouts; e.g. {', '.join(c.error_examples) or '-'}){excused}")
    check(rate <= s.error_rate + t.max_error_rate_increase,
          f"canary error rate within {t.max_error_rate_increase:.4f} of stable's {s.error_rate:.4f}",
          f"canary error rate {rate:.4f} exceeds stable's {s.error_rate:.4f} by more than {t.max_error_rate_increase:.4f}")
    if c.p99_ms is None:
        if c.requests:
            broken.append(f"the canary answered none of its {c.requests} requests ({c.timeouts} timeouts): no latency to judge")
    else:
        check(c.p99_ms <= t.max_p99_latency_ms, f"canary p99 {c.p99_ms:.1f} ms <= {t.max_p99_latency_ms:.1f} ms",
              f"canary p99 latency {c.p99_ms:.1f} ms > {t.max_p99_latency_ms:.1f} ms")
        # Against stable's calls for the same requests at the same moments when there are any.
        shadow = observations.stable_shadow
        base, which = (shadow.p99_ms, "stable's on the same requests") if shadow is not None and shadow.p99_ms is not None \
            else (s.p99_ms, "stable's")
        if base is not None:
            check(c.p99_ms <= base * t.max_p99_latency_ratio,
                  f"canary p99 {c.p99_ms:.1f} ms <= {t.max_p99_latency_ratio:g}x {which} {base:.1f} ms",
                  f"canary p99 latency {c.p99_ms:.1f} ms > {t.max_p99_latency_ratio:g}x {which} {base:.1f} ms")
        median = shadow.p50_ms if shadow is not None and shadow.p50_ms is not None else s.p50_ms
        if median is not None and c.p50_ms is not None:
            check(c.p50_ms <= median * t.max_p50_latency_ratio,
                  f"canary p50 {c.p50_ms:.1f} ms <= {t.max_p50_latency_ratio:g}x {which} {median:.1f} ms",
                  f"canary median latency {c.p50_ms:.1f} ms > {t.max_p50_latency_ratio:g}x {which} {median:.1f} ms")
    if a.pairs == 0:
        if c.requests:
            broken.append("no request was answered by both stable and canary: score agreement cannot be judged")
    else:
        assert a.score_agreement is not None and a.mean_abs_diff is not None
        # Where the evaluation measured the two models' difference on the same row, the canary is
        # held to that difference (served as evaluated), not to stable's scores.
        versus = (f" (the difference from stable's within {t.score_tolerance:g} of the evaluated one on "
                  f"{a.expected_pairs} of them; mean |stable - canary| {a.mean_raw_diff:.4f})") if a.expected_pairs else ""
        what = "canary - stable vs the evaluated difference" if a.expected_pairs == a.pairs else "stable - canary"
        check(a.score_agreement >= t.min_score_agreement,
              f"scores agree within {t.score_tolerance:g} on {a.score_agreement:.1%} of {a.pairs} pairs{versus}",
              f"scores agree within {t.score_tolerance:g} on {a.score_agreement:.1%} of {a.pairs} pairs "
              f"(< {t.min_score_agreement:.1%}){versus}")
        check(a.mean_abs_diff <= t.max_mean_score_difference,
              f"mean |{what}| {a.mean_abs_diff:.4f} <= {t.max_mean_score_difference:g}",
              f"mean |{what}| {a.mean_abs_diff:.4f} > {t.max_mean_score_difference:g}")
        if a.decision_agreement is not None and t.decision_threshold is not None:
            check(a.decision_agreement >= t.min_decision_agreement,
                  f"decisions (at {t.decision_threshold:g}) agree on {a.decision_agreement:.1%} of {a.pairs} pairs",
                  f"decisions (at {t.decision_threshold:g}) agree on only {a.decision_agreement:.1%} of {a.pairs} pairs "
                  f"(< {t.min_decision_agreement:.1%})")
    return Judgement(ROLLBACK, broken) if broken else Judgement(PASS, checked)


def finite(value: Any) -> Any:
    """JSON-safe: NaN and infinities become None, recursively."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
