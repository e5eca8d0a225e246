"""The aggregation engine (flywheel/features/engine.py) against an oracle written naively here: for
every entity, instant and aggregation, the events in (t - window, t] picked out one by one. Plus the
edge cases of the semantics (flywheel/aggregations.py), each named after the bug it catches, the
day-by-day computation against a whole one, and fraud's hand-written tables expressed as declarations."""

from __future__ import annotations

import datetime as dt
import math
import re
import statistics

import numpy as np
import pandas as pd
import pytest
import yaml
from pandas.testing import assert_frame_equal

from flywheel.aggregations import Aggregation, Features, parse_features, parse_window
from flywheel.contract import parse_contract
from flywheel.errors import DataError, UseCaseError
from flywheel.features.engine import CREATED_TIMESTAMP, EVENT_TIMESTAMP, entity_table, known_times, lookback
from tests import factories
from tests import fraud_tables as compute  # fraud's hand-written tables: a second oracle

# Flights-like: a label known at a time in a column (nullable: not landed), two entities.
LEGS = parse_contract(yaml.safe_load("""
columns:
  tail: {type: string}
  origin: {type: string}
  departs: {type: timestamp}
  lands: {type: timestamp, nullable: true}
  distance: {type: float64, min: 0}
  carrier: {type: string, nullable: true}
  delay: {type: float64, nullable: true}
timestamp: departs
labels: [delay]
label_known: {column: lands, within: PT3H}
entities: {tail: tail, origin: origin}
unlabelled: keep
"""), "legs")

# The same legs with a further source: each airport's weather, observed on the hour and known half an
# hour later, joined to the origin entity by its airport column.
LEGS_AND_WEATHER = parse_contract({**yaml.safe_load(yaml.safe_dump(LEGS.model_dump(mode="json"))), "sources": {
    "weather": {
        "columns": {"airport": {"type": "string"}, "observed": {"type": "timestamp"},
                    "visib": {"type": "float64", "nullable": True}, "sky": {"type": "string", "nullable": True}},
        "timestamp": "observed", "delay": "PT30M", "entities": {"origin": "airport"},
    }}}, "legs and weather")

WEATHER_OPS = [
    {"op": "last", "column": "visib", "window": "3h", "source": "weather"},
    {"op": "min", "column": "visib", "window": "2h", "source": "weather"},
    {"op": "mean", "column": "visib", "window": "6h", "source": "weather"},
    {"op": "count", "window": "2h", "source": "weather"},
    {"op": "distinct", "column": "sky", "window": "6h", "source": "weather"},
    {"op": "count", "window": "3h"},  # the origin's own departures, in the same table
    {"op": "mean", "column": "delay", "window": "6h"},
]


def weather(seed: int, days: int = 3) -> pd.DataFrame:
    """Hourly observations at EWR and JFK (and one airport no leg leaves from), some hours missing,
    some values unknown."""
    rng = np.random.default_rng(seed)
    hours = pd.date_range("2026-04-30T20:00", periods=(days + 1) * 24, freq="h", tz="UTC")
    frame = pd.DataFrame([(a, h) for h in hours for a in ("EWR", "JFK", "LGA")], columns=["airport", "observed"])
    frame = frame[rng.random(len(frame)) > 0.1].reset_index(drop=True)
    frame["observed"] = frame["observed"].astype("datetime64[us, UTC]")
    frame["visib"] = pd.Series(rng.choice([0.5, 2.0, 7.5, 10.0], len(frame))).where(rng.random(len(frame)) > 0.1)
    frame["sky"] = pd.Series(rng.choice(["clear", "rain", "fog"], len(frame))).where(rng.random(len(frame)) > 0.1)
    return frame


ALL_OPS = [
    {"op": "count", "window": "3h"},
    {"op": "sum", "column": "distance", "window": "3h"},
    {"op": "mean", "column": "distance", "window": "1d"},
    {"op": "std", "column": "distance", "window": "1d"},
    {"op": "min", "column": "distance", "window": "6h"},
    {"op": "max", "column": "distance", "window": "6h"},
    {"op": "distinct", "column": "carrier", "window": "12h"},
    {"op": "last", "column": "carrier", "window": "1d"},
    {"op": "last_time", "window": "2d"},
    {"op": "mean", "column": "delay", "window": "1d"},
    {"op": "count", "window": "90m", "name": "recent_departures"},
    {"op": "count", "column": "carrier", "window": "6h"},
    {"op": "count", "column": "delay", "window": "1d"},
    {"op": "max", "column": "delay", "window": "6h", "fill": -1},
    {"op": "last", "column": "delay", "window": "2d"},
]


