"""A use case's task (flywheel/task.py) and its request-time inputs (flywheel/features/transform.py):
defaults that follow the contract, declarations held to it, and the same training workers learning a
regression, a multiclass model through the team's own network, and fraud's binary model, each with
the code its spec carries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flywheel.config import load_settings
from flywheel.errors import UseCaseError
from flywheel.features.transform import FeatureSpec
from flywheel.storage import Storage
from flywheel.training.launcher import launch
from flywheel.training.model import Model, build_network
from flywheel.usecase import load_usecase
from tests.factories import FRAUD, REPO

# A use case unlike both of ours: two labels (a number and a grade), no entity, a category input.
CONTRACT = """
columns:
  id: {type: string}
  at: {type: timestamp}
  x: {type: float64}
  kind: {type: string, categories: [a, b, c]}
  y: {type: float64}
  grade: {type: string, categories: [low, mid, high]}
id: id
timestamp: at
labels: [y, grade]
label_known: {delay: P1D}
"""
# The team's own network for the grade: a linear layer between two of its own modules.
NETWORK = """
import torch
from torch import nn


class Grader(nn.Module):
    def __init__(self, width, outputs):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, 16), nn.Tanh())
        self.head = nn.Linear(16, outputs)

    def forward(self, x):
        return self.head(self.body(x))


def build(width, outputs, hidden):
    return Grader(width, outputs)
"""


def usecase_folder(root: Path, task: str | None = None, **files: str) -> Path:
    folder = root / "graded"
    folder.mkdir(parents=True)
    (folder / "contract.yaml").write_text(CONTRACT)
    if task is not None:
        (folder / "task.yaml").write_text(task)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def rows(count: int, seed: int = 0) -> pd.DataFrame:
    """y is 3x plus noise, 5 more for kind c; the grade is y's tercile."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, count)
    kind = rng.choice(["a", "b", "c"], count)
    y = 3 * x + np.where(kind == "c", 5.0, 0.0) + rng.normal(0, 0.3, count)
    grade = np.where(y < np.quantile(y, 1 / 3), "low", np.where(y < np.quantile(y, 2 / 3), "mid", "high"))
    return pd.DataFrame({
        "id": [f"r{i}" for i in range(count)],
        "at": pd.Timestamp("2026-05-01", tz="UTC") + pd.to_timedelta(np.arange(count), unit="min"),
        "x": x, "kind": kind, "y": y, "grade": grade,
    })


# --- the declaration ------------------------------------------------------------------------------

def test_each_use_cases_task_is_what_it_declares():
    flights = load_usecase(REPO / "usecases" / "flights").task
    assert (FRAUD.task.kind, FRAUD.task.loss, FRAUD.task.early_stopping, FRAUD.task.output) == (
        "binary", "bce", "pr_auc", "fraud_probability")
    assert (flights.kind, flights.loss, flights.early_stopping, flights.output) == ("regression", "l1", "mae", "arr_delay_minutes")


def test_without_a_task_file_the_task_follows_the_first_label(tmp_path):
    task = load_usecase(usecase_folder(tmp_path)).task
    assert (task.kind, task.label, task.loss, task.early_stopping, task.output) == ("regression", "y", "huber", "mae", "y_prediction")


def test_a_string_label_with_categories_is_multiclass_with_the_contracts_classes(tmp_path):
    task = load_usecase(usecase_folder(tmp_path, "label: grade\n")).task
    assert (task.kind, task.classes, task.outputs, task.loss) == ("multiclass", ("low", "mid", "high"), 3, "cross_entropy")


