"""Profiles: a window's profile merges exactly with another's into the profile of their union, it
serialises and reads back exactly, and the edge cases (all null, constant, NaN, empty, unseen
categories, different baselines) say what they mean."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flywheel.errors import DataError
from flywheel.monitoring import profile as profile_module
from flywheel.monitoring.profile import CategoryProfile, NumberProfile, Profile, profile_table

KINDS = {"amount": "number", "merchant": "category"}


def table(amounts: list, merchants: list) -> pa.Table:
    return pa.table({"amount": pa.array(amounts, pa.float64()), "merchant": pa.array(merchants, pa.string())})


def without_sketches(profile: Profile) -> dict:
    data = profile.to_dict()
    for column in data["columns"].values():
        column.pop("sketch", None)
    return data


def rank_error_ok(values: np.ndarray, estimate: float, q: float, eps: float) -> bool:
    """The estimate's rank in ``values`` is within ``eps`` of ``q`` (ranks of equal values span a range)."""
    below, at_or_below = np.mean(values < estimate), np.mean(values <= estimate)
    return below - eps <= q <= at_or_below + eps


# Multiples of 1/8 with |x| < 2^20: every sum of a few hundred of them is exact in float64, so
# "exact" can be asserted for sums too. None is a null, NaN is a null as well.
amounts = st.one_of(st.integers(-(2 ** 23), 2 ** 23).map(lambda n: n / 8), st.none(), st.just(float("nan")))
merchants = st.one_of(st.sampled_from(["m1", "m2", "m3", "m4", "new", "other"]), st.none())
rows = st.lists(st.tuples(amounts, merchants), max_size=300)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base_rows=st.lists(st.tuples(amounts, st.sampled_from(["m1", "m2", "m3", "other"])), min_size=1, max_size=200),
       first=rows, second=rows, bins=st.integers(1, 12), max_categories=st.integers(1, 4))
def test_merging_two_windows_equals_profiling_their_union(base_rows, first, second, bins, max_categories) -> None:
    baseline = profile_table(table(*zip(*base_rows)), KINDS, bins=bins, max_categories=max_categories)

    def window(pairs):
        return profile_table(table(*zip(*pairs)) if pairs else table([], []), KINDS, baseline=baseline)

    merged = window(first).merge(window(second))
    union = window(first + second)
    assert without_sketches(merged) == without_sketches(union)
    present = np.array([a for a, _ in first + second if a is not None and a == a], dtype=float)
    column = merged.columns["amount"]
    assert isinstance(column, NumberProfile)
    if present.size == 0:
        assert column.quantile(0.5) is None
        return
    eps = column.rank_error()
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert rank_error_ok(present, column.quantile(q), q, eps), q


def test_merged_quantiles_stay_within_kll_rank_error_on_large_windows() -> None:
    # Beyond a few hundred values KLL compacts: the merged sketch answers within its documented error.
    rng = np.random.default_rng(7)
    values = rng.lognormal(3, 1, 60_000)
    baseline = profile_table(table(list(values[:5000]), ["m1"] * 5000), KINDS)
    parts = [profile_table(table(list(chunk), ["m1"] * chunk.size), KINDS, baseline=baseline)
             for chunk in np.array_split(values, 3)]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    column = merged.columns["amount"]
    assert column.count == values.size and column.sum == pytest.approx(values.sum(), rel=1e-12)
    eps = column.rank_error()
    assert 0 < eps < 0.02  # k=200: about 1.7%
    for q in np.linspace(0.05, 0.95, 19):
        assert rank_error_ok(values, column.quantile(q), q, eps), q


def test_profile_round_trips_through_json_exactly() -> None:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"amount": np.r_[rng.normal(size=500), [np.nan, np.inf]],
                          "merchant": [f"m{i % 7}" for i in range(501)] + [None]})
    baseline = profile_table(frame, KINDS, bins=5, max_categories=3)
    window = profile_table(frame.iloc[::2], KINDS, baseline=baseline)
    for profile in (baseline, window):
        text = json.dumps(profile.to_dict(), allow_nan=True)
        again = Profile.from_dict(json.loads(text))
        assert again == profile
        assert again.columns["amount"].quantile(0.5) == profile.columns["amount"].quantile(0.5)
        assert json.dumps(again.to_dict()) == text