def legs(rows: int, seed: int, days: int = 3) -> pd.DataFrame:
    """Random legs on a coarse clock (every 15 minutes), so instants tie and windows end exactly on
    events; some carriers and delays missing; some never land."""
    rng = np.random.default_rng(seed)
    departs = pd.Timestamp("2026-05-01", tz="UTC") + pd.to_timedelta(rng.integers(0, days * 96, rows) * 15, unit="min")
    lands = departs + pd.to_timedelta(rng.integers(2, 12, rows) * 15, unit="min")
    landed = rng.random(rows) > 0.1
    return pd.DataFrame({
        "tail": rng.choice(["N1", "N2", "N3", "N4"], rows),
        "origin": rng.choice(["EWR", "JFK"], rows),
        "departs": departs.astype("datetime64[us, UTC]"),
        "lands": pd.Series(lands.astype("datetime64[us, UTC]")).where(landed),
        "distance": rng.choice([200.0, 750.5, 1200.25, 2500.0], rows),
        "carrier": pd.Series(rng.choice(["AA", "B6", "UA"], rows)).where(rng.random(rows) > 0.15),
        "delay": pd.Series(rng.normal(10, 30, rows).round(1)).where(landed),
    })


def oracle(rows: pd.DataFrame, contract, entity: str, named: list[tuple[str, Aggregation]],
           sources: dict[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """The table computed the slow, obvious way."""
    key = contract.entities[entity]
    known = known_times(rows, contract)
    streams = {}  # stream -> (its rows, their times, [(key, time, row position)])
    events = [(k, t, i) for i, (k, t) in enumerate(zip(rows[key], rows[contract.timestamp]))]
    labelled = {label: [(k, t, i) for i, (k, t, v) in enumerate(zip(rows[key], known, rows[label]))
                        if not pd.isna(v) and not pd.isna(t)] for label in contract.labels}

    def stream_of(a: Aggregation) -> str:
        return f"source {a.source}" if a.source else a.column if a.column in contract.labels else "events"

    for _, a in named:
        stream = stream_of(a)
        if a.source:  # a further source's row is an event of the entity its key names, once known
            declared_source = contract.sources[a.source]
            frame = sources[a.source]
            times = frame[declared_source.timestamp] + pd.Timedelta(declared_source.delay)
            streams[stream] = (frame, times, [(k, t, i) for i, (k, t) in
                                              enumerate(zip(frame[declared_source.entities[entity]], times))
                                              if not pd.isna(k)])
        elif stream != "events":
            streams[stream] = (rows, known, labelled[stream])
        else:
            streams[stream] = (rows, rows[contract.timestamp], events)
    # An instant at each event, and one at each moment an event leaves a window that reads it.
    instants = sorted({(k, t) for _, _, stream in streams.values() for k, t, _ in stream}
                      | {(k, t + a.window) for _, a in named for k, t, _ in streams[stream_of(a)][2]})
    table = []
    for k, t in instants:
        row = {key: k, EVENT_TIMESTAMP: t, CREATED_TIMESTAMP: t}
        for name, a in named:
            frame, times, stream = streams[stream_of(a)]
            inside = [i for kk, tt, i in stream if kk == k and t - a.window < tt <= t]
            inside.sort(key=lambda i: (times.iloc[i], i))
            values = [frame[a.column].iloc[i] for i in inside] if a.column else []
            present = [v for v in values if not pd.isna(v)]
            if a.op == "count":
                value = len(present) if a.column else len(inside)
            elif a.op == "sum":
                value = float(sum(present))
            elif a.op == "mean":
                value = statistics.fmean(present) if present else math.nan
            elif a.op == "std":
                value = statistics.stdev(present) if len(present) > 1 else math.nan
            elif a.op == "min":
                value = min(present) if present else math.nan
            elif a.op == "max":
                value = max(present) if present else math.nan
            elif a.op == "distinct":
                value = len(set(present))
            elif a.op == "last":
                value = present[-1] if present else math.nan
            else:  # last_time
                seen = [frame[contract.timestamp].iloc[i] for i in inside]
                value = max(seen).timestamp() if seen else math.nan
            if a.fill is not None and isinstance(value, float) and math.isnan(value):
                value = a.fill
            row[name] = value
        table.append(row)
    out = pd.DataFrame(table, columns=[key, EVENT_TIMESTAMP, CREATED_TIMESTAMP, *[n for n, _ in named]])
    for column in (EVENT_TIMESTAMP, CREATED_TIMESTAMP):
        out[column] = pd.to_datetime(out[column], utc=True).astype("datetime64[us, UTC]")
    for name, a in named:
        if a.op in ("count", "distinct"):
            out[name] = out[name].astype("int64")
        elif a.op == "last" and a.column == "carrier":
            out[name] = out[name].astype(object).where(out[name].notna(), np.nan)
        else:
            out[name] = out[name].astype("float64")
    return out


def declared(contract, entity: str, specs: list[dict]) -> list[tuple[str, Aggregation]]:
    return parse_features({"aggregations": {entity: specs}}, contract, "test").named()[entity]


@pytest.mark.parametrize("entity", ["tail", "origin"])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_operation_equals_the_naive_oracle(entity, seed):
    rows = legs(160, seed)
    named = [(n, a) for n, a in declared(LEGS, entity, ALL_OPS) if not (a.op == "last" and a.column == "carrier")]
    got = entity_table(rows, LEGS, entity, named)
    want = oracle(rows, LEGS, entity, named)
    assert_frame_equal(got, want, check_exact=False, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("entity", ["tail", "origin"])
def test_an_instant_computed_alone_has_the_very_bits_of_the_whole_table(entity):
    """A live update computes one instant per entity (each window reduced on its own, FEW_WINDOWS);
    the offline tables compute all of them at once (every window walked back together). Bug caught:
    the two orders of addition rounding differently, so that what serving reads differs from what
    training joined in the last bits (the replay checks compare at a tolerance; this compares bits)."""
    rows = legs(400, 3)
    named = [(n, a) for n, a in declared(LEGS, entity, ALL_OPS) if not (a.op == "last" and a.column == "carrier")]
    whole = entity_table(rows, LEGS, entity, named)
    assert len(whole) > 64  # the whole table takes the walking path
    key = LEGS.entities[entity]
    for index in np.random.default_rng(4).choice(len(whole), 12, replace=False):
        instant = whole[EVENT_TIMESTAMP].iloc[index]
        alone = entity_table(rows, LEGS, entity, named, since=instant, until=instant + pd.Timedelta(microseconds=1))
        alone = alone[alone[key] == whole[key].iloc[index]].reset_index(drop=True)
        assert_frame_equal(alone, whole.iloc[[index]].reset_index(drop=True), check_exact=True)


def test_the_last_value_of_a_text_column_equals_the_oracle():
    rows = legs(120, 5)
    named = declared(LEGS, "tail", [{"op": "last", "column": "carrier", "window": "15m"}])
    got = entity_table(rows, LEGS, "tail", named)
    want = oracle(rows, LEGS, "tail", named)
    assert got["tail_carrier_last_15m"].fillna("-").tolist() == want["tail_carrier_last_15m"].fillna("-").tolist()
    assert got["tail_carrier_last_15m"].isna().any()  # windows with no carrier known


@pytest.mark.parametrize("seed", [0, 1])
def test_aggregations_of_a_further_source_equal_the_naive_oracle(seed):
    rows, hours = legs(160, seed), weather(seed)
    named = declared(LEGS_AND_WEATHER, "origin", WEATHER_OPS)
    got = entity_table(rows, LEGS_AND_WEATHER, "origin", named, sources={"weather": hours})
    want = oracle(rows, LEGS_AND_WEATHER, "origin", named, sources={"weather": hours})
    assert_frame_equal(got, want, check_exact=False, rtol=1e-12, atol=1e-9)
    assert got["origin_visib_last_3h"].notna().mean() > 0.5  # the weather reached most rows


def test_a_source_row_feeds_features_only_once_its_delay_has_passed():
    rows = tiny(["2026-05-01T10:10", "2026-05-01T10:40"])
    hours = pd.DataFrame({"airport": ["EWR"], "observed": pd.to_datetime(["2026-05-01T10:00"], utc=True).astype("datetime64[us, UTC]"),
                          "visib": [0.5], "sky": ["fog"]})
    named = declared(LEGS_AND_WEATHER, "origin", [{"op": "last", "column": "visib", "window": "3h", "source": "weather"},
                                                  {"op": "count", "window": "1h"}])
    table = entity_table(rows, LEGS_AND_WEATHER, "origin", named, sources={"weather": hours})
    # 10:10 is before the 10:00 observation is known (10:30): no visibility yet; it is a row of its own at 10:30,
    # and leaves the 3h window at 13:30 (the departures leave the 1h count at 11:10 and 11:40).
    assert table[EVENT_TIMESTAMP].dt.strftime("%H:%M").tolist() == ["10:10", "10:30", "10:40", "11:10", "11:40", "13:30"]
    assert table["origin_visib_last_3h"].fillna(-1).tolist() == [-1, 0.5, 0.5, 0.5, 0.5, -1]
    assert table["origin_count_1h"].tolist() == [1, 1, 2, 1, 0, 0]


def test_a_source_aggregation_without_the_sources_rows_is_a_clear_error():
    named = declared(LEGS_AND_WEATHER, "origin", [{"op": "count", "window": "1h", "source": "weather"}])
    with pytest.raises(DataError, match="source 'weather'"):
        entity_table(legs(10, 0), LEGS_AND_WEATHER, "origin", named)


@pytest.mark.parametrize("spec, problem", [
    ({"op": "last", "column": "visib", "window": "1h", "source": "radar"}, "'radar' is not a source of the contract"),
    ({"op": "last", "column": "lightning", "window": "1h", "source": "weather"}, "'lightning' is not a column of source weather"),
    ({"op": "mean", "column": "sky", "window": "1h", "source": "weather"}, "mean needs a number, and weather.sky is string"),
])
def test_a_source_aggregation_that_does_not_fit_the_source_is_refused(spec, problem):
    with pytest.raises(UseCaseError, match=re.escape(problem)):
        declared(LEGS_AND_WEATHER, "origin", [spec])
    with pytest.raises(UseCaseError, match="source weather names no key of tail"):
        declared(LEGS_AND_WEATHER, "tail", [{"op": "count", "window": "1h", "source": "weather"}])


@pytest.mark.parametrize("change, problem", [
    (lambda w: w["entities"].update(gate="airport"), "sources.weather.entities.gate: not an entity of the contract"),
    (lambda w: w["entities"].update(origin="nowhere"), "sources.weather"),
    (lambda w: w["columns"]["airport"].update(type="int64"), "airport is int64, and the entity's key origin is string"),
    (lambda w: w.update(timestamp="visib"), "timestamp 'visib' must be of type timestamp"),
])
def test_a_source_that_does_not_fit_the_contract_is_refused(change, problem):
    data = LEGS_AND_WEATHER.model_dump(mode="json")
    change(data["sources"]["weather"])
    with pytest.raises(UseCaseError, match=re.escape(problem)):
        parse_contract(data, "test")


# --- read at any time: the window ending at the read, with expiry -------------------------------------

def read_before(table: pd.DataFrame, key: str, keys: list, times: list[pd.Timestamp], ttl: pd.Timedelta) -> pd.DataFrame:
    """Each (key, time) read as a training row (and the online store) reads: the latest row of the key
    strictly before the time, within the view's TTL; a row with no such table row reads all missing."""
    asked = pd.DataFrame({key: keys, "at": pd.to_datetime(pd.Series(times), utc=True).astype("datetime64[us, UTC]")})
    asked["as_of"] = (asked["at"] - pd.Timedelta(microseconds=1)).astype("datetime64[us, UTC]")
    asked["position"] = np.arange(len(asked))
    merged = pd.merge_asof(asked.sort_values("as_of"), table.sort_values(EVENT_TIMESTAMP), left_on="as_of",
                           right_on=EVENT_TIMESTAMP, by=key, allow_exact_matches=True, tolerance=ttl)
    return merged.sort_values("position").reset_index(drop=True)


def brute_force(rows: pd.DataFrame, contract, entity: str, a: Aggregation, k, at: pd.Timestamp,
                sources: dict[str, pd.DataFrame] | None = None):
    """The aggregation over the events of key ``k`` with time in ``[at - window, at)``, one by one."""
    if a.source:
        declared_source = contract.sources[a.source]
        frame = sources[a.source]
        keys, times = frame[declared_source.entities[entity]], frame[declared_source.timestamp] + pd.Timedelta(declared_source.delay)
    elif a.column in contract.labels:
        frame, keys, times = rows, rows[contract.entities[entity]], known_times(rows, contract)
    else:
        frame, keys, times = rows, rows[contract.entities[entity]], rows[contract.timestamp]
    inside = [i for i, (kk, t) in enumerate(zip(keys, times))
              if kk == k and not pd.isna(t) and at - a.window <= t < at
              and not (a.column in contract.labels and pd.isna(frame[a.column].iloc[i]))]
    inside.sort(key=lambda i: (times.iloc[i], i))
    present = [v for v in (frame[a.column].iloc[i] for i in inside) if not pd.isna(v)] if a.column else []
    if a.op == "count":
        value = len(present) if a.column else len(inside)
    elif a.op in ("sum", "distinct"):
        value = float(sum(present)) if a.op == "sum" else len(set(present))
    elif a.op == "mean":
        value = statistics.fmean(present) if present else math.nan
    elif a.op == "std":
        value = statistics.stdev(present) if len(present) > 1 else math.nan
    elif a.op in ("min", "max"):
        value = (min if a.op == "min" else max)(present) if present else math.nan
    elif a.op == "last":
        value = present[-1] if present else math.nan
    else:  # last_time
        value = times.iloc[inside[-1]].timestamp() if inside else math.nan
    if a.fill is not None and isinstance(value, float) and math.isnan(value):
        value = a.fill
    return value


def empty_window(a: Aggregation):
    """What a read that finds no row (none yet, or none within the TTL) means: every window empty."""
    if a.op in ("count", "distinct", "sum"):
        return 0
    return a.fill if a.fill is not None else math.nan


def same(got, want) -> bool:
    if isinstance(want, str) or isinstance(got, str):
        return got == want
    if pd.isna(got) or pd.isna(want):
        return pd.isna(got) and pd.isna(want)
    return math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-9)


def read_times(rows: pd.DataFrame, contract, entity: str, named: list[tuple[str, Aggregation]], seed: int,
               sources: dict[str, pd.DataFrame] | None = None, extra: int = 300) -> list[tuple]:
    """(key, read time) pairs: each event, and just before, at and just after each moment it leaves a
    window, random times, and long after each key's last event; at most 900 of them (seeded)."""
    rng = np.random.default_rng(seed)
    us = pd.Timedelta(microseconds=1)
    pairs = set()
    for _, a in named:
        if a.source:
            declared_source = contract.sources[a.source]
            frame = sources[a.source]
            keys, times = frame[declared_source.entities[entity]], frame[declared_source.timestamp] + pd.Timedelta(declared_source.delay)
        else:
            keys = rows[contract.entities[entity]]
            times = known_times(rows, contract) if a.column in contract.labels else rows[contract.timestamp]
        for k, t in zip(keys, times):
            if not pd.isna(t) and not pd.isna(k):
                pairs |= {(k, t), (k, t + a.window - us), (k, t + a.window), (k, t + a.window + us)}
    pairs = sorted(pairs)
    chosen = [pairs[i] for i in rng.choice(len(pairs), min(len(pairs), 600), replace=False)]
    keys = sorted({k for k, _ in pairs})
    first, last = min(t for _, t in pairs), max(t for _, t in pairs)
    span = (last - first) / us
    chosen += [(keys[rng.integers(len(keys))], first + us * int(rng.integers(0, span))) for _ in range(extra)]
    chosen += [(k, last + pd.Timedelta(days=10)) for k in keys]
    return chosen


def assert_reads_equal_brute_force(rows, contract, entity, named, seed, sources=None):
    table = entity_table(rows, contract, entity, named, sources=sources)
    key = contract.entities[entity]
    ttl = pd.Timedelta(max(a.window for _, a in named))
    asked = read_times(rows, contract, entity, named, seed, sources)
    read = read_before(table, key, [k for k, _ in asked], [t for _, t in asked], ttl)
    found = read[EVENT_TIMESTAMP].notna().to_numpy()
    assert found.any() and not found.all()  # reads within a window of events, and long after
    wrong = []
    for row, (k, at) in enumerate(asked):
        for name, a in named:
            got = read[name].iloc[row] if found[row] else empty_window(a)
            want = brute_force(rows, contract, entity, a, k, at, sources)
            if not same(got, want):
                wrong.append(f"{k} at {at} {name}: read {got!r}, events before it {want!r}")
    assert not wrong, f"{len(wrong)} reads differ, first: {wrong[:5]}"


@pytest.mark.parametrize("entity", ["tail", "origin"])
def test_every_operation_read_at_any_time_equals_the_window_ending_at_the_read(entity):
    """Bug caught: windows that end at the entity's last change instead of at the read (a count that
    does not decay between events), an expiry one microsecond late or early, or a read past the TTL
    that still finds events. The read: the latest row strictly before T within the view's TTL (as
    the training join and the online store read); the oracle: the events in [T - window, T), picked
    out one by one at random times, at each event, and around each moment it leaves a window."""
    rows = legs(120, 7)
    named = declared(LEGS, entity, ALL_OPS)
    assert_reads_equal_brute_force(rows, LEGS, entity, named, seed=8)


def test_a_further_sources_aggregations_read_at_any_time_equal_the_window_ending_at_the_read():
    rows, hours = legs(120, 9), weather(9)
    assert_reads_equal_brute_force(rows, LEGS_AND_WEATHER, "origin", declared(LEGS_AND_WEATHER, "origin", WEATHER_OPS),
                                   seed=10, sources={"weather": hours})


def test_a_count_read_long_after_the_last_event_has_decayed_to_zero():
    rows = tiny(["2026-05-01T00:00"])
    named = declared(LEGS, "tail", [{"op": "count", "window": "1h"}, {"op": "count", "window": "24h"}])
    table = entity_table(rows, LEGS, "tail", named)
    at = pd.to_datetime(["2026-05-01T00:30", "2026-05-01T05:00", "2026-05-01T23:59", "2026-05-02T00:01"], utc=True)
    read = read_before(table, "tail", ["N1"] * 4, list(at), pd.Timedelta(hours=24))
    assert read["tail_count_1h"].tolist()[:3] == [1, 0, 0] and read["tail_count_24h"].tolist()[:3] == [1, 1, 1]
    # A day and a minute later: the last row (the 24h expiry, both counts 0) is read, or none at all.
    assert read["tail_count_24h"].fillna(0).iloc[3] == 0 and read["tail_count_1h"].fillna(0).iloc[3] == 0


def test_an_event_exactly_one_window_before_the_read_is_in_it():
    """[T - window, T): the event at 00:00 is in the 1h window of a read at 01:00, and out of it a
    microsecond later."""
    rows = tiny(["2026-05-01T00:00"])
    table = entity_table(rows, LEGS, "tail", declared(LEGS, "tail", [{"op": "count", "window": "1h"}]))
    at = [pd.Timestamp("2026-05-01T01:00", tz="UTC"), pd.Timestamp("2026-05-01T01:00", tz="UTC") + pd.Timedelta(microseconds=1)]
    assert read_before(table, "tail", ["N1"] * 2, at, pd.Timedelta(hours=1))["tail_count_1h"].tolist() == [1, 0]


# --- the semantics' edge cases -----------------------------------------------------------------------

def tiny(times: list[str], tails: list[str] | None = None, lands: list[str | None] | None = None,
         delays: list[float | None] | None = None) -> pd.DataFrame:
    n = len(times)
    departs = pd.to_datetime(times, utc=True).astype("datetime64[us, UTC]")
    return pd.DataFrame({
        "tail": tails or ["N1"] * n, "origin": ["EWR"] * n, "departs": departs,
        "lands": pd.Series(pd.to_datetime(lands or [None] * n, utc=True)).astype("datetime64[us, UTC]"),
        "distance": [100.0 * (i + 1) for i in range(n)], "carrier": ["AA"] * n,
        "delay": pd.Series(delays or [None] * n, dtype="float64"),
    })


def test_an_event_exactly_one_window_before_is_not_in_the_window():
    rows = tiny(["2026-05-01T00:00", "2026-05-01T01:00"])
    table = entity_table(rows, LEGS, "tail", declared(LEGS, "tail", [{"op": "count", "window": "1h"}]))
    assert table[EVENT_TIMESTAMP].dt.strftime("%H:%M").tolist() == ["00:00", "01:00", "02:00"]
    assert table["tail_count_1h"].tolist() == [1, 1, 0]  # (01:00 - 1h, 01:00] leaves out 00:00


def test_events_at_the_same_instant_are_one_row_that_counts_them_all():
    rows = tiny(["2026-05-01T00:00", "2026-05-01T00:30", "2026-05-01T00:30"])
    table = entity_table(rows, LEGS, "tail", declared(LEGS, "tail", [{"op": "count", "window": "1h"},
                                                                      {"op": "sum", "column": "distance", "window": "1h"}]))
    # Their expiry is one instant too (01:30), as is the first event's (01:00).
    assert table[EVENT_TIMESTAMP].dt.strftime("%H:%M").tolist() == ["00:00", "00:30", "01:00", "01:30"]
    assert table["tail_count_1h"].tolist() == [1, 3, 2, 0]
    assert table["tail_distance_sum_1h"].tolist() == [100.0, 600.0, 500.0, 0.0]


def read_as_serving_does(table: pd.DataFrame, rows: pd.DataFrame, key: str = "tail") -> pd.DataFrame:
    """Each row's features as a request at its event time reads them: the latest row strictly before."""
    requests = rows[[key, "departs"]].rename(columns={"departs": EVENT_TIMESTAMP}).sort_values(EVENT_TIMESTAMP)
    return pd.merge_asof(requests, table, on=EVENT_TIMESTAMP, by=key, allow_exact_matches=False)


def test_a_label_counts_only_from_when_it_is_known_and_is_a_row_of_its_own():
    """The first leg lands at 03:00 with a delay of 40: the tail's next departure at 02:00 knows
    nothing of it, a row appears at 03:00, and the departure at 04:00 sees it."""
    rows = tiny(["2026-05-01T01:00", "2026-05-01T02:00", "2026-05-01T04:00"],
                lands=["2026-05-01T03:00", None, None], delays=[40.0, None, None])
    table = entity_table(rows, LEGS, "tail", declared(LEGS, "tail", [{"op": "mean", "column": "delay", "window": "24h"},
                                                                      {"op": "count", "window": "24h"}]))
    # Each then leaves the 24h windows a day later.
    assert table[EVENT_TIMESTAMP].dt.strftime("%d %H:%M").tolist() == ["01 01:00", "01 02:00", "01 03:00", "01 04:00",
                                                                       "02 01:00", "02 02:00", "02 03:00", "02 04:00"]
    seen = read_as_serving_does(table, rows)
    assert seen["tail_delay_mean_24h"].fillna(-1).tolist() == [-1, -1, 40.0]
    assert seen["tail_count_24h"].fillna(-1).tolist() == [-1, 1, 2]


def test_an_entity_with_label_aggregations_only_has_rows_when_labels_arrive():
    rows = tiny(["2026-05-01T01:00", "2026-05-01T04:00"], lands=["2026-05-01T03:00", None], delays=[40.0, None])
    table = entity_table(rows, LEGS, "tail", declared(LEGS, "tail", [{"op": "mean", "column": "delay", "window": "24h"}]))
    assert table[EVENT_TIMESTAMP].dt.strftime("%d %H:%M").tolist() == ["01 03:00", "02 03:00"]  # known, then expired
    assert read_as_serving_does(table, rows)["tail_delay_mean_24h"].fillna(-1).tolist() == [-1, 40.0]


def test_a_rows_own_label_never_feeds_its_features_even_when_known_at_once():
    """Read as serving reads (the latest row strictly before the request), a leg whose delay is known
    the instant it departs (lands == departs) still does not see its own label."""
    rows = tiny(["2026-05-01T01:00", "2026-05-01T02:00"], lands=["2026-05-01T01:00", "2026-05-01T02:00"],
                delays=[5.0, 99.0])
    table = entity_table(rows, LEGS, "tail", declared(LEGS, "tail", [{"op": "max", "column": "delay", "window": "36h"}]))
    seen = read_as_serving_does(table, rows)
    assert seen["tail_delay_max_36h"].isna().tolist() == [True, False] and seen["tail_delay_max_36h"].iloc[1] == 5.0


def test_a_label_known_before_its_event_counts_from_the_event():
    rows = tiny(["2026-05-01T05:00"], lands=["2026-05-01T04:00"], delays=[7.0])  # a clock error upstream
    assert known_times(rows, LEGS).iloc[0] == rows["departs"].iloc[0]


def test_missing_values_are_skipped_and_an_empty_window_is_zero_or_null():
    rows = tiny(["2026-05-01T00:00", "2026-05-01T00:10"])
    rows.loc[1, "distance"] = np.nan
    named = declared(LEGS, "tail", [{"op": "count", "window": "1h"}, {"op": "sum", "column": "distance", "window": "1h"},
                                    {"op": "mean", "column": "distance", "window": "1h"},
                                    {"op": "std", "column": "distance", "window": "1h"},
                                    {"op": "std", "column": "distance", "window": "1h", "fill": 0, "name": "spread"}])
    table = entity_table(rows, LEGS, "tail", named)
    last = table.iloc[1]  # 00:10 (then 01:00 and 01:10, as the events leave the window)
    assert last["tail_count_1h"] == 2 and last["tail_distance_sum_1h"] == 100.0 and last["tail_distance_mean_1h"] == 100.0
    assert math.isnan(last["tail_distance_std_1h"]) and last["spread"] == 0.0


# --- day by day equals whole -----------------------------------------------------------------------

def test_each_day_from_its_lookback_equals_the_same_day_of_a_whole_computation():
    """Bug caught: a window that reads past the lookback (a day computed alone misses rows), or sums
    that round differently depending on where the computation starts."""
    rows = legs(600, 3, days=6)
    named = declared(LEGS, "tail", ALL_OPS)
    whole = entity_table(rows, LEGS, "tail", named)
    reach = lookback([a for _, a in named], LEGS, label_lag=dt.timedelta(hours=3))
    days = []
    # Departures until 05-07, landings 3h later, and the longest window (2d): the last expiry is on 05-09.
    assert whole[EVENT_TIMESTAMP].max() < pd.Timestamp("2026-05-10", tz="UTC")
    for day in pd.date_range("2026-05-01", periods=9, freq="D", tz="UTC"):
        start, end = day, day + pd.Timedelta(days=1)
        needed = rows[(rows["departs"] >= start - reach) & (rows["departs"] < end)]
        days.append(entity_table(needed, LEGS, "tail", named, since=start, until=end))
    pieced = pd.concat(days, ignore_index=True).sort_values(["tail", EVENT_TIMESTAMP], kind="stable").reset_index(drop=True)
    assert_frame_equal(pieced, whole, check_exact=True)


# --- fraud's hand-written tables, declared ------------------------------------------------------------

CARD = [
    {"op": "count", "window": "1h", "name": "card_txn_count_1h"},
    {"op": "count", "window": "24h", "name": "card_txn_count_24h"},
    {"op": "count", "window": "7d", "name": "card_txn_count_7d"},
    {"op": "mean", "column": "amount", "window": "30d", "name": "card_amount_mean_30d"},
    {"op": "std", "column": "amount", "window": "30d", "fill": 0, "name": "card_amount_std_30d"},
    {"op": "mean", "column": "lat", "window": "30d", "name": "card_lat_mean_30d"},
    {"op": "mean", "column": "lon", "window": "30d", "name": "card_lon_mean_30d"},
    {"op": "distinct", "column": "merchant_id", "window": "24h", "name": "card_distinct_merchants_24h"},
    {"op": "last_time", "window": "30d", "name": "card_last_txn_unix"},
]


def instants_of(table: pd.DataFrame, key: str) -> set[tuple]:
    return set(zip(table[key], table[EVENT_TIMESTAMP]))


def test_frauds_card_table_declared_equals_the_hand_written_one_at_its_rows():
    """The engine generalizes compute.card_feature_table: declared as aggregations (the use case's
    features.yaml), the same rows at each transaction; the engine adds a row as each transaction
    leaves each window (1h, 24h, 7d, 30d later), which the hand-written table has not."""
    tx = factories.make_transactions(3000, seed=4, start="2026-09-01", days=40, cards=30, merchants=12)
    contract = factories.FRAUD_CONTRACT
    named = factories.FRAUD.features.named()["card"]
    assert named == declared(contract, "card", CARD)
    got = entity_table(tx, contract, "card", named)
    want = compute.card_feature_table(tx)
    at_transactions = pd.MultiIndex.from_frame(got[["card_id", EVENT_TIMESTAMP]]).isin(
        pd.MultiIndex.from_frame(want[["card_id", EVENT_TIMESTAMP]]))
    assert_frame_equal(got[at_transactions].reset_index(drop=True), want, check_exact=False, rtol=1e-12)
    times = tx["ts"].astype("datetime64[us, UTC]")
    expiries = {(card, t + pd.Timedelta(w)) for w in ("1h", "24h", "7d", "30d") for card, t in zip(tx["card_id"], times)}
    assert instants_of(got, "card_id") == instants_of(want, "card_id") | expiries


def test_frauds_merchant_rates_declared_equal_the_hand_written_ones_at_each_transaction():
    """The fraud rate over the labels known at each transaction (chargebacks arrive 3 days later)
    equals compute.merchant_feature_table's; the engine adds a row when each label arrives."""
    tx = factories.make_transactions(3000, seed=5, start="2026-09-01", days=40, cards=30, merchants=12, fraud_every=7)
    contract = factories.FRAUD_CONTRACT
    got = entity_table(tx, contract, "merchant", factories.FRAUD.features.named()["merchant"])
    want = compute.merchant_feature_table(tx, dt.timedelta(days=3))
    at_transactions = want[["merchant_id", EVENT_TIMESTAMP]].merge(got, on=["merchant_id", EVENT_TIMESTAMP], how="left")
    for name in ("merchant_txn_count_24h", "merchant_amount_mean_30d"):
        # At a label-only instant the event aggregations are as of that instant too: compare at transactions.
        assert np.allclose(at_transactions[name], want[name], rtol=1e-12, equal_nan=True), name
    for name in ("merchant_labelled_count_30d", "merchant_fraud_rate_30d"):
        assert np.allclose(at_transactions[name], want[name], rtol=1e-12, equal_nan=True), name
    times = tx["ts"].astype("datetime64[us, UTC]")
    arrivals = times + pd.Timedelta(days=3)
    labelled = tx["is_fraud"].notna().to_numpy()
    expected = {(m, t + pd.Timedelta(w)) for w in ("0s", "24h", "30d") for m, t in zip(tx["merchant_id"], times)}
    expected |= {(m, t + pd.Timedelta(w)) for w in ("0s", "30d") for m, t in zip(tx["merchant_id"][labelled], arrivals[labelled])}
    assert instants_of(got, "merchant_id") == expected  # each event, each label's arrival, and as each leaves a window


# --- the declaration ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("1h", 3600), ("24h", 86400), ("30d", 2_592_000), ("90s", 90),
                                           ("15min", 900), ("PT1H", 3600), ("P7D", 604_800), (120, 120)])
