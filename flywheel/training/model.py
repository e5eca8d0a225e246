"""A use case's model: a network over the FeatureSpec's inputs, its task, and how it is saved and loaded.

The network is the platform's MLP, or the use case's own ``torch.nn.Module`` from the factory its
task names (``network: network.py`` defining ``build(width, outputs, hidden)``); the spec carries that
file's source, so a saved model loads with the code it was trained with. Predictions are in the
task's terms: a probability per row (binary), a probability per class (multiclass, rows x classes),
the label in its own units (regression).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from flywheel.errors import UseCaseError
from flywheel.features.transform import FeatureSpec, import_code

if TYPE_CHECKING:
    from flywheel.registry import ModelVersion, Registry

WEIGHTS_FILE = "model.pt"
CARD_FILE = "model.json"


class TabularMLP(nn.Module):
    """A small MLP: one output per row (a logit, or a scaled regression value), or one per class."""

    def __init__(self, width: int, hidden: list[int], outputs: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = width
        for size in hidden:
            layers += [nn.Linear(previous, size), nn.ReLU()]
            previous = size
        layers.append(nn.Linear(previous, outputs))
        self.net = nn.Sequential(*layers)
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each layer's forward directly rather than through nn.Module.__call__ (no hooks are used):
        # the call machinery was half the time of a one-row forward pass when serving.
        for layer in self.net:
            x = layer.forward(x)
        return x.squeeze(-1) if self.outputs == 1 else x


def build_network(spec: FeatureSpec, hidden: list[int]) -> nn.Module:
    """The task's network for the spec's input width: the use case's factory when its task names one,
    else :class:`TabularMLP`."""
    task = spec.objective
    if task.network is None:
        return TabularMLP(spec.width, hidden, task.outputs)
    module = import_code(spec.code, task.network)
    factory = getattr(module, "build", None)
    if not callable(factory):
        raise UseCaseError(f"the use case's {task.network} defines no build(width, outputs, hidden) function")
    network = factory(spec.width, task.outputs, list(hidden))
    if not isinstance(network, nn.Module):
        raise UseCaseError(f"{task.network}: build() returned {type(network).__name__}, not a torch.nn.Module")
    return network


def output_layer(network: nn.Module) -> nn.Linear | None:
    """The last linear layer (its bias starts at the base rate or class priors), if the network has one."""
    last = None
    for module in network.modules():
        if isinstance(module, nn.Linear):
            last = module
    return last


def predictions(spec: FeatureSpec, raw: torch.Tensor) -> np.ndarray:
    """The network's raw outputs in the task's terms (float64)."""
    task = spec.objective
    if task.kind == "binary":
        return torch.sigmoid(raw).numpy().astype("float64")
    if task.kind == "multiclass":
        return torch.softmax(raw.float(), dim=-1).numpy().astype("float64")
    centre, scale = spec.target
    return raw.numpy().astype("float64") * scale + centre


@dataclass
class Model:
    """A trained network with the spec that feeds it."""

    module: nn.Module
    spec: FeatureSpec
    meta: dict[str, Any]

    @property
    def task(self):
        return self.spec.objective

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        """Predictions for a frame of rows joined with their features."""
        return self.predict(self.spec.transform(frame))

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Predictions for a matrix of model inputs (from the spec's transform): one forward pass."""
        with torch.inference_mode():
            return predictions(self.spec, self.module(torch.from_numpy(inputs)))

    def save(self, folder: str | Path) -> list[Path]:
        """Write the weights and the model card (architecture, spec with its code, training facts)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.module.state_dict(), folder / WEIGHTS_FILE)
        card = {"hidden": self.meta["hidden"], "spec": self.spec.to_dict(), "meta": self.meta}
        (folder / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
        return [folder / WEIGHTS_FILE, folder / CARD_FILE]

    @classmethod
    def load(cls, folder: str | Path) -> "Model":
        """Load a model saved by :meth:`save`: the weights as tensors only (no pickle runs); the use
        case's inputs and network code from the card, as trained (registry files are sha256-checked)."""
        folder = Path(folder)
        card = json.loads((folder / CARD_FILE).read_text())
        spec = FeatureSpec.from_dict(card["spec"])
        module = build_network(spec, card["hidden"])
        module.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        module.eval()
        return cls(module, spec, card["meta"])


def load_version(registry: "Registry", version: "str | ModelVersion", cache_dir: str | Path | None = None) -> Model:
    """A registered version as a model: its files downloaded and verified by the registry, then loaded."""
    _, folder = registry.download(version, cache_dir)
    return Model.load(folder)
