"""Mergeable per-column profiles: what a table's columns look like, in a form that adds up.

A *baseline* profile (the training set, or the model's evaluation holdout) fixes each column's
basis: a number's bin edges (the column's own quantiles) and range, a category's vocabulary (its
most frequent values) and the values it has seen. A *window* (a day of captured rows, or one part
of it) is profiled on that basis, so the profiles of two windows merge exactly into the profile of
their union: a monitor reads the capture part by part and never holds a whole window in memory.

Numbers: rows that are null or NaN count as nulls (an infinite value is a value, beyond every edge); the bins are the open-ended one below the first
edge, the baseline's own bins (``[e0, e1), [e1, e2), ..., [e(k-1), ek]``, the last one closed; a
constant column has one edge and one bin ``[c, c]``) and the open-ended one above the last edge.
As the edges are the baseline's quantiles 0 and 1 included, the first and last edges are the
baseline's min and max: values in the two open-ended bins are exactly the out-of-range ones. A
quantile sketch (Apache DataSketches' KLL) keeps the distribution's shape at a bounded size.

Categories: values are compared as strings; nulls are counted apart; the counts are per
vocabulary value plus "other". The rate of values the baseline never saw is exact while the
baseline's distinct values fit in ``MAX_KNOWN`` (else ``unseen`` is None: unknown, never wrong).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from flywheel.errors import DataError

# KLL's accuracy parameter: 200 (DataSketches' default) keeps about 1.7% rank error for any one
# quantile at 99% confidence, in a few kilobytes.
KLL_K = 200
# The distinct values a category baseline remembers to tell an unseen value from a rare one.
MAX_KNOWN = 10_000
FORMAT_VERSION = 1

Kind = Literal["number", "category"]


def _kll():
    # Imported on use: datasketches is a compiled extension that only the monitor needs.
    from datasketches import kll_doubles_sketch

    return kll_doubles_sketch


def _basis_id(payload: Any) -> str:
    """A short fingerprint of a basis (edges and range, or vocabulary and known values)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class NumberProfile:
    """A number column on a baseline's basis: counts per bin, out-of-range rows and a KLL sketch.

    ``edges``, ``low`` and ``high`` (the baseline's min and max) are the basis; ``basis`` is their
    fingerprint, and only profiles on the same basis merge. ``bins`` has ``len(edges) + 1`` counts
    (``3`` for a constant baseline, ``1`` when the baseline had no value at all).
    """

    basis: str
    edges: list[float]
    low: float | None
    high: float | None
    count: int = 0  # non-null rows
    nulls: int = 0  # null or NaN
    bins: list[int] = field(default_factory=list)
    out_of_range: int = 0  # below the baseline's min or above its max
    min: float | None = None
    max: float | None = None
    sum: float = 0.0
    sketch: bytes = b""  # a serialised KLL sketch (empty: no value yet)

    kind: Literal["number"] = "number"

    def quantile(self, q: float) -> float | None:
        """The sketch's estimate of the ``q`` quantile (None when the column had no value)."""
        if not 0 <= q <= 1:
            raise DataError(f"a quantile is between 0 and 1, not {q}")
        if self.count == 0 or not self.sketch:
            return None
        return float(_kll().deserialize(self.sketch).get_quantile(q))

    def rank_error(self) -> float:
        """KLL's documented normalised rank error of any one quantile (99% confidence)."""
        if not self.sketch:
            return 0.0
        return float(_kll().deserialize(self.sketch).normalized_rank_error(False))

    def merge(self, other: "NumberProfile", name: str = "") -> "NumberProfile":
        """The profile of both windows' rows together (same basis only)."""
        _check_same_basis(self, other, name)
        sketch = _merge_sketches(self.sketch, other.sketch)
        return NumberProfile(
            basis=self.basis, edges=list(self.edges), low=self.low, high=self.high,
            count=self.count + other.count, nulls=self.nulls + other.nulls,
            bins=[a + b for a, b in zip(self.bins, other.bins)],
            out_of_range=self.out_of_range + other.out_of_range,
            min=_pick(min, self.min, other.min), max=_pick(max, self.max, other.max),
            sum=self.sum + other.sum, sketch=sketch)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "number", "basis": self.basis, "edges": list(self.edges), "low": self.low,
                "high": self.high, "count": self.count, "nulls": self.nulls, "bins": list(self.bins),
                "out_of_range": self.out_of_range, "min": self.min, "max": self.max, "sum": self.sum,
                "sketch": base64.b64encode(self.sketch).decode("ascii")}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NumberProfile":
        return cls(basis=data["basis"], edges=[float(e) for e in data["edges"]], low=data["low"], high=data["high"],
                   count=int(data["count"]), nulls=int(data["nulls"]), bins=[int(b) for b in data["bins"]],
                   out_of_range=int(data["out_of_range"]), min=data["min"], max=data["max"],
                   sum=float(data["sum"]), sketch=base64.b64decode(data["sketch"]))


