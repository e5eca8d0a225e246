"""A model version's monitoring baseline, stored with the model: what its training set looked like
at its end and how the model scored there.

- ``profile``: mergeable sketches (:mod:`flywheel.monitoring.profile`) of every request field, online
  feature and output over the training set's holdout: its newest rows (split by time), on which the
  model was evaluated. That is the state serving should resemble: the older rows include any
  warm-up of windowed features (a 30-day count over the first days of the data is small because
  the data is young, not because the world differs), which would make every later week "drift".
  Each window of captured traffic is profiled on the same bins and vocabularies, so drift is a
  comparison of counts. The training rows' own profile is kept too (``training_profile``), for a
  reader who wants the whole history.
- ``reference``: the label-free estimators' fit on the holdout (:mod:`flywheel.monitoring.performance`:
  a binary model's calibration map, a regression's loss model) and the holdout's realised metrics,
  which the estimates and the realised metrics of later days are held to.

Column names are the capture's (``input.<field>``, ``feature.<name>``,
``output.<output>``): a window's table and the baseline line up without renaming. Which
columns are profiled, and how, follows the model's recorded contract and views: numbers as numbers;
a vocabulary, a flag or a short text as categories; never the id, the time, a join key without a
vocabulary (an entity's id), nor a feature that is a time (``last_time``: it moves with the clock,
so it always "drifts").

Written once per version (``<model>/monitoring/baseline.json`` beside the version's files, a
separate object: the version's files and their sha256s are untouched); :func:`load_baseline` builds
it for a version that has none (trained before monitoring existed).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pandas as pd

from flywheel import lineage
from flywheel.config import Settings
from flywheel.contract import NUMERIC, Contract, parse_contract
from flywheel.errors import ArtifactNotFound, DataError
from flywheel.features.build import TrainingSet
from flywheel.features.views import View, views_of_model
from flywheel.monitoring import performance
from flywheel.monitoring.capture import FEATURE, INPUT, OUTPUT
from flywheel.monitoring.profile import profile_table
from flywheel.registry import ModelVersion, Registry
from flywheel.scoring import output_columns
from flywheel.storage import Storage
from flywheel.training.model import load_version
from flywheel.usecase import load_usecase

log = logging.getLogger(__name__)

Kind = Literal["number", "category"]
TIME_OPS = {"last_time"}  # features that are instants: they move with the clock


def contract_of(settings: Settings, meta: dict[str, Any]) -> Contract:
    """The contract a version was trained with (recorded in its model card), else the use case's own."""
    if meta.get("contract"):
        return parse_contract(meta["contract"], "the model's recorded contract")
    return load_usecase(settings.usecase).contract


def baseline_uri(version: ModelVersion) -> str:
    return f"{version.uri}/monitoring/baseline.json"


def profiled_columns(contract: Contract, views: list[View], outputs: list[str]) -> dict[str, Kind]:
    """Capture column -> how it is profiled (see the module's docstring)."""
    kinds: dict[str, Kind] = {}
    keys = set(contract.entities.values()) | ({contract.id} if contract.id else set())
    for name in contract.request_fields():
        column = contract.columns[name]
        if name == contract.timestamp or column.type == "timestamp":
            continue
        if column.categories is not None or column.type == "bool" or column.is_binary():
            kinds[INPUT + name] = "category"
        elif column.type in NUMERIC:
            if name not in keys or column.categories is not None:
                kinds[INPUT + name] = "number"
        elif column.type == "string" and name not in keys:
            kinds[INPUT + name] = "category"
    for view in views:
        times = {name for name, aggregation in view.aggregations if aggregation.op in TIME_OPS}
        for name, kind in view.features.items():
            if name not in times:
                kinds[FEATURE + name] = "category" if kind == "String" else "number"
    for name in outputs:
        kinds[OUTPUT + name] = "number"
    return kinds


