"""Delivering events to the live feature worlds: producers append to an event log; one updater reads
it in batches and applies them to every served world (:class:`flywheel.features.live.LiveFeatures`).

An event is one JSON object (one per line in a file):

- ``{"row": {...}}``: a main row as it happens (a request's fields; labels, if it carries them,
  count from the time they become known);
- ``{"label": {"<id column>": ..., "<label>": ..., ...}}``: a row's label became known (and, for a
  contract whose label time is a column, that column: when it became known);
- ``{"source": "<name>", "row": {...}}``: a row of one of the contract's further sources.

The log (``live.log``):

- **sqlite** (embedded): a table in one SQLite file per use case beside the feature worlds; the
  updater's position is a row of the same file, moved in the transaction that acknowledges a batch.
- **redis** (cluster): a Redis Stream per use case, read through a consumer group (``XREADGROUP``);
  a batch is acknowledged (``XACK``) once applied; entries a dead updater had claimed are claimed
  again after ``live.claim_idle_s`` (``XAUTOCLAIM``), so an update is never lost with its consumer.
  Why Redis Streams: the online store is already Redis on the cluster, consumer groups give
  at-least-once delivery with acknowledgements and re-delivery, and no new service is needed; the
  updater is idempotent by event id, which turns at-least-once into exactly-once effects. Kafka or
  Flink would add a broker and a job manager for what one Deployment does here.

An event that does not fit the contract goes to the dead-letter log with the reason (and a counter
moves); an update that fails (the online store is down) is retried with backoff and, if it still
fails, left unacknowledged to be read again: never silently dropped.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd
from prometheus_client import Counter
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from flywheel.contract import NUMERIC, Contract
from flywheel.errors import DataError, FeatureStoreError
from flywheel.features.live import Events, LiveFeatures

log = logging.getLogger(__name__)

EVENTS = Counter("flywheel_live_events", "Events read by the live-feature updater, by outcome", ["outcome"])
GROUP = "flywheel-live"


@dataclass(frozen=True)
class DeadEvent:
    """An event that cannot be applied: where it was, what it held, why."""

    where: str
    body: str
    reason: str


# ---------------------------------------------------------------- parsing
def parse_events(bodies: Sequence[tuple[str, bytes | str]], contract: Contract) -> tuple[Events, list[DeadEvent]]:
    """``(where, JSON text)`` pairs as one :class:`Events` batch, and the ones that do not fit the
    contract, each with the reason naming the field."""
    rows: list[dict[str, Any]] = []
    labels: list[dict[str, Any]] = []
    sources: dict[str, list[dict[str, Any]]] = {}
    dead: list[DeadEvent] = []
    label_fields = {contract.id, *contract.labels, *([contract.label_known.column] if contract.label_known.column else [])}
    for where, body in bodies:
        text = body.decode("utf-8", errors="replace") if isinstance(body, (bytes, bytearray)) else body
        try:
            event = json.loads(text)
            if not isinstance(event, dict):
                raise DataError(f"an event is a JSON object, not {type(event).__name__}")
            extra = sorted(set(event) - {"row", "label", "source"})
            if extra:
                raise DataError(f"unknown field(s) of an event: {', '.join(extra)}")
            if "label" in event:
                labels.append(_checked(event["label"], contract, "label", required=[contract.id], allowed=label_fields))
            elif "source" in event:
                name = event["source"]
                declared = contract.sources.get(name) if isinstance(name, str) else None
                if declared is None:
                    raise DataError(f"source {name!r} is not a source of the contract (sources: {', '.join(contract.sources) or 'none'})")
                sources.setdefault(name, []).append(_checked(event.get("row"), declared.contract(), f"source {name}",
                                                             required=[declared.timestamp]))
            elif "row" in event:
                required = [contract.timestamp, *([contract.id] if contract.id else [])]
                rows.append(_checked(event["row"], contract, "row", required=required))
            else:
                raise DataError('an event holds "row", "label" or "source" (with "row")')
        except (DataError, ValueError) as exc:
            reason = str(exc) if isinstance(exc, DataError) else f"not JSON: {exc}"
            dead.append(DeadEvent(where, text[:2000], reason))
    return Events(
        rows=pd.DataFrame(rows) if rows else None,
        labels=pd.DataFrame(labels) if labels else None,
        sources={name: pd.DataFrame(found) for name, found in sources.items()},
    ), dead


def _checked(record: Any, contract: Contract, what: str, required: Iterable[str], allowed: set[str] | None = None) -> dict[str, Any]:
    """A record whose fields are columns of ``contract`` with values of their types (times parsed),
    holding every ``required`` field; DataError names the first field at fault."""
    if not isinstance(record, dict):
        raise DataError(f"a {what} event's body is a JSON object of its columns")
    out: dict[str, Any] = {}
    for name, value in record.items():
        column = contract.columns.get(name)
        if column is None or (allowed is not None and name not in allowed):
            raise DataError(f"{what}: {name!r} is not a column it may carry")
        if value is None:
            out[name] = None
            continue
        kind = column.type
        if kind == "timestamp":
            try:
                moment = pd.Timestamp(value, unit="s") if isinstance(value, (int, float)) and not isinstance(value, bool) else pd.Timestamp(value)
            except (ValueError, TypeError, OverflowError):
                raise DataError(f"{what}: {name} = {value!r} is not a time (ISO 8601 or seconds since the epoch)") from None
            if moment is pd.NaT:
                raise DataError(f"{what}: {name} = {value!r} is not a time")
            out[name] = moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")
        elif kind in NUMERIC:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
                raise DataError(f"{what}: {name} = {value!r} is not a finite number")
            if kind.startswith("int") and float(value) != int(value):
                raise DataError(f"{what}: {name} = {value!r} is not a whole number")
            out[name] = value
        elif kind == "bool":
            if not isinstance(value, bool):
                raise DataError(f"{what}: {name} = {value!r} is not true or false")
            out[name] = value
        else:
            if not isinstance(value, str):
                raise DataError(f"{what}: {name} = {value!r} is not text")
            out[name] = value
    missing = [name for name in required if out.get(name) is None]
    if missing:
        raise DataError(f"{what}: {', '.join(missing)} missing")
    return out


def encode_rows(columns: Mapping[str, Any], count: int, contract: Contract, fields: Sequence[str]) -> list[bytes]:
    """One ``{"row": ...}`` event per scored row, from serving's validated columns (numbers, times
    as ISO 8601, text, booleans; absent values left out). A row without the contract's id gets one
    derived from its content, so that a re-delivered row is still recognised."""
    import hashlib

    import numpy as np

    out: list[dict[str, Any]] = [{} for _ in range(count)]
    for name in fields:
        values = columns.get(name)
        if values is None:
            continue
        kind = contract.columns[name].type
        if values.dtype.kind == "M":
            texts = np.datetime_as_string(values.astype("datetime64[us]"), unit="us", timezone="UTC")
            for row in np.flatnonzero(~np.isnat(values)).tolist():
                out[row][name] = str(texts[row])
        elif values.dtype.kind == "f":
            for row, value in enumerate(values.tolist()):
                if value == value:  # not NaN
                    out[row][name] = bool(value) if kind == "bool" else int(value) if kind.startswith("int") else value
        else:
            for row, value in enumerate(values.tolist()):
                if value is not None and value != "":
                    out[row][name] = value
    bodies = []
    for record in out:
        if contract.id and contract.id not in record:
            digest = hashlib.sha1(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
            record[contract.id] = f"sha1:{digest}"
        bodies.append(json.dumps({"row": record}, separators=(",", ":")).encode())
    return bodies


# ---------------------------------------------------------------- the logs
class SqliteEventLog:
    """The embedded event log: one SQLite file (write-ahead logging), events in arrival order, the
    updater's position, and the dead letters."""

    def __init__(self, path: Path, group: str = GROUP) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.group = group  # whose position: each updater of its own worlds reads the whole log
        self._local = threading.local()
        with self._connection() as connection:
            connection.executescript(
                "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL, arrived REAL);"
                "CREATE TABLE IF NOT EXISTS position (consumer TEXT PRIMARY KEY, seq INTEGER NOT NULL);"
                "CREATE TABLE IF NOT EXISTS dead (seq INTEGER, body BLOB, reason TEXT, at TEXT);"
            )
            columns = {row[1] for row in connection.execute("PRAGMA table_info(events)")}
            if "arrived" not in columns:  # a log written before arrival times were kept
                connection.execute("ALTER TABLE events ADD COLUMN arrived REAL")

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=30)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            self._local.connection = connection
        return connection

    def append(self, bodies: Sequence[bytes]) -> int:
        connection = self._connection()
        with connection:
            now = time.time()
            connection.executemany("INSERT INTO events (body, arrived) VALUES (?, ?)", [(body, now) for body in bodies])
        return len(bodies)

    def trim(self, before_s: float) -> int:
        """Remove the events that arrived before ``before_s`` (seconds since the epoch): a retention
        bound, so that the log and a world's seeding from its history do not grow for ever. Dead
        letters stay (they say why an event failed). Returns how many were removed."""
        connection = self._connection()
        with connection:
            return connection.execute("DELETE FROM events WHERE arrived < ?", (before_s,)).rowcount

    def claim(self, limit: int, block_s: float = 0.0) -> list[tuple[str, bytes]]:
        """The next events after the updater's position (waiting up to ``block_s`` for one)."""
        deadline = time.monotonic() + block_s
        connection = self._connection()
        while True:
            position = connection.execute("SELECT seq FROM position WHERE consumer = ?", (self.group,)).fetchone()
            found = connection.execute("SELECT seq, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                                       (position[0] if position else 0, limit)).fetchall()
            if found or time.monotonic() >= deadline:
                return [(str(seq), bytes(body)) for seq, body in found]
            time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))

    def ack(self, ids: Sequence[str], dead: Sequence[DeadEvent] = ()) -> None:
        """Move the position past ``ids`` and record the dead letters, in one transaction."""
        if not ids:
            return
        connection = self._connection()
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        with connection:
            connection.executemany("INSERT INTO dead (seq, body, reason, at) VALUES (?, ?, ?, ?)",
                                   [(int(d.where), d.body, d.reason, now) for d in dead])
            connection.execute("INSERT INTO position (consumer, seq) VALUES (?, ?) ON CONFLICT(consumer) DO UPDATE SET "
                               "seq = max(seq, excluded.seq)", (self.group, max(int(i) for i in ids)))

    def history(self) -> list[tuple[str, bytes]]:
        """Every event the log holds, applied or not, in order (to rebuild a live state)."""
        return [(str(seq), bytes(body)) for seq, body in self._connection().execute("SELECT seq, body FROM events ORDER BY seq")]

    def dead_letters(self) -> list[DeadEvent]:
        rows = self._connection().execute("SELECT seq, body, reason FROM dead ORDER BY rowid").fetchall()
        return [DeadEvent(str(seq), body.decode() if isinstance(body, bytes) else body, reason) for seq, body, reason in rows]

    def backlog(self) -> int:
        connection = self._connection()
        position = connection.execute("SELECT seq FROM position WHERE consumer = ?", (self.group,)).fetchone()
        return connection.execute("SELECT count(*) FROM events WHERE seq > ?", (position[0] if position else 0,)).fetchone()[0]

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None