@dataclass
class CategoryProfile:
    """A category column on a baseline's basis: counts per vocabulary value and "other", and how
    many values the baseline never saw.

    ``counts`` has one count per ``vocabulary`` value, in order, then the count of every other
    value. ``known`` is the baseline's distinct values, kept in a baseline profile only (None in a
    window's profile, which carries the baseline's ``basis`` instead, and in a baseline with more
    than ``MAX_KNOWN`` distinct values). ``unseen`` is None when the baseline's values were too
    many to remember: then no one can tell an unseen value from a forgotten one.
    """

    basis: str
    vocabulary: list[str]
    known: list[str] | None
    count: int = 0  # non-null rows
    nulls: int = 0
    counts: list[int] = field(default_factory=list)
    unseen: int | None = 0

    kind: Literal["category"] = "category"

    def merge(self, other: "CategoryProfile", name: str = "") -> "CategoryProfile":
        """The profile of both windows' rows together (same basis only)."""
        _check_same_basis(self, other, name)
        unseen = None if self.unseen is None or other.unseen is None else self.unseen + other.unseen
        return CategoryProfile(
            basis=self.basis, vocabulary=list(self.vocabulary), known=self.known,
            count=self.count + other.count, nulls=self.nulls + other.nulls,
            counts=[a + b for a, b in zip(self.counts, other.counts)], unseen=unseen)

    def shares(self) -> list[float]:
        """Each bucket's share of the non-null rows, as ``counts`` (all zero when there are none)."""
        return [count / self.count if self.count else 0.0 for count in self.counts]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "category", "basis": self.basis, "vocabulary": list(self.vocabulary),
                "known": None if self.known is None else list(self.known), "count": self.count,
                "nulls": self.nulls, "counts": list(self.counts), "unseen": self.unseen}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CategoryProfile":
        return cls(basis=data["basis"], vocabulary=list(data["vocabulary"]),
                   known=None if data["known"] is None else list(data["known"]), count=int(data["count"]),
                   nulls=int(data["nulls"]), counts=[int(c) for c in data["counts"]],
                   unseen=None if data["unseen"] is None else int(data["unseen"]))


ColumnProfile = Union[NumberProfile, CategoryProfile]


