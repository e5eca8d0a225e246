"""Batch scoring: a date range of the lake scored by one model version, in chunks of days.

The batch pattern: a plan pins the model version (the production one when the run starts, so a
deployment during the run cannot mix versions) and splits the range into chunks; each chunk is scored
on its own (in parallel on a cluster) and writes its days' partitions; a summary gathers the chunks.

A chunk scores exactly as training saw its rows: the use case's aggregates are computed from the
lake with the training code (:mod:`flywheel.features.engine`) over the chunk and the days before it
that the features read (:func:`flywheel.features.incremental.lookback_days`, and a margin),
and joined point-in-time through Feast
(:func:`flywheel.features.store.historical_features`), so each row gets the features as they
were just before it. Results land under ``<out>/date=YYYY-MM-DD/scores.parquet`` (the day of the
contract's timestamp), each with a lineage record naming the lake parts and the model it came from;
``<out>/summary.json`` is written last.

What a row of the scores holds follows the use case (:func:`score_columns`): the contract's id,
timestamp and entities' join keys, then the model's answer under its task's ``output`` name (a binary
task's probability, a regression's prediction in the label's units, or a multiclass task's
probability per class, one column ``<output>_<class>`` each), then ``model_version``. The summary
gives every output column's mean; a binary task's also counts the rows flagged at or above
``scoring.alert_threshold``, and a multiclass task's counts the rows per most likely class.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import shutil
import time
from typing import Any

import numpy as np
import pandas as pd

from flywheel import lineage
from flywheel.config import Settings
from flywheel.contract import Contract
from flywheel.errors import DataError, RegistryError, UseCaseError
from flywheel.features import engine, incremental, store as feast_store
from flywheel.features.views import views_of
from flywheel.lake import LakeSnapshot, latest_snapshot, read_part, source_snapshots
from flywheel.usecase import load_usecase
from flywheel.registry import Registry
from flywheel.storage import Storage, join
from flywheel.task import Task
from flywheel.training.model import load_version

log = logging.getLogger(__name__)
HISTORY_MARGIN_DAYS = 1  # read a day more than the features' lookback
VERSION_COLUMN = "model_version"


def output_columns(task: Task) -> list[str]:
    """The columns a model of ``task`` answers in: its output, or one probability per class."""
    if task.kind == "multiclass":
        return [f"{task.output}_{name}" for name in task.classes]
    return [task.output]


def score_columns(contract: Contract, task: Task) -> tuple[list[str], list[str]]:
    """(the row's keys: the contract's id, timestamp and join keys; the model's output columns).

    An output column that would overwrite a key (or the model version) is a :class:`UseCaseError`."""
    keys = list(dict.fromkeys(name for name in (contract.id, contract.timestamp, *contract.entities.values()) if name))
    outputs = output_columns(task)
    clashes = sorted(set(outputs) & {*keys, VERSION_COLUMN})
    if clashes:
        raise UseCaseError(f"the task's output {task.output!r} names the scores' column(s) {', '.join(clashes)}, which "
                           f"batch scoring also writes (the contract's id, timestamp and join keys, and {VERSION_COLUMN}): "
                           "choose another output name in task.yaml")
    return keys, outputs


def _date(value: str, name: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except (TypeError, ValueError):
        raise DataError(f"{name} must be a date YYYY-MM-DD, not {value!r}") from None


def plan(storage: Storage, settings: Settings, start: str, end: str, chunk_days: int, out_uri: str, lake_uri: str = "") -> dict[str, Any]:
    """Check the range, pin the model version and the lake snapshot, and split the range into chunks."""
    first, last = _date(start, "start_date"), _date(end, "end_date")
    if first > last:
        raise DataError(f"start_date {start} is after end_date {end}")
    if chunk_days < 1:
        raise DataError(f"chunk_days must be at least 1, not {chunk_days}")
    production = Registry(storage, settings.model_name).production()
    if production is None:
        raise RegistryError(f"model {settings.model_name!r} has no production version to score with: run `flywheel run` first")
    lake = lake_uri or storage.uri("lake")
    snapshot = latest_snapshot(storage, lake)
    if snapshot is None:
        raise DataError(f"the lake {lake} holds no published data: ingest some with `flywheel run --source ...`")
    days_in_lake = sorted({p["date"] for p in snapshot.parts if start <= p["date"] <= end})
    if not days_in_lake:
        raise DataError(f"the lake {lake} has no rows from {start} to {end} "
                        f"(it holds {min(p['date'] for p in snapshot.parts)} to {max(p['date'] for p in snapshot.parts)})")
    chunks = []
    day = first
    while day <= last:
        chunk_end = min(day + dt.timedelta(days=chunk_days - 1), last)
        chunks.append({"start": day.isoformat(), "end": chunk_end.isoformat()})
        day = chunk_end + dt.timedelta(days=1)
    return {
        "start": start, "end": end, "out_uri": out_uri, "model_version": production.version,
        "snapshot_uri": snapshot.uri, "snapshot_sha256": snapshot.sha256, "chunks": chunks,
    }


def score_chunk(storage: Storage, settings: Settings, chunk: dict[str, str], scoring: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Score the rows of one chunk of days and write one partition per day.

    The result holds, besides the rows and files, what :func:`summarize` gathers: the model's task,
    the sum of each output column, and (binary) the rows flagged or (multiclass) the rows per most
    likely class."""
    started = time.perf_counter()
    first, last = _date(chunk["start"], "chunk start"), _date(chunk["end"], "chunk end")
    usecase = load_usecase(settings.usecase)
    history_from = (first - dt.timedelta(days=incremental.lookback_days(usecase) + HISTORY_MARGIN_DAYS)).isoformat()
    snapshot = LakeSnapshot.from_dict(storage.read_json(scoring["snapshot_uri"]))
    if snapshot.sha256 != scoring["snapshot_sha256"]:
        raise DataError(f"{scoring['snapshot_uri']} changed during the scoring run (sha256 mismatch)")
    parts = [p for p in snapshot.parts if history_from <= p["date"] <= chunk["end"]]
    schema = usecase.contract.arrow_schema()
    frames = [read_part(storage, part, schema, of=snapshot.uri).to_pandas() for part in parts]
    history = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    timestamp = usecase.contract.timestamp
    dates = history[timestamp].dt.strftime("%Y-%m-%d") if len(history) else pd.Series(dtype=str)
    target = history[(dates >= chunk["start"]) & (dates <= chunk["end"])] if len(history) else history
    result: dict[str, Any] = {"start": chunk["start"], "end": chunk["end"], "rows": int(len(target)), "files": {},
                              "model_version": scoring["model_version"], "task": None, "output": None, "sums": {},
                              "flagged": None, "predicted": {}}
    if target.empty:
        log.info("score: no rows from %s to %s", chunk["start"], chunk["end"])
        return result

    registry = Registry(storage, settings.model_name)
    version = registry.get(scoring["model_version"])
    model = load_version(registry, version)
    task = model.task  # the task the model was trained for: what its answers mean
    keys, outputs = score_columns(usecase.contract, task)
    sources = incremental.source_rows(storage, snapshot, usecase, history_from, chunk["end"])  # further sources read
    joined = _point_in_time(settings, history, target, scoring, chunk, sources)
    answers = np.asarray(model.score(joined), dtype="float64").reshape(len(joined), len(outputs))
    scores = joined[keys].reset_index(drop=True)
    for i, name in enumerate(outputs):
        scores[name] = answers[:, i]
    scores[VERSION_COLUMN] = version.version
    inputs = [{"uri": p["uri"], "sha256": p["sha256"]} for p in parts] + [{"uri": version.manifest_uri, "sha256": version.sha256}]
    inputs += [{"uri": p["uri"], "sha256": p["sha256"]} for source in source_snapshots(snapshot).values()
               for p in source.parts if history_from <= p.get("date", "") <= chunk["end"]]
    for day, rows in scores.groupby(scores[timestamp].dt.strftime("%Y-%m-%d"), sort=True):
        ref = storage.write_parquet(join(scoring["out_uri"], f"date={day}", "scores.parquet"), rows.reset_index(drop=True))
        lineage.record(storage, ref, step="score", run_id=run_id, inputs=inputs,
                       params={"model_version": version.version, "start": chunk["start"], "end": chunk["end"]})
        result["files"][ref.uri] = ref.sha256
    result.update(task=task.kind, output=task.output, sums={name: float(np.sum(answers[:, i])) for i, name in enumerate(outputs)})
    if task.kind == "binary":
        result["flagged"] = int((answers[:, 0] >= settings.scoring.alert_threshold).sum())
    elif task.kind == "multiclass":
        counts = np.bincount(answers.argmax(axis=1), minlength=len(task.classes))
        result["predicted"] = {name: int(count) for name, count in zip(task.classes, counts)}
    result["seconds"] = round(time.perf_counter() - started, 3)
    log.info("score: %s..%s, %d rows in %.1fs", chunk["start"], chunk["end"], len(scores), result["seconds"])
    return result


def _point_in_time(settings: Settings, history: pd.DataFrame, target: pd.DataFrame, scoring: dict[str, Any],
                   chunk: dict[str, str], sources: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The chunk's rows joined with their features as they were just before each one."""
    key = hashlib.sha256(f"{scoring['snapshot_sha256']}:{chunk['start']}:{chunk['end']}".encode()).hexdigest()[:16]
    world = f"scoring{key}"  # a throwaway world: this chunk's registry and tables, removed after the join
    folder = feast_store.world_dir(settings, world)
    (folder / "offline").mkdir(parents=True, exist_ok=True)
    usecase = load_usecase(settings.usecase)
    views = views_of(usecase)
    until = pd.Timestamp(chunk["end"], tz="UTC") + pd.Timedelta(days=1)
    try:
        paths = {}
        for view in views:
            paths[view.name] = str(folder / "offline" / f"{view.name}.parquet")
            table = engine.entity_table(history, usecase.contract, view.entity, list(view.aggregations), until=until,
                                        sources=sources)
            table.to_parquet(paths[view.name], index=False)
        fs = feast_store.open_store(settings, world)
        feast_store.apply_definitions(fs, views, paths)
        return feast_store.historical_features(fs, target.reset_index(drop=True), views, usecase.contract)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def summarize(storage: Storage, settings: Settings, scoring: dict[str, Any], results: list[dict[str, Any]], run_id: str) -> dict[str, Any]:
    """Gather the chunks into ``<out>/summary.json`` (written last: the run's publication point)."""
    versions = {r["model_version"] for r in results}
    covered = sorted((r["start"], r["end"]) for r in results)
    expected = sorted((c["start"], c["end"]) for c in scoring["chunks"])
    if covered != expected or versions != {scoring["model_version"]}:
        raise DataError(f"the chunks' results do not cover the plan: chunks {covered} of {expected}, model versions {sorted(versions)}")
    rows = sum(int(r["rows"]) for r in results)  # KFP hands collected numbers back as floats
    files = {uri: sha for r in results for uri, sha in r["files"].items()}
    kind, output = _task_of(settings, results)
    sums: dict[str, float] = {}
    for r in results:
        for name, total in (r.get("sums") or {}).items():
            sums[name] = sums.get(name, 0.0) + float(total)
    summary: dict[str, Any] = {
        "run_id": run_id, "start": scoring["start"], "end": scoring["end"], "model_version": scoring["model_version"],
        "snapshot_sha256": scoring["snapshot_sha256"], "rows": rows, "days": len(files), "chunks": len(results),
        "task": kind, "output": output, "means": {name: total / rows for name, total in sums.items()} if rows else {},
    }
    if kind == "binary":
        summary.update(flagged=sum(int(r["flagged"] or 0) for r in results), alert_threshold=settings.scoring.alert_threshold,
                       mean_probability=summary["means"].get(output))
    elif kind == "multiclass":
        predicted: dict[str, int] = {}
        for r in results:
            for name, count in (r.get("predicted") or {}).items():
                predicted[name] = predicted.get(name, 0) + int(count)
        summary["predicted"] = predicted
    summary["files"] = files
    ref = storage.write_json(join(scoring["out_uri"], "summary.json"), summary)
    lineage.record(storage, ref, step="summarize", run_id=run_id, inputs=[{"uri": u, "sha256": s} for u, s in files.items()],
                   params={"start": scoring["start"], "end": scoring["end"]})
    return {**summary, "uri": ref.uri}


def _task_of(settings: Settings, results: list[dict[str, Any]]) -> tuple[str, str]:
    """(kind, output) of the model that scored the chunks; the use case's task when no chunk had rows."""
    scored = {(r["task"], r["output"]) for r in results if r.get("task")}
    if len(scored) > 1:
        raise DataError(f"the chunks were scored for different tasks: {sorted(scored)}")
    if scored:
        return scored.pop()
    task = load_usecase(settings.usecase).task
    return task.kind, task.output


def describe(summary: dict[str, Any]) -> str:
    """What a summary says, in one line: the rows and days, the model, and the task's figure (a binary
    task's flagged rows, a regression's mean answer, a multiclass task's rows per most likely class)."""
    line = (f"scored {summary['rows']:,} rows over {summary['days']} day(s) in {summary['chunks']} chunk(s) "
            f"with model {summary['model_version']}")
    if summary["task"] == "binary":
        return f"{line}: {summary['flagged']:,} at or above {summary['alert_threshold']}"
    if summary["task"] == "multiclass":
        counts = ", ".join(f"{name} {count:,}" for name, count in summary.get("predicted", {}).items())
        return f"{line}: most likely {summary['output']}: {counts}" if counts else line
    mean = summary["means"].get(summary["output"])
    return f"{line}: mean {summary['output']} {mean:.4g}" if mean is not None else line
