"""Capture: a sampled share of the scored requests, written in the background as the monitoring
layout's Parquet parts (:mod:`flywheel.monitoring.capture`).

The request path only hands references over: a scoring pass puts the arrays it already computed
(the validated request columns, the features it read, the predictions) with the spans of its
sampled requests and their ids on a bounded queue (:class:`CaptureQueue`, counted in rows). A full
queue drops the pass's rows and counts them (``flywheel_capture_rows_total{outcome="dropped"}``);
offering never blocks, never raises. One writer thread per process takes what waits every second
(:data:`DRAIN_S`), turns it into Arrow at once (:func:`captured_table`; the passes' arrays
are let go), and writes parts of at most ``monitoring.capture_batch_rows`` rows, at least every
``monitoring.capture_flush_s`` seconds, through the storage layer, named
``part-<ns>-<pid>-<seq>.parquet`` (workers never collide). A part that cannot be written is
counted (``failed``) and logged with its cause; its rows are dropped, never retried. Closing the
queue (server stop, worker exit, interpreter exit) writes what waits.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from serving import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)  # no __dict__: thousands wait in the queue
class Captured:
    """One scoring pass's sampled requests, as references to what the pass computed."""

    captured_ns: int  # when it was scored (time.time_ns())
    bundle: Any  # serving.predictor.Bundle: the version, its schema and task
    columns: dict[str, np.ndarray]  # the pass's validated request columns (every row of the pass)
    features: dict[str, np.ndarray]  # the features it read, by name
    known: dict[str, np.ndarray]  # by join key
    predictions: np.ndarray
    spans: tuple[tuple[int, int, str], ...]  # (start, stop, request id) of each sampled request
    rows: int  # rows in the spans


# How often the writer thread takes what waits (turned into Arrow at once: references never pile up).
# Each take holds the interpreter a few milliseconds; taken every 0.25 s in chunks of 128 rows, the
# request path stalled about 2.5% of the time in 1 ms gaps (measured in process, one-row passes at
# 2,000 rows/s): enough requests to move p99. Once a second in one piece: about 1%, one gap a second.
# (Letting go of the GIL after every column was worse still: the handoffs cost the request path 24%
# of its requests/s and 1.65x its p99 in benchmarks/serving.py --only capture, 2026-12-08.)
DRAIN_S = 1.0


class CaptureQueue:
    """A bounded queue of captured rows with one writer thread: :meth:`offer` from the request path
    (never blocks: a full queue drops and counts), and in the thread, every ``drain_s`` seconds (or
    as soon as ``batch_rows`` rows wait), ``sink(items, closing) -> (rows written, rows failed)``
    with what waits, a batch of at most ``batch_rows`` rows at a time (an empty list when nothing
    waits: the sink writes on its own schedule; ``closing``: the last call, write everything).

    Rows count against ``max_rows`` from the moment they are queued until the sink took them, so a
    stalled sink (a storage write that hangs) bounds the memory held, and the request path sheds
    the rest. The queue holds the passes' own arrays only briefly: a sink turns them into compact
    Arrow columns at once, and a request's numpy arrays neither pile up nor age into the garbage
    collector's old generation."""

    def __init__(self, sink: Callable[[list[Any], bool], tuple[int, int]], max_rows: int, batch_rows: int,
                 drain_s: float = DRAIN_S, name: str = "flywheel-capture") -> None:
        self._sink = sink
        self.max_rows, self.batch_rows, self.drain_s = max_rows, batch_rows, drain_s
        self._items: collections.deque = collections.deque()
        self._rows = 0  # queued, or being taken by the sink
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._queued = metrics.CAPTURE_ROWS.labels("queued")
        self._dropped = metrics.CAPTURE_ROWS.labels("dropped")
        self._written = metrics.CAPTURE_ROWS.labels("written")
        self._failed = metrics.CAPTURE_ROWS.labels("failed")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        atexit.register(self.close)

    @property
    def pending_rows(self) -> int:
        return self._rows

    def offer(self, item: Any, rows: int) -> bool:
        """Queue ``rows`` rows (as one item) if there is room; else drop them. True when queued."""
        try:
            with self._lock:
                room = not self._closed and self._rows + rows <= self.max_rows
                if room:
                    self._items.append((item, rows))
                    self._rows += rows
                    full = self._rows >= self.batch_rows
            if not room:
                self._dropped.inc(rows)
                return False
            self._queued.inc(rows)
            if full:
                self._wake.set()
            return True
        except Exception:  # never into the request
            return False

    def close(self, timeout: float = 30.0) -> None:
        """Write what waits and stop the writer (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.drain_s)
            self._wake.clear()
            closing = self._closed
            while self._take(False):
                pass
            if closing:
                self._take(True)
                return

    def _take(self, closing: bool) -> bool:
        """Hand one batch of what waits to the sink (at least one item, at most ``batch_rows`` rows
        unless one item alone holds more; with nothing waiting, an empty one); True when items were taken."""
        with self._lock:
            batch, rows = [], 0
            while self._items and (not batch or rows + self._items[0][1] <= self.batch_rows):
                item, count = self._items.popleft()
                batch.append(item)
                rows += count
        written = failed = 0
        try:
            written, failed = self._sink(batch, closing)
        except Exception as exc:  # the batch's rows are lost: counted, said with the cause
            failed = rows
            log.error("capture: %d rows were not written: %s: %s", rows, type(exc).__name__, exc)
        finally:
            if rows:
                with self._lock:
                    self._rows -= rows
        if written:
            self._written.inc(written)
        if failed:
            self._failed.inc(failed)
        return bool(batch)


def _picked(item: Captured) -> np.ndarray | None:
    """The rows of the pass that were sampled (None: all of them)."""
    count = len(item.predictions)
    if len(item.spans) == 1 and item.spans[0][0] == 0 and item.spans[0][1] == count:
        return None
    return np.concatenate([np.arange(start, stop) for start, stop, _ in item.spans])


def _gather(arrays: list[np.ndarray], picks: list[np.ndarray | None]) -> np.ndarray:
    parts = [values if pick is None else values[pick] for values, pick in zip(arrays, picks)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def captured_table(items: list[Captured]) -> Any:
    """The captured rows of passes scored by one model version, as one table in the capture's layout."""
    from flywheel.monitoring.capture import capture_table, input_array
    from flywheel.scoring import output_columns

    bundle = items[0].bundle
    schema, task = bundle.schema, bundle.model.task
    picks = [_picked(item) for item in items]
    # a few numpy calls for the whole batch, not a few per pass (a batch can hold thousands of passes)
    spans = [span for item in items for span in item.spans]
    request_ids = np.repeat(np.array([rid for _, _, rid in spans], dtype=object), [stop - start for start, stop, _ in spans])
    captured_at = np.repeat(np.array([item.captured_ns for item in items], dtype=np.int64),
                            [item.rows for item in items]).view("datetime64[ns]")
    inputs = {}
    for spec in schema.fields:
        kind = "integer" if spec.kind == "number" and spec.integer else spec.kind
        inputs[spec.name] = input_array(_gather([item.columns[spec.name] for item in items], picks), kind,
                                        empty_is_null=not spec.required)
    row_time = captured_at
    if schema.time in items[0].columns:
        times = _gather([item.columns[schema.time] for item in items], picks).astype("datetime64[ns]")
        row_time = np.where(np.isnat(times), captured_at, times)
    features = {name: _gather([item.features[name] for item in items], picks) for name in items[0].features}
    known = {key: _gather([item.known[key] for item in items], picks) for key in items[0].known}
    predictions = _gather([item.predictions for item in items], picks)
    names = output_columns(task)
    if predictions.ndim == 1:
        outputs = {names[0]: predictions}
    else:
        outputs = {name: predictions[:, column] for column, name in enumerate(names)} if len(names) == predictions.shape[1] \
            else {names[0]: predictions[:, 0]}
    return capture_table(request_ids=request_ids, captured_at=captured_at, model_version=bundle.version, row_time=row_time,
                         inputs=inputs, features=features, known=known, outputs=outputs)