def test_windows_are_read_in_the_usual_spellings(text, seconds):
    assert parse_window(text).total_seconds() == seconds


@pytest.mark.parametrize("specs, message", [
    ({"plane": [{"op": "count", "window": "1h"}]}, "plane: not an entity of the contract"),
    ({"tail": [{"op": "mean", "column": "wind", "window": "1h"}]}, "'wind' is not a column"),
    ({"tail": [{"op": "mean", "column": "carrier", "window": "1h"}]}, "mean needs a number, and carrier is string"),
    ({"tail": [{"op": "sum", "column": "lands", "window": "1h"}]}, "needs a number"),
    ({"tail": [{"op": "count", "window": "1h"}, {"op": "count", "window": "60m"}]}, "the name tail_count_1h is also"),
    ({"tail": [{"op": "count", "window": "1h", "name": "distance"}]}, "is a column of the contract"),
    ({"tail": [{"op": "last_time", "column": "distance", "window": "1h"}]}, "last_time takes no column"),
    ({"tail": [{"op": "mean", "window": "1h"}]}, "mean needs a column"),
    ({"tail": [{"op": "median", "column": "distance", "window": "1h"}]}, "op"),
    ({"tail": [{"op": "count", "window": "-1h"}]}, "is not a duration"),
    ({"tail": [{"op": "count", "window": "0s"}]}, "a window must be positive"),
    ({"tail": [{"op": "count"}]}, "window"),
])
def test_an_invalid_declaration_is_refused_naming_the_problem(specs, message):
    with pytest.raises(UseCaseError) as info:
        parse_features({"aggregations": specs}, LEGS, "features.yaml")
    assert message in str(info.value) and "features.yaml" in str(info.value), str(info.value)


