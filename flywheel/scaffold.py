"""`flywheel init`: a new use case's folder, written from a sample of the team's data.

From the sample come the contract (:func:`flywheel.contract.infer_contract`: types, nullability,
observed ranges and small vocabularies, as TFX's SchemaGen), a commented starting set of features
per entity (its events' count, the label's mean over the labels known, a number's mean), the task
inferred from the label (binary, multiclass or regression, with its loss and early stopping), and, when
the sample is older than the default event-time window, the settings that let it in. Every file is
meant to be read and edited: the ranges are what the sample showed, not what may come.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import yaml

from flywheel.aggregations import FEATURES_FILE, parse_features
from flywheel.config import USECASE_SETTINGS, IngestSettings
from flywheel.contract import CONTRACT_FILE, NUMERIC, Contract, dump_contract, infer_contract, parse_contract
from flywheel.errors import UseCaseError
from flywheel.task import LOSSES, STOPPING, TASK_FILE, TaskFile, infer_kind, resolve_task
from flywheel.usecase import NAME_PATTERN


def read_sample(path: Path) -> pa.Table:
    """A sample file (parquet, csv, jsonl/json) as an Arrow table, with Arrow's own type inference
    (ISO 8601 text in a csv becomes a timestamp)."""
    kind = path.suffix.lower().lstrip(".")
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if kind == "csv":
            import pyarrow.csv as pcsv

            # As ingest reads a csv: an empty field is a missing value, not an empty string.
            return pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
        if kind in ("jsonl", "json"):
            import pyarrow.json as pjson

            return pjson.read_json(path)
    except FileNotFoundError:
        raise UseCaseError(f"the sample {path} does not exist") from None
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise UseCaseError(f"the sample {path} cannot be read as {kind}: {str(exc).splitlines()[0]}") from None
    raise UseCaseError(f"the sample {path} is not a parquet, csv or jsonl file")


def _as_utc(table: pa.Table, column: str) -> pa.Table:
    """A time column as timestamp[us, UTC] (text is parsed; naive times are UTC)."""
    values = table.column(column)
    if pa.types.is_timestamp(values.type) and values.type.tz is None:
        values = values.cast(pa.timestamp("us")).cast(pa.timestamp("us", tz="UTC"))
    elif not pa.types.is_timestamp(values.type):
        from flywheel.rawfiles import utc_timestamps

        try:
            values = utc_timestamps(values)
        except (ValueError, TypeError, pa.ArrowInvalid) as exc:
            raise UseCaseError(f"the timestamp column {column!r} does not hold times: {exc}") from None
    return table.set_column(table.schema.get_field_index(column), column, values)


def entity_name(column: str) -> str:
    """A join key's column as an entity's name: ``customer_id`` -> ``customer``; ``shop`` -> ``shop``."""
    for suffix in ("_id", "_key", "_code"):
        if column.endswith(suffix) and len(column) > len(suffix):
            return column[: -len(suffix)]
    return column


def starting_features(contract: Contract) -> str:
    """A commented features.yaml to start from: per entity, its events in the last 24 hours, the
    label's mean over the labels known in 30 days, and the mean of the first number over 7 days."""
    label = contract.labels[0]
    numbers = [name for name, c in contract.columns.items()
               if c.type in NUMERIC and name not in (*contract.labels, contract.id) and name not in contract.entities.values()]
    numbers.sort(key=lambda name: not contract.columns[name].type.startswith("float"))  # a measure before a code
    label_is_number = contract.columns[label].type in NUMERIC or contract.columns[label].type == "bool"
    lines = [
        "# Windowed aggregations per entity of contract.yaml, computed point-in-time correct by flywheel's",
        "# engine (flywheel/aggregations.py says what each means). A starting set: add, remove, rename.",
        "# Operations: count, sum, mean, std, min, max, distinct, last, last_time; windows: 1h, 24h, 7d, P30D.",
        "aggregations:",
    ]
    for entity in contract.entities:
        lines.append(f"  {entity}:")
        lines.append("    - {op: count, window: 24h}  # its events in the last day")
        if label_is_number:
            lines.append(f"    - {{op: mean, column: {label}, window: 30d}}  # its {label} over the labels known by then")
        if numbers:
            lines.append(f"    - {{op: mean, column: {numbers[0]}, window: 7d}}")
    return "\n".join(lines) + "\n"


