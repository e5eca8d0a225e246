"""A use case's task: what its model predicts, under which name, and how it learns (issue 19).

Declared in ``usecases/<name>/task.yaml`` (every field optional: without the file the task follows
from the contract's label)::

    task: regression          # binary | multiclass | regression (default: from the label's type)
    label: delay              # default: the contract's first label
    output: delay_minutes     # what serving calls the prediction (default: <label>_prediction,
                              #   <label>_probability for a binary or multiclass task)
    loss: l1                  # binary: bce; multiclass: cross_entropy; regression: huber (default), l1, mse
    early_stopping: mae       # the validation figure that picks the best epoch (defaults below)
    network: network.py       # optional: the team's own torch.nn.Module factory (see below)
    evaluation:               # optional: how a model is judged (see below)
      slices: [carrier, origin]       # metrics per value of these columns, in the report
      floors: {mae_skill: 0.05}       # the least a model must reach
      regressions: {mae: 0.25}        # how much worse than production it may be, in the metric's units
      tolerance: 15                   # regression: the share of predictions within 15 (label units)
      min_comparison_rows: 500        # fewer rows neither model trained on: no comparison
      canary_tolerance: 5             # the canary: stable's and the candidate's answers within 5 agree
      canary_mean_difference: 2       # ... and differ by at most 2 on average (the output's units)

A binary label is a 0/1 column; a multiclass label is a string column whose contract lists its
``categories`` (the classes, in that order); a regression label is a number. The loss and the
early-stopping figure follow the task: a binary model learns binary cross-entropy and stops on the
validation PR-AUC; a multiclass one, cross-entropy and log-loss; a regression one, the declared loss
and the mean absolute error. A regression model learns the label centred and scaled (its median and
spread on the fit rows) and answers in the label's own units.

The metrics per task (:data:`METRICS`): binary ROC-AUC, PR-AUC, recall at a false-positive rate
and the Brier skill over the base rate; multiclass log-loss, accuracy, macro-F1 and the log-loss skill
over the classes' shares; regression MAE, RMSE, median absolute error, bias, the share within the
tolerance and the MAE skill over the training labels' median. A binary task's floors and allowed
regressions default to the ``gate`` settings; the others' to beating that constant (skill above 0)
and at most 0.01 of skill worse than production.

``network``: a Python file of the use case defining ``build(width: int, outputs: int, hidden:
list[int]) -> torch.nn.Module``, a module mapping a float32 matrix (rows x width) to its outputs
(rows, for one output; rows x outputs otherwise). Without it, the platform's MLP with the training
settings' ``hidden`` layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from flywheel.contract import NUMERIC, Contract, describe_errors, read_usecase_yaml
from flywheel.errors import UseCaseError

TASK_FILE = "task.yaml"
TaskKind = Literal["binary", "multiclass", "regression"]
LOSSES: dict[str, tuple[str, ...]] = {
    "binary": ("bce",),
    "multiclass": ("cross_entropy",),
    "regression": ("huber", "l1", "mse"),
}
# The validation figures early stopping may watch, the first being the task's default, and whether
# higher is better.
STOPPING: dict[str, dict[str, bool]] = {
    "binary": {"pr_auc": True, "roc_auc": True, "log_loss": False},
    "multiclass": {"log_loss": False, "accuracy": True},
    "regression": {"mae": False, "rmse": False},
}


# Every figure the evaluation reports per task -> whether higher is better (None: neither; reported,
# never gated). Floors and allowed regressions may name the ones with a direction.
METRICS: dict[str, dict[str, bool | None]] = {
    "binary": {"roc_auc": True, "pr_auc": True, "recall_at_fpr": True, "brier_skill": True},
    "multiclass": {"log_loss": False, "accuracy": True, "macro_f1": True, "log_loss_skill": True},
    "regression": {"mae": False, "rmse": False, "median_ae": False, "within_tolerance": True, "mae_skill": True,
                   "bias": None},
}
# How a person reads each metric's name (the gate's reasons, the report).
LABELS = {
    "roc_auc": "ROC-AUC", "pr_auc": "PR-AUC", "recall_at_fpr": "recall at FPR {fpr:g}", "brier_skill": "Brier skill score",
    "log_loss": "log-loss", "accuracy": "accuracy", "macro_f1": "macro-F1",
    "log_loss_skill": "log-loss skill",
    "mae": "MAE", "rmse": "RMSE", "median_ae": "median absolute error", "bias": "bias (mean error)",
    "within_tolerance": "share within the tolerance", "mae_skill": "MAE skill",
}
# The figures a summary line shows first, per task.
HEADLINE = {"binary": ("roc_auc", "pr_auc"), "multiclass": ("log_loss", "macro_f1", "accuracy"),
            "regression": ("mae", "rmse", "mae_skill")}


def headline(metrics: dict[str, float], separator: str = "  ") -> str:
    """The first figures of an evaluation's metrics, named for a person ("ROC-AUC 0.9312  PR-AUC ...")."""
    kind = next((k for k, names in HEADLINE.items() if names[0] in metrics), None)
    if kind is None:
        return ""
    return separator.join(f"{LABELS[name].format(fpr=0.01)} {metrics[name]:.4f}" for name in HEADLINE[kind] if name in metrics)