@dataclass
class Profile:
    """A table's profile: its rows and one profile per column (number or category)."""

    rows: int
    columns: dict[str, ColumnProfile]

    def merge(self, other: "Profile") -> "Profile":
        """The profile of both tables' rows together. Both must be profiled on the same baseline
        (same columns, edges and vocabularies): anything else raises ``DataError``."""
        if set(self.columns) != set(other.columns):
            raise DataError(f"profiles of different columns cannot be merged: {sorted(self.columns)} and "
                            f"{sorted(other.columns)}; profile both windows with the same baseline")
        columns: dict[str, ColumnProfile] = {}
        for name, mine in self.columns.items():
            theirs = other.columns[name]
            if mine.kind != theirs.kind:
                raise DataError(f"column {name!r} is a {mine.kind} in one profile and a {theirs.kind} in the other")
            columns[name] = mine.merge(theirs, name)  # type: ignore[arg-type]
        return Profile(rows=self.rows + other.rows, columns=columns)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``Profile.from_dict`` reads it back exactly)."""
        return {"format": FORMAT_VERSION, "rows": self.rows,
                "columns": {name: column.to_dict() for name, column in self.columns.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Profile":
        """The profile a ``to_dict`` wrote."""
        if data.get("format") != FORMAT_VERSION:
            raise DataError(f"a profile in format {data.get('format')!r} cannot be read (this flywheel reads "
                            f"format {FORMAT_VERSION}): profile the baseline again")
        columns: dict[str, ColumnProfile] = {}
        for name, column in data["columns"].items():
            if column["kind"] == "number":
                columns[name] = NumberProfile.from_dict(column)
            elif column["kind"] == "category":
                columns[name] = CategoryProfile.from_dict(column)
            else:
                raise DataError(f"column {name!r} of a stored profile has an unknown kind {column['kind']!r}")
        return cls(rows=int(data["rows"]), columns=columns)


def _pick(choose, a, b):
    if a is None:
        return b
    if b is None:
        return a
    return choose(a, b)


def _check_same_basis(mine: ColumnProfile, theirs: ColumnProfile, name: str) -> None:
    if mine.basis != theirs.basis:
        raise DataError(f"column {name!r} was profiled on different baselines (basis {mine.basis} and "
                        f"{theirs.basis}: other bin edges or vocabulary); only windows profiled with the same "
                        "baseline merge")


def _merge_sketches(a: bytes, b: bytes) -> bytes:
    if not a:
        return b
    if not b:
        return a
    kll = _kll()
    merged = kll.deserialize(a)
    merged.merge(kll.deserialize(b))
    return merged.serialize()


def _as_table(table: pa.Table | pd.DataFrame) -> pa.Table:
    if isinstance(table, pa.Table):
        return table
    if isinstance(table, pd.DataFrame):
        try:
            return pa.Table.from_pandas(table, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataError(f"a DataFrame to profile has a column of mixed types: {exc}") from exc
    raise DataError(f"profile_table takes a pyarrow Table or a pandas DataFrame, not {type(table).__name__}")


def _column(table: pa.Table, name: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise DataError(f"column {name!r} to profile is not in the table (it has {table.column_names})")
    return table[name]


def _number_values(column: pa.ChunkedArray, name: str) -> np.ndarray:
    """The column as float64, nulls as NaN."""
    try:
        values = pc.cast(column, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"column {name!r} is profiled as a number but its type is {column.type}: {exc}") from exc
    return values.to_numpy(zero_copy_only=False)


def _bin_counts(values: np.ndarray, edges: list[float]) -> list[int]:
    """Counts in the bins described in the module's docstring (values are non-null)."""
    if not edges:
        return [int(values.size)]
    edge_array = np.asarray(edges)
    inner = max(len(edges) - 1, 1)
    # side="right" puts a value equal to an edge in the bin that starts there; clipping to the
    # inner bins closes the last one at the top edge (and gives a constant baseline its one bin).
    index = np.clip(np.searchsorted(edge_array, values, side="right"), 1, inner)
    index[values < edge_array[0]] = 0
    index[values > edge_array[-1]] = inner + 1
    return [int(c) for c in np.bincount(index, minlength=inner + 2)]


def _profile_number(column: pa.ChunkedArray, name: str, base: NumberProfile | None, bins: int) -> NumberProfile:
    values = _number_values(column, name)
    present = values[~np.isnan(values)]
    nulls = int(values.size - present.size)
    if base is None:
        finite = present[np.isfinite(present)]
        if finite.size:
            # Quantiles 0 and 1 included: the first and last edges are the baseline's (finite) min
            # and max. An infinite value is a value, outside every range: it lands in an open bin.
            edges = [float(e) for e in np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)))]
            low, high = edges[0], edges[-1]
        else:
            edges, low, high = [], None, None
        basis = _basis_id({"kind": "number", "edges": edges, "low": low, "high": high})
    else:
        edges, low, high, basis = list(base.edges), base.low, base.high, base.basis
    if low is None:
        out_of_range = int(present.size)  # a baseline with no value: every value is out of its range
    else:
        out_of_range = int(np.count_nonzero(present < low) + np.count_nonzero(present > high))
    sketch = b""
    if present.size:
        kll = _kll()(KLL_K)
        kll.update(present)
        sketch = kll.serialize()
    return NumberProfile(
        basis=basis, edges=edges, low=low, high=high, count=int(present.size), nulls=nulls,
        bins=_bin_counts(present, edges), out_of_range=out_of_range,
        min=float(present.min()) if present.size else None, max=float(present.max()) if present.size else None,
        sum=float(present.sum()), sketch=sketch)