class RedisEventLog:
    """The cluster event log: a Redis Stream read through a consumer group; dead letters in a stream of their own."""

    def __init__(self, client: Any, stream: str, consumer: str | None = None, claim_idle_s: float = 30.0,
                 group: str = GROUP) -> None:
        import redis

        self.group = group
        self.client = client
        self.stream = stream
        self.dead_stream = f"{stream}:dead"
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms = int(claim_idle_s * 1000)
        try:
            client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def append(self, bodies: Sequence[bytes]) -> int:
        pipe = self.client.pipeline(transaction=False)
        for body in bodies:
            pipe.xadd(self.stream, {"body": body})
        pipe.execute()
        return len(bodies)

    def claim(self, limit: int, block_s: float = 0.0) -> list[tuple[str, bytes]]:
        """Entries another consumer claimed and never acknowledged (idle past ``claim_idle_s``)
        first, then new ones (waiting up to ``block_s``)."""
        _, stuck, *_ = self.client.xautoclaim(self.stream, self.group, self.consumer, self.claim_idle_ms, "0-0", count=limit)
        entries = list(stuck)
        if not entries:
            answer = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=limit,
                                            block=int(block_s * 1000) if block_s > 0 else None)
            entries = answer[0][1] if answer else []
        return [(_text(entry_id), fields[b"body"] if b"body" in fields else b"") for entry_id, fields in entries if fields]

    def ack(self, ids: Sequence[str], dead: Sequence[DeadEvent] = ()) -> None:
        if not ids:
            return
        pipe = self.client.pipeline(transaction=True)
        for letter in dead:
            pipe.xadd(self.dead_stream, {"id": letter.where, "body": letter.body, "reason": letter.reason})
        pipe.xack(self.stream, self.group, *ids)
        pipe.execute()

    def history(self) -> list[tuple[str, bytes]]:
        """Every entry the stream holds, acknowledged or not, in order (to rebuild a live state)."""
        return [(_text(entry_id), fields.get(b"body", b"")) for entry_id, fields in self.client.xrange(self.stream)]

    def dead_letters(self) -> list[DeadEvent]:
        return [DeadEvent(_text(f[b"id"]), _text(f[b"body"]), _text(f[b"reason"])) for _, f in self.client.xrange(self.dead_stream)]

    def trim(self, before_s: float) -> int:
        """Remove the entries added before ``before_s`` (an entry's id is its arrival in
        milliseconds: ``XTRIM MINID``). Dead letters stay. Returns how many were removed."""
        return int(self.client.xtrim(self.stream, minid=f"{int(before_s * 1000)}-0", approximate=False))

    def backlog(self) -> int:
        """Entries not acknowledged: those delivered and pending, and those never delivered."""
        groups = {_text(g["name"]): g for g in self.client.xinfo_groups(self.stream)}
        group = groups.get(self.group)
        if group is None:
            return int(self.client.xlen(self.stream))
        undelivered = len(self.client.xrange(self.stream, min="(" + _text(group["last-delivered-id"])))
        return undelivered + int(group.get("pending", 0))

    def close(self) -> None:
        self.client.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def open_event_log(settings: Any, group: str = GROUP) -> SqliteEventLog | RedisEventLog:
    """The use case's event log as the settings choose it, read as ``group`` (an updater's position)."""
    from flywheel.features.store import feast_home, redis_client

    live = settings.live
    if live.log == "redis":
        connection = live.redis_connection or settings.features.redis_connection
        return RedisEventLog(redis_client(connection), f"{settings.features.project}:{settings.namespace}:events",
                             claim_idle_s=live.claim_idle_s, group=group)
    return SqliteEventLog(feast_home(settings) / "events.db", group)