# Without a declaration (a declared one replaces these): a model must beat the constant it could have learnt without inputs (the
# training labels' median, or the classes' shares), and may be at most 1% of that constant's error
# worse than production (a binary task's floors and regressions are the gate settings).
DEFAULT_FLOORS = {"binary": {}, "multiclass": {"log_loss_skill": 0.0}, "regression": {"mae_skill": 0.0}}
DEFAULT_REGRESSIONS = {"binary": {}, "multiclass": {"log_loss_skill": 0.01, "macro_f1": 0.01},
                       "regression": {"mae_skill": 0.01}}


class EvaluationFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slices: list[str] = []
    floors: dict[str, float] = {}
    regressions: dict[str, float] = {}
    tolerance: float | None = None
    min_comparison_rows: int | None = None
    canary_tolerance: float | None = None
    canary_mean_difference: float | None = None


class TaskFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: TaskKind | None = None
    label: str | None = None
    output: str | None = None
    loss: str | None = None
    early_stopping: str | None = None
    network: str | None = None
    evaluation: EvaluationFile = EvaluationFile()


class EvaluationRules(BaseModel):
    """How a model of the task is judged: the columns its metrics are sliced by, the floors it must
    clear, how much worse than production it may be (in each metric's own units), a regression's
    tolerance (the share of predictions within it is reported), and how many rows neither model
    trained on a comparison with production needs."""

    model_config = ConfigDict(frozen=True)

    slices: tuple[str, ...] = ()
    floors: dict[str, float] = {}
    regressions: dict[str, float] = {}
    tolerance: float | None = None
    min_comparison_rows: int = 200
    # The canary: two answers closer than this agree, and the mean difference allowed, in the
    # output's units (binary: the canary settings; regression default: a tenth and a twentieth of
    # the training label's spread; multiclass: the settings, per class probability).
    canary_tolerance: float | None = None
    canary_mean_difference: float | None = None


