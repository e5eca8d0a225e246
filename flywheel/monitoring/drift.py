"""Drift: how far a window's profile is from its baseline's, column by column, against the
thresholds in ``MonitoringSettings``.

Numbers are compared on the baseline's bins (the two open-ended bins included) by the population
stability index or the Jensen-Shannon distance (``settings.drift_metric``); categories by the
largest change of one bucket's share (L-infinity). A column also crosses when its null rate moves by
more than ``max_null_rate_change``. A window with fewer than ``min_rows`` rows is reported but
never judged: a few rows say nothing about a distribution.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from flywheel.config import MonitoringSettings
from flywheel.errors import DataError
from flywheel.monitoring.profile import CategoryProfile, NumberProfile, Profile

# PSI's floor for an empty bin's share. ln(a/e) is infinite when either share is 0, and an empty
# bin is common (the open-ended bins of a baseline are empty by construction): each share is
# raised to at least 1e-4 (0.01%, the floor Evidently and most PSI write-ups use), without
# renormalising, so a bin empty on both sides adds exactly 0 and a window's bin holding a share
# s where the baseline had none adds about s * ln(s / 1e-4).
PSI_FLOOR = 1e-4


def _shares(counts: Sequence[float], what: str) -> np.ndarray:
    array = np.asarray(counts, dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise DataError(f"{what} must be a non-empty list of counts per bin")
    if np.any(array < 0) or not np.all(np.isfinite(array)):
        raise DataError(f"{what} must be finite counts >= 0, not {list(counts)}")
    total = array.sum()
    if total <= 0:
        raise DataError(f"{what} has no rows: a distribution of nothing cannot be compared")
    return array / total


def _pair(expected: Sequence[float], actual: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    if len(expected) != len(actual):
        raise DataError(f"counts on different bins cannot be compared ({len(expected)} and {len(actual)} bins)")
    return _shares(expected, "the expected counts"), _shares(actual, "the actual counts")


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index of two count vectors on the same bins:
    ``sum((a - e) * ln(a / e))`` over the bins' shares, each share floored at ``PSI_FLOOR``."""
    e, a = _pair(expected, actual)
    e, a = np.maximum(e, PSI_FLOOR), np.maximum(a, PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def js_distance(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Jensen-Shannon distance (base 2: between 0 and 1) of two count vectors on the same bins:
    scipy's ``jensenshannon``. Empty bins need no floor."""
    from scipy.spatial.distance import jensenshannon

    e, a = _pair(expected, actual)
    return float(jensenshannon(e, a, base=2))


def linf(expected: Sequence[float], actual: Sequence[float]) -> float:
    """The largest absolute change of one bucket's share (counts in, shares compared)."""
    e, a = _pair(expected, actual)
    return float(np.max(np.abs(a - e)))


@dataclass
class ColumnDrift:
    """One column's verdict. ``value`` is None when there was nothing to compare (no non-null value
    in the baseline or the window); ``crossed`` is True only for a judged column whose metric or
    null-rate change is over its threshold."""

    column: str
    kind: str  # "number" | "category"
    metric: str  # "psi" | "js" | "linf"
    value: float | None
    threshold: float
    metric_crossed: bool
    null_rate_baseline: float | None
    null_rate_window: float | None
    null_rate_change: float | None  # window minus baseline, absolute units
    null_rate_threshold: float
    null_rate_crossed: bool
    out_of_range_rate: float | None  # numbers: share of non-null window values outside the baseline's range
    unseen_rate: float | None  # categories: share of non-null window values the baseline never saw (None: unknown)
    rows: int  # the window's rows
    judged: bool  # False: fewer rows than settings.min_rows, never crossed
    crossed: bool

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN never appears: missing figures are None)."""
        return asdict(self)


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _number_metric(base: NumberProfile, window: NumberProfile, settings: MonitoringSettings) -> tuple[str, float | None, float]:
    metric = settings.drift_metric
    threshold = settings.max_psi if metric == "psi" else settings.max_js
    if base.count == 0 or window.count == 0:
        return metric, None, threshold
    measure = psi if metric == "psi" else js_distance
    return metric, measure(base.bins, window.bins), threshold


def compare(baseline: Profile, window: Profile, settings: MonitoringSettings) -> list[ColumnDrift]:
    """Compare each of the baseline's columns in ``window`` (profiled on that baseline) and say
    which crossed their thresholds. A window with fewer than ``settings.min_rows`` rows is reported
    with ``judged=False`` and nothing crossed."""
    judged = window.rows >= settings.min_rows
    results = []
    for name, base in baseline.columns.items():
        seen = window.columns.get(name)
        if seen is None:
            raise DataError(f"column {name!r} of the baseline is not in the window's profile: profile the window "
                            "with that baseline")
        if seen.kind != base.kind or seen.basis != base.basis:
            raise DataError(f"column {name!r} of the window was not profiled on this baseline (other edges or "
                            "vocabulary): profile the window with the baseline it is compared with")
        out_of_range_rate = unseen_rate = None
        if isinstance(base, NumberProfile):
            assert isinstance(seen, NumberProfile)
            metric, value, threshold = _number_metric(base, seen, settings)
            out_of_range_rate = _rate(seen.out_of_range, seen.count)
        else:
            assert isinstance(base, CategoryProfile) and isinstance(seen, CategoryProfile)
            metric, threshold = "linf", settings.max_category_linf
            value = linf(base.counts, seen.counts) if base.count and seen.count else None
            unseen_rate = None if seen.unseen is None else _rate(seen.unseen, seen.count)
        null_base = _rate(base.nulls, base.count + base.nulls)
        null_window = _rate(seen.nulls, seen.count + seen.nulls)
        null_change = None if null_base is None or null_window is None else null_window - null_base
        metric_crossed = judged and value is not None and value > threshold
        null_crossed = judged and null_change is not None and abs(null_change) > settings.max_null_rate_change
        if value is not None and not math.isfinite(value):
            raise DataError(f"column {name!r}: the drift metric is {value}")
        results.append(ColumnDrift(
            column=name, kind=base.kind, metric=metric, value=value, threshold=threshold,
            metric_crossed=metric_crossed, null_rate_baseline=null_base, null_rate_window=null_window,
            null_rate_change=null_change, null_rate_threshold=settings.max_null_rate_change,
            null_rate_crossed=null_crossed, out_of_range_rate=out_of_range_rate, unseen_rate=unseen_rate,
            rows=window.rows, judged=judged, crossed=metric_crossed or null_crossed))
    return results