@pytest.mark.parametrize("declared, problem", [
    ("task: binary\n", "a binary task needs a 0/1 label, and y is float64"),
    ("loss: bce\n", "loss 'bce' does not fit a regression task (one of: huber, l1, mse)"),
    ("early_stopping: pr_auc\n", "early_stopping 'pr_auc' is not a regression figure"),
    ("label: x\n", "label x is not one of the contract's labels (y, grade)"),
    ("task: regression\nlabel: grade\n", "a regression task needs a numeric label, and grade is string"),
    ("outputs: 2\n", "outputs is not a field of a task here"),
    ("network: nowhere.py\n", "network nowhere.py is not a file of the use case folder"),
    ("- binary\n", "must hold a mapping"),
])
def test_a_task_that_does_not_fit_its_contract_is_refused_naming_the_file_and_the_problem(tmp_path, declared, problem):
    with pytest.raises(UseCaseError) as caught:
        load_usecase(usecase_folder(tmp_path, declared))
    assert "task.yaml" in str(caught.value) and problem in str(caught.value)


# --- the inputs -----------------------------------------------------------------------------------

def test_without_inputs_py_the_default_inputs_are_the_numbers_the_times_and_the_hour(tmp_path):
    usecase = load_usecase(usecase_folder(tmp_path))
    frame = rows(50)
    spec = FeatureSpec.fit(frame, usecase)
    assert spec.numeric == ["x", "hour_sin", "hour_cos"]  # no label, no id
    assert spec.categories == [("kind", ["a", "b", "c"])]
    assert spec.code == {}
    inputs = spec.transform(frame)
    assert inputs.shape == (50, 3 + 4) and np.isfinite(inputs).all()
    np.testing.assert_allclose(inputs[:, 0], (frame["x"] - frame["x"].mean()) / frame["x"].std(ddof=0), rtol=1e-5)
    assert spec.target[0] == pytest.approx(frame["y"].mean())  # huber: centred on the mean


def test_a_model_runs_the_inputs_code_it_was_trained_with_not_the_folders_current_one(tmp_path):
    """Bug caught: a model read its inputs code from the use case folder at load time, so an edit
    after training changed what a served or evaluated model computed (silent skew)."""
    inputs = "import numpy as np\n\ndef derive(columns, fitted):\n    return {'x2': columns['x'] * 2.0}\n"
    folder = usecase_folder(tmp_path, None, **{"inputs.py": inputs})
    usecase = load_usecase(folder)
    frame = rows(200)
    spec = FeatureSpec.fit(frame, usecase)
    model = Model(build_network(spec, [4]), spec, {"hidden": [4]})
    model.save(tmp_path / "model")
    before = Model.load(tmp_path / "model").score(frame)
    (folder / "inputs.py").write_text(inputs.replace("2.0", "-7.0"))
    assert load_usecase(folder).digest != usecase.digest  # the next model's key changes...
    np.testing.assert_array_equal(Model.load(tmp_path / "model").score(frame), before)  # ...this one does not


def test_inputs_code_that_fails_names_the_file_and_the_cause(tmp_path):
    folder = usecase_folder(tmp_path, None, **{"inputs.py": "import numpy as np\nraise ValueError('no scale yet')\n"})
    with pytest.raises(UseCaseError, match=r"inputs\.py failed to import: ValueError: no scale yet"):
        FeatureSpec.fit(rows(10), load_usecase(folder))


def test_categories_must_name_a_contract_column_that_lists_them(tmp_path):
    code = "CATEGORIES = ['x']\n\ndef derive(columns, fitted):\n    return {'x': columns['x']}\n"
    folder = usecase_folder(tmp_path, None, **{"inputs.py": code})
    with pytest.raises(UseCaseError, match="CATEGORIES names x, which is not a column of the contract with categories"):
        FeatureSpec.fit(rows(10), load_usecase(folder))


# --- the same workers, three tasks ----------------------------------------------------------------

