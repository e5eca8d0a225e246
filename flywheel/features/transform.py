"""From rows joined with their features to the model's input matrix, and from labels to its targets.

One code path for training, evaluation and serving, so the model sees at serving time exactly what it
saw in training. What is specific to a use case (its request-time inputs: ratios, distances, cyclic
time, gaps since an entity's last event) is the use case's own ``inputs.py``, as TFX's
``preprocessing_fn`` or Feast's on-demand views::

    CATEGORIES = ["merchant_category", "channel"]  # optional: one-hot blocks, vocabularies from the contract

    def fit(columns):                              # optional: constants learnt once from the fit rows
        return {"offsets": ...}                    #   (JSON-able: they are saved with the model)

    def derive(columns, fitted):                   # the numeric inputs, vectorized
        return {"log_amount": np.log1p(number(columns, "amount")), ...}

``columns`` are :data:`Columns`: one numpy array per column of the contract (labels excluded) and per
feature. ``derive`` is called with a whole training set and with the one to few rows of a serving
pass: keep it to numpy (pandas on a one-row hot path is the cost, FIELD-NOTES). Without an
``inputs.py`` the inputs are :func:`default_derive`'s: every number column and feature as it is,
features that hold a time as the log seconds before the row, and the hour of day as a cycle.

The fitted :class:`FeatureSpec` carries the source of the use case's code (``inputs.py``, and the
network file when the task names one) with its scaling and vocabularies. The training workers, the
registry's model files and the predictor therefore run the code the model was trained with, read
from storage, never from whatever the use case folder holds today (TFX saves its transform graph
with the model for the same reason).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd

from flywheel.errors import DataError, UseCaseError
from flywheel.task import Task

if TYPE_CHECKING:
    from flywheel.usecase import UseCase

INPUTS_FILE = "inputs.py"
MAX_AGE_S = 30 * 24 * 3600.0  # default inputs: a time older than this (or none) counts as this old

Columns = Mapping[str, np.ndarray]
"""Rows joined with their features as one array per column: numbers (and 0/1 flags) as float64 (NaN
where missing), timestamps as numpy datetime64 in UTC, text as objects ("" where missing). Serving
builds this from a request without pandas; training gets it from a frame through :func:`frame_columns`."""


# ------------------------------------------------------------------- helpers for a use case's inputs
def row_count(columns: Columns) -> int:
    """How many rows the columns hold."""
    return len(next(iter(columns.values())))


def number(columns: Columns, name: str, rows: int | None = None, default: float = np.nan) -> np.ndarray:
    """A number column (float64), or ``default`` everywhere when the rows do not carry it."""
    values = columns.get(name)
    if values is None:
        return np.full(row_count(columns) if rows is None else rows, default, dtype="float64")
    return values


def text(columns: Columns, name: str, rows: int | None = None) -> np.ndarray:
    """A text column, or "" everywhere when the rows do not carry it."""
    values = columns.get(name)
    return np.full(row_count(columns) if rows is None else rows, "", dtype=object) if values is None else values


def fill(values: np.ndarray, default: float) -> np.ndarray:
    """NaN replaced by ``default`` (what ``np.nan_to_num(values, nan=default)`` gives for the finite
    numbers these columns hold, at a fraction of its cost: serving calls this on one-row arrays)."""
    return np.where(np.isnan(values), default, values)


def between(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``np.clip`` without its per-call overhead (NaN stays NaN, as with clip)."""
    return np.minimum(np.maximum(values, low), high)


