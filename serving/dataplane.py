"""KServe's data plane (shared by the REST and gRPC servers) with what flywheel's server really offers.

KServe's server metadata claims ``model_repository_extension`` for every server, and its model
metadata has no versions. flywheel's server claims only the protocol extensions it serves (the
binary tensor data extension, over REST; no model repository: no caller may load or unload the
model), and a model's metadata names the version it serves; its inputs and outputs come from the
model itself (:meth:`serving.predictor.Predictor.get_input_types`).
"""

from __future__ import annotations

from typing import Any

from kserve.protocol.dataplane import DataPlane

# Open Inference Protocol extensions this server serves, by the names Triton's server metadata uses.
EXTENSIONS = ["binary_tensor_data"]


class FlywheelDataPlane(DataPlane):
    def metadata(self) -> dict[str, Any]:
        return dict(super().metadata(), extensions=list(EXTENSIONS))

    async def model_metadata(self, model_name: str) -> dict[str, Any]:
        metadata = await super().model_metadata(model_name)
        version = getattr(self.get_model_from_registry(model_name), "version", None)
        metadata["versions"] = [str(version)] if version is not None else []
        return metadata
