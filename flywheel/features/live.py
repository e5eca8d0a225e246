"""Real-time features: events move a feature world's online rows as they happen, computed by the
same engine, from the same declaration, as the offline tables.

The offline path (:mod:`flywheel.features.engine`) gives each entity one row per *instant* at which
one of its aggregations may change (an event, a label becoming known, a further source's row
becoming known), and a request at ``T`` reads the entity's latest row strictly before ``T``. Serving
reads the online store, which holds each entity's latest row. So the online store is current when,
after every instant, it holds the entity's row *at* that instant. :class:`LiveFeatures` keeps it so:

- It buffers the raw rows that can still feed a window (the main rows and each further source's rows
  of the last :func:`~flywheel.features.engine.lookback`, labels included) and a *watermark*: the
  latest time it has seen (an event's time, a source row's known time, or ``now``).
- An event batch adds its rows (a scored request is a row without its labels), sets the labels that
  became known (a chargeback, a landing: by the row's id), and adds further sources' rows. Each
  entity they touch is recomputed: :func:`~flywheel.features.engine.entity_table` over just that
  entity's buffered rows, at the entity's latest instant at or before the watermark, and written.
  This is the Chronon/Tecton "raw events within the window" approach, with the window's events kept
  per entity rather than pre-aggregated into tiles: a recomputation costs the entity's events in its
  longest window, and gives the very bits the offline engine gives (the same code computes both).
- A label is an event at the time it becomes known (the contract's fixed delay after its row, or the
  time its ``label_known`` column holds), never earlier: a label delivered before that time waits,
  and the entities it feeds are recomputed once the watermark passes it. So does a source row
  known later than the watermark.
- Every buffered event also leaves each window that reads it, at its time plus the window (its
  *expiry*, an instant of the offline table too): those instants wait the same way, and the
  entities are recomputed as the watermark passes them, events or not (:meth:`LiveFeatures.advance`
  moves it with the clock). So the online row is the offline row at the watermark, and a request
  at ``T`` at or after the watermark reads each aggregation over ``[T - window, T)`` as training
  does, up to the expiries between the watermark and ``T`` (none, for a watermark kept current).
- Replaying an event changes nothing (idempotent by the row's id; a source row by its keys and time;
  a label by its id). A row older than the buffer's reach can no longer feed any window the store
  holds, and is ignored (counted as stale).

A row stays buffered while any of its expiries is still to come: the buffer's reach (the longest
window, plus the label or source delay) is at least as long as any window that reads it.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from flywheel.contract import NUMERIC, Contract
from flywheel.errors import DataError
from flywheel.features.engine import entity_table, known_times, lookback

_US = pd.Timedelta(microseconds=1)


@dataclass
class Events:
    """One batch of events, as frames in the lake's layout.

    ``rows``: main rows (a scored request: the contract's columns without labels; a row may carry
    labels, which then count from the time they become known). ``labels``: the id column, the label
    columns whose values became known, and (for a contract whose label time is a column) that
    column. ``sources``: further source name -> its rows."""

    rows: pd.DataFrame | None = None
    labels: pd.DataFrame | None = None
    sources: dict[str, pd.DataFrame] = field(default_factory=dict)

    def count(self) -> int:
        return sum(len(frame) for frame in (self.rows, self.labels, *self.sources.values()) if frame is not None)


@dataclass
class Applied:
    """What one batch did."""

    rows: int = 0  # new main rows buffered
    labels: int = 0  # labels set
    source_rows: int = 0
    duplicates: int = 0  # events already applied (same id; same label value; same source row)
    stale: int = 0  # rows too old to feed any window the store holds
    written: dict[str, int] = field(default_factory=dict)  # view -> entity rows written
    seconds: float = 0.0


class LiveFeatures:
    """The live state of one feature world: buffered rows, the watermark, and the online writer.

    ``views``: the world's feature views (:class:`flywheel.features.views.View`, with their
    aggregations); ``writer``: an object with ``write(view, frame)`` that stores each entity's row
    (:class:`flywheel.features.online_write.OnlineWriter`); ``label_lag``: how long after its row a
    label held in a column may become known (default: the contract's ``label_known.within``)."""

    def __init__(self, contract: Contract, views: Sequence[Any], writer: Any, label_lag: dt.timedelta | None = None) -> None:
        self.contract = contract
        self.views = [view for view in views if view.aggregations]
        self.writer = writer
        lag = label_lag if label_lag is not None else contract.label_known.within
        reach = [lookback(list(a for _, a in view.aggregations), contract, lag) for view in self.views]
        self.reach = pd.Timedelta(max(reach, default=dt.timedelta(0)))
        self.watermark: pd.Timestamp | None = None
        self.rows = _empty(contract)
        self.sources = {name: _empty(source.contract()) for name, source in contract.sources.items()}
        self._keys_of_rows: dict[str, np.ndarray] = {}  # join key -> the buffered rows' keys as text
        self._rows_of: dict[str, dict[str, list[int]]] = {}  # join key -> entity -> its rows' positions
        self._keys_of_sources: dict[tuple[str, str], np.ndarray] = {}  # (source, column) -> its rows' keys as text
        self._position: dict[Any, int] = {}  # row id -> its position in the buffer
        self._reindex()
        # Instants still to come (a label or a source row known after the watermark, an event leaving
        # a window): when, which view, which key.
        self._due = _Pending()
        self._since_eviction = 0

    # ------------------------------------------------------------ seeding
    def seed(self, rows: pd.DataFrame, sources: Mapping[str, pd.DataFrame] | None = None,
             until: pd.Timestamp | None = None) -> None:
        """Start from the lake: the rows (and further sources' rows) that can still feed a window at
        ``until`` (default: the latest time among them), without writing anything (the world's
        materialization already holds their rows; :meth:`rebuild` writes them). Labels and source
        rows known after ``until`` are held back until the watermark reaches them."""
        contract = self.contract
        times = [rows[contract.timestamp].max()] if len(rows) else []
        for name, frame in (sources or {}).items():
            if len(frame):
                times.append(_known(frame, contract.sources[name]).max())
        if until is None and not times:
            return
        self.watermark = pd.Timestamp(until) if until is not None else max(times)
        horizon = self.watermark - self.reach
        rows = _typed(rows[rows[contract.timestamp] > horizon - _US], contract)
        self.rows = pd.concat([self.rows, rows], ignore_index=True) if len(self.rows) else rows.reset_index(drop=True)
        for name, frame in (sources or {}).items():
            declared = contract.sources[name]
            frame = _typed(frame[_known(frame, declared) > horizon - _US], declared.contract())
            self.sources[name] = pd.concat([self.sources[name], frame], ignore_index=True) if len(self.sources[name]) else frame.reset_index(drop=True)
        self._reindex()
        self._remember(self.rows, self.sources, after=self.watermark, events=True)

    # ------------------------------------------------------------ applying events
    def apply(self, events: Events, now: pd.Timestamp | None = None) -> Applied:
        """Apply one batch and write every entity row it changed; ``now`` (optional) moves the
        watermark on even when no event is that recent (the clock of a live server). All or
        nothing: when a write fails, the state is as before the batch (so that applying it again
        writes its rows, rather than skipping its events as repeats), and the error propagates."""
        saved = (self.rows, dict(self.sources), self.watermark, self._due.runs)
        try:
            return self._apply(events, now)
        except BaseException:
            self.rows, self.sources, self.watermark, self._due.runs = saved
            self._reindex()
            raise

    def _apply(self, events: Events, now: pd.Timestamp | None) -> Applied:
        started = time.perf_counter()
        applied = Applied()
        contract = self.contract
        touched: list[set[str]] = [set() for _ in self.views]
        earliest: list[pd.Timestamp] = []
        latest: list[pd.Timestamp] = [pd.Timestamp(now)] if now is not None else []
        if events.rows is not None and len(events.rows):
            new = self._new_rows(events.rows, applied)
            if len(new):
                self._append_rows(new)
                latest.append(new[contract.timestamp].max())
                earliest.append(new[contract.timestamp].min())
                for index, view in enumerate(self.views):
                    if any(a.source is None and a.column not in contract.labels for _, a in view.aggregations):
                        touched[index].update(k for k in _text_keys(new[view.join_key]) if k is not None)
                self._remember(new, {}, events=True)
        if events.labels is not None and len(events.labels):
            changed = self._set_labels(events.labels, applied)
            if len(changed):
                self._remember(changed, {})
        for name, frame in events.sources.items():
            if name not in contract.sources:
                raise DataError(f"events name source {name!r}, which the contract does not declare "
                                f"(sources: {', '.join(contract.sources) or 'none'})")
            if len(frame):
                new = self._new_source_rows(name, frame, applied)
                if len(new):
                    buffered = self.sources[name]
                    self.sources[name] = pd.concat([buffered, new], ignore_index=True) if len(buffered) else new
                    self._reindex_source(name)
                    self._remember(None, {name: new})
        if latest and (self.watermark is None or max(latest) > self.watermark):
            self.watermark = max(latest)
        if self.watermark is not None:
            # Everything whose instant has come: the rows above, labels and source rows now known, and
            # events now out of a window.
            due_at, due_view, due_key = self._due.pop(_micros_of(self.watermark))
            if len(due_at):
                earliest.append(pd.Timestamp(int(due_at.min()), unit="us", tz="UTC"))
                for view_index, key in zip(due_view.tolist(), due_key.tolist()):
                    touched[view_index].add(key)
            since = min(earliest) if earliest else None
            for view, keys in zip(self.views, touched):
                if keys and since is not None:
                    frame = self._rows_at_watermark(view, keys, since)
                    if len(frame):
                        self.writer.write(view, frame)
                        applied.written[view.name] = applied.written.get(view.name, 0) + len(frame)
            self._since_eviction += 1
            if self._since_eviction >= 256:
                self.evict()
        applied.seconds = time.perf_counter() - started
        return applied

    def advance(self, now: pd.Timestamp) -> Applied:
        """Move the watermark to ``now`` and write what became due (labels, source rows known by then,
        events that left a window by then)."""
        return self.apply(Events(), now=now)

    def rebuild(self) -> Applied:
        """Write every buffered entity's row at its latest instant at or before the watermark (for an
        online store that must be brought to the buffer's state, rather than one whose
        materialization already holds it)."""
        started = time.perf_counter()
        applied = Applied()
        if self.watermark is None:
            return applied
        for view in self.views:
            keys = set(self._keys_of_rows[view.join_key].tolist())
            for name in {a.source for _, a in view.aggregations if a.source is not None}:
                keys |= set(self._keys_of_sources[(name, self.contract.sources[name].entities[view.entity])].tolist())
            keys.discard(None)
            if keys:
                frame = self._rows_at_watermark(view, keys, None)
                if len(frame):
                    self.writer.write(view, frame)
                    applied.written[view.name] = len(frame)
        applied.seconds = time.perf_counter() - started
        return applied

    def evict(self) -> None:
        """Drop the buffered rows no window can reach any more."""
        self._since_eviction = 0
        if self.watermark is None:
            return
        horizon = self.watermark - self.reach
        times = self.rows[self.contract.timestamp]
        if len(times) and times.min() <= horizon - _US:
            self.rows = self.rows[(times > horizon - _US).to_numpy()].reset_index(drop=True)
        for name, frame in self.sources.items():
            known = _known(frame, self.contract.sources[name])
            if len(known) and known.min() <= horizon - _US:
                self.sources[name] = frame[(known > horizon - _US).to_numpy()].reset_index(drop=True)
        self._reindex()

    # ------------------------------------------------------------ internals
    def _reindex(self) -> None:
        contract = self.contract
        keys = {view.join_key for view in self.views}
        self._keys_of_rows = {key: _text_keys(self.rows[key]) for key in keys}
        self._rows_of = {key: {} for key in keys}
        for key, texts in self._keys_of_rows.items():
            _add_positions(self._rows_of[key], texts, 0)
        self._position = {row_id: at for at, row_id in enumerate(self.rows[contract.id].tolist())} if contract.id else {}
        for name in self.sources:
            self._reindex_source(name)

    def _reindex_source(self, name: str) -> None:
        declared = self.contract.sources[name]
        for column in set(declared.entities.values()):
            self._keys_of_sources[(name, column)] = _text_keys(self.sources[name][column])

    def _append_rows(self, new: pd.DataFrame) -> None:
        start = len(self.rows)
        self.rows = pd.concat([self.rows, new], ignore_index=True) if start else new.reset_index(drop=True)
        for key in self._keys_of_rows:
            texts = _text_keys(new[key])
            self._keys_of_rows[key] = np.concatenate([self._keys_of_rows[key], texts])
            _add_positions(self._rows_of[key], texts, start)
        if self.contract.id:
            self._position.update((row_id, start + at) for at, row_id in enumerate(new[self.contract.id].tolist()))

    def _horizon(self) -> pd.Timestamp | None:
        return None if self.watermark is None else self.watermark - self.reach

    def _new_rows(self, rows: pd.DataFrame, applied: Applied) -> pd.DataFrame:
        contract = self.contract
        rows = _typed(rows, contract)
        horizon = self._horizon()
        if horizon is not None:
            stale = (rows[contract.timestamp] <= horizon - _US).to_numpy()
            applied.stale += int(stale.sum())
            rows = rows[~stale]
        if contract.id:
            ids = rows[contract.id]
            repeated = np.fromiter((row_id in self._position for row_id in ids.tolist()), dtype=bool, count=len(ids))
            repeated |= ids.duplicated().to_numpy()
            applied.duplicates += int(repeated.sum())
            rows = rows[~repeated]
        applied.rows += len(rows)
        return rows.reset_index(drop=True)

    def _set_labels(self, labels: pd.DataFrame, applied: Applied) -> pd.DataFrame:
        """Set the labels of buffered rows by id; returns the rows whose labels changed."""
        contract = self.contract
        if not contract.id:
            raise DataError("label events name their row by the contract's id, and this contract declares none")
        if contract.id not in labels:
            raise DataError(f"a label event must name its row's {contract.id}")
        columns = [c for c in [*contract.labels, *([contract.label_known.column] if contract.label_known.column else [])] if c in labels]
        labels = _typed(labels[[contract.id, *columns]].copy(), contract, only=columns).drop_duplicates(contract.id, keep="last")
        position = np.array([self._position.get(row_id, -1) for row_id in labels[contract.id].tolist()], dtype=np.int64)
        unknown = position < 0
        if unknown.any():
            applied.stale += int(unknown.sum())  # its row is older than the buffer's reach, or never came
            labels, position = labels[~unknown], position[~unknown]
        if not len(labels):
            return self.rows.iloc[0:0]
        before = self.rows[columns].iloc[position].reset_index(drop=True)
        after = labels[columns].reset_index(drop=True)
        same = ((before == after) | (before.isna() & after.isna())).all(axis=1).to_numpy()
        applied.duplicates += int(same.sum())
        position, after = position[~same], after[~same]
        self.rows = self.rows.copy(deep=False)  # a new frame: the one a failed batch restores is untouched
        for column in columns:
            values = self.rows[column].copy()
            incoming = after[column]
            if values.dtype.kind in "iub" and incoming.dtype.kind not in "iub":
                values = values.astype("float64")
            values.iloc[position] = incoming.array  # an array, not numpy: a time keeps its zone
            self.rows[column] = values
        applied.labels += len(position)
        return self.rows.iloc[position]

    def _new_source_rows(self, name: str, frame: pd.DataFrame, applied: Applied) -> pd.DataFrame:
        declared = self.contract.sources[name]
        frame = _typed(frame, declared.contract())
        horizon = self._horizon()
        if horizon is not None:
            stale = (_known(frame, declared) <= horizon - _US).to_numpy()
            applied.stale += int(stale.sum())
            frame = frame[~stale]
        identity = [declared.timestamp, *sorted(set(declared.entities.values()))]
        buffered = self.sources[name]
        both = pd.concat([buffered[identity], frame[identity]], ignore_index=True)
        repeated = both.duplicated(keep="first").to_numpy()[len(buffered):]
        applied.duplicates += int(repeated.sum())
        frame = frame[~repeated].reset_index(drop=True)
        applied.source_rows += len(frame)
        return frame

    def _remember(self, rows: pd.DataFrame | None, sources: Mapping[str, pd.DataFrame], after: pd.Timestamp | None = None,
                  events: bool = False) -> None:
        """The instants these rows bring besides their events' own: their labels' known times (label
        aggregations), further sources' known times, and the moment each leaves each window that
        reads it (its events' too, with ``events``); those after ``after`` only, when given. Written
        once the watermark reaches them."""
        contract = self.contract
        times, views, keys = [], [], []
        bound = _micros_of(after) if after is not None else None

        def add(index: int, at: np.ndarray, text: np.ndarray, has: np.ndarray, shifts: list[int]) -> None:
            has = has & (text != None)  # noqa: E711  (elementwise)
            for shift in shifts:
                moment = at[has] + np.int64(shift)
                later = moment > bound if bound is not None else np.ones(len(moment), dtype=bool)
                times.append(moment[later])
                views.append(np.full(int(later.sum()), index, dtype=np.int64))
                keys.append(text[has][later])

        for index, view in enumerate(self.views):
            windows = _windows_by_stream(view, contract)
            if rows is not None and len(rows):
                text = _text_keys(rows[view.join_key])
                if events and "" in windows:
                    at = _micros_array(rows[contract.timestamp])
                    add(index, at, text, at != _NAT, windows[""])  # the event itself is touched directly
                labels = [column for column in windows if column in contract.labels]
                if labels:
                    known = _micros_array(known_times(rows, contract))
                    for column in labels:
                        add(index, known, text, rows[column].notna().to_numpy() & (known != _NAT), [0, *windows[column]])
            for name in {a.source for _, a in view.aggregations if a.source is not None}:
                frame = sources.get(name)
                if frame is None or not len(frame):
                    continue
                declared = contract.sources[name]
                known = _micros_array(_known(frame, declared))
                add(index, known, _text_keys(frame[declared.entities[view.entity]]), known != _NAT,
                    [0, *windows[_SOURCE_STREAM + name]])
        if times:
            self._due.add(np.concatenate(times), np.concatenate(views), np.concatenate(keys))

    def _rows_at_watermark(self, view: Any, keys: set[str], since: pd.Timestamp | None) -> pd.DataFrame:
        """Each key's row at its latest instant at or before the watermark (computed from its buffered rows)."""
        contract = self.contract
        wanted = pd.Index(list(keys))
        found = self._rows_of[view.join_key]
        positions = sorted(at for key in keys for at in found.get(key, ()))  # the buffer's order: ties keep it
        mine = self.rows.iloc[positions]
        sources = {}
        for name in {a.source for _, a in view.aggregations if a.source is not None}:
            column = contract.sources[name].entities[view.entity]
            frame = self.sources[name]
            sources[name] = frame[wanted.get_indexer(self._keys_of_sources[(name, column)]) >= 0] if len(frame) else frame
        table = entity_table(mine, contract, view.entity, list(view.aggregations), since=since,
                             until=self.watermark + _US, sources=sources)
        if not len(table):
            return table
        return table.drop_duplicates(view.join_key, keep="last").reset_index(drop=True)  # sorted by key and instant


_NAT = np.iinfo(np.int64).min
_SOURCE_STREAM = "source:"


def _windows_by_stream(view: Any, contract: Contract) -> dict[str, list[int]]:
    """The distinct windows (microseconds) of a view's aggregations per stream they read: ``""`` the
    entity's events, a label's name its known values, ``source:<name>`` a further source's rows."""
    out: dict[str, set[int]] = {}
    for _, a in view.aggregations:
        stream = _SOURCE_STREAM + a.source if a.source is not None else a.column if a.column in contract.labels else ""
        out.setdefault(stream, set()).add(a.window // dt.timedelta(microseconds=1))
    return {stream: sorted(windows) for stream, windows in out.items()}


class _Pending:
    """Instants still to come, as (time, view index, key) in runs sorted by time: taking those due is
    a binary search per run (no pass over all of them), and a batch's new instants are one run,
    merged with the runs before it while those are no more than twice as long (so few runs remain,
    and each instant is merged a logarithmic number of times). Runs are never changed in place: a
    copy of the list is a snapshot."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, at: np.ndarray, view: np.ndarray, key: np.ndarray) -> None:
        if not len(at):
            return
        order = np.argsort(at, kind="stable")
        runs = [*self.runs, (at[order], view[order], key[order])]
        while len(runs) > 1 and len(runs[-2][0]) <= 2 * len(runs[-1][0]):
            (a_at, a_view, a_key), (b_at, b_view, b_key) = runs[-2], runs[-1]
            at, view, key = np.concatenate([a_at, b_at]), np.concatenate([a_view, b_view]), np.concatenate([a_key, b_key])
            order = np.argsort(at, kind="stable")
            runs[-2:] = [(at[order], view[order], key[order])]
        self.runs = runs

    def pop(self, until: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The instants at or before ``until`` (microseconds), taken out."""
        taken, kept = [], []
        for at, view, key in self.runs:
            cut = int(np.searchsorted(at, until, side="right"))
            if cut:
                taken.append((at[:cut], view[:cut], key[:cut]))
            if cut < len(at):
                kept.append((at[cut:], view[cut:], key[cut:]))
        self.runs = kept
        if not taken:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object)
        return tuple(np.concatenate([run[i] for run in taken]) for i in range(3))  # type: ignore[return-value]


def _add_positions(index: dict[str, list[int]], texts: np.ndarray, start: int) -> None:
    """Record each row's position (``start`` on) under its entity's key."""
    for offset, key in enumerate(texts.tolist()):
        if key is not None:
            index.setdefault(key, []).append(start + offset)


def _micros_of(moment: pd.Timestamp) -> int:
    return int(pd.Timestamp(moment).tz_convert("UTC").value // 1000) if pd.Timestamp(moment).tzinfo else int(pd.Timestamp(moment).value // 1000)


def _micros_array(times: pd.Series) -> np.ndarray:
    """Microseconds since the epoch (NaT: the int64 minimum)."""
    return times.astype("datetime64[us, UTC]").array.asi8 if len(times) else np.zeros(0, dtype=np.int64)


def _known(frame: pd.DataFrame, declared: Any) -> pd.Series:
    """When each row of a further source becomes known: its time plus the source's delay."""
    return frame[declared.timestamp] + pd.Timedelta(declared.delay)


def _text_keys(values: pd.Series) -> np.ndarray:
    """Join keys as the online store names them (text; None where absent), as an object array."""
    if values.dtype == object and len(values) and all(isinstance(v, str) for v in values.tolist()):
        return values.to_numpy(dtype=object)
    return np.array([None if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA else _key(v)
                     for v in values.tolist()], dtype=object)


def _key(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)




def _empty(contract: Contract) -> pd.DataFrame:
    return _typed(pd.DataFrame({name: pd.Series([], dtype=object) for name in contract.columns}), contract)


def _typed(frame: pd.DataFrame, contract: Contract, only: Iterable[str] | None = None) -> pd.DataFrame:
    """The frame in the lake's dtypes as pandas reads them: times UTC microseconds, numbers as their
    width (float64 where an integer column holds a null), text as objects."""
    frame = frame.copy() if only is None else frame
    for name in (only if only is not None else contract.columns):
        column = contract.columns[name]
        if name not in frame:
            frame[name] = None
        values = frame[name]
        if column.type == "timestamp":
            if values.dtype != "datetime64[us, UTC]":
                frame[name] = pd.to_datetime(values, utc=True, format="ISO8601").astype("datetime64[us, UTC]") \
                    if values.dtype == object else pd.to_datetime(values, utc=True).astype("datetime64[us, UTC]")
        elif column.type in NUMERIC:
            if values.dtype.kind not in "iuf":
                values = pd.to_numeric(values)
            if column.type.startswith("int") and not values.isna().any():
                frame[name] = values.astype(column.type)
            elif column.type.startswith("int"):
                frame[name] = values.astype("float64")
            else:
                frame[name] = values.astype(column.type)
        elif column.type == "bool":
            frame[name] = values.astype(object) if values.isna().any() else values.astype(bool)
        elif values.dtype != object:
            frame[name] = values.astype(object).where(values.notna(), None)
    return frame


# ---------------------------------------------------------------- replay: the online path, in time order
def timeline(rows: pd.DataFrame, contract: Contract, sources: Mapping[str, pd.DataFrame] | None = None) -> list[tuple[pd.Timestamp, Events]]:
    """Rows as the events they were, in time order: each row at its event time without its labels,
    its labels at the time they became known, each further source's row at its known time. One
    :class:`Events` per distinct time."""
    hidden = [c for c in [*contract.labels, *([contract.label_known.column] if contract.label_known.column else [])]]
    parts: list[tuple[str, pd.Series, pd.DataFrame]] = []
    bare = rows.copy()
    for column in hidden:
        bare[column] = None
    parts.append(("rows", rows[contract.timestamp], bare))
    if contract.id:
        known = known_times(rows, contract)
        labelled = rows[list(contract.labels)].notna().any(axis=1) & known.notna()
        labels = rows.loc[labelled, [contract.id, *hidden]]
        parts.append(("labels", known[labelled], labels))
    for name, frame in (sources or {}).items():
        declared = contract.sources[name]
        parts.append((f"source:{name}", frame[declared.timestamp] + pd.Timedelta(declared.delay), frame))
    by_time: dict[pd.Timestamp, Events] = {}
    for kind, times, frame in parts:
        for moment, group in frame.groupby(times.to_numpy(), sort=False):
            events = by_time.setdefault(pd.Timestamp(moment), Events())
            if kind == "rows":
                events.rows = group
            elif kind == "labels":
                events.labels = group
            else:
                events.sources[kind.removeprefix("source:")] = group
    return sorted(by_time.items(), key=lambda item: item[0])


def replay(live: LiveFeatures, read: Any, rows: pd.DataFrame, sources: Mapping[str, pd.DataFrame] | None = None,
           join_keys: Sequence[str] = ()) -> pd.DataFrame:
    """Replay ``rows`` (and further sources' rows) in time order through ``live``, reading each row's
    features as a request at its time would, just before the events of that time are applied.

    ``read``: ``(keys, at=times) -> (features, known)`` (:meth:`flywheel.features.store.OnlineReader.read`).
    Returns the features read, one row per row of ``rows`` (in their order)."""
    from flywheel.features.engine import join_key_text

    contract = live.contract
    rows = rows.reset_index(drop=True)
    position = pd.Series(np.arange(len(rows)))
    keys = {key: (rows[key] if contract.columns[key].type == "string" else join_key_text(rows[key])).to_numpy(dtype=object)
            for key in join_keys}
    requests = dict(iter(position.groupby(rows[contract.timestamp].to_numpy(), sort=False)))
    times = rows[contract.timestamp].dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[us]")
    out: dict[str, np.ndarray] = {}
    waiting: list[Events] = []
    for moment, events in timeline(rows, contract, sources):
        asked = requests.get(moment)
        if asked is not None:
            # Everything before this moment, in one batch (the online rows are the same however the
            # events were batched: each entity's row at its latest instant before the watermark).
            live.apply(merge(waiting), now=moment - _US)
            waiting = []
            at = asked.to_numpy()
            features, _ = read({key: [None if pd.isna(v) else v for v in values[at]] for key, values in keys.items()}, at=times[at])
            for name, values in features.items():
                if name not in out:
                    out[name] = np.full(len(rows), np.nan, dtype=values.dtype if values.dtype == object else np.float64)
                out[name][at] = values
        waiting.append(events)
    if waiting:
        live.apply(merge(waiting))
    return pd.DataFrame(out)


def merge(batches: Sequence[Events]) -> Events:
    """Several batches as one (rows, labels and each source's rows concatenated in order)."""
    def joined(frames: list[pd.DataFrame | None]) -> pd.DataFrame | None:
        frames = [frame for frame in frames if frame is not None and len(frame)]
        return None if not frames else frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)

    sources: dict[str, list[pd.DataFrame]] = {}
    for batch in batches:
        for name, frame in batch.sources.items():
            sources.setdefault(name, []).append(frame)
    merged = {name: joined(frames) for name, frames in sources.items()}
    return Events(joined([b.rows for b in batches]), joined([b.labels for b in batches]),
                  {name: frame for name, frame in merged.items() if frame is not None})