def _as_capture(frame: pd.DataFrame, contract: Contract, views: list[View]) -> pd.DataFrame:
    """A training-set frame with the capture's column names (request fields as inputs, features as features)."""
    features = {name for view in views for name in view.features}
    renamed = {name: INPUT + name for name in contract.request_fields() if name in frame.columns}
    renamed.update({name: FEATURE + name for name in features if name in frame.columns})
    return frame[list(renamed)].rename(columns=renamed)


def build_baseline(storage: Storage, settings: Settings, version: ModelVersion) -> dict[str, Any]:
    """Profile the version's training set and holdout predictions, fit the estimators' reference on
    the holdout, and store it with the model (returns what it stored)."""
    meta = version.meta
    manifest = f"{meta['training_set']['uri']}/manifest.json"
    if not storage.exists(manifest):
        raise ArtifactNotFound(f"version {version.version}'s training set {meta['training_set']['uri']} is gone: "
                               "no baseline can be built for it")
    training_set = TrainingSet.from_dict(storage.read_json(manifest))
    model = load_version(Registry(storage, settings.model_name), version)
    contract = contract_of(settings, meta)
    views = views_of_model(meta) or []
    task = model.task
    outputs = output_columns(task)
    kinds = profiled_columns(contract, views, outputs)
    train = storage.read_parquet(training_set.train_uri).to_pandas()
    holdout = storage.read_parquet(training_set.holdout_uri).to_pandas()
    predictions = np.asarray(model.score(holdout))
    labels = np.asarray(model.spec.label_values(holdout))
    rows = _as_capture(holdout, contract, views)
    for index, name in enumerate(outputs):
        rows[OUTPUT + name] = predictions.reshape(len(holdout), -1)[:, index]
    cfg = settings.monitoring
    profile = profile_table(rows, kinds, bins=cfg.bins)
    inputs_only = {k: v for k, v in kinds.items() if not k.startswith(OUTPUT)}
    training_profile = profile_table(_as_capture(train, contract, views), inputs_only, bins=cfg.bins)
    numeric_inputs = holdout_features(_as_capture(holdout, contract, views), kinds)
    if task.kind == "binary":
        reference = performance.binary_reference(predictions.reshape(-1), labels)
    elif task.kind == "regression":
        reference = performance.regression_reference(predictions.reshape(-1), labels, numeric_inputs)
    else:
        reference = {}
    document = {
        "version": version.version,
        "task": task.kind,
        "outputs": outputs,
        "kinds": kinds,
        "profile": profile.to_dict(),
        "training_profile": training_profile.to_dict(),
        "reference": reference,
        "training_rows": int(len(train)),
        "holdout_rows": int(len(holdout)),
        "training_window": meta.get("training_window"),
    }
    ref = storage.write_json(baseline_uri(version), document)
    lineage.record(storage, ref, step="monitoring-baseline", run_id=meta.get("run_id", ""),
                   inputs=[storage.stat(training_set.train_uri).to_dict(), storage.stat(training_set.holdout_uri).to_dict(),
                           {"uri": version.manifest_uri, "sha256": version.sha256}],
                   params={"bins": cfg.bins})
    log.info("monitoring baseline of %s: %d columns over %d training and %d holdout rows",
             version.version, len(kinds), len(train), len(holdout))
    return document


def holdout_features(frame: pd.DataFrame, kinds: dict[str, Kind]) -> pd.DataFrame:
    """The numeric inputs and features a regression's loss model reads (the capture's names)."""
    columns = [c for c, kind in kinds.items() if kind == "number" and not c.startswith(OUTPUT) and c in frame.columns]
    return frame[columns].astype("float64")


def load_baseline(storage: Storage, settings: Settings, version: ModelVersion) -> dict[str, Any]:
    """The version's stored baseline, built now when it has none."""
    uri = baseline_uri(version)
    if storage.exists(uri):
        return storage.read_json(uri)
    try:
        return build_baseline(storage, settings, version)
    except (ArtifactNotFound, KeyError) as exc:
        raise DataError(f"version {version.version} has no monitoring baseline and none can be built: {exc}") from exc
