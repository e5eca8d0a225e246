"""The fraud predictor: a `kserve.Model` that joins each transaction with its online features.

A request carries transactions; the card's and merchant's features come from the Feast online
store; the production model (from the registry) returns the fraud probability. Client mistakes
raise `InvalidInput` (HTTP 400).
"""

from __future__ import annotations

import logging
from typing import Any

import kserve
import pandas as pd
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from flywheel.config import Settings
from flywheel.errors import RegistryError
from flywheel.features.build import world_of_model
from flywheel.features.store import online_features, open_served_store
from flywheel.registry import Registry
from flywheel.storage import Storage
from flywheel.training.model import load_version
from serving.requests import json_body, transactions_frame, v1_instances, v2_instances

log = logging.getLogger(__name__)


class FraudPredictor(kserve.Model):
    """Scores card transactions with the registry's production model and Feast online features."""

    def __init__(self, name: str, settings: Settings) -> None:
        super().__init__(name)
        self.settings = settings
        self.model: Any = None
        self.store: Any = None
        self.version: str | None = None
        self.world: str | None = None

    def load(self) -> bool:
        """Load the production model and open the online store of its feature world (the features
        it was trained with); ready only once both are there."""
        import torch

        torch.set_num_threads(self.settings.serving.torch_threads)
        storage = Storage.from_settings(self.settings)
        registry = Registry(storage, self.settings.model_name)
        production = registry.production()
        if production is None:
            raise RegistryError(
                f"model {self.settings.model_name!r} has no production version yet: run `flywheel run` first"
            )
        self.model = load_version(registry, production, cache_dir=self.settings.home / "serving" / "models")
        self.version = production.version
        self.world = world_of_model(storage, production.meta)
        self.store = open_served_store(self.settings, self.world)
        self.ready = True
        log.info("loaded %s version %s", self.name, self.version)
        return self.ready

    def score(self, transactions: pd.DataFrame) -> list[float]:
        """Fraud probabilities for validated transactions, with their current online features."""
        keys = [{"card_id": c, "merchant_id": m} for c, m in zip(transactions["card_id"], transactions["merchant_id"])]
        features = pd.DataFrame(online_features(self.store, keys)).drop(columns=["card_id", "merchant_id"])
        frame = pd.concat([transactions.reset_index(drop=True), features.reset_index(drop=True)], axis=1)
        return [float(p) for p in self.model.score(frame)]

    def predict(self, payload: dict | bytes | InferRequest, headers: dict[str, str] | None = None) -> dict | InferResponse:
        payload = json_body(payload)
        if isinstance(payload, InferRequest):
            probabilities = self.score(transactions_frame(v2_instances(payload)))
            output = InferOutput(name="fraud_probability", shape=[len(probabilities)], datatype="FP32", data=probabilities)
            return InferResponse(
                response_id=payload.id or "", model_name=self.name, model_version=self.version, infer_outputs=[output]
            )
        if isinstance(payload, dict):
            probabilities = self.score(transactions_frame(v1_instances(payload)))
            return {"predictions": [{"fraud_probability": p, "model_version": self.version} for p in probabilities]}
        raise InvalidInput(f"unsupported request body of type {type(payload).__name__}")
