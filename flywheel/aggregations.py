"""A use case's features, declared as windowed aggregations per entity (``features.yaml``).

A team declares, per entity of its contract, the aggregations the model reads::

    aggregations:
      customer:                                        # an entity of the contract (its join key)
        - {op: count, window: 1h}                      # -> customer_count_1h
        - {op: mean, column: order_total, window: 30d} # -> customer_order_total_mean_30d
        - {op: distinct, column: shop, window: 24h}
        - {op: last_time, window: 30d}                 # the time of the customer's last event
      shop:
        - {op: mean, column: returned, window: 30d, name: shop_return_rate_30d}  # a label

flywheel's engine (:mod:`flywheel.features.engine`) computes them point-in-time correct, day by day,
and registers them as Feast feature views. The semantics, written down here and tested against a
naive oracle (tests/unit/test_engine.py), are those of Chronon's GroupBy with Tecton-style trailing
windows:

- **Events.** An aggregation over a column the contract knows at the event (anything but a label or
  the time a label becomes known) reads the entity's *events*, at their event time. An aggregation
  over a **label** reads the entity's *labels*, each at the time it becomes known (``label_known``:
  the event time plus a fixed delay, or the time in a column): a label is an event of its own, on
  the day it arrives, as a landing is. Rows whose label is null (not known yet, or never) are not
  label events.
- **Further sources.** An aggregation with ``source: <name>`` reads the rows of one of the
  contract's further sources (hourly weather per airport) whose key column for the entity holds its
  key: each row is an event of that entity at the time it becomes known, its ``timestamp`` plus the
  source's ``delay``. Its rows are instants of the entity's table as its own events are.
- **Rows.** The entity's feature table has one row per entity and instant at which any of its
  aggregations may change: each event time, each time a label becomes known (label aggregations
  only), each time a source row becomes known, and each moment an event leaves a window that reads
  it (its *expiry*: its time plus the window, for each distinct window of the aggregations reading
  its stream). The row at instant ``t`` holds each aggregation over the events with time in the
  window ``(t - window, t]``: events *at* ``t`` are in it, all of them (ties are one instant), and
  the event exactly ``window`` before ``t`` is not.
- **Reading.** A request (or a training row) at time ``T`` reads the latest row *strictly before*
  ``T``: nothing that happens at ``T`` itself, not even the request's own event, feeds its features.
  Since a label is known no earlier than its event, a row's own label can never feed its features.
  Because every moment a window changes is a row (events entering it, and leaving it), what is read
  is exact at read time: each aggregation over the events with time in ``[T - window, T)``, a window
  of its length ending just before ``T``, however long ago the entity's last event was (a 1h count
  decays to 0 an hour after the last event). The event exactly ``window`` before ``T`` is in it.
  The same holds in training and serving. A row older than its view's longest window (the view's
  TTL) is not read at all: every window is empty by then, and a missing value means it (0 for
  counts, distinct counts and sums; null otherwise).
- **Empty windows.** ``count``, ``distinct`` and ``sum`` are 0; ``mean``, ``std``, ``min``, ``max``,
  ``last`` and ``last_time`` are null (``fill`` replaces a null). ``std`` is the sample standard
  deviation: null for one value. Null values of a column are skipped (``count`` counts events).

Operations: ``count`` (events; with a column, the events where it has a value: of a label, the
labels known), ``sum``, ``mean``, ``std``, ``min``, ``max``, ``distinct`` (distinct
values), ``last`` (the latest value) and ``last_time`` (the latest event's time, as seconds since
the epoch: the request-time input "seconds since" is the request's time minus it).
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flywheel.contract import NUMERIC, Contract, describe_errors, read_usecase_yaml
from flywheel.errors import UseCaseError

FEATURES_FILE = "features.yaml"
Op = Literal["count", "sum", "mean", "std", "min", "max", "distinct", "last", "last_time"]
NEEDS_NUMBER = {"sum", "mean", "std", "min", "max"}
NO_COLUMN = {"last_time"}
OPTIONAL_COLUMN = {"count"}
_DURATION = re.compile(r"^(\d+)\s*(s|m|min|h|d|w)$")
_UNITS = {"s": "seconds", "m": "minutes", "min": "minutes", "h": "hours", "d": "days", "w": "weeks"}
NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def parse_window(value: Any) -> dt.timedelta:
    """``"1h"``, ``"24h"``, ``"30d"``, ``"90s"``, an ISO 8601 duration (``"PT1H"``, ``"P30D"``) or
    seconds, as a positive duration."""
    if isinstance(value, dt.timedelta):
        window = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        window = dt.timedelta(seconds=value)
    elif isinstance(value, str) and (match := _DURATION.match(value.strip().lower())):
        window = dt.timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    elif isinstance(value, str):
        from pydantic import TypeAdapter

        try:
            window = TypeAdapter(dt.timedelta).validate_python(value)
        except ValidationError:
            raise ValueError(f"{value!r} is not a duration: say 1h, 24h, 30d, 90s or ISO 8601 (PT1H)") from None
    else:
        raise ValueError(f"{value!r} is not a duration: say 1h, 24h, 30d, 90s or ISO 8601 (PT1H)")
    if window <= dt.timedelta(0):
        raise ValueError(f"a window must be positive, not {value!r}")
    return window


def window_label(window: dt.timedelta) -> str:
    """A window's name in feature names: whole days from two days on (7d, 30d), else whole hours
    (1h, 24h), minutes (90m) or seconds (45s)."""
    seconds = int(window.total_seconds())
    if seconds % 86_400 == 0 and seconds >= 2 * 86_400:
        return f"{seconds // 86_400}d"
    for unit, size in (("h", 3_600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class Aggregation(BaseModel):
    """One windowed aggregation of one entity's events."""

    model_config = ConfigDict(extra="forbid")

    op: Op
    column: str | None = None
    window: dt.timedelta
    name: str = ""  # default: <entity>_<column>_<op>_<window>, or <entity>_<op>_<window> without a column
    fill: float | None = None  # the value of a null (an empty window, a single value's spread)
    source: str | None = None  # a further source of the contract whose rows it reads (default: the main rows)
    doc: str = ""

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, value: Any) -> dt.timedelta:
        return parse_window(value)

    @model_validator(mode="after")
    def _column_fits_the_op(self) -> "Aggregation":
        if self.op in NO_COLUMN and self.column is not None:
            raise ValueError(f"{self.op} takes no column (it times the entity's events)")
        if self.op not in NO_COLUMN | OPTIONAL_COLUMN and self.column is None:
            raise ValueError(f"{self.op} needs a column")
        if self.name and not NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: lower-case letters, digits and '_', starting with a letter")
        return self

    def is_integer(self) -> bool:
        """Whether its values are whole numbers (counts), so the tables store them as int64."""
        return self.op in ("count", "distinct")