class Task(BaseModel):
    """The task as the platform reads it: every default resolved."""

    model_config = ConfigDict(frozen=True)

    kind: TaskKind
    label: str
    output: str
    loss: str
    early_stopping: str
    classes: tuple[str, ...] = ()  # multiclass: the label's categories, in the contract's order
    network: str | None = None  # the use case's network file, relative to its folder
    evaluation: EvaluationRules = EvaluationRules()

    @property
    def outputs(self) -> int:
        """The network's output width."""
        return len(self.classes) if self.kind == "multiclass" else 1

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger early-stopping figure is a better model."""
        return STOPPING[self.kind][self.early_stopping]


def infer_kind(contract: Contract, label: str) -> str:
    """The task a label implies: 0/1 -> binary, a string with categories -> multiclass, a number -> regression."""
    column = contract.columns[label]
    if column.is_binary():
        return "binary"
    if column.type == "string" and column.categories:
        return "multiclass"
    if column.type in NUMERIC:
        return "regression"
    raise UseCaseError(f"label {label} is {column.type}{' without categories' if column.type == 'string' else ''}: "
                       "no task follows from it (a 0/1 number is binary, a string with categories multiclass, "
                       "another number regression); declare the label's categories or range in contract.yaml")


def resolve_task(declared: TaskFile, contract: Contract, source: str) -> Task:
    """Fill the defaults in and check that the declaration fits the contract."""
    label = declared.label or contract.labels[0]
    if label not in contract.labels:
        raise UseCaseError(f"{source}: label {label} is not one of the contract's labels ({', '.join(contract.labels)})")
    kind = declared.task or infer_kind(contract, label)
    column = contract.columns[label]
    classes: tuple[str, ...] = ()
    if kind == "binary" and not column.is_binary():
        raise UseCaseError(f"{source}: a binary task needs a 0/1 label, and {label} is {column.type} "
                           f"with bounds [{column.min}, {column.max}] (declare min: 0 and max: 1 in contract.yaml)")
    if kind == "multiclass":
        if not column.categories:
            raise UseCaseError(f"{source}: a multiclass task needs the label's classes: list {label}'s categories "
                               "in contract.yaml")
        classes = tuple(column.categories)
        if len(classes) < 2:
            raise UseCaseError(f"{source}: a multiclass task needs at least two classes; {label} lists {len(classes)}")
    if kind == "regression" and column.type not in NUMERIC:
        raise UseCaseError(f"{source}: a regression task needs a numeric label, and {label} is {column.type}")
    loss = declared.loss or LOSSES[kind][0]
    if loss not in LOSSES[kind]:
        raise UseCaseError(f"{source}: loss {loss!r} does not fit a {kind} task (one of: {', '.join(LOSSES[kind])})")
    stopping = declared.early_stopping or next(iter(STOPPING[kind]))
    if stopping not in STOPPING[kind]:
        raise UseCaseError(f"{source}: early_stopping {stopping!r} is not a {kind} figure "
                           f"(one of: {', '.join(STOPPING[kind])})")
    output = declared.output or (f"{label}_prediction" if kind == "regression" else f"{label}_probability")
    if not output.isidentifier():
        raise UseCaseError(f"{source}: output {output!r} must be a plain name (letters, digits, '_')")
    return Task(kind=kind, label=label, output=output, loss=loss, early_stopping=stopping, classes=classes,
                network=declared.network, evaluation=resolve_evaluation(declared.evaluation, kind, contract, source))


def resolve_evaluation(declared: EvaluationFile, kind: str, contract: Contract, source: str) -> EvaluationRules:
    """The evaluation's rules, defaults filled in, held to the task's metrics and the contract's columns."""
    hidden = contract.not_known_at_scoring()
    for column in declared.slices:
        if column not in contract.columns or column in hidden:
            raise UseCaseError(f"{source}: evaluation.slices names {column}, which is not a column known when a "
                               "row is scored")
    for what, values in (("floors", declared.floors), ("regressions", declared.regressions)):
        for name, value in values.items():
            if METRICS[kind].get(name) is None:
                gated = [m for m, higher in METRICS[kind].items() if higher is not None]
                raise UseCaseError(f"{source}: evaluation.{what} names {name}, not a {kind} metric with a direction "
                                   f"(one of: {', '.join(gated)})")
            if what == "regressions" and value < 0:
                raise UseCaseError(f"{source}: evaluation.regressions.{name} is {value}: an allowed worsening is >= 0")
    if declared.tolerance is not None and (kind != "regression" or declared.tolerance <= 0):
        raise UseCaseError(f"{source}: evaluation.tolerance is a regression's error margin in the label's units (> 0)")
    if declared.min_comparison_rows is not None and declared.min_comparison_rows < 1:
        raise UseCaseError(f"{source}: evaluation.min_comparison_rows must be at least 1")
    for name in ("canary_tolerance", "canary_mean_difference"):
        value = getattr(declared, name)
        if value is not None and (kind == "binary" or value <= 0):
            raise UseCaseError(f"{source}: evaluation.{name} is a regression's or multiclass model's canary margin "
                               "(> 0; a binary model's are the deploy.canary settings)")
    return EvaluationRules(
        slices=tuple(declared.slices),
        floors=dict(declared.floors) if "floors" in declared.model_fields_set else DEFAULT_FLOORS[kind],
        regressions=dict(declared.regressions) if "regressions" in declared.model_fields_set else DEFAULT_REGRESSIONS[kind],
        tolerance=declared.tolerance,
        min_comparison_rows=declared.min_comparison_rows or 200,
        canary_tolerance=declared.canary_tolerance,
        canary_mean_difference=declared.canary_mean_difference,
    )


def load_task(folder: Path, contract: Contract) -> Task:
    """The task of the use case in ``folder`` (``task.yaml``; defaults from the contract when absent)."""
    path = folder / TASK_FILE
    data: Any = read_usecase_yaml(path) if path.exists() else {}
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UseCaseError(f"{path} must hold a mapping (task, label, output, ...), not {type(data).__name__}")
    try:
        declared = TaskFile.model_validate(data)
    except ValidationError as exc:
        raise UseCaseError(f"invalid task {path}: {describe_errors(exc, 'task')}") from None
    task = resolve_task(declared, contract, str(path))
    if task.network is not None and not (folder / task.network).is_file():
        raise UseCaseError(f"{path}: network {task.network} is not a file of the use case folder {folder}")
    return task
