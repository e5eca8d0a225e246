"""A use case's data contract, declared as data: the first piece of the use-case API (issue 19).

A team describes its raw rows once, in its own folder (``usecases/<name>/contract.yaml``): each
column's type, nullability, range and category set, which column is the id and which the event time,
the label(s) and when a row's label becomes known (a fixed delay after the event, or a column that
holds the time), the entities (join keys), and what happens to a row that has no label. From that
one declaration come the Arrow schema the lake enforces, the fields a scoring request carries, and
(in later steps) the default expectations and the request schema.

:func:`infer_contract` writes a first contract from a sample of the team's data, as TFX's SchemaGen
does: types, nullability, observed ranges and small category sets, for a person to review.

This module names no use case: the platform reads a contract; use cases declare one.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flywheel.errors import UseCaseError

ColumnType = Literal["string", "bool", "int8", "int16", "int32", "int64", "float32", "float64", "timestamp"]
ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "timestamp": pa.timestamp("us", tz="UTC"),  # the lake stores every time as UTC microseconds
}
NUMERIC = {"int8", "int16", "int32", "int64", "float32", "float64"}
CONTRACT_FILE = "contract.yaml"
MAX_CATEGORIES = 50  # inference: a string column with at most this many distinct values is a category


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Column(_Strict):
    """One column of the raw rows."""

    type: ColumnType
    nullable: bool = False
    min: float | None = None  # inclusive bounds on a number (the lake refuses a row outside them)
    max: float | None = None
    strict_min: bool = False  # the bound ``min`` itself is outside (an amount must be > 0)
    categories: list[str] | None = None  # the closed vocabulary of a string column
    categories_mostly: float = Field(1.0, gt=0.0, le=1.0)  # the share of rows that must be in it
    request: Literal["required", "optional", "absent"] | None = None  # default: see Contract.request_fields
    # Validation: the column's mean must lie in [low, high] (a label's base rate: a labelling or
    # sampling bug moves it), and how the drift gate compares a batch with the last accepted ones
    # (default: see Contract.drift_checks).
    mean: tuple[float, float] | None = None
    drift: Literal["quantiles", "shares", "rate", "none"] | None = None
    doc: str = ""

    @model_validator(mode="after")
    def _bounds_fit_the_type(self) -> "Column":
        if (self.min is not None or self.max is not None) and self.type not in NUMERIC:
            raise ValueError(f"min/max bound numbers, and this column is {self.type}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        if self.mean is not None:
            if self.type not in NUMERIC and self.type != "bool":
                raise ValueError(f"mean bounds a number's average, and this column is {self.type}")
            if self.mean[0] > self.mean[1]:
                raise ValueError(f"mean: {self.mean[0]} is above {self.mean[1]}")
        if self.drift == "quantiles" and self.type not in NUMERIC:
            raise ValueError(f"drift: quantiles compares numbers, and this column is {self.type}")
        if self.drift == "shares" and self.type != "string":
            raise ValueError(f"drift: shares compares a string column's values, and this column is {self.type}")
        if self.drift == "rate" and not self.is_binary():
            raise ValueError("drift: rate compares the share of 1s of a 0/1 column: say type bool, or an integer with min 0 and max 1")
        if self.categories is not None:
            if self.type != "string":
                raise ValueError(f"categories are a string column's vocabulary, and this column is {self.type}")
            if not self.categories or len(set(self.categories)) != len(self.categories):
                raise ValueError("categories must be a non-empty list without repeats")
        return self

    def is_binary(self) -> bool:
        """Whether the column holds 0/1 values (a bool, or an integer bounded to [0, 1])."""
        return self.type == "bool" or (self.type.startswith("int") and self.min == 0 and self.max == 1)


class LabelKnown(_Strict):
    """When a row's label becomes known: ``delay`` after its event time (chargebacks), or at the time
    held in ``column`` (a flight's arrival). Exactly one of the two."""

    delay: dt.timedelta | None = Field(None, ge=dt.timedelta(0))
    column: str | None = None
    # With a column: the longest a label may take to become known after its event (a flight lands
    # within a day). Features that aggregate labels read this far back; validation holds rows to it.
    within: dt.timedelta | None = Field(None, gt=dt.timedelta(0))

    @model_validator(mode="after")
    def _exactly_one(self) -> "LabelKnown":
        if (self.delay is None) == (self.column is None):
            raise ValueError("give exactly one of delay (ISO 8601, e.g. P3D) and column")
        if self.within is not None and self.column is None:
            raise ValueError("within bounds a label time held in a column; a fixed delay is its own bound")
        return self


class Source(_Strict):
    """A further table the use case's features read, joined by key and time (hourly weather per
    airport): its own columns, the time each row describes, how long after that time it is known, and
    which of its columns holds each entity's key. Its rows are events of those entities, at the time
    they become known; aggregations declared with ``source: <name>`` read them. Its raw files are
    ingested into a lake of its own (:mod:`flywheel.ingest`), from the ``files`` below the main
    source (a folder, a file or a glob relative to it; default ``_sources/<name>``)."""

    columns: dict[str, Column]
    timestamp: str  # the time a row describes (an hour's weather: the hour)
    delay: dt.timedelta = Field(dt.timedelta(0), ge=dt.timedelta(0))  # known this long after it (ISO 8601 or seconds)
    entities: dict[str, str] = Field(min_length=1)  # entity of the contract -> this table's column of its key
    id: str | None = None
    files: str = ""  # where its raw files are, relative to the main source (default: _sources/<name>)
    doc: str = ""

    def contract(self) -> "Contract":
        """The source as a contract of its own (no labels): what its lake enforces."""
        return SourceContract(columns=self.columns, id=self.id, timestamp=self.timestamp, labels=[],
                              entities=dict(self.entities), unlabelled="keep")


class Contract(_Strict):
    """What a use case's raw rows look like, and what each column means to the loop."""

    columns: dict[str, Column]  # in the order the lake stores them
    id: str | None = None  # unique per row, when the data has one
    timestamp: str  # the event time: what "as of t" means for every feature of the row
    labels: list[str] = Field(min_length=1)
    label_known: LabelKnown = LabelKnown(delay=dt.timedelta(0))
    entities: dict[str, str] = {}  # entity name -> its join key column
    # A row whose label is null: "reject" (bad data), "drop" (not a row of this use case), or "keep"
    # (a real event that features may count, never a training target: a cancelled flight).
    unlabelled: Literal["reject", "drop", "keep"] = "reject"
    sources: dict[str, Source] = {}  # further tables joined by key and time (see Source)

    @model_validator(mode="after")
    def _names_are_columns(self) -> "Contract":
        problems = []

        def column(role: str, name: str, types: set[str] | None = None) -> None:
            if name not in self.columns:
                problems.append(f"{role} {name!r} is not a column (columns: {', '.join(self.columns)})")
            elif types is not None and self.columns[name].type not in types:
                problems.append(f"{role} {name!r} must be of type {' or '.join(sorted(types))}, not {self.columns[name].type}")

        if not self.columns:
            problems.append("columns: the contract declares no column")
        if self.id is not None:
            column("id", self.id, {"string", "int64", "int32"})
        column("timestamp", self.timestamp, {"timestamp"})
        for label in self.labels:
            column("label", label)
        if self.label_known.column is not None:
            column("label_known.column", self.label_known.column, {"timestamp"})
        for entity, key in self.entities.items():
            column(f"entity {entity}'s join key", key, {"string", "int64", "int32"})
        # An entity's join key may be missing (an aircraft not yet assigned): the row is then no event
        # of that entity. The id and the event time never may.
        roles = [self.timestamp] + ([self.id] if self.id else [])
        if len(set(self.labels)) != len(self.labels):
            problems.append("labels: a label is named twice")
        overlap = set(self.labels) & ({self.timestamp, self.id} | set(self.entities.values()))
        if overlap:
            problems.append(f"labels: {', '.join(sorted(overlap))} is also the id, the timestamp or a join key")
        for name in roles:
            if name in self.columns and self.columns[name].nullable and name not in self.labels:
                problems.append(f"{name!r} identifies or times a row, so it cannot be nullable")
        if self.unlabelled == "reject":
            problems += [f"label {label!r} is nullable, but unlabelled is reject (say drop or keep)"
                         for label in self.labels if label in self.columns and self.columns[label].nullable]
        for name in [*self.labels, *( [self.label_known.column] if self.label_known.column else [])]:
            if name in self.columns and self.columns[name].request in ("required", "optional"):
                problems.append(f"{name!r} is not known when a row is scored, so a request cannot carry it")
        problems += self._source_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _source_problems(self) -> list[str]:
        problems = []
        for name, source in self.sources.items():
            where = f"sources.{name}"
            if not SOURCE_NAME.match(name):
                problems.append(f"{where}: a source's name is lower-case letters, digits and '_', starting with a letter")
            try:
                source.contract()
            except ValidationError as exc:
                problems.append(f"{where}: {describe_errors(exc, 'source')}")
                continue
            for entity, column in source.entities.items():
                if entity not in self.entities:
                    problems.append(f"{where}.entities.{entity}: not an entity of the contract "
                                    f"(entities: {', '.join(self.entities) or 'none'})")
                elif self.columns.get(self.entities[entity]) is not None and \
                        source.columns[column].type != self.columns[self.entities[entity]].type:
                    problems.append(f"{where}.entities.{entity}: {column} is {source.columns[column].type}, and the "
                                    f"entity's key {self.entities[entity]} is {self.columns[self.entities[entity]].type}")
        return problems

    def arrow_schema(self) -> pa.Schema:
        """The schema of the rows in the lake: the columns in their declared order."""
        return pa.schema([pa.field(name, ARROW_TYPES[c.type], nullable=c.nullable) for name, c in self.columns.items()])

    def timestamp_columns(self) -> list[str]:
        """The columns that hold times (read from Arrow timestamps or ISO 8601 text, stored as UTC)."""
        return [name for name, c in self.columns.items() if c.type == "timestamp"]

    def dictionary_columns(self) -> list[str]:
        """The columns whose values repeat (every string column but the id, and integer labels): the
        lake writes them with dictionary pages. A unique id, an amount or a time fills a dictionary
        only for the writer to give it up, which costs about a quarter of a write's CPU."""
        return [name for name, c in self.columns.items()
                if (c.type == "string" and name != self.id) or (name in self.labels and c.type.startswith("int"))]

    def drift_checks(self) -> dict[str, str]:
        """Each column the drift gate compares -> how: ``quantiles`` (numbers: each quantile within a
        tolerance of the baseline's), ``shares`` (a vocabulary's value shares and their KL divergence)
        or ``rate`` (a 0/1 column's share of 1s). A column's ``drift`` says; by default a vocabulary
        is compared by shares, a 0/1 column by rate and a non-negative number (an amount, a count, a
        duration: ``min`` >= 0) by quantiles, whose tolerance is relative; ids, times and join keys
        without a vocabulary are not."""
        keys = set(self.entities.values()) | ({self.id} if self.id else set())
        checks = {}
        for name, c in self.columns.items():
            how = c.drift
            if how is None and c.categories is not None:
                how = "shares"  # a closed vocabulary, even of a join key (an airport, an airline)
            elif how is None and name not in keys:
                if c.is_binary():
                    how = "rate"
                elif c.type in NUMERIC and c.min is not None and c.min >= 0:
                    how = "quantiles"
            if how and how != "none":
                checks[name] = how
        return checks

    def not_known_at_scoring(self) -> set[str]:
        """The columns a scoring request never carries: the labels and the time they become known."""
        return set(self.labels) | ({self.label_known.column} if self.label_known.column else set())

    def request_fields(self) -> dict[str, bool]:
        """Each field a scoring request may carry -> whether it must. By default a column is required
        when it is not nullable, except the id; labels (and when they are known) are never sent."""
        hidden = self.not_known_at_scoring()
        fields = {}
        for name, column in self.columns.items():
            mode = column.request or ("absent" if name in hidden else
                                      "optional" if column.nullable or name == self.id else "required")
            if mode != "absent":
                fields[name] = mode == "required"
        return fields


class SourceContract(Contract):
    """A further source's own contract: a contract without labels."""

    labels: list[str] = []


SOURCE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def describe_errors(exc: ValidationError, what: str) -> str:
    """Every problem pydantic found in a use case file, named by where it is ("columns.amount.min:
    ..."), an unknown field as not a field of ``what`` (a contract, a task, ...)."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or what
        if err["type"] == "extra_forbidden":
            problems.append(f"{where} is not a field of a {what} here")
        else:
            problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def parse_contract(data: Any, source: str) -> Contract:
    """A :class:`Contract` from already-parsed YAML/JSON; :class:`UseCaseError` names every problem."""
    if not isinstance(data, dict):
        raise UseCaseError(f"{source} must hold a mapping (columns, timestamp, labels, ...), not {type(data).__name__}")
    try:
        return Contract.model_validate(data)
    except ValidationError as exc:
        raise UseCaseError(f"invalid contract {source}: {describe_errors(exc, 'contract')}") from None


def read_usecase_yaml(path: Path) -> Any:
    """A use case file's YAML; :class:`UseCaseError` names the file when it is missing, unreadable or
    not YAML."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UseCaseError(f"{path} does not exist: a use case folder holds its {CONTRACT_FILE}") from None
    except yaml.YAMLError as exc:
        raise UseCaseError(f"{path} is not valid YAML: {exc}") from None
    except OSError as exc:
        raise UseCaseError(f"{path} cannot be read: {exc.strerror or exc}") from None


def load_contract(folder: str | Path) -> Contract:
    """The contract of the use case in ``folder`` (its ``contract.yaml``)."""
    path = Path(folder) / CONTRACT_FILE
    return parse_contract(read_usecase_yaml(path), str(path))


def dump_contract(contract: Contract) -> str:
    """The contract as YAML, in declaration order, without the defaults it does not change."""
    data = contract.model_dump(mode="json", exclude_defaults=True)
    data.setdefault("labels", contract.labels)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _column_type(name: str, arrow: pa.DataType) -> str:
    if pa.types.is_dictionary(arrow):
        arrow = arrow.value_type
    if pa.types.is_string(arrow) or pa.types.is_large_string(arrow):
        return "string"
    if pa.types.is_boolean(arrow):
        return "bool"
    if pa.types.is_timestamp(arrow) or pa.types.is_date(arrow):
        return "timestamp"
    for kind in NUMERIC:
        if arrow == ARROW_TYPES[kind]:
            return kind
    if pa.types.is_unsigned_integer(arrow):
        return "int64"
    if pa.types.is_floating(arrow):
        return "float64"
    raise UseCaseError(f"column {name!r} has type {arrow}, which a contract cannot hold "
                       f"(types: {', '.join(ARROW_TYPES)}): convert it in the sample, or leave the column out")


def infer_contract(sample: pa.Table, *, label: str, timestamp: str, id: str | None = None,
                   entities: dict[str, str] | None = None, max_categories: int = MAX_CATEGORIES) -> Contract:
    """A first contract from a sample of the data: each column's type, whether it had nulls, the
    observed range of numbers, and the vocabulary of string columns with few distinct values (never
    of the id or a join key). A sample shows what was seen, not what may come: review the ranges."""
    entities = dict(entities or {})
    named = [label, timestamp, *entities.values()] + ([id] if id else [])
    missing = [name for name in named if name not in sample.column_names]
    if missing:
        raise UseCaseError(f"the sample has no column {', '.join(map(repr, missing))} (columns: {', '.join(sample.column_names)})")
    if sample.num_rows == 0:
        raise UseCaseError("the sample has no rows: a contract is inferred from data")
    keys = set(entities.values()) | ({id} if id else set())
    columns: dict[str, Column] = {}
    for name in sample.column_names:
        values = sample.column(name)
        kind = _column_type(name, values.type)
        spec: dict[str, Any] = {"type": kind, "nullable": values.null_count > 0}
        if kind in NUMERIC and values.null_count < len(values):
            low, high = pc.min_max(values).values()
            low, high = low.as_py(), high.as_py()
            if all(isinstance(v, (int, float)) and math.isfinite(v) for v in (low, high)):
                spec.update(min=low, max=high)
        if kind == "string" and name not in keys:
            distinct = pc.unique(values.cast(pa.string()) if pa.types.is_dictionary(values.type) else values).drop_null()
            if 0 < len(distinct) <= max_categories and len(distinct) < max(2, sample.num_rows // 2):
                spec["categories"] = sorted(distinct.to_pylist())
        columns[name] = Column(**spec)
    unlabelled = "keep" if columns[label].nullable else "reject"
    try:
        return Contract(columns=columns, id=id, timestamp=timestamp, labels=[label], entities=entities, unlabelled=unlabelled)
    except ValidationError as exc:
        raise UseCaseError(f"the sample does not make a valid contract: {describe_errors(exc, 'contract')}") from None