def train_with_workers(tmp_path: Path, usecase_folder_: Path, frame: pd.DataFrame, **training: object) -> Model:
    """Fit the spec as the train step does, run the DDP workers (two, gloo), load what they wrote."""
    env = {"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_TRAINING__PROCESS_GROUP_TIMEOUT_S": "30",
           "FLYWHEEL_TRAINING__TIMEOUT_S": "120"}
    env.update({f"FLYWHEEL_TRAINING__{k.upper()}": str(v) for k, v in training.items()})
    settings = load_settings(env=env)
    usecase = load_usecase(usecase_folder_)
    (tmp_path / "in").mkdir()
    data = tmp_path / "in" / "train.parquet"
    frame.to_parquet(data, row_group_size=100)
    spec = FeatureSpec.fit(frame, usecase)
    (tmp_path / "in" / "spec.json").write_text(json.dumps(spec.to_dict()))
    launch(settings, Storage.from_settings(settings), "r1", data, tmp_path / "in" / "spec.json", tmp_path / "out", tmp_path / "logs")
    hidden = [int(h) for h in settings.training.hidden]
    model = Model(build_network(spec, hidden), spec, {"hidden": hidden})
    import torch

    model.module.load_state_dict(torch.load(tmp_path / "out" / "model.pt", weights_only=True))
    model.module.eval()
    return model


def test_a_regression_model_learns_its_label_in_its_own_units(tmp_path):
    folder = usecase_folder(tmp_path, "loss: l1\n")
    model = train_with_workers(tmp_path, folder, rows(2000), epochs=8, learning_rate=0.01)
    holdout = rows(500, seed=1)
    predicted = model.score(holdout)
    median_mae = np.abs(holdout["y"] - np.median(rows(2000)["y"])).mean()
    assert np.abs(predicted - holdout["y"]).mean() < 0.25 * median_mae  # in y's units, not standardised ones
    history = [json.loads(line) for line in (tmp_path / "out" / "history.jsonl").read_text().splitlines()]
    assert all("validation_neg_mae" in epoch for epoch in history)


def test_a_multiclass_model_learns_through_the_teams_own_network(tmp_path):
    folder = usecase_folder(tmp_path, "label: grade\nnetwork: network.py\n", **{"network.py": NETWORK})
    model = train_with_workers(tmp_path, folder, rows(2000), epochs=8, learning_rate=0.01)
    assert type(model.module).__name__ == "Grader"
    holdout = rows(500, seed=1)
    probabilities = model.score(holdout)
    assert probabilities.shape == (500, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    classes = np.array(["low", "mid", "high"])
    assert (classes[probabilities.argmax(axis=1)] == holdout["grade"]).mean() > 0.8
    history = [json.loads(line) for line in (tmp_path / "out" / "history.jsonl").read_text().splitlines()]
    assert all("validation_neg_log_loss" in epoch for epoch in history)


def test_the_default_inputs_read_a_text_feature_as_text_without_tripping_on_it(tmp_path):
    """Bug caught: the default one-hot columns were looked up in the contract by every text column's
    name, so a use case whose features hold the last value of a text column failed to train."""
    folder = tmp_path / "shops"
    folder.mkdir()
    (folder / "contract.yaml").write_text(
        "columns:\n  id: {type: string}\n  at: {type: timestamp}\n  shop: {type: string}\n"
        "  colour: {type: string, categories: [red, blue]}\n  y: {type: float64}\n"
        "id: id\ntimestamp: at\nlabels: [y]\nlabel_known: {delay: P1D}\nentities: {shop: shop}\n")
    (folder / "features.yaml").write_text(
        "aggregations:\n  shop:\n    - {op: last, column: colour, window: 24h}\n    - {op: count, window: 24h}\n")
    usecase = load_usecase(folder)
    frame = rows(20)[["id", "at", "x", "y"]].assign(
        shop="s1", colour="red", shop_colour_last_24h=["blue", None] * 10, shop_count_24h=range(20))
    spec = FeatureSpec.fit(frame, usecase)
    assert "shop_colour_last_24h" in spec.texts and "shop_count_24h" in spec.numeric
    assert spec.categories == [("colour", ["red", "blue"])]
    assert spec.transform(frame).shape == (20, spec.width)
