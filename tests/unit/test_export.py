"""Serving exports: a torch.export program and an INT8 copy, loadable without unpickling code."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from flywheel.features.transform import FeatureSpec
from tests.factories import FRAUD
from flywheel.training.export import INT8_FILE, PROGRAM_FILE, compare_variants, load_int8, write_exports
from flywheel.training.model import TabularMLP, Model
from tests.unit.test_transform import frame


@pytest.fixture
def model() -> Model:
    torch.manual_seed(0)
    spec = FeatureSpec.fit(pd.concat([frame(), frame(amount=90.0), frame(amount=3.0)], ignore_index=True), FRAUD)
    return Model(TabularMLP(spec.width, [64, 32]), spec, {"hidden": [64, 32]})


def test_the_exported_program_scores_like_the_model_at_any_batch_size(model, tmp_path):
    write_exports(model, tmp_path)
    program = torch.export.load(tmp_path / PROGRAM_FILE).module()
    for batch in (1, 7, 300, 50_000):
        x = torch.randn(batch, model.spec.width)
        with torch.inference_mode():
            assert torch.allclose(program(x), model.module(x), atol=1e-6)


def test_the_program_runs_without_flywheel_installed(model, tmp_path):
    """A serving image needs torch only: loading the program must not import flywheel's classes."""
    write_exports(model, tmp_path)
    code = (
        "import sys, torch; p = torch.export.load(sys.argv[1]).module(); "
        "print(p(torch.zeros(3, int(sys.argv[2]))).shape, any(m.startswith('flywheel') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / PROGRAM_FILE), str(model.spec.width)],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "torch.Size([3]) False"


def test_the_int8_copy_loads_with_weights_only_and_stays_close(model, tmp_path):
    write_exports(model, tmp_path)
    torch.load(tmp_path / INT8_FILE, weights_only=True)  # raises on anything but tensors and containers
    int8 = load_int8(tmp_path, model.spec, [64, 32])
    x = torch.randn(500, model.spec.width)
    with torch.inference_mode():
        float_scores, int8_scores = torch.sigmoid(model.module(x)), torch.sigmoid(int8(x))
    assert (float_scores - int8_scores).abs().max() < 0.05
    assert np.corrcoef(float_scores.numpy(), int8_scores.numpy())[0, 1] > 0.99


def test_compare_variants_reports_size_latency_and_quality_of_each(model):
    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(400, model.spec.width)).astype("float32")
    with torch.inference_mode():
        logits = model.module(torch.from_numpy(inputs)).numpy()
    labels = (logits > np.quantile(logits, 0.9)).astype(int)  # the float model ranks perfectly
    figures = compare_variants(model, inputs, labels, repeats=30)
    assert set(figures) == {"float", "exported", "int8"}
    assert figures["float"]["pr_auc"] == pytest.approx(1.0)
    assert figures["exported"]["pr_auc"] == pytest.approx(1.0)
    assert 0.8 < figures["int8"]["pr_auc"] <= 1.0
    assert figures["int8"]["bytes"] < figures["float"]["bytes"]
    assert all(v["latency_us_batch1"] > 0 and v["latency_us_batch256"] > 0 for v in figures.values())
