"""Drift: PSI, JS and L-infinity against oracles computed naively on the raw rows; the real default
thresholds leave same-distribution windows alone and catch a shifted one."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from flywheel.config import MonitoringSettings
from flywheel.errors import DataError
from flywheel.monitoring.drift import PSI_FLOOR, compare, js_distance, linf, psi
from flywheel.monitoring.profile import profile_table

KINDS = {"amount": "number", "hour": "number", "merchant": "category"}
MERCHANTS, MERCHANT_P = ["grocery", "fuel", "online", "travel"], [0.4, 0.3, 0.2, 0.1]


def rows(rng: np.random.Generator, n: int, amount_scale: float = 1.0, new_share: float = 0.0) -> pd.DataFrame:
    merchant = rng.choice(MERCHANTS, size=n, p=MERCHANT_P).astype(object)
    merchant[rng.random(n) < new_share] = "brand-new"
    amount = rng.lognormal(3, 1, n) * amount_scale
    amount[rng.random(n) < 0.02] = np.nan
    return pd.DataFrame({"amount": amount, "hour": rng.integers(0, 24, n).astype(float), "merchant": merchant})


def naive_counts(base: np.ndarray, window: np.ndarray, bins: int) -> tuple[list[int], list[int]]:
    """Bin counts written out by hand: below min, the quantile bins (last one closed), above max."""
    base, window = base[~np.isnan(base)], window[~np.isnan(window)]
    edges = sorted(set(np.quantile(base, np.linspace(0, 1, bins + 1)).tolist()))

    def count(values):
        out = [int(np.sum(values < edges[0]))]
        for i in range(len(edges) - 1):
            last = i == len(edges) - 2
            upper = values <= edges[i + 1] if last else values < edges[i + 1]
            out.append(int(np.sum((values >= edges[i]) & upper)))
        out.append(int(np.sum(values > edges[-1])))
        return out

    return count(base), count(window)


def naive_psi(expected: list[int], actual: list[int]) -> float:
    total_e, total_a, value = sum(expected), sum(actual), 0.0
    for e, a in zip(expected, actual):
        e_share, a_share = max(e / total_e, PSI_FLOOR), max(a / total_a, PSI_FLOOR)
        value += (a_share - e_share) * math.log(a_share / e_share)
    return value


def naive_js(expected: list[int], actual: list[int]) -> float:
    p = [e / sum(expected) for e in expected]
    q = [a / sum(actual) for a in actual]
    divergence = 0.0
    for pi, qi in zip(p, q):
        mi = (pi + qi) / 2
        divergence += 0.5 * (pi * math.log2(pi / mi) if pi else 0) + 0.5 * (qi * math.log2(qi / mi) if qi else 0)
    return math.sqrt(divergence)


def by_column(results):
    return {result.column: result for result in results}


@pytest.mark.parametrize("metric", ["psi", "js"])
def test_number_drift_matches_a_naive_oracle_on_the_raw_rows(metric: str) -> None:
    rng = np.random.default_rng(11)
    base, window = rows(rng, 5000), rows(rng, 3000, amount_scale=1.3)
    baseline = profile_table(base, KINDS)
    result = by_column(compare(baseline, profile_table(window, KINDS, baseline=baseline),
                               MonitoringSettings(drift_metric=metric)))["amount"]
    expected, actual = naive_counts(base["amount"].to_numpy(), window["amount"].to_numpy(), 10)
    oracle = naive_psi(expected, actual) if metric == "psi" else naive_js(expected, actual)
    assert result.metric == metric
    assert result.value == pytest.approx(oracle, rel=1e-9)
    assert result.out_of_range_rate == pytest.approx(
        (actual[0] + actual[-1]) / sum(actual), rel=1e-12)


def test_category_linf_and_unseen_rate_match_a_naive_oracle() -> None:
    rng = np.random.default_rng(12)
    base, window = rows(rng, 4000), rows(rng, 2000, new_share=0.05)
    baseline = profile_table(base, KINDS)
    result = by_column(compare(baseline, profile_table(window, KINDS, baseline=baseline), MonitoringSettings()))["merchant"]
    base_share, window_share = base["merchant"].value_counts(normalize=True), window["merchant"].value_counts(normalize=True)
    # The vocabulary holds every baseline value, so "other" is exactly the new one.
    oracle = max(abs(window_share.get(m, 0) - base_share.get(m, 0)) for m in set(base_share.index) | {"brand-new"})
    assert result.metric == "linf" and result.value == pytest.approx(oracle, rel=1e-12)
    assert result.unseen_rate == pytest.approx(window_share["brand-new"], rel=1e-12)


def test_psi_floors_empty_bins_instead_of_dividing_by_zero() -> None:
    assert psi([10, 0, 5], [20, 0, 10]) == 0.0
    share = 0.5
    assert psi([10, 0], [5, 5]) == pytest.approx((share - 1) * math.log(share) + (share - PSI_FLOOR) * math.log(share / PSI_FLOOR))
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    assert linf([1, 1, 2], [2, 1, 1]) == pytest.approx(0.25)


def test_counts_on_different_bins_or_with_no_rows_are_refused() -> None:
    with pytest.raises(DataError, match="different bins"):
        psi([1, 2], [1, 2, 3])
    with pytest.raises(DataError, match="no rows"):
        js_distance([0, 0], [1, 2])


@pytest.mark.parametrize("metric", ["psi", "js"])
def test_same_distribution_windows_stay_under_the_default_thresholds(metric: str) -> None:
    # The real defaults (max_psi 0.2, max_js 0.1, max_category_linf 0.1, min_rows 500), windows of
    # exactly min_rows rows: the smallest judged window is the noisiest.
    settings = MonitoringSettings(drift_metric=metric)
    defaults = MonitoringSettings()
    assert (settings.max_psi, settings.max_js, settings.max_category_linf, settings.min_rows) == (
        defaults.max_psi, defaults.max_js, defaults.max_category_linf, defaults.min_rows)
    rng = np.random.default_rng(13)
    baseline = profile_table(rows(rng, 20_000), KINDS, bins=settings.bins)
    for _ in range(20):
        window = profile_table(rows(rng, settings.min_rows), KINDS, baseline=baseline)
        results = compare(baseline, window, settings)
        assert all(result.judged for result in results)
        assert not [result.to_dict() for result in results if result.crossed]


@pytest.mark.parametrize("metric", ["psi", "js"])
def test_shifted_window_crosses_the_default_thresholds(metric: str) -> None:
    settings = MonitoringSettings(drift_metric=metric)
    rng = np.random.default_rng(14)
    baseline = profile_table(rows(rng, 20_000), KINDS, bins=settings.bins)
    window = profile_table(rows(rng, 2000, amount_scale=3, new_share=0.2), KINDS, baseline=baseline)
    results = by_column(compare(baseline, window, settings))
    assert results["amount"].crossed and results["amount"].metric_crossed
    assert results["merchant"].crossed and results["merchant"].unseen_rate == pytest.approx(0.2, abs=0.03)
    assert not results["hour"].crossed  # what did not move is not blamed


def test_a_window_under_min_rows_is_reported_but_never_crossed() -> None:
    settings = MonitoringSettings()
    rng = np.random.default_rng(15)
    baseline = profile_table(rows(rng, 5000), KINDS)
    window = profile_table(rows(rng, settings.min_rows - 1, amount_scale=3, new_share=0.5), KINDS, baseline=baseline)
    results = compare(baseline, window, settings)
    assert all(not result.judged and not result.crossed for result in results)
    assert by_column(results)["amount"].value > settings.max_psi  # still measured, for the report
    assert all(result.rows == settings.min_rows - 1 for result in results)


def test_a_null_rate_change_crosses_on_its_own() -> None:
    settings = MonitoringSettings()
    rng = np.random.default_rng(16)
    base = rows(rng, 5000)
    baseline = profile_table(base, KINDS)
    window = base.sample(2000, random_state=1).reset_index(drop=True)
    window.loc[:599, "hour"] = np.nan  # 30% null where the baseline had none
    result = by_column(compare(baseline, profile_table(window, KINDS, baseline=baseline), settings))["hour"]
    assert result.null_rate_baseline == 0 and result.null_rate_window == pytest.approx(0.3)
    assert result.null_rate_crossed and result.crossed and not result.metric_crossed


def test_an_all_null_window_column_has_no_metric_but_its_null_rate_crosses() -> None:
    rng = np.random.default_rng(17)
    baseline = profile_table(rows(rng, 2000), KINDS)
    window = rows(rng, 1000)
    window["amount"] = np.nan
    result = by_column(compare(baseline, profile_table(window, KINDS, baseline=baseline), MonitoringSettings()))["amount"]
    assert result.value is None and result.out_of_range_rate is None
    assert result.null_rate_window == 1.0 and result.crossed


def test_column_drift_serialises_to_json() -> None:
    rng = np.random.default_rng(18)
    baseline = profile_table(rows(rng, 2000), KINDS)
    results = compare(baseline, profile_table(rows(rng, 600), KINDS, baseline=baseline), MonitoringSettings())
    data = json.loads(json.dumps([result.to_dict() for result in results], allow_nan=False))
    assert {item["column"] for item in data} == set(KINDS)
    assert set(data[0]) >= {"metric", "value", "threshold", "crossed", "null_rate_change", "rows", "judged"}


def test_a_window_of_another_baseline_is_refused() -> None:
    rng = np.random.default_rng(19)
    first, second = profile_table(rows(rng, 1000), KINDS), profile_table(rows(rng, 1000), KINDS)
    with pytest.raises(DataError, match="was not profiled on this baseline"):
        compare(first, profile_table(rows(rng, 600), KINDS, baseline=second), MonitoringSettings())