def test_a_profile_in_another_format_is_refused() -> None:
    data = profile_table(table([1.0], ["m1"]), KINDS).to_dict()
    data["format"] = 99
    with pytest.raises(DataError, match="format 99"):
        Profile.from_dict(data)


def test_baseline_edges_are_its_quantiles_and_its_min_and_max() -> None:
    values = np.arange(1, 101, dtype=float)
    column = profile_table(table(list(values), ["m1"] * 100), KINDS, bins=4).columns["amount"]
    assert column.edges == list(np.quantile(values, [0, 0.25, 0.5, 0.75, 1]))
    assert (column.low, column.high) == (1.0, 100.0)
    # Open-ended bins empty; [1, 25.75), [25.75, 50.5), [50.5, 75.25), [75.25, 100] (the last closed).
    assert column.bins == [0, 25, 25, 25, 25, 0]
    assert column.out_of_range == 0


def test_window_values_outside_the_baseline_range_fill_the_open_bins_and_count_as_out_of_range() -> None:
    baseline = profile_table(table([0.0, 1.0, 2.0, 3.0, 4.0], ["m1"] * 5), KINDS, bins=2)
    window = profile_table(table([-1.0, 0.0, 4.0, 4.5, 9.0, None], ["m1"] * 6), KINDS, baseline=baseline)
    column = window.columns["amount"]
    assert column.edges == [0.0, 2.0, 4.0]
    assert column.bins == [1, 1, 1, 2]  # -1 | 0 | 4 (the top edge is inside) | 4.5, 9
    assert column.out_of_range == 3
    assert (column.min, column.max, column.sum, column.nulls) == (-1.0, 9.0, 16.5, 1)


def test_all_null_column_profiles_nulls_and_no_edges() -> None:
    baseline = profile_table(table([None, float("nan"), None], ["m1", None, None]), KINDS)
    amount = baseline.columns["amount"]
    assert (amount.count, amount.nulls, amount.edges, amount.bins) == (0, 3, [], [0])
    assert amount.min is None and amount.max is None and amount.sum == 0 and amount.quantile(0.5) is None
    window = profile_table(table([5.0, None], ["m1", "m1"]), KINDS, baseline=baseline).columns["amount"]
    # A baseline with no value has no range: every value of a window is out of it.
    assert (window.bins, window.out_of_range) == ([1], 1)


def test_constant_column_has_one_edge_and_one_inner_bin() -> None:
    baseline = profile_table(table([3.0] * 50, ["m1"] * 50), KINDS, bins=10)
    column = baseline.columns["amount"]
    assert column.edges == [3.0]
    assert column.bins == [0, 50, 0]
    window = profile_table(table([2.0, 3.0, 3.0, 4.0], ["m1"] * 4), KINDS, baseline=baseline).columns["amount"]
    assert window.bins == [1, 2, 1] and window.out_of_range == 2


def test_nan_and_null_both_count_as_nulls_and_never_reach_the_bins() -> None:
    frame = pd.DataFrame({"amount": [1.0, np.nan, None, 2.0], "merchant": ["m1", None, np.nan, "m2"]})
    baseline = profile_table(frame, KINDS)
    assert (baseline.columns["amount"].count, baseline.columns["amount"].nulls) == (2, 2)
    assert sum(baseline.columns["amount"].bins) == 2 and baseline.columns["amount"].sum == 3.0
    assert (baseline.columns["merchant"].count, baseline.columns["merchant"].nulls) == (2, 2)


def test_empty_window_profiles_zero_rows_and_merges_as_a_no_op() -> None:
    baseline = profile_table(table([1.0, 2.0, 3.0], ["m1", "m2", "m1"]), KINDS, bins=2)
    empty = profile_table(table([], []), KINDS, baseline=baseline)
    assert empty.rows == 0
    assert empty.columns["amount"].bins == [0, 0, 0, 0] and empty.columns["amount"].quantile(0.5) is None
    assert empty.columns["merchant"].counts == [0, 0, 0] and empty.columns["merchant"].unseen == 0
    full = profile_table(table([1.0, 9.0], ["m2", "zz"]), KINDS, baseline=baseline)
    assert empty.merge(full) == full
    assert full.merge(empty) == full