CHUNK_ROWS = 4096  # rows turned into Arrow at a time, letting go of the GIL between chunks (a chunk: about 10 ms)


class CaptureWriter:
    """The writer thread's sink: captured passes turned into Arrow as they come (per model version),
    written as parts (at most ``batch_rows`` rows each, one per hour of the rows' own time) once
    ``batch_rows`` rows are pending, ``flush_s`` seconds after the oldest pending one arrived, or
    when closing."""

    def __init__(self, storage_of: Callable[[], Any], batch_rows: int, flush_s: float) -> None:
        self._storage_of = storage_of  # opened in the writer's thread, on first use
        self._storage: Any = None
        self.batch_rows, self.flush_s = batch_rows, flush_s
        self._pending: dict[str, list[Any]] = {}  # model version -> Arrow tables not yet written
        self._pending_rows = 0
        self._since = 0.0  # when the oldest pending row was taken (monotonic)
        self._sequence = 0

    @staticmethod
    def _table(items: list[Captured]) -> Any:
        """The items' table, built a few thousand rows at a time, letting go of the interpreter
        between chunks (each call has a fixed cost per column: fewer, larger chunks hold the GIL
        less in all)."""
        import pyarrow as pa

        chunks, chunk, rows = [], [], 0
        for item in items:
            chunk.append(item)
            rows += item.rows
            if rows >= CHUNK_ROWS:
                chunks.append(captured_table(chunk))
                chunk, rows = [], 0
                time.sleep(0)
        if chunk:
            chunks.append(captured_table(chunk))
        return chunks[0] if len(chunks) == 1 else pa.concat_tables(chunks, promote_options="permissive")

    def __call__(self, items: list[Captured], closing: bool = False) -> tuple[int, int]:
        """Take ``items`` (convert them); write the pending rows when due. (rows written, rows failed)."""
        now = time.monotonic()
        if items:
            if not self._pending_rows:
                self._since = now
            by_version: dict[str, list[Captured]] = {}
            for item in items:
                by_version.setdefault(item.bundle.version, []).append(item)
            for version, group in by_version.items():
                self._pending.setdefault(version, []).append(self._table(group))
                self._pending_rows += sum(item.rows for item in group)
        if self._pending_rows and (closing or self._pending_rows >= self.batch_rows or now - self._since >= self.flush_s):
            return self._write_pending()
        return 0, 0

    def _write_pending(self) -> tuple[int, int]:
        import pyarrow as pa

        from flywheel.monitoring.capture import write_parts

        pending, self._pending, self._pending_rows = self._pending, {}, 0
        written = failed = 0
        for version, tables in pending.items():
            table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")
            for start in range(0, table.num_rows, self.batch_rows):
                part = table.slice(start, self.batch_rows)
                try:
                    if self._storage is None:
                        self._storage = self._storage_of()
                    uris = write_parts(self._storage, part, self._sequence)
                except Exception as exc:  # the storage failed: these rows are lost, said once with the cause
                    log.error("capture: %d rows of model version %s were not written: %s: %s",
                              part.num_rows, version, type(exc).__name__, exc)
                    self._sequence += 1
                    failed += part.num_rows
                    continue
                self._sequence += len(uris)
                written += part.num_rows
        return written, failed
