"""flywheel's aggregation engine: a use case's declared aggregations (:mod:`flywheel.aggregations`),
computed point-in-time correct, vectorized, into one feature table per entity.

The semantics are :mod:`flywheel.aggregations`'s (windows ``(t - window, t]``, one row per entity and
instant at which an aggregation may change, events entering and leaving windows alike, labels as
events at the time they become known, reads strictly before the request: a read at ``T`` gets each
aggregation over ``[T - window, T)``). Here is how they are computed, in numpy, for any number of
entities, aggregations and rows:

1. Each aggregation reads a *stream*: the entity's events (key, event time, the columns), or, for an
   aggregation of a label, that label's known values at the time each became known, or, for an
   aggregation of a further source, that source's rows (key, their time plus the source's delay).
2. A table's instants are the union of its streams' (key, time) pairs and of their *expiries*: for each
   distinct window of the aggregations reading a stream, each event's time plus that window (the
   moment it leaves the window), in ``[since, until)``. With them a count decays to 0 after the last
   event, however long ago it was.
3. For each stream, each instant's window is a range ``[lo, hi)`` of the stream sorted by key and
   time: ``hi`` counts the key's events at or before ``t``, ``lo`` those at or before ``t - window``
   (one lexicographic sort of events and instants together, then a cumulative count).
4. Each operation over those ranges: counts from prefix sums of integers (exact); sums, means,
   spreads, minima, maxima and distinct counts by walking each window newest first in a fixed order,
   so that the same window gives the same bits wherever a computation starts (a running sum rounds
   differently depending on the rows before the window; then a day computed from its lookback would
   not equal the same day of a whole computation). For a few windows (a live update's), each window
   is reduced on its own, with the same additions in the same order: the same bits.

Cost: sorting, plus the sum of the window lengths for the walking operations, as the hand-written
card and merchant tables this replaces (benchmarks/features.py measures both); the expiries multiply
the instants by up to one plus the number of distinct windows per stream.
"""

from __future__ import annotations

import datetime as dt
from typing import Iterator, Mapping

import numpy as np
import pandas as pd

from flywheel.aggregations import Aggregation
from flywheel.contract import Contract
from flywheel.errors import DataError

EVENT_TIMESTAMP = "event_timestamp"
CREATED_TIMESTAMP = "created_timestamp"
_EVENTS = "__events__"  # the stream of an entity's events (label streams are named by their label)
_SOURCE = "__source__:"  # the stream of a further source's rows: this prefix and the source's name


def known_times(rows: pd.DataFrame, contract: Contract) -> pd.Series:
    """When each row's label becomes known: its event time plus the contract's delay, or the time in
    its ``label_known.column`` (never before the event itself: a label cannot precede what it labels)."""
    event = rows[contract.timestamp]
    if contract.label_known.column is not None:
        known = rows[contract.label_known.column]
        return known.where(known.isna() | (known >= event), event)
    return event + pd.Timedelta(contract.label_known.delay or dt.timedelta(0))


def lookback(aggregations: list[Aggregation], contract: Contract, label_lag: dt.timedelta | None = None) -> dt.timedelta:
    """How far before an instant the rows that feed it may lie: the longest window, plus, for label
    aggregations, how long after its event a label may become known (the contract's fixed delay, or
    ``label_lag`` for a label whose time is a column)."""
    longest = dt.timedelta(0)
    for aggregation in aggregations:
        extra = dt.timedelta(0)
        if aggregation.source is not None:
            extra = contract.sources[aggregation.source].delay  # a source row feeds its features from then on
        elif aggregation.column in contract.labels:
            extra = contract.label_known.delay if contract.label_known.delay is not None else (label_lag or dt.timedelta(0))
        longest = max(longest, aggregation.window + extra)
    return longest


def _micros(times: pd.Series) -> np.ndarray:
    return times.astype("datetime64[us, UTC]").array.asi8 if len(times) else np.zeros(0, dtype=np.int64)