def test_categories_never_seen_in_the_baseline_count_as_unseen_and_other() -> None:
    baseline = profile_table(table([1.0] * 6, ["a", "a", "a", "b", "b", "c"]), KINDS, max_categories=2)
    category = baseline.columns["merchant"]
    assert category.vocabulary == ["a", "b"] and category.counts == [3, 2, 1]
    assert category.known == ["a", "b", "c"] and category.unseen == 0
    window = profile_table(table([1.0] * 5, ["a", "c", "new", "new", None]), KINDS, baseline=baseline)
    seen = window.columns["merchant"]
    # "c" is outside the vocabulary ("other") but the baseline saw it; "new" it never saw.
    assert seen.counts == [1, 0, 3] and seen.unseen == 2 and seen.nulls == 1
    assert seen.shares() == [0.25, 0.0, 0.75]


def test_a_value_spelled_other_is_kept_apart_from_the_other_bucket() -> None:
    baseline = profile_table(table([1.0] * 3, ["other", "other", "x"]), KINDS, max_categories=1)
    assert baseline.columns["merchant"].vocabulary == ["other"]
    assert baseline.columns["merchant"].counts == [2, 1]


def test_unseen_is_unknown_beyond_the_remembered_vocabulary(monkeypatch) -> None:
    monkeypatch.setattr(profile_module, "MAX_KNOWN", 3)
    baseline = profile_table(table([1.0] * 4, ["a", "b", "c", "d"]), KINDS)
    assert baseline.columns["merchant"].known is None
    window = profile_table(table([1.0] * 2, ["a", "zz"]), KINDS, baseline=baseline)
    assert window.columns["merchant"].unseen is None  # not 0 and not 1: unknown
    other = profile_table(table([1.0], ["b"]), KINDS, baseline=baseline)
    assert window.merge(other).columns["merchant"].unseen is None


def test_mixing_profiles_of_different_baselines_is_refused() -> None:
    first = profile_table(table([1.0, 2.0, 3.0], ["a", "b", "b"]), KINDS)
    second = profile_table(table([10.0, 20.0, 30.0], ["a", "b", "b"]), KINDS)
    window_one = profile_table(table([2.0], ["a"]), KINDS, baseline=first)
    window_two = profile_table(table([2.0], ["a"]), KINDS, baseline=second)
    with pytest.raises(DataError, match="'amount' was profiled on different baselines"):
        window_one.merge(window_two)
    third = profile_table(table([1.0, 2.0, 3.0], ["a", "c", "c"]), KINDS)
    with pytest.raises(DataError, match="'merchant' was profiled on different baselines"):
        window_one.merge(profile_table(table([2.0], ["a"]), KINDS, baseline=third))
    with pytest.raises(DataError, match="different columns"):
        window_one.merge(profile_table(table([2.0], ["a"]), {"amount": "number"}, baseline=first))


def test_a_column_missing_from_the_table_or_the_baseline_is_refused() -> None:
    baseline = profile_table(table([1.0], ["a"]), {"amount": "number"})
    with pytest.raises(DataError, match="'merchant' is not in the baseline"):
        profile_table(table([1.0], ["a"]), KINDS, baseline=baseline)
    with pytest.raises(DataError, match="'price' to profile is not in the table"):
        profile_table(table([1.0], ["a"]), {"price": "number"})
    with pytest.raises(DataError, match="is profiled as a number"):
        profile_table(table([1.0], ["a"]), {"merchant": "number"})


def test_integer_and_boolean_columns_profile_as_numbers_and_categories() -> None:
    frame = pd.DataFrame({"count": pd.array([1, 2, None], dtype="Int64"), "flag": [True, False, True]})
    profile = profile_table(frame, {"count": "number", "flag": "category"})
    assert (profile.columns["count"].count, profile.columns["count"].nulls, profile.columns["count"].sum) == (2, 1, 3.0)
    assert isinstance(profile.columns["flag"], CategoryProfile)
    assert profile.columns["flag"].vocabulary == ["true", "false"]
