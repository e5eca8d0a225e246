"""The fraud model (an MLP over the FeatureSpec's inputs) and how it is saved and loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from flywheel.features.transform import FeatureSpec

if TYPE_CHECKING:
    from flywheel.registry import ModelVersion, Registry

WEIGHTS_FILE = "model.pt"
CARD_FILE = "model.json"


class FraudMLP(nn.Module):
    """A small MLP that returns one logit per transaction."""

    def __init__(self, width: int, hidden: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = width
        for size in hidden:
            layers += [nn.Linear(previous, size), nn.ReLU()]
            previous = size
        layers.append(nn.Linear(previous, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each layer's forward directly rather than through nn.Module.__call__ (no hooks are used):
        # the call machinery was half the time of a one-transaction forward pass when serving.
        for layer in self.net:
            x = layer.forward(x)
        return x.squeeze(-1)


@dataclass
class FraudModel:
    """A trained model with the spec that feeds it: scores transactions joined with their features."""

    module: FraudMLP
    spec: FeatureSpec
    meta: dict[str, Any]

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        """Fraud probabilities for a frame of transactions joined with their features."""
        return self.probabilities(self.spec.transform(frame))

    def probabilities(self, inputs: np.ndarray) -> np.ndarray:
        """Fraud probabilities for a matrix of model inputs (from the spec's transform): one forward pass."""
        with torch.inference_mode():
            return torch.sigmoid(self.module(torch.from_numpy(inputs))).numpy().astype("float64")

    def save(self, folder: str | Path) -> list[Path]:
        """Write the weights and the model card (architecture, spec, training facts) into a folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.module.state_dict(), folder / WEIGHTS_FILE)
        card = {"hidden": self.meta["hidden"], "spec": self.spec.to_dict(), "meta": self.meta}
        (folder / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
        return [folder / WEIGHTS_FILE, folder / CARD_FILE]

    @classmethod
    def load(cls, folder: str | Path) -> "FraudModel":
        """Load a model saved by :meth:`save` (weights only: no pickled code is executed)."""
        folder = Path(folder)
        card = json.loads((folder / CARD_FILE).read_text())
        spec = FeatureSpec.from_dict(card["spec"])
        module = FraudMLP(spec.width, card["hidden"])
        module.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        module.eval()
        return cls(module, spec, card["meta"])


def load_version(registry: "Registry", version: "str | ModelVersion", cache_dir: str | Path | None = None) -> FraudModel:
    """A registered version as a model: its files downloaded and verified by the registry, then loaded."""
    _, folder = registry.download(version, cache_dir)
    return FraudModel.load(folder)