def _value_counts(column: pa.ChunkedArray, name: str) -> tuple[dict[str, int], int]:
    """The non-null values (as strings) with their counts, and the nulls."""
    try:
        strings = pc.cast(column, pa.string()) if column.type != pa.string() else column
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"column {name!r} is profiled as a category but its type is {column.type}: {exc}") from exc
    nulls = strings.null_count
    counted = pc.value_counts(strings)
    values, counts = counted.field("values").to_pylist(), counted.field("counts").to_pylist()
    return {value: count for value, count in zip(values, counts) if value is not None}, nulls


def _profile_category(column: pa.ChunkedArray, name: str, base: CategoryProfile | None,
                      max_categories: int) -> CategoryProfile:
    seen, nulls = _value_counts(column, name)
    if base is None:
        # The most frequent values; ties broken by the value so a profile does not depend on row order.
        ranked = sorted(seen.items(), key=lambda item: (-item[1], item[0]))
        vocabulary = [value for value, _ in ranked[:max_categories]]
        known = sorted(seen) if len(seen) <= MAX_KNOWN else None
        basis = _basis_id({"kind": "category", "vocabulary": vocabulary, "known": known})
        unseen: int | None = 0
    else:
        vocabulary, known, basis = list(base.vocabulary), None, base.basis
        if base.known is None:
            unseen = None
        else:
            remembered = set(base.known)
            unseen = sum(count for value, count in seen.items() if value not in remembered)
    position = {value: index for index, value in enumerate(vocabulary)}
    counts = [0] * (len(vocabulary) + 1)  # the last: every value outside the vocabulary
    for value, count in seen.items():
        counts[position.get(value, len(vocabulary))] += count
    return CategoryProfile(basis=basis, vocabulary=vocabulary, known=known, count=sum(seen.values()),
                           nulls=nulls, counts=counts, unseen=unseen)


def profile_table(table: pa.Table | pd.DataFrame, kinds: Mapping[str, Kind], baseline: Profile | None = None,
                  bins: int = 10, max_categories: int = 100) -> Profile:
    """Profile the columns named in ``kinds`` (``"number"`` or ``"category"``).

    Without ``baseline`` this is a baseline profile: each number's edges are its own quantiles
    (``bins`` bins, repeated edges dropped) and each category's vocabulary its ``max_categories``
    most frequent values. With ``baseline``, the table is a window profiled on the baseline's edges
    and vocabularies (``bins`` and ``max_categories`` are then the baseline's), so windows' profiles
    merge exactly. A column missing from the table, or from the baseline, raises ``DataError``.
    """
    if bins < 1:
        raise DataError(f"a profile needs at least one bin, not {bins}")
    if max_categories < 1:
        raise DataError(f"a category vocabulary needs at least one value, not {max_categories}")
    arrow = _as_table(table)
    columns: dict[str, ColumnProfile] = {}
    for name, kind in kinds.items():
        base = None
        if baseline is not None:
            base = baseline.columns.get(name)
            if base is None:
                raise DataError(f"column {name!r} is not in the baseline profile (it has {sorted(baseline.columns)})")
            if base.kind != kind:
                raise DataError(f"column {name!r} is a {base.kind} in the baseline, not a {kind}")
        column = _column(arrow, name)
        if kind == "number":
            columns[name] = _profile_number(column, name, base, bins)  # type: ignore[arg-type]
        elif kind == "category":
            columns[name] = _profile_category(column, name, base, max_categories)  # type: ignore[arg-type]
        else:
            raise DataError(f"column {name!r} has kind {kind!r}: a profile knows 'number' and 'category'")
    return Profile(rows=arrow.num_rows, columns=columns)