class UpdaterBusy(FeatureStoreError):
    """Another updater applies the same log to the same worlds."""


def hold_updater_lock(settings: Any, group: str) -> Any:
    """An exclusive lock on being ``group``'s updater on this machine (released when the process
    ends): two updaters of the same worlds would each keep half of the events in their buffers
    and write wrong rows. UpdaterBusy when another process holds it. (On a cluster the updater is
    one Deployment of one replica, replaced, not rolled.)"""
    import fcntl

    from flywheel.features.store import feast_home

    path = feast_home(settings) / f"updater-{group}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UpdaterBusy(f"a live-feature updater is already applying this log to these worlds ({holder}): "
                          "it applies pushed events too; stop it first to apply them here") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle


# ---------------------------------------------------------------- the updater
@dataclass
class UpdaterStats:
    read: int = 0
    applied: int = 0
    dead: int = 0
    failed_batches: int = 0
    batches: int = 0
    seconds: float = 0.0
    lag_s: list[float] = field(default_factory=list)
    ticks_written: int = 0  # entity rows the clock's ticks wrote (windows that changed with no new event)
    trimmed: int = 0  # events removed from the log past its retention


def _transient() -> tuple[type[BaseException], ...]:
    """What a retry may cure: the online store or the log unreachable or busy."""
    import redis

    return (FeatureStoreError, OSError, sqlite3.OperationalError, ConnectionError, redis.exceptions.RedisError)