def _count_at_or_before(s_code: np.ndarray, s_time: np.ndarray, q_code: np.ndarray, q_time: np.ndarray) -> np.ndarray:
    """Per query, how many stream events of its key have a time at or before the query's."""
    n = len(s_code)
    codes = np.concatenate([s_code, q_code])
    times = np.concatenate([s_time, q_time])
    is_query = np.concatenate([np.zeros(n, dtype=np.int8), np.ones(len(q_code), dtype=np.int8)])
    order = np.lexsort((is_query, times, codes))  # key, then time, events before queries at a tie
    is_event = (is_query[order] == 0).astype(np.int64)
    so_far = np.cumsum(is_event)
    sorted_codes = codes[order]
    first = np.searchsorted(sorted_codes, sorted_codes, side="left")
    before_key = so_far[first] - is_event[first]
    counts = np.empty(len(q_code), dtype=np.int64)
    positions = np.flatnonzero(is_query[order] == 1)
    counts[order[positions] - n] = (so_far - before_key)[positions]
    return counts


def _walk_back(lo: np.ndarray, hi: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For windows ``[lo, hi)``: yields (rows, index) for back = 0, 1, ...: the rows whose window still
    reaches ``back`` events before its newest, and that event's index. Longest windows first, so each
    step touches only the rows still active."""
    lengths = hi - lo
    order = np.argsort(-lengths, kind="stable")
    longest_first = lengths[order]
    for back in range(int(longest_first[0]) if len(order) else 0):
        active = order[: np.searchsorted(-longest_first, -back, side="left")]
        yield active, hi[active] - 1 - back


FEW_WINDOWS = 64  # up to this many windows, each is reduced on its own (a live update's one instant per entity)


def _few(lo: np.ndarray) -> bool:
    """Whether to reduce each window on its own rather than walk all of them back together: the walk
    costs a step (several numpy calls) per event of the longest window, whatever the number of
    windows, which for the few windows of a live update is most of its time."""
    return len(lo) <= FEW_WINDOWS


def _newest_first_sum(values: np.ndarray) -> float:
    """The sum of ``values`` added one by one from the last (newest) to the first, starting at 0.0:
    the very additions, in the very order, of the walk back (``np.add.accumulate`` is sequential,
    unlike ``np.sum``'s pairwise summation), so both give the same bits."""
    return float(np.add.accumulate(values[::-1])[-1]) if len(values) else 0.0


def _aggregate(aggregation: Aggregation, lo: np.ndarray, hi: np.ndarray, values: np.ndarray | None,
               times: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """One aggregation over windows ``[lo, hi)`` of a stream (sorted by key and time)."""
    op = aggregation.op
    if op == "count" and values is None:
        return (hi - lo).astype(np.int64)
    if op == "count":  # the events where the column has a value
        present_before = np.concatenate([[0], np.cumsum(~pd.isna(values))])
        return (present_before[hi] - present_before[lo]).astype(np.int64)
    if op == "last_time":
        out = np.full(len(lo), np.nan)
        some = hi > lo
        out[some] = times[hi[some] - 1] / 1e6
        return out
    assert values is not None
    if op == "distinct":
        codes, _ = pd.factorize(values, use_na_sentinel=True)
        valid = codes >= 0
        pairs = pd.DataFrame({"key": keys, "value": codes, "position": np.arange(len(codes))})
        next_same = pairs.groupby(["key", "value"], sort=False)["position"].shift(-1).fillna(len(codes)).to_numpy(np.int64)
        distinct = np.zeros(len(lo), dtype=np.int64)
        if _few(lo):
            for row, (start, stop) in enumerate(zip(lo.tolist(), hi.tolist())):
                distinct[row] = np.count_nonzero(valid[start:stop] & (next_same[start:stop] >= stop))
            return distinct
        for rows, index in _walk_back(lo, hi):
            distinct[rows] += valid[index] & (next_same[index] >= hi[rows])
        return distinct
    if op == "last":  # the newest value present in the window: a number, or text (an object column)
        present = ~pd.isna(values)
        last_present = np.maximum.accumulate(np.where(present, np.arange(len(values)), -1)) if len(values) else np.zeros(0, np.int64)
        at = np.full(len(lo), -1)
        some = hi > 0
        at[some] = last_present[hi[some] - 1]
        found = (at >= lo) & (at >= 0)
        numeric = values.dtype.kind in "fiub"
        out = np.full(len(lo), np.nan) if numeric else np.full(len(lo), np.nan, dtype=object)
        out[found] = values[at[found]]
        return out
    numbers = values.astype("float64")
    valid = ~np.isnan(numbers)
    valid_before = np.concatenate([[0], np.cumsum(valid)])
    count = valid_before[hi] - valid_before[lo]
    if op in ("sum", "mean") and values.dtype.kind in "iub":
        # Whole numbers (a 0/1 label, a count): prefix sums are exact, so no walk is needed for the
        # same bits wherever the computation starts.
        total_before = np.concatenate([[0], np.cumsum(values.astype(np.int64))])
        whole = (total_before[hi] - total_before[lo]).astype("float64")
        if op == "sum":
            return whole
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, whole / np.maximum(count, 1), np.nan)
    if op in ("min", "max"):
        pick, start = (np.fmin, np.inf) if op == "min" else (np.fmax, -np.inf)
        out = np.full(len(lo), start)
        if _few(lo):
            for row, (first, stop) in enumerate(zip(lo.tolist(), hi.tolist())):
                out[row] = pick.reduce(numbers[first:stop], initial=start)
            return np.where(count > 0, out, np.nan)
        for rows, index in _walk_back(lo, hi):
            out[rows] = pick(out[rows], numbers[index])
        return np.where(count > 0, out, np.nan)
    filled = np.where(valid, numbers, 0.0)
    total = np.zeros(len(lo))
    if _few(lo):
        for row, (start, stop) in enumerate(zip(lo.tolist(), hi.tolist())):
            total[row] = _newest_first_sum(filled[start:stop])
    else:
        for rows, index in _walk_back(lo, hi):
            total[rows] += filled[index]
    if op == "sum":
        return total
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    if op == "mean":
        return mean
    squares = np.zeros(len(lo))
    if _few(lo):
        for row, (start, stop) in enumerate(zip(lo.tolist(), hi.tolist())):
            squares[row] = _newest_first_sum(np.where(valid[start:stop], (filled[start:stop] - mean[row]) ** 2, 0.0))
    else:
        for rows, index in _walk_back(lo, hi):
            squares[rows] += np.where(valid[index], (filled[index] - mean[rows]) ** 2, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 1, np.sqrt(squares / np.maximum(count - 1, 1)), np.nan)


def _instants(streams: Mapping[str, pd.DataFrame], windows: Mapping[str, list[dt.timedelta]],
              since: pd.Timestamp | None, until: pd.Timestamp | None) -> tuple[np.ndarray, np.ndarray]:
    """A table's instants as (key code, time) arrays, sorted and distinct, in ``[since, until)``: each
    stream event's time, and, for each distinct window of the aggregations reading its stream, the
    moment it leaves that window (its time plus the window: its *expiry*)."""
    codes, times = [], []
    for stream, frame in streams.items():
        code, time = frame["code"].to_numpy(np.int64), frame["time"].to_numpy(np.int64)
        for shift in [0, *sorted({window // dt.timedelta(microseconds=1) for window in windows[stream]})]:
            codes.append(code)
            times.append(time + np.int64(shift))
    code = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int64)
    time = np.concatenate(times) if times else np.zeros(0, dtype=np.int64)
    keep = np.ones(len(time), dtype=bool)
    if since is not None:
        keep &= time >= _micros(pd.Series([since]))[0]
    if until is not None:
        keep &= time < _micros(pd.Series([until]))[0]
    code, time = code[keep], time[keep]
    order = np.lexsort((time, code))
    code, time = code[order], time[order]
    distinct = np.ones(len(time), dtype=bool)
    distinct[1:] = (code[1:] != code[:-1]) | (time[1:] != time[:-1])
    return code[distinct], time[distinct]


def entity_table(
    rows: pd.DataFrame,
    contract: Contract,
    entity: str,
    aggregations: list[tuple[str, Aggregation]],
    *,
    since: pd.Timestamp | None = None,
    until: pd.Timestamp | None = None,
    sources: Mapping[str, pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """The feature table of one entity: its key, ``event_timestamp`` (the instant), ``created_timestamp``
    (the same: computed in one pass) and each named aggregation, one row per key and instant in
    ``[since, until)`` (all when not given), sorted by key and instant. ``rows`` are the lake's rows of
    the contract; for rows in ``[since, until)`` to be exact they must include every row a window
    reaches (see :func:`lookback`). ``sources`` holds the rows of the contract's further sources
    (name -> rows), for the aggregations that read one."""
    key = contract.entities[entity]
    streams: dict[str, pd.DataFrame] = {}
    by_stream: dict[str, list[tuple[str, Aggregation]]] = {}
    for name, aggregation in aggregations:
        if aggregation.source is not None:
            stream = _SOURCE + aggregation.source
        else:
            stream = aggregation.column if aggregation.column in contract.labels else _EVENTS
        by_stream.setdefault(stream, []).append((name, aggregation))
    keyed = rows[rows[key].notna()] if rows[key].isna().any() else rows  # a row without the key is no event of it
    for stream in by_stream:
        columns = sorted({a.column for _, a in by_stream[stream] if a.column})
        if stream.startswith(_SOURCE):
            name = stream.removeprefix(_SOURCE)
            if sources is None or name not in sources:
                raise DataError(f"the features of {entity} read source {name!r}, and its rows were not given")
            declared = contract.sources[name]
            source_key = declared.entities[entity]
            source = sources[name]
            source = source[source[source_key].notna()]
            known = source[declared.timestamp] + pd.Timedelta(declared.delay)
            frame = pd.DataFrame({"key": source[source_key].to_numpy(), "time": _micros(known)})
        elif stream == _EVENTS:
            source = keyed
            frame = pd.DataFrame({"key": source[key].to_numpy(), "time": _micros(source[contract.timestamp])})
        else:
            known = known_times(keyed, contract)
            keep = (keyed[stream].notna() & known.notna()).to_numpy()
            source = keyed[keep]
            frame = pd.DataFrame({"key": source[key].to_numpy(), "time": _micros(known[keep])})
        for column in columns:
            frame[column] = source[column].to_numpy()
        streams[stream] = frame
    # One code per key across every stream, then each stream in (key, time) order (stable: ties keep
    # the lake's order).
    all_keys = pd.concat([s["key"] for s in streams.values()], ignore_index=True) if streams else pd.Series([], dtype=object)
    codes, uniques = pd.factorize(all_keys, sort=True)
    offset = 0
    for stream, frame in streams.items():
        frame["code"] = codes[offset: offset + len(frame)]
        offset += len(frame)
        streams[stream] = frame.sort_values(["code", "time"], kind="stable").reset_index(drop=True)
    q_code, q_time = _instants(streams, {stream: [a.window for _, a in named] for stream, named in by_stream.items()},
                               since, until)
    out = pd.DataFrame({
        key: uniques.take(q_code) if len(q_code) else pd.Series([], dtype=rows[key].dtype),
        EVENT_TIMESTAMP: pd.to_datetime(q_time, unit="us", utc=True).astype("datetime64[us, UTC]"),
    })
    out[CREATED_TIMESTAMP] = out[EVENT_TIMESTAMP]
    results: dict[str, np.ndarray] = {}
    for stream, named in by_stream.items():
        frame = streams[stream]
        s_code, s_time = frame["code"].to_numpy(np.int64), frame["time"].to_numpy(np.int64)
        start = np.searchsorted(s_code, q_code, side="left")
        hi = start + _count_at_or_before(s_code, s_time, q_code, q_time)
        for name, aggregation in named:
            window = np.int64(aggregation.window // dt.timedelta(microseconds=1))
            lo = start + _count_at_or_before(s_code, s_time, q_code, q_time - window)
            values = frame[aggregation.column].to_numpy() if aggregation.column else None
            result = _aggregate(aggregation, lo, hi, values, s_time, s_code)
            if aggregation.fill is not None and result.dtype.kind == "f":
                result = np.where(np.isnan(result), aggregation.fill, result)
            results[name] = result
    for name, _ in aggregations:
        out[name] = results[name]
    if contract.columns[key].type != "string":
        out[key] = join_key_text(out[key])
    return out


def join_key_text(values: pd.Series) -> pd.Series:
    """Join keys as the feature store holds them: text (an integer key as its decimal digits), so
    that a table, a training row and a request name an entity the same way; a missing key stays missing."""
    if values.dtype == object and values.map(lambda v: isinstance(v, str) or v is None).all():
        return values
    if pd.api.types.is_float_dtype(values):  # integers with gaps come out of pandas as floats
        return values.map(lambda v: None if pd.isna(v) else str(int(v))).astype(object)
    return values.map(lambda v: None if pd.isna(v) else str(v)).astype(object)