def starting_task(contract: Contract, label: str) -> str:
    """A task.yaml inferred from the label (a 0/1 label: binary; a string with categories: multiclass;
    another number: regression), with the choices a team may change written out as comments."""
    kind = infer_kind(contract, label)
    task = resolve_task(TaskFile(task=kind, label=label), contract, TASK_FILE)  # the defaults, as they load
    choices = ", ".join(LOSSES[kind])
    return (f"# What the model predicts (flywheel/task.py), inferred from the label {label}.\n"
            f"task: {task.kind}\n"
            f"label: {task.label}\n"
            f"output: {task.output}          # what serving answers per row\n"
            f"loss: {task.loss}              # {kind}: {choices}\n"
            f"early_stopping: {task.early_stopping}      # the validation figure that picks the best epoch: "
            f"{', '.join(STOPPING[kind])}\n"
            "# network: network.py   # your own torch.nn.Module: build(width, outputs, hidden) in that file\n"
            "# Inputs: without an inputs.py the model reads every number column and feature, the time since\n"
            "# an entity's last event, the hour of day and one-hots of the columns with categories; write\n"
            "# inputs.py (derive(columns, fitted), optional fit(columns) and CATEGORIES) to choose your own.\n")


def init_usecase(folder: Path, sample: Path, *, label: str, timestamp: str, id: str | None = None,
                 entities: list[str] | None = None, now: dt.datetime | None = None) -> list[Path]:
    """Write a new use case into ``folder`` (which must not exist, or be empty) from ``sample``;
    returns the files written."""
    folder = Path(folder)
    if not NAME_PATTERN.match(folder.name):
        raise UseCaseError(f"{folder.name!r} cannot name a use case: lower-case letters, digits, '-' and '_'")
    if folder.exists() and any(folder.iterdir()):
        raise UseCaseError(f"{folder} already holds files: init writes a new use case into an empty or new folder")
    if not entities:
        raise UseCaseError("name at least one entity (--entity COLUMN): features are aggregations per entity")
    table = read_sample(Path(sample))
    missing = [c for c in (timestamp, label, *entities, *([id] if id else [])) if c not in table.column_names]
    if missing:
        raise UseCaseError(f"the sample has no column {', '.join(map(repr, missing))} (columns: {', '.join(table.column_names)})")
    table = _as_utc(table, timestamp)
    names = {entity_name(column): column for column in entities}
    if len(names) != len(entities):
        raise UseCaseError(f"the entities {entities} would share a name: give columns whose names differ")
    contract = infer_contract(table, label=label, timestamp=timestamp, id=id, entities=names)
    files = {CONTRACT_FILE: "# The data contract, inferred from " + Path(sample).name + ": review every range and vocabulary.\n"
             "# Say when a label becomes known: label_known: {delay: P3D}, or {column: COLUMN, within: P2D}.\n"
             + dump_contract(contract)}
    features_text = starting_features(contract)
    parse_features(yaml.safe_load(features_text), parse_contract(yaml.safe_load(files[CONTRACT_FILE]), CONTRACT_FILE),
                   FEATURES_FILE)  # what init writes must load
    files[FEATURES_FILE] = features_text
    files[TASK_FILE] = starting_task(contract, label)
    oldest = table.column(timestamp).to_pandas().min()
    now = now or dt.datetime.now(dt.timezone.utc)
    age_days = (now - oldest.to_pydatetime()).days if oldest is not None and oldest == oldest else 0
    if age_days > IngestSettings().max_age_days:
        files[USECASE_SETTINGS] = ("# The sample is older than the default event-time window (ingest.max_age_days): history.\n"
                                   + yaml.safe_dump({"ingest": {"max_age_days": float(age_days * 2)}}, sort_keys=False))
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = folder / name
        path.write_text(text)
        written.append(path)
    return written


__all__ = ["init_usecase", "read_sample", "starting_features", "entity_name"]