class Features(BaseModel):
    """A use case's feature declaration: entity -> its aggregations, in the order the model reads them."""

    model_config = ConfigDict(extra="forbid")

    aggregations: dict[str, list[Aggregation]] = Field(default_factory=dict)

    def named(self) -> dict[str, list[tuple[str, Aggregation]]]:
        """entity -> [(feature name, aggregation)], names filled in."""
        out = {}
        for entity, aggregations in self.aggregations.items():
            out[entity] = [(a.name or default_name(entity, a), a) for a in aggregations]
        return out

    def longest_window(self) -> dt.timedelta:
        windows = [a.window for aggs in self.aggregations.values() for a in aggs]
        return max(windows) if windows else dt.timedelta(0)


def default_name(entity: str, aggregation: Aggregation) -> str:
    parts = [entity, *([aggregation.column] if aggregation.column else []), aggregation.op, window_label(aggregation.window)]
    return "_".join(parts).lower()


def check_against(features: Features, contract: Contract, source: str) -> Features:
    """Hold a declaration to its contract: entities it declares, columns it has, numbers where the op
    needs them, names that are unique and do not collide with the contract's columns."""
    problems = []
    seen: dict[str, str] = {}
    for entity, named in features.named().items():
        if entity not in contract.entities:
            problems.append(f"aggregations.{entity}: not an entity of the contract "
                            f"(entities: {', '.join(contract.entities) or 'none'})")
            continue
        for index, (name, aggregation) in enumerate(named):
            where = f"aggregations.{entity}[{index}] ({name})"
            column = aggregation.column
            if aggregation.source is not None:
                problems += _source_problems(aggregation, contract, entity, where)
            elif column is not None:
                if column not in contract.columns:
                    problems.append(f"{where}: {column!r} is not a column of the contract")
                    continue
                kind = contract.columns[column].type
                if aggregation.op in NEEDS_NUMBER and kind not in NUMERIC and kind != "bool":
                    problems.append(f"{where}: {aggregation.op} needs a number, and {column} is {kind}")
                if column == contract.label_known.column:
                    problems.append(f"{where}: {column} is when a label becomes known, not a value to aggregate")
                if column in contract.labels and contract.label_known.column and contract.label_known.within is None:
                    problems.append(f"{where}: aggregating the label {column} needs label_known.within in the contract "
                                    f"(the longest {contract.label_known.column} may come after the event), so that "
                                    "a day's features know how far back to read")
            if name in seen:
                problems.append(f"{where}: the name {name} is also {seen[name]}'s: give one a name")
            elif name in contract.columns:
                problems.append(f"{where}: the name {name} is a column of the contract: give it another name")
            seen[name] = where
    if problems:
        raise UseCaseError(f"invalid features {source}: " + "; ".join(problems))
    return features


def _source_problems(aggregation: Aggregation, contract: Contract, entity: str, where: str) -> list[str]:
    """What is wrong with an aggregation of a further source's rows (its source, entity and column)."""
    source = contract.sources.get(aggregation.source or "")
    if source is None:
        return [f"{where}: source {aggregation.source!r} is not a source of the contract "
                f"(sources: {', '.join(contract.sources) or 'none'})"]
    if entity not in source.entities:
        return [f"{where}: source {aggregation.source} names no key of {entity} "
                f"(its entities: {', '.join(source.entities)})"]
    column = aggregation.column
    if column is None:
        return []
    if column not in source.columns:
        return [f"{where}: {column!r} is not a column of source {aggregation.source}"]
    kind = source.columns[column].type
    if aggregation.op in NEEDS_NUMBER and kind not in NUMERIC and kind != "bool":
        return [f"{where}: {aggregation.op} needs a number, and {aggregation.source}.{column} is {kind}"]
    return []


def parse_features(data: Any, contract: Contract, source: str) -> Features:
    """A :class:`Features` from parsed YAML, checked against ``contract``; UseCaseError names each problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UseCaseError(f"{source} must hold a mapping (aggregations: ...), not {type(data).__name__}")
    try:
        features = Features.model_validate(data)
    except ValidationError as exc:
        raise UseCaseError(f"invalid features {source}: {describe_errors(exc, 'features declaration')}") from None
    return check_against(features, contract, source)


def load_features(folder: Path, contract: Contract) -> Features:
    """The declaration in ``folder/features.yaml`` (none declared when the file is absent)."""
    path = folder / FEATURES_FILE
    if not path.exists():
        return Features()
    return parse_features(read_usecase_yaml(path), contract, str(path))