class Updater:
    """Reads the log in batches and applies each to every live world; acknowledges only what was applied.

    ``worlds``: a callable returning the live states to update now (world -> LiveFeatures): the
    served worlds change when a model is promoted or a canary starts."""

    def __init__(self, event_log: Any, contract: Contract, worlds: Callable[[], Mapping[str, LiveFeatures]],
                 batch_max: int = 1000, attempts: int = 5, backoff_s: float = 0.05,
                 clock: Callable[[], pd.Timestamp] | None = None, retention_s: float | None = None,
                 trim_every_s: float = 300.0) -> None:
        self.log = event_log
        # Events that arrived longer ago than ``retention_s`` are removed from the log (every
        # ``trim_every_s``). Default: the longest reach of the worlds' windows (their longest window
        # plus label and source delays) and a day: such an event can no longer move any window of a
        # world whose watermark follows its arrival, and a world brought live later seeds from the lake.
        self.retention_s = retention_s
        self.trim_every_s = trim_every_s
        self._trimmed_at = 0.0
        # ``clock`` (the wall clock, ``live.clock: wall``): each world's watermark follows it between
        # batches, so an event leaving a window is written when it does, whether or not another event
        # comes; None (``events``): the watermark moves with the events' own times only (a replay of history).
        self.clock = clock
        self.contract = contract
        self.worlds = worlds
        self.batch_max = batch_max
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.stats = UpdaterStats()

    def step(self, block_s: float = 0.0) -> int:
        """One batch: claimed, parsed, applied to every world (retried), acknowledged. Returns how
        many events it read (0: the log had none)."""
        claimed = self.log.claim(self.batch_max, block_s)
        if not claimed:
            self.tick()
            return 0
        started = time.perf_counter()
        events, dead = parse_events(claimed, self.contract)
        for letter in dead:
            log.warning("live: event %s is dead-lettered: %s", letter.where, letter.reason)
        try:
            for attempt in Retrying(stop=stop_after_attempt(self.attempts), reraise=True,
                                    wait=wait_exponential(multiplier=self.backoff_s, max=2.0),
                                    retry=retry_if_exception_type(_transient())):
                with attempt:
                    now = self.clock() if self.clock is not None else None
                    for world, live in self.worlds().items():
                        live.apply(events, now=now)
        except Exception as exc:
            # Not acknowledged: read again by the next step (or, on Redis, claimed by another updater).
            self.stats.failed_batches += 1
            EVENTS.labels("retried").inc(len(claimed))
            log.error("live: a batch of %d events could not be applied (%s: %s); it stays in the log",
                      len(claimed), type(exc).__name__, exc)
            raise FeatureStoreError(f"live update of {len(claimed)} events failed after {self.attempts} attempts: "
                                    f"{type(exc).__name__}: {exc}") from exc
        self.log.ack([where for where, _ in claimed], dead)
        applied = len(claimed) - len(dead)
        self.stats.read += len(claimed)
        self.stats.applied += applied
        self.stats.dead += len(dead)
        self.stats.batches += 1
        self.stats.seconds += time.perf_counter() - started
        EVENTS.labels("applied").inc(applied)
        if dead:
            EVENTS.labels("dead").inc(len(dead))
        return len(claimed)

    def trim(self, force: bool = False) -> int:
        """Remove the events older than the retention from the log (at most every ``trim_every_s``
        unless ``force``). Returns how many were removed; a failure is logged, never raised."""
        now = time.time()
        if not force and now - self._trimmed_at < self.trim_every_s:
            return 0
        self._trimmed_at = now
        retention = self.retention_s
        if retention is None:
            reach = [live.reach.total_seconds() for live in self.worlds().values()]
            if not reach:
                return 0
            retention = max(reach) + 86_400.0
        try:
            removed = self.log.trim(now - retention) if hasattr(self.log, "trim") else 0
        except Exception as exc:
            log.warning("live: trimming the event log failed (%s: %s)", type(exc).__name__, exc)
            return 0
        if removed:
            self.stats.trimmed += removed
            log.info("live: %d events older than %.0f s removed from the log", removed, retention)
        return removed

    def tick(self) -> None:
        """With a clock: move every world's watermark to now, writing the entities whose windows
        changed since (events that left a window, labels and source rows that became known). A
        failed write is logged and done again by the next tick (the state is restored: all or nothing).
        Then the log's retention (:meth:`trim`)."""
        self.trim()
        if self.clock is None:
            return
        now = self.clock()
        for world, live in self.worlds().items():
            try:
                applied = live.advance(now)
            except Exception as exc:
                log.warning("live: moving world %s to %s failed (%s: %s); the next tick retries", world, now,
                            type(exc).__name__, exc)
                continue
            if applied.written:
                self.stats.ticks_written += sum(applied.written.values())

    def drain(self) -> UpdaterStats:
        """Apply everything in the log now."""
        while self.step():
            pass
        self.tick()
        return self.stats

    def run(self, stop: threading.Event, poll_s: float = 0.05) -> None:
        """Apply batches until ``stop`` is set; a failed batch is retried after a pause. After a
        batch it waits ``poll_s`` for the next one to gather: a batch's work is mostly fixed (the
        buffer's look-ups, one engine call per view), so under load fewer, larger batches cost far
        less CPU beside the server, for at most ``poll_s`` of freshness."""
        while not stop.is_set():
            try:
                if self.step(block_s=poll_s):
                    stop.wait(poll_s)
            except FeatureStoreError:
                stop.wait(1.0)
            except Exception:  # keep the updater alive; the batch stays in the log
                log.exception("live: the updater failed; retrying")
                stop.wait(1.0)
