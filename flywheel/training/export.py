"""Serving exports of a trained model: a `torch.export` program and an INT8 dynamically quantized copy.

Three forms of one model, each loadable without unpickling arbitrary objects:

- the float weights (``model.pt``, ``torch.load(weights_only=True)``) with the model card;
- ``model.pt2``: a `torch.export` program of the MLP over the model's input matrix (batch size
  dynamic), loadable with ``torch.export.load`` without flywheel's Python classes;
- ``model_int8.pt``: the state dict of an INT8 dynamically quantized copy (Linear layers in int8,
  activations quantized on the fly), loadable with ``weights_only=True`` into
  :func:`quantized_module`.

:func:`compare_variants` measures each form's size, latency and PR-AUC side by side (a binary model).
"""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn

from flywheel.features.transform import FeatureSpec
from flywheel.training.model import Model, build_network

PROGRAM_FILE = "model.pt2"
INT8_FILE = "model_int8.pt"


def export_program(module: nn.Module, width: int) -> torch.export.ExportedProgram:
    """The module as a `torch.export` program taking a (batch, width) float32 matrix."""
    example = (torch.zeros(2, width, dtype=torch.float32),)
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(module.eval(), example, dynamic_shapes={"x": {0: batch}})


def quantized_module(module: nn.Module) -> nn.Module:
    """An INT8 dynamically quantized copy of the module (its Linear layers)."""
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; it is still the one in this torch.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(module.eval(), {nn.Linear}, dtype=torch.qint8)


def write_exports(model: Model, folder: str | Path) -> list[Path]:
    """Write the program and the INT8 state dict next to the float weights; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.export.save(export_program(model.module, model.spec.width), folder / PROGRAM_FILE)
    torch.save(quantized_module(model.module).state_dict(), folder / INT8_FILE)
    return [folder / PROGRAM_FILE, folder / INT8_FILE]


def load_int8(folder: str | Path, spec: FeatureSpec, hidden: list[int]) -> nn.Module:
    """The INT8 model from its state dict (``weights_only=True``: no arbitrary unpickling)."""
    module = quantized_module(build_network(spec, hidden))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module.load_state_dict(torch.load(Path(folder) / INT8_FILE, map_location="cpu", weights_only=True))
    return module.eval()


def _size(obj: Any, save: Any) -> int:
    buffer = io.BytesIO()
    save(obj, buffer)
    return len(buffer.getvalue())


def _latency_us(forward: Any, inputs: torch.Tensor, repeats: int) -> float:
    """Median microseconds per call of ``forward(inputs)`` (after a warm-up), one thread."""
    with torch.inference_mode():
        for _ in range(20):
            forward(inputs)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            forward(inputs)
            times.append(time.perf_counter() - started)
    return float(np.median(times) * 1e6)


def compare_variants(model: Model, inputs: np.ndarray, labels: np.ndarray, repeats: int = 300) -> dict[str, dict[str, float]]:
    """Size (bytes), latency (µs per call, batch 1 and 256) and PR-AUC/ROC-AUC of the float model,
    its exported program and its INT8 copy, on the same input matrix."""
    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    program = export_program(model.module, model.spec.width)
    int8 = quantized_module(model.module)
    variants = {
        "float": (model.module, _size(model.module.state_dict(), torch.save)),
        "exported": (program.module(), _size(program, torch.export.save)),
        "int8": (int8, _size(int8.state_dict(), torch.save)),
    }
    out = {}
    for name, (forward, size) in variants.items():
        with torch.inference_mode():
            scores = torch.sigmoid(forward(x).reshape(-1)).numpy()
        out[name] = {
            "bytes": float(size),
            "latency_us_batch1": _latency_us(forward, x[:1], repeats),
            "latency_us_batch256": _latency_us(forward, x[:256], max(20, repeats // 10)),
            "pr_auc": float(average_precision_score(labels, scores)),
            "roc_auc": float(roc_auc_score(labels, scores)),
        }
    return out