def test_aggregating_a_label_known_at_a_column_needs_the_bound_on_when():
    """Without label_known.within, a day computed alone could not know how far back a label that
    becomes known that day may lie: the declaration is refused, naming what to add."""
    data = LEGS.model_dump(mode="json")
    data["label_known"] = {"column": "lands"}
    contract = parse_contract(data, "legs")
    assert contract.label_known.within is None
    with pytest.raises(UseCaseError, match="needs label_known.within"):
        parse_features({"aggregations": {"tail": [{"op": "mean", "column": "delay", "window": "1d"}]}}, contract, "f")
    parse_features({"aggregations": {"tail": [{"op": "mean", "column": "distance", "window": "1d"}]}}, contract, "f")
    with pytest.raises(UseCaseError, match="within bounds a label time held in a column"):
        parse_contract({**data, "label_known": {"delay": "P1D", "within": "P2D"}}, "legs")


def test_names_default_to_entity_column_op_and_window():
    named = declared(LEGS, "tail", [{"op": "count", "window": "24h"}, {"op": "mean", "column": "delay", "window": "P30D"},
                                    {"op": "max", "column": "distance", "window": "90m"}])
    assert [n for n, _ in named] == ["tail_count_24h", "tail_delay_mean_30d", "tail_distance_max_90m"]
    assert Features().named() == {}


def test_an_integer_join_key_is_text_in_the_table_and_a_missing_key_is_no_event():
    """The feature store names every entity by text (a table, a training row and a request alike);
    a row without the key (an aircraft not yet assigned) is not an event of any entity."""
    contract = parse_contract({**LEGS.model_dump(mode="json"),
                               "columns": {**LEGS.model_dump(mode="json")["columns"], "tail": {"type": "int64", "nullable": True}}},
                              "legs")
    rows = tiny(["2026-05-01T00:00", "2026-05-01T00:10", "2026-05-01T00:20"])
    rows["tail"] = pd.array([7, None, 7], dtype="Int64")
    table = entity_table(rows, contract, "tail", declared(contract, "tail", [{"op": "count", "window": "1h"}]))
    assert table["tail"].tolist() == ["7"] * 4 and table["tail_count_1h"].tolist() == [1, 2, 1, 0]  # 00:00, 00:20, 01:00, 01:20