def epoch_seconds(ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UTC datetime64 values as (float seconds since the epoch, whole seconds since the epoch), from
    integer nanoseconds (the same numbers, to the last bit, as pandas' ``total_seconds``)."""
    nanoseconds = ts.astype("datetime64[ns]").astype(np.int64)
    return nanoseconds / 1_000_000_000, nanoseconds // 1_000_000_000


def hour_of_day(ts: np.ndarray) -> np.ndarray:
    """The UTC hour of day with minutes as a fraction (0 <= h < 24)."""
    _, whole = epoch_seconds(ts)
    second_of_day = whole % 86_400
    return (second_of_day // 3_600) + (second_of_day % 3_600 // 60) / 60.0


# ------------------------------------------------------------------------- the default inputs
def default_fit(usecase: "UseCase") -> dict[str, Any]:
    """What :func:`default_derive` reads, decided once from the contract and the features."""
    contract = usecase.contract
    hidden = contract.not_known_at_scoring() | {contract.id}
    numbers = [n for n, c in contract.columns.items() if n not in hidden and c.type not in ("string", "timestamp")]
    times = [n for n in contract.timestamp_columns() if n not in hidden and n != contract.timestamp]
    from flywheel.features.views import views_of

    ages, features = [], []
    for view in views_of(usecase):
        for name, aggregation in view.aggregations:
            if view.features[name] != "String":
                (ages if aggregation.op == "last_time" else features).append(name)
    return {"time": contract.timestamp, "numbers": numbers, "features": features, "ages": ages, "times": times}


def default_derive(columns: Columns, fitted: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inputs for a use case without ``inputs.py``: each number column and numeric feature as it is
    (scaled later), each feature holding an entity's last event time as ``log1p`` of the seconds since
    (a month when none), each other known time as hours from the event, and the hour of day as sine
    and cosine."""
    rows = row_count(columns)
    now, _ = epoch_seconds(columns[fitted["time"]])
    derived = {name: number(columns, name, rows) for name in (*fitted["numbers"], *fitted["features"])}
    for name in fitted["ages"]:
        derived[f"{name}_age_log"] = np.log1p(between(fill(now - number(columns, name, rows), MAX_AGE_S), 0, MAX_AGE_S))
    for name in fitted["times"]:
        other = columns.get(name)
        derived[f"{name}_hours_from_event"] = (np.full(rows, np.nan) if other is None
                                               else (epoch_seconds(other)[0] - now) / 3600.0)
    angle = 2 * np.pi * hour_of_day(columns[fitted["time"]]) / 24
    derived["hour_sin"], derived["hour_cos"] = np.sin(angle), np.cos(angle)
    return derived


# --------------------------------------------------------------------------- the use case's code
def import_code(code: Mapping[str, str], name: str) -> ModuleType | None:
    """The module ``name`` (``inputs.py``) from a spec's code, or None when the spec carries none."""
    from flywheel.usecase import import_source

    source = code.get(name)
    return None if source is None else import_source(source, name)


# ------------------------------------------------------------------------------------- the spec
@dataclass
class FeatureSpec:
    """How rows become model inputs and labels become targets: the columns read and their kinds, the
    use case's code and what it learnt, the numeric inputs' scaling, the one-hot vocabularies, and the
    task (with a regression target's centre and scale)."""

    task: dict[str, Any]
    time: str  # the event-time column
    numbers: list[str] = field(default_factory=list)  # columns read as float64
    texts: list[str] = field(default_factory=list)  # columns read as text
    times: list[str] = field(default_factory=list)  # other columns read as UTC datetime64
    code: dict[str, str] = field(default_factory=dict)  # file name -> source: the use case's inputs.py, network file
    fitted: dict[str, Any] = field(default_factory=dict)  # what the inputs' fit() learnt
    numeric: list[str] = field(default_factory=list)  # the derived numeric inputs, in the input layout's order
    means: list[float] = field(default_factory=list)
    stds: list[float] = field(default_factory=list)
    categories: list[tuple[str, list[str]]] = field(default_factory=list)  # one-hot blocks (a list: the order is the layout)
    target: tuple[float, float] = (0.0, 1.0)  # regression: the label's centre and scale (the model learns (y - c) / s)

    def __post_init__(self) -> None:
        self._task = Task.model_validate(self.task)
        module = import_code(self.code, INPUTS_FILE)
        self._derive = module.derive if module is not None else default_derive
        self._fit = getattr(module, "fit", None) if module is not None else None

    # ------------------------------------------------------------------ building one
    @classmethod
    def fit(cls, frame: pd.DataFrame, usecase: "UseCase") -> "FeatureSpec":
        """Read the use case's code, learn its constants, then the numeric inputs' mean and spread and
        (regression) the target's centre and scale, from the fit rows."""
        contract, task = usecase.contract, usecase.task
        hidden = contract.not_known_at_scoring()
        columns = [n for n in contract.columns if n not in hidden and n != contract.id]
        from flywheel.features.views import views_of

        features = {name: kind for view in views_of(usecase) for name, kind in view.features.items()}
        numbers = [n for n in columns if contract.columns[n].type not in ("string", "timestamp")]
        numbers += [name for name, kind in features.items() if kind != "String"]
        texts = [n for n in columns if contract.columns[n].type == "string"]
        texts += [name for name, kind in features.items() if kind == "String"]
        times = [n for n in columns if contract.columns[n].type == "timestamp" and n != contract.timestamp]
        code = {}
        inputs_path = usecase.folder / INPUTS_FILE
        if inputs_path.is_file():
            code[INPUTS_FILE] = inputs_path.read_text()
        if task.network:
            code[task.network] = (usecase.folder / task.network).read_text()
        spec = cls(task=task.model_dump(mode="json"), time=contract.timestamp, numbers=numbers, texts=texts,
                   times=times, code=code)
        module = import_code(code, INPUTS_FILE)
        declared = getattr(module, "CATEGORIES", None) if module is not None else None
        if declared is None:
            declared = [n for n in texts if n in contract.columns and contract.columns[n].categories
                        and n not in contract.entities.values()]
        for name in declared:
            if name not in contract.columns or not contract.columns[name].categories:
                raise UseCaseError(f"{usecase.folder / INPUTS_FILE}: CATEGORIES names {name}, which is not a column "
                                   "of the contract with categories (the one-hot vocabulary comes from them)")
        spec.categories = [(name, list(contract.columns[name].categories or [])) for name in declared]
        data = spec.columns_of(frame)
        if module is None:
            spec.fitted = default_fit(usecase)
        elif spec._fit is not None:
            spec.fitted = spec._fit(data)
        derived = spec._derive(data, spec.fitted)
        spec.numeric = list(derived)
        if not spec.numeric:
            raise UseCaseError(f"use case {usecase.name}: its inputs derive no numeric input")
        stacked = np.stack([np.asarray(derived[name], dtype="float64") for name in spec.numeric], axis=1)
        with np.errstate(invalid="ignore"):
            finite = np.where(np.isfinite(stacked), stacked, np.nan)
            means = np.nanmean(finite, axis=0) if len(frame) else np.zeros(len(spec.numeric))
            stds = np.nanstd(finite, axis=0) if len(frame) else np.ones(len(spec.numeric))
        spec.means = [float(m) if np.isfinite(m) else 0.0 for m in means]
        spec.stds = [float(s) if np.isfinite(s) and s > 1e-9 else 1.0 for s in stds]
        if task.kind == "regression":
            labels = pd.to_numeric(frame[task.label], errors="coerce").dropna().to_numpy(dtype="float64")
            if not len(labels):
                raise DataError(f"no row to fit on has a label {task.label}")
            centre = float(np.median(labels)) if task.loss == "l1" else float(labels.mean())
            scale = float(labels.std()) if labels.std() > 1e-9 else 1.0
            spec.target = (centre, scale)
        return spec

    # ------------------------------------------------------------------ reading rows
    @property
    def objective(self) -> Task:
        """The task, as the typed object."""
        return self._task

    def columns_of(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """A frame's columns as :data:`Columns` (pandas only here, for training and evaluation)."""
        columns: dict[str, np.ndarray] = {}
        for name in (self.time, *self.times):
            if name in frame:
                columns[name] = pd.to_datetime(frame[name], utc=True).dt.tz_localize(None).to_numpy()
        for name in self.texts:
            if name in frame:
                columns[name] = frame[name].astype("string").fillna("").to_numpy(dtype=object)
        for name in self.numbers:
            if name in frame:
                columns[name] = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype="float64")
        if self.time not in columns:
            raise DataError(f"the rows have no {self.time} column (the event time the inputs are derived at)")
        return columns

    def derive(self, columns: Columns) -> dict[str, np.ndarray]:
        """The use case's derived numeric inputs for :data:`Columns`."""
        return self._derive(columns, self.fitted)

    def derive_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """:meth:`derive` for a frame, as a frame (inspection and tests)."""
        derived = self.derive(self.columns_of(frame))
        return pd.DataFrame({name: derived[name] for name in self.numeric}, index=frame.index)

    # ------------------------------------------------------------------ the input layout
    @property
    def input_names(self) -> list[str]:
        names = list(self.numeric)
        for column, vocab in self.categories:
            names += [f"{column}={value}" for value in vocab] + [f"{column}=<other>"]
        return names

    @property
    def width(self) -> int:
        return len(self.input_names)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """The model's input matrix (float32, one row per row of the frame)."""
        return self.transform_columns(self.columns_of(frame))

    def transform_columns(self, columns: Columns) -> np.ndarray:
        """The model's input matrix (float32, one row per row) for :data:`Columns`: the one
        implementation behind training (through :meth:`transform`) and serving."""
        if not self.means:
            raise ValueError("FeatureSpec.transform called before fit")
        derived = self._derive(columns, self.fitted)
        rows = len(columns[self.time])
        try:
            stacked = np.stack([derived[name] for name in self.numeric], axis=1)
        except KeyError as exc:
            raise UseCaseError(f"the model's input {exc.args[0]} is not one its inputs derive "
                               f"(they derive {', '.join(derived)}): the spec and its code disagree") from None
        blocks = [(stacked - np.asarray(self.means)) / np.asarray(self.stds)]
        for column, vocab in self.categories:
            index = {v: i for i, v in enumerate(vocab)}
            codes = np.array([index.get(v, len(vocab)) for v in text(columns, column, rows)], dtype=np.int64)
            blocks.append(np.eye(len(vocab) + 1)[codes])
        # NaN (a missing feature) becomes the mean; infinities stay (float32 infinities), as nan_to_num left them.
        return fill(np.hstack(blocks), 0.0).astype(np.float32)

    # ------------------------------------------------------------------ labels
    def targets(self, frame: pd.DataFrame) -> np.ndarray:
        """The frame's labels as the network learns them: 0/1 float32 (binary), class indices int64
        (multiclass), the centred and scaled label float32 (regression). A row without a label, or with
        a class the contract does not list, is a :class:`DataError` naming it."""
        task = self._task
        if task.label not in frame:
            raise DataError(f"the rows have no label column {task.label}")
        values = frame[task.label]
        missing = values.isna()
        if missing.any():
            raise DataError(f"{int(missing.sum())} row(s) have no label {task.label}: a training set holds labelled rows only")
        if task.kind == "multiclass":
            index = {c: i for i, c in enumerate(task.classes)}
            codes = values.astype("string").map(index)
            if codes.isna().any():
                unknown = sorted(set(values.astype("string")[codes.isna()]))[:5]
                raise DataError(f"label {task.label} holds {unknown}, not among the contract's classes {list(task.classes)}")
            return codes.to_numpy(dtype="int64")
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype="float64")
        if task.kind == "regression":
            return ((numbers - self.target[0]) / self.target[1]).astype("float32")
        return numbers.astype("float32")

    def label_values(self, frame: pd.DataFrame) -> np.ndarray:
        """The labels in the task's own terms: 0/1 (binary), class indices (multiclass), the label in
        its own units (regression)."""
        if self._task.kind == "regression":
            return pd.to_numeric(frame[self._task.label], errors="coerce").to_numpy(dtype="float64")
        return self.targets(frame)

    # ------------------------------------------------------------------ saving
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureSpec":
        data = dict(data)
        data["categories"] = [(column, list(vocab)) for column, vocab in data.get("categories", [])]
        data["target"] = tuple(data.get("target", (0.0, 1.0)))
        return cls(**data)
